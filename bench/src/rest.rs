//! The `rest` scenario: HTTP publishes over keep-alive HTTP/1.1 connections, flat out, into
//! the gateway (`POST /v1/exchanges/amq.default/publish` into a length-limited queue), into
//! the framework's ceiling — an axum handler that parses the same JSON body and answers, served
//! by this binary in a process of its own (`--serve-ceiling`) so it pays what the gateway pays
//! for its process and sockets — and into RabbitMQ's management API (`POST
//! /api/exchanges/{vhost}/amq.default/publish`, the same queue cap). Requests answered per
//! second; anything but 200 counts as refused.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{Args, Target};

/// Keep-alive connections, each with one request in flight (as the peers' README baseline).
pub const CONNECTIONS: usize = 16;

/// Serves the ceiling on `addr` (port 0 works), printing the bound address; never returns.
pub async fn serve_ceiling(addr: &str) -> Result<(), String> {
    use axum::routing::post;
    async fn publish(
        axum::extract::Path(_exchange): axum::extract::Path<String>,
        axum::Json(body): axum::Json<Value>,
    ) -> axum::Json<Value> {
        // Touch what the gateway must read, so the parse is not optimised away.
        let routed = body.get("routing_key").is_some() && body.get("body").is_some();
        axum::Json(json!({ "routed": routed }))
    }
    let app = axum::Router::new().route("/v1/exchanges/{exchange}/publish", post(publish));
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| e.to_string())?;
    let bound = listener.local_addr().map_err(|e| e.to_string())?;
    println!("ceiling listening on {bound}");
    axum::serve(listener, app).await.map_err(|e| e.to_string())
}

/// What one run of the load answered.
pub struct Answered {
    pub per_second: f64,
    pub refused: u64,
}

/// Where a publish goes and how it is said.
#[derive(Clone)]
pub enum Api {
    /// The gateway's REST publish (or the ceiling, which takes the same request), with a token.
    Gateway { base: String, token: Option<String> },
    /// RabbitMQ's management API, as guest.
    Rabbit { base: String },
}

impl Api {
    fn publish(
        &self,
        http: &reqwest::Client,
        queue: &str,
        payload: usize,
    ) -> reqwest::RequestBuilder {
        let body = "x".repeat(payload);
        match self {
            Api::Gateway { base, token } => {
                let req = http
                    .post(format!("{base}/v1/exchanges/amq.default/publish"))
                    .header("content-type", "application/json")
                    .body(json!({ "routing_key": queue, "body": body }).to_string());
                match token {
                    Some(t) => req.bearer_auth(t),
                    None => req,
                }
            }
            Api::Rabbit { base } => http
                .post(format!("{base}/api/exchanges/%2f/amq.default/publish"))
                .basic_auth("guest", Some("guest"))
                .header("content-type", "application/json")
                .body(
                    json!({ "routing_key": queue, "payload": body, "payload_encoding": "string", "properties": {} })
                        .to_string(),
                ),
        }
    }

    /// Declares the target queue, capped so a long run does not grow it (`x-max-length`: the
    /// oldest are dropped). The ceiling has nothing to declare.
    pub async fn declare(&self, queue: &str) -> Result<(), String> {
        let http = reqwest::Client::new();
        let args = json!({ "durable": false, "arguments": { "x-max-length": 10_000 } });
        let req = match self {
            Api::Gateway { token: None, .. } => return Ok(()),
            Api::Gateway {
                base,
                token: Some(t),
            } => http.put(format!("{base}/v1/queues/{queue}")).bearer_auth(t),
            Api::Rabbit { base } => http
                .put(format!("{base}/api/queues/%2f/{queue}"))
                .basic_auth("guest", Some("guest")),
        };
        let r = req.json(&args).send().await.map_err(|e| e.to_string())?;
        if r.status().is_success() {
            Ok(())
        } else {
            Err(format!("declare {queue}: {}", r.status()))
        }
    }
}

