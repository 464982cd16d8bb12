//! The bench binary: MQTT 3.1.1 load against several brokers in one run, so the gateway is
//! always compared with a peer measured on the same machine at the same moment. Scenarios
//! mirror `../shared/peers/README.md`: 1→1 QoS 0 and QoS 1, 1→50 fan-out, 50→1 fan-in
//! (deliveries per second), and latency at a fixed 5 000 msg/s. Tables of their own: durable
//! and AMQP scenarios against RabbitMQ, WebSocket fan-out and idle memory (`ws.rs`), HTTP
//! publish against the framework's ceiling and RabbitMQ's management API (`rest.rs`), the soak.
//! `bench/run.sh` starts the gateway and the peers and passes their addresses.
//!
//!     bench --target gateway=127.0.0.1:1884@TOKEN --target mosquitto=127.0.0.1:18831

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

mod count;
mod durable;
mod hop;
mod pipelined;
mod report;
mod rest;
mod soak;
mod ws;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, NetworkOptions, Packet, QoS};
use tokio::sync::Mutex;

#[derive(Parser)]
struct Args {
    /// `NAME=HOST:PORT[@PASSWORD]`; the first one is the base of the ratios.
    #[arg(long = "target", required_unless_present_any = ["serve_ceiling", "chart"])]
    targets: Vec<String>,
    /// Serve the `rest` scenario's ceiling (an axum JSON POST handler) on this address, and
    /// nothing else.
    #[arg(long)]
    serve_ceiling: Option<String>,
    /// Draw the figures recorded in this file (`BENCH_RESULTS` of earlier runs) into
    /// `--chart-out`, and nothing else.
    #[arg(long, requires = "chart_out")]
    chart: Option<std::path::PathBuf>,
    #[arg(long)]
    chart_out: Option<std::path::PathBuf>,
    /// The ceiling's base URL, for the `rest` scenario.
    #[arg(long)]
    ceiling_http: Option<String>,
    /// RabbitMQ's management API base URL (guest), the `rest` scenario's peer.
    #[arg(long)]
    rabbit_http: Option<String>,
    /// `NAME=KIND,URL,PUBLISHER` (KIND `json` or `mqtt`; PUBLISHER a `--target` name): the
    /// WebSocket scenarios' targets, the first one the base of the ratios.
    #[arg(long = "ws-target")]
    ws_targets: Vec<String>,
    /// Subscribers of the `wsfanout` scenario.
    #[arg(long, default_value_t = 1000)]
    ws_subscribers: usize,
    /// Measured time per scenario (after a one-second warm-up).
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    duration: Duration,
    #[arg(long, default_value_t = 64)]
    payload: usize,
    /// Runs per scenario and target; the median is reported.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Throughput scenarios (`qos0`, `qos1`, `fanout`, `fanin`) run with rumqttc; with
    /// `-pipelined` appended (`qos1-pipelined`) with the [`pipelined`] client instead.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "qos0,qos1,fanout,fanin,latency,idle"
    )]
    scenarios: Vec<String>,
    /// `NAME=PID` of a target's process, for the memory scenario (`idle`).
    #[arg(long = "pid")]
    pids: Vec<String>,
    /// Connections the `idle` scenario opens.
    #[arg(long, default_value_t = 1000)]
    idle_connections: usize,
    /// The gateway's REST base URL, for the `durable` scenario (its token: the first target's
    /// password).
    #[arg(long)]
    gateway_http: Option<String>,
    /// RabbitMQ's AMQP URL, the `durable`, `hop` and `amqp` scenarios' peer.
    #[arg(long)]
    amqp: Option<String>,
    /// The gateway's AMQP listener as a URL with a token as the password (`amqp` scenario).
    #[arg(long)]
    gateway_amqp: Option<String>,
    /// Publisher counts of the `durable` scenario.
    #[arg(long, value_delimiter = ',', default_value = "1,16,128")]
    publishers: Vec<usize>,
}

#[derive(Clone)]
struct Target {
    name: String,
    host: String,
    port: u16,
    password: Option<String>,
    pid: Option<u32>,
}

fn parse_target(s: &str) -> Result<Target, String> {
    let (name, rest) = s
        .split_once('=')
        .ok_or("expected NAME=HOST:PORT[@PASSWORD]")?;
    let (addr, password) = match rest.split_once('@') {
        Some((a, p)) => (a, Some(p.to_owned())),
        None => (rest, None),
    };
    let (host, port) = addr.rsplit_once(':').ok_or("expected HOST:PORT")?;
    Ok(Target {
        name: name.to_owned(),
        host: host.to_owned(),
        port: port.parse().map_err(|_| format!("bad port in {s}"))?,
        password,
        pid: None,
    })
}

/// Resident memory of a process, in KiB (Linux).
fn rss_kib(pid: u32) -> Result<u64, String> {
    status_kib(pid, "VmRSS")
}

/// The anonymous part of a process's resident memory, in KiB (Linux): its heap and stacks,
/// without the pages of its executable and libraries. What a connection costs: the first
/// connections of a run page in the code they run (about 0.4–1 MiB of the gateway's
/// executable, read once and shared), which `VmRSS` charged to them (docs/bench.md,
/// 2026-12-07 (morning)).
fn anon_kib(pid: u32) -> Result<u64, String> {
    status_kib(pid, "RssAnon")
}

fn status_kib(pid: u32, field: &str) -> Result<u64, String> {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).map_err(|e| e.to_string())?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .ok_or_else(|| format!("no {field} for {pid}"))
}

/// CPU time a process has used, user and system, in seconds (Linux: `/proc` counts in
/// USER_HZ, 100 on every Linux ABI).
fn cpu_seconds(pid: u32) -> Result<f64, String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).map_err(|e| e.to_string())?;
    // The command name may hold spaces and parentheses: fields are counted after its last `)`,
    // where the line's third field (the state) comes first; utime and stime are its 14th and 15th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest.split_whitespace().collect())
        .unwrap_or_default();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .ok_or_else(|| format!("no CPU times for {pid}"))
    };
    Ok((ticks(11)? + ticks(12)?) as f64 / 100.0)
}