/// `CONNECTIONS` keep-alive clients posting publishes of `payload` bytes through `api` for
/// `duration` after a second of warm-up.
pub async fn load(
    api: &Api,
    queue: &str,
    payload: usize,
    duration: Duration,
) -> Result<Answered, String> {
    let http = reqwest::Client::builder()
        .http1_only()
        .pool_max_idle_per_host(CONNECTIONS)
        .timeout(Duration::from_secs(10))
        .build()
        .map_err(|e| e.to_string())?;
    let (ok, refused) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = Vec::new();
    for _ in 0..CONNECTIONS {
        let (http, api, queue) = (http.clone(), api.clone(), queue.to_owned());
        let (ok, refused, stop) = (ok.clone(), refused.clone(), stop.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match api.publish(&http, &queue, payload).send().await {
                    Ok(r) if r.status() == 200 => {
                        // Read the answer whole, so the connection is kept.
                        let _ = r.bytes().await;
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(r) => {
                        let _ = r.bytes().await;
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(_) => {
                        refused.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (before, refused_before) = (ok.load(Ordering::Relaxed), refused.load(Ordering::Relaxed));
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    let answered = ok.load(Ordering::Relaxed) - before;
    let elapsed = started.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    Ok(Answered {
        per_second: answered as f64 / elapsed,
        refused: refused.load(Ordering::Relaxed) - refused_before,
    })
}

/// REST publish against the framework's ceiling and RabbitMQ's management API (when
/// `--rabbit-http`): answered requests per second, median of the runs, and the ratios.
pub async fn report(args: &Args, gateway: &Target) -> Result<(), String> {
    let http = args.gateway_http.clone().ok_or("needs --gateway-http")?;
    let ceiling = args.ceiling_http.clone().ok_or("needs --ceiling-http")?;
    let token = gateway
        .password
        .clone()
        .ok_or("needs the gateway's token")?;
    let mut apis = vec![
        (
            "gateway REST publish",
            Api::Gateway {
                base: http,
                token: Some(token),
            },
        ),
        (
            "axum JSON handler (ceiling)",
            Api::Gateway {
                base: ceiling,
                token: None,
            },
        ),
    ];
    if let Some(base) = args.rabbit_http.clone() {
        apis.push(("RabbitMQ management API publish", Api::Rabbit { base }));
    }
    let queue = format!("bench-rest-{}", std::process::id());
    for (_, api) in &apis {
        api.declare(&queue).await?;
    }
    let mut cells = Vec::new();
    for (_, api) in &apis {
        let (mut rates, mut refused) = (Vec::new(), 0);
        for _ in 0..args.runs {
            let a = load(api, &queue, args.payload, args.duration).await?;
            rates.push(a.per_second);
            refused += a.refused;
        }
        cells.push((crate::median(rates), refused));
    }
    println!(
        "\nHTTP publish, HTTP/1.1 keep-alive, {} connections with one request each in flight, {} B bodies, median of {} runs of {:?}\n",
        CONNECTIONS, args.payload, args.runs, args.duration
    );
    let names: Vec<&str> = apis.iter().map(|(n, _)| *n).collect();
    let mut header = format!("| {} |", names.join(" | "));
    for other in &names[1..] {
        header.push_str(&format!(
            " gateway vs {} |",
            other.split(' ').next().unwrap_or(other)
        ));
    }
    println!("{header}");
    println!("|{}", "---|".repeat(names.len() * 2 - 1));
    for ((name, _), (rate, _)) in apis.iter().zip(&cells) {
        crate::report::record("HTTP publish", name, *rate, "msg/s");
    }
    let mut row = String::from("|");
    for (rate, refused) in &cells {
        row.push_str(&format!(" {:.1}k/s, {refused} refused |", rate / 1000.0));
    }
    for (rate, _) in &cells[1..] {
        let ratio = if *rate > 0.0 { cells[0].0 / rate } else { 0.0 };
        row.push_str(&format!(" {ratio:.2} |"));
    }
    println!("{row}");
    Ok(())
}