/// `n` clients connected, each with one QoS 1 subscription, as idle devices would be: the
/// broker's anonymous resident memory grown per connection, in KiB.
async fn idle(t: &Target, args: &Args) -> Result<f64, String> {
    let pid = t.pid.ok_or("needs --pid NAME=PID")?;
    let before = anon_kib(pid)?;
    let seen = Arc::new(Seen::default());
    let mut clients = Vec::new();
    for i in 0..args.idle_connections {
        let topic = format!("bench/idle/{}/{i}", std::process::id());
        clients.push(subscriber(t, &topic, QoS::AtLeastOnce, seen.clone(), false, None).await?);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let after = anon_kib(pid)?;
    for c in clients {
        let _ = c.disconnect().await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    Ok(after.saturating_sub(before) as f64 / args.idle_connections as f64)
}

static NEXT_ID: AtomicU64 = AtomicU64::new(0);

/// A number unique in this process (client ids, topics).
fn next_id() -> u64 {
    NEXT_ID.fetch_add(1, Ordering::Relaxed)
}

fn options(t: &Target) -> MqttOptions {
    let id = format!("bench-{}-{}", std::process::id(), next_id());
    let mut o = MqttOptions::new(id, t.host.clone(), t.port);
    o.set_keep_alive(Duration::from_secs(30));
    o.set_max_packet_size(1 << 20, 1 << 20);
    o.set_inflight(100);
    if let Some(p) = &t.password {
        o.set_credentials("bench", p.clone());
    }
    o
}

/// The latency scenario's clients write each packet at once. rumqttc leaves Nagle's algorithm
/// on, which holds a small write back while an earlier one is unacknowledged: on one VM every
/// broker measured 12–13 ms p50 through it, where a paho-mqtt client (which sets TCP_NODELAY)
/// measured 0.2 ms against the same Mosquitto (docs/bench.md, 2026-12-03). Throughput
/// scenarios keep the default, as the earlier figures were measured.
fn no_delay(ev: &mut EventLoop) {
    let mut network = NetworkOptions::new();
    network.set_tcp_nodelay(true);
    ev.set_network_options(network);
}

async fn until_connected(ev: &mut EventLoop) -> Result<(), String> {
    loop {
        match ev.poll().await {
            Ok(Event::Incoming(Packet::ConnAck(_))) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
}

/// What subscribers saw: deliveries, and latencies (µs) when payloads carry a send time.
#[derive(Default)]
struct Seen {
    count: AtomicU64,
    latencies: Mutex<Vec<u64>>,
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

async fn subscriber(
    t: &Target,
    topic: &str,
    qos: QoS,
    seen: Arc<Seen>,
    timed: bool,
    numbered: Option<Arc<count::Received>>,
) -> Result<AsyncClient, String> {
    let (client, mut ev) = AsyncClient::new(options(t), 10_000);
    if timed {
        no_delay(&mut ev);
    }
    until_connected(&mut ev).await?;
    client
        .subscribe(topic, qos)
        .await
        .map_err(|e| e.to_string())?;
    loop {
        match ev.poll().await {
            Ok(Event::Incoming(Packet::SubAck(_))) => break,
            Ok(_) => {}
            Err(e) => return Err(e.to_string()),
        }
    }
    tokio::spawn(async move {
        while let Ok(event) = ev.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                seen.count.fetch_add(1, Ordering::Relaxed);
                if let Some(numbered) = &numbered {
                    numbered.record(&p.payload);
                }
                if timed && p.payload.len() >= 8 {
                    let sent = u64::from_be_bytes(p.payload[..8].try_into().unwrap_or([0; 8]));
                    seen.latencies
                        .lock()
                        .await
                        .push(now_micros().saturating_sub(sent));
                }
            }
        }
    });
    Ok(client)
}

/// `timed`: its send times are measured ([`no_delay`]).
async fn publisher(t: &Target, timed: bool) -> Result<AsyncClient, String> {
    let (client, mut ev) = AsyncClient::new(options(t), 1_000);
    if timed {
        no_delay(&mut ev);
    }
    until_connected(&mut ev).await?;
    tokio::spawn(async move { while ev.poll().await.is_ok() {} });
    Ok(client)
}

/// One throughput run: deliveries per second during the window, what the whole run lost, and
/// the broker's CPU time per delivered message during the window (µs; with `--pid`).
struct Run {
    rate: f64,
    loss: count::Loss,
    cpu_us: Option<f64>,
}

/// The load generator of a throughput scenario.
#[derive(Clone, Copy, PartialEq)]
enum Client {
    /// rumqttc: a system call per packet sent.
    Rumqttc,
    /// [`pipelined`]: a window of packets per system call.
    Pipelined,
}

/// A throughput scenario: who publishes to whom, at which QoS, through which client.
#[derive(Clone, Copy)]
struct Shape {
    pubs: usize,
    subs: usize,
    qos: QoS,
    client: Client,
}

impl Shape {
    /// The throughput scenario `NAME[-pipelined]`, if `scenario` is one.
    fn of(scenario: &str) -> Option<Shape> {
        let (name, client) = match scenario.strip_suffix("-pipelined") {
            Some(name) => (name, Client::Pipelined),
            None => (scenario, Client::Rumqttc),
        };
        let (pubs, subs, qos) = match name {
            "qos0" => (1, 1, QoS::AtMostOnce),
            "qos1" => (1, 1, QoS::AtLeastOnce),
            "fanout" => (1, 50, QoS::AtMostOnce),
            "fanin" => (50, 1, QoS::AtMostOnce),
            _ => return None,
        };
        Some(Shape {
            pubs,
            subs,
            qos,
            client,
        })
    }
}

/// `pubs` publishers flat out to `subs` subscribers of one topic (numbered payloads, loss
/// counted after a drain).
async fn throughput(
    t: &Target,
    args: &Args,
    Shape {
        pubs,
        subs,
        qos,
        client,
    }: Shape,
) -> Result<Run, String> {
    let topic = format!("bench/{}/{}", std::process::id(), next_id());
    let seen = Arc::new(Seen::default());
    let mut clients = Vec::new();
    let (mut pipelined_subs, mut pipelined_pubs) = (Vec::new(), Vec::new());
    let mut received = Vec::new();
    for _ in 0..subs {
        let numbered = Arc::new(count::Received::default());
        received.push(numbered.clone());
        if client == Client::Pipelined {
            let sub = pipelined::subscriber(t, &topic, qos, seen.clone(), numbered).await?;
            pipelined_subs.push(sub);
        } else {
            clients.push(subscriber(t, &topic, qos, seen.clone(), false, Some(numbered)).await?);
        }
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut sent = Vec::new();
    for index in 0..pubs {
        let tally = Arc::new(count::Sent::default());
        sent.push(tally.clone());
        let (stop, topic, size) = (stop.clone(), topic.clone(), args.payload);
        if client == Client::Pipelined {
            let task = pipelined::publisher(t, topic, qos, index as u32, size, tally, stop);
            pipelined_pubs.push(task.await?);
            continue;
        }
        let client = publisher(t, false).await?;
        clients.push(client.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let seq = tally.count();
                let payload = count::payload(index as u32, seq, size);
                if client.publish(&topic, qos, false, payload).await.is_err() {
                    break;
                }
                tally.next();
            }
        });
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cpu = || t.pid.and_then(|pid| cpu_seconds(pid).ok());
    let (before, cpu_before) = (seen.count.load(Ordering::Relaxed), cpu());
    let started = Instant::now();
    tokio::time::sleep(args.duration).await;
    let delivered = seen.count.load(Ordering::Relaxed) - before;
    let rate = delivered as f64 / started.elapsed().as_secs_f64();
    let cpu_us = match (cpu_before, cpu()) {
        (Some(a), Some(b)) if delivered > 0 => Some((b - a) * 1e6 / delivered as f64),
        _ => None,
    };
    stop.store(true, Ordering::Relaxed);
    drain(&seen.count).await;
    // Their tallies are final once they stopped (a pipelined QoS 1 publisher waits for its
    // window's acks first, at most ten seconds).
    for task in pipelined_pubs {
        let _ = tokio::time::timeout(Duration::from_secs(11), task).await;
    }
    let loss = count::Loss::of(&sent, &received);
    for c in clients {
        let _ = c.disconnect().await;
    }
    for sub in pipelined_subs {
        sub.close().await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    Ok(Run { rate, loss, cpu_us })
}

/// What `counter` counted per second over `duration`, after a one-second warm-up.
async fn rate_over(counter: &AtomicU64, duration: Duration) -> f64 {
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = counter.load(Ordering::Relaxed);
    let started = Instant::now();
    tokio::time::sleep(duration).await;
    (counter.load(Ordering::Relaxed) - before) as f64 / started.elapsed().as_secs_f64()
}

/// Waits until deliveries stop (a second without one, at most thirty seconds): what is still
/// in flight after that counts as lost. A target that slows its publishers (the gateway's
/// pacing, TCP backpressure) holds their backlog in parked input and socket buffers when the
/// run stops — tens of megabytes over 50 connections — so half a second without a delivery
/// or ten seconds in all counted messages still on their way (up to 17 % in 50→1).
async fn drain(delivered: &AtomicU64) {
    let until = Instant::now() + Duration::from_secs(30);
    let mut last = delivered.load(Ordering::Relaxed);
    while Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(1000)).await;
        let now = delivered.load(Ordering::Relaxed);
        if now == last {
            return;
        }
        last = now;
    }
}

/// One publisher at a fixed 5 000 msg/s QoS 0 to one subscriber: (p50, p99, max) in ms.
async fn latency(t: &Target, args: &Args) -> Result<(f64, f64, f64), String> {
    const RATE: u64 = 5_000;
    let topic = format!("bench/{}/lat{}", std::process::id(), next_id());
    let seen = Arc::new(Seen::default());
    let sub = subscriber(t, &topic, QoS::AtMostOnce, seen.clone(), true, None).await?;
    let client = publisher(t, true).await?;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    let per_tick = RATE / 1000;
    let warm_until = Instant::now() + Duration::from_secs(1);
    let end = warm_until + args.duration;
    let mut warm = true;
    while Instant::now() < end {
        tick.tick().await;
        if warm && Instant::now() >= warm_until {
            warm = false;
            seen.latencies.lock().await.clear();
        }
        for _ in 0..per_tick {
            let mut payload = now_micros().to_be_bytes().to_vec();
            payload.resize(args.payload.max(8), b'x');
            client
                .publish(&topic, QoS::AtMostOnce, false, payload)
                .await
                .map_err(|e| e.to_string())?;
        }
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut l = std::mem::take(&mut *seen.latencies.lock().await);
    let _ = client.disconnect().await;
    let _ = sub.disconnect().await;
    if l.is_empty() {
        return Err("nothing received".into());
    }
    l.sort_unstable();
    let at = |q: f64| l[((l.len() - 1) as f64 * q) as usize] as f64 / 1000.0;
    Ok((at(0.5), at(0.99), at(1.0)))
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

/// The median of a scenario's runs on one target.
enum Outcome {
    /// Deliveries per second and broker CPU µs per delivery (medians), and what all runs
    /// together lost.
    Rate {
        rate: f64,
        loss: count::Loss,
        cpu_us: Option<f64>,
    },
    /// Milliseconds: medians of the runs' p50 and p99, the worst run's max.
    Latency { p50: f64, p99: f64, max: f64 },
    /// KiB per connection.
    Memory(f64),
}

impl Outcome {
    fn cell(&self) -> String {
        match self {
            Outcome::Rate { rate, loss, cpu_us } => {
                let mut cell = format!("{:.1}k/s, {:.2} % lost", rate / 1000.0, loss.percent());
                if let Some(us) = cpu_us {
                    cell.push_str(&format!(", {us:.2} µs CPU"));
                }
                if loss.duplicates > 0 || loss.reordered > 0 {
                    cell.push_str(&format!(
                        " ({} dup, {} out of order)",
                        loss.duplicates, loss.reordered
                    ));
                }
                cell
            }
            Outcome::Latency { p50, p99, max } => format!("{p50:.2} / {p99:.2} / {max:.1} ms"),
            Outcome::Memory(kib) => format!("{kib:.1} KiB"),
        }
    }

    /// The figures the chart draws (`report.rs`): the rate and CPU cost, the p99, the memory.
    fn record(&self, label: &str, target: &str) {
        let scenario = label.split(',').next().unwrap_or(label);
        match self {
            Outcome::Rate { rate, cpu_us, .. } => {
                report::record(scenario, target, *rate, "msg/s");
                if let Some(us) = cpu_us {
                    report::record(scenario, target, *us, "µs");
                }
            }
            Outcome::Latency { p99, .. } => report::record(scenario, target, *p99, "ms"),
            Outcome::Memory(kib) => report::record(scenario, target, *kib, "KiB"),
        }
    }

    /// base / other, oriented so that above 1 means the base target did better.
    fn ratio(&self, other: &Outcome) -> Option<f64> {
        match (self, other) {
            (Outcome::Rate { rate: a, .. }, Outcome::Rate { rate: b, .. }) if *b > 0.0 => {
                Some(a / b)
            }
            (Outcome::Latency { p50: a, .. }, Outcome::Latency { p50: b, .. }) if *a > 0.0 => {
                Some(b / a)
            }
            (Outcome::Memory(a), Outcome::Memory(b)) if *a > 0.0 => Some(b / a),
            _ => None,
        }
    }
}

async fn measure(t: &Target, args: &Args, scenario: &str) -> Result<Outcome, String> {
    if scenario == "idle" {
        // One run: memory grows in steps, a median of allocator states says little more.
        return idle(t, args).await.map(Outcome::Memory);
    }
    let (mut rates, mut cpus) = (Vec::new(), Vec::new());
    let mut loss = count::Loss::default();
    let mut runs = |r: Result<Run, String>| {
        r.map(|run| {
            rates.push(run.rate);
            cpus.extend(run.cpu_us);
            loss.add(run.loss);
        })
    };
    let (mut p50s, mut p99s, mut max) = (Vec::new(), Vec::new(), 0f64);
    let mut last_error = None;
    for _ in 0..args.runs {
        let r = match scenario {
            s if let Some(shape) = Shape::of(s) => runs(throughput(t, args, shape).await),
            "latency" => latency(t, args).await.map(|(p50, p99, worst)| {
                p50s.push(p50);
                p99s.push(p99);
                max = max.max(worst);
            }),
            other => return Err(format!("unknown scenario {other}")),
        };
        if let Err(e) = r {
            last_error = Some(e);
        }
    }
    if !rates.is_empty() {
        Ok(Outcome::Rate {
            rate: median(rates),
            loss,
            cpu_us: (!cpus.is_empty()).then(|| median(cpus)),
        })
    } else if !p50s.is_empty() {
        Ok(Outcome::Latency {
            p50: median(p50s),
            p99: median(p99s),
            max,
        })
    } else {
        Err(last_error.unwrap_or_else(|| "no run".into()))
    }
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    if let Some(addr) = &args.serve_ceiling {
        if let Err(e) = rest::serve_ceiling(addr).await {
            eprintln!("bench: ceiling: {e}");
            std::process::exit(1);
        }
        return;
    }
    if let (Some(results), Some(out)) = (&args.chart, &args.chart_out) {
        or_exit("chart", report::chart(results, out));
        return;
    }
    let targets: Result<Vec<Target>, String> = args
        .targets
        .iter()
        .map(|s| {
            let mut t = parse_target(s)?;
            t.pid = args.pids.iter().find_map(|p| {
                let (name, pid) = p.split_once('=')?;
                (name == t.name).then(|| pid.parse().ok())?
            });
            Ok(t)
        })
        .collect();
    let targets = match targets {
        Ok(t) => t,
        Err(e) => {
            eprintln!("bench: {e}");
            std::process::exit(2);
        }
    };
    let mqtt_scenarios: Vec<&String> = args
        .scenarios
        .iter()
        .filter(|s| !is_amqp_scenario(s))
        .collect();
    if !mqtt_scenarios.is_empty() {
        mqtt_table(&args, &targets).await;
    }
    if args.scenarios.iter().any(|s| s == "durable") {
        let d = durable::Durable {
            http: args.gateway_http.clone().unwrap_or_default(),
            token: targets[0].password.clone().unwrap_or_default(),
            amqp: args.amqp.clone(),
        };
        if let Err(e) = durable::report(&d, &targets[0], &args).await {
            eprintln!("bench: durable: {e}");
            std::process::exit(1);
        }
    }
    let wants = |names: &[&str]| args.scenarios.iter().any(|s| names.contains(&s.as_str()));
    if wants(&["hop"]) {
        or_exit("hop", hop_table(&args, &targets[0]).await);
    }
    if wants(&["amqp"]) {
        or_exit("amqp", amqp_table(&args).await);
    }
    if wants(&["wsfanout", "wsidle", "wspublish"]) {
        or_exit("ws", ws::report(&args, &targets).await);
    }
    if wants(&["rest"]) {
        or_exit("rest", rest::report(&args, &targets[0]).await);
    }
    if args.scenarios.iter().any(|s| s == "soak") {
        let s = soak::Soak {
            target: targets[0].clone(),
            http: args.gateway_http.clone().unwrap_or_default(),
            amqp: args.gateway_amqp.clone().unwrap_or_default(),
            duration: args.duration,
        };
        if let Err(e) = soak::report(&s).await {
            eprintln!("bench: soak: {e}");
            std::process::exit(1);
        }
    }
}

/// The head of a table with a row per scenario: a column per target, then the first target's
/// ratio to each other one.
fn scenario_header<'a>(names: impl Iterator<Item = &'a str>) {
    let names: Vec<&str> = names.collect();
    let mut header = format!("| scenario | {} |", names.join(" | "));
    for other in &names[1..] {
        header.push_str(&format!(" {} vs {other} |", names[0]));
    }
    println!("{header}");
    println!("|---|{}", "---|".repeat(names.len() * 2 - 1));
}

/// Ends the bench when a table could not be measured.
fn or_exit(table: &str, result: Result<(), String>) {
    if let Err(e) = result {
        eprintln!("bench: {table}: {e}");
        std::process::exit(1);
    }
}

/// Scenarios with a table of their own (against RabbitMQ over AMQP, `--amqp`, the REST
/// ceiling, or the soak).
fn is_amqp_scenario(s: &str) -> bool {
    matches!(
        s,
        "durable" | "hop" | "amqp" | "soak" | "rest" | "wsfanout" | "wsidle" | "wspublish"
    )
}

/// AMQP 0-9-1 1→1 with the same lapin load through the gateway's AMQP listener and through
/// RabbitMQ directly: auto-ack, and manual acks with prefetch 100 (publisher confirms, 100 in
/// flight, in both).
async fn amqp_table(args: &Args) -> Result<(), String> {
    let gateway = args.gateway_amqp.as_deref().ok_or("needs --gateway-amqp")?;
    let rabbit = args.amqp.as_deref().ok_or("needs --amqp")?;
    println!(
        "\nAMQP 0-9-1 1→1 (lapin, confirms with 100 in flight), {} B payloads, median of {} runs of {:?}\n",
        args.payload, args.runs, args.duration
    );
    println!("| consumer | gateway AMQP | RabbitMQ direct | gateway vs RabbitMQ |");
    println!("|---|---|---|---|");
    for (label, ack) in [
        ("auto-ack", hop::Ack::Auto),
        ("manual ack, prefetch 100", hop::Ack::Manual),
    ] {
        let (mut g, mut r) = (Vec::new(), Vec::new());
        let (mut g_loss, mut r_loss) = (count::Loss::default(), count::Loss::default());
        for _ in 0..args.runs {
            let (rate, loss) = hop::one_to_one(gateway, args.payload, args.duration, ack).await?;
            g.push(rate);
            g_loss.add(loss);
            let (rate, loss) = hop::one_to_one(rabbit, args.payload, args.duration, ack).await?;
            r.push(rate);
            r_loss.add(loss);
        }
        let (g, r) = (median(g), median(r));
        report::record(&format!("AMQP 1→1 {label}"), "gateway AMQP", g, "msg/s");
        report::record(&format!("AMQP 1→1 {label}"), "RabbitMQ", r, "msg/s");
        println!(
            "| {label} | {:.1}k/s, {:.2} % lost | {:.1}k/s, {:.2} % lost | {:.2} |",
            g / 1000.0,
            g_loss.percent(),
            r / 1000.0,
            r_loss.percent(),
            if r > 0.0 { g / r } else { 0.0 }
        );
    }
    Ok(())
}

/// 1→1 at-least-once deliveries through the gateway (MQTT QoS 1) and through RabbitMQ
/// directly (lapin), median of the runs, and their ratio.
async fn hop_table(args: &Args, gateway: &Target) -> Result<(), String> {
    let url = args.amqp.as_deref().ok_or("needs --amqp")?;
    let (mut through, mut direct) = (Vec::new(), Vec::new());
    let (mut through_loss, mut direct_loss) = (count::Loss::default(), count::Loss::default());
    for _ in 0..args.runs {
        let shape = Shape::of("qos1").ok_or("no qos1 scenario")?;
        let run = throughput(gateway, args, shape).await?;
        through.push(run.rate);
        through_loss.add(run.loss);
        let (rate, loss) =
            hop::one_to_one(url, args.payload, args.duration, hop::Ack::Manual).await?;
        direct.push(rate);
        direct_loss.add(loss);
    }
    let (g, d) = (median(through), median(direct));
    println!(
        "\n1→1 at-least-once, {} B payloads, 100 in flight, median of {} runs of {:?}\n",
        args.payload, args.runs, args.duration
    );
    println!(
        "| gateway MQTT QoS 1 | RabbitMQ direct (lapin confirms + manual acks) | gateway vs direct |"
    );
    println!("|---|---|---|");
    println!(
        "| {:.1}k/s, {:.2} % lost | {:.1}k/s, {:.2} % lost | {:.2} |",
        g / 1000.0,
        through_loss.percent(),
        d / 1000.0,
        direct_loss.percent(),
        if d > 0.0 { g / d } else { 0.0 }
    );
    Ok(())
}

/// The MQTT scenarios, one row each, every target side by side.
async fn mqtt_table(args: &Args, targets: &[Target]) {
    println!(
        "MQTT 3.1.1, {} B payloads, {:?} per run after 1 s warm-up, median of {}",
        args.payload, args.duration, args.runs
    );
    println!(
        "ratios: above 1, the first target did better (latency by p50; memory: other / first)\n"
    );
    scenario_header(targets.iter().map(|t| t.name.as_str()));
    for scenario in args.scenarios.iter().filter(|s| !is_amqp_scenario(s)) {
        let mut outcomes = Vec::new();
        for t in targets {
            outcomes.push(measure(t, args, scenario).await);
        }
        let cells: Vec<String> = outcomes
            .iter()
            .map(|o| match o {
                Ok(o) => o.cell(),
                Err(e) => format!("error: {e}"),
            })
            .collect();
        for (t, o) in targets.iter().zip(&outcomes) {
            if let Ok(o) = o {
                o.record(&label(scenario, args), &t.name);
            }
        }
        let mut row = format!("| {} | {} |", label(scenario, args), cells.join(" | "));
        for other in &outcomes[1..] {
            row.push_str(&match (&outcomes[0], other) {
                (Ok(a), Ok(b)) => a.ratio(b).map_or(" – |".into(), |r| format!(" {r:.2} |")),
                _ => " – |".to_owned(),
            });
        }
        println!("{row}");
    }
}

fn label(s: &str, args: &Args) -> String {
    if s == "idle" {
        return format!(
            "idle MQTT × {}, anonymous memory per connection (1 subscription each)",
            args.idle_connections
        );
    }
    match s {
        "qos0" => "1→1 QoS 0, deliveries/s",
        "qos1" => "1→1 QoS 1, deliveries/s",
        "fanout" => "1→50 fan-out QoS 0, deliveries/s",
        "fanin" => "50→1 fan-in QoS 0, deliveries/s",
        "qos0-pipelined" => "1→1 QoS 0 pipelined client, deliveries/s",
        "qos1-pipelined" => "1→1 QoS 1 pipelined client, deliveries/s",
        "fanout-pipelined" => "1→50 fan-out QoS 0 pipelined client, deliveries/s",
        "fanin-pipelined" => "50→1 fan-in QoS 0 pipelined client, deliveries/s",
        "latency" => "1→1 QoS 0 at 5k msg/s, p50 / p99 / max",
        other => other,
    }
    .to_owned()
}
