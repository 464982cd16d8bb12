//! What the fuzz targets that talk to a running gateway share: one embedded gateway per fuzzing
//! process, on loopback port 0, started on first use. A panic in any of its tasks aborts the
//! process (libfuzzer-sys's panic hook), so libFuzzer sees it as a crash.

use std::net::SocketAddr;
use std::sync::OnceLock;
use std::time::Duration;

pub struct Harness {
    pub rt: tokio::runtime::Runtime,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    /// An administrator's token, so requests reach past authentication.
    pub token: String,
    pub client: reqwest::Client,
}

const SECRET: &str = "fuzzing-secret-0123456789abcdef";

pub fn harness() -> &'static Harness {
    static H: OnceLock<Harness> = OnceLock::new();
    H.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("a runtime");
        let mut c = amqp_gateway::Config::default();
        c.http.listen = "127.0.0.1:0".parse().unwrap();
        c.metrics.listen = "127.0.0.1:0".parse().unwrap();
        c.mqtt.listen = "127.0.0.1:0".parse().unwrap();
        c.amqp.listen = "127.0.0.1:0".parse().unwrap();
        c.auth.hs256_secret = Some(SECRET.into());
        c.auth.anonymous_scope = Some("gateway.tag:administrator".into());
        c.engine.data_dir =
            std::env::temp_dir().join(format!("amqp-gateway-fuzz-{}", std::process::id()));
        // Many short connections from one subject, fast timeouts.
        c.limits.max_connections_per_subject = 100_000;
        c.limits.publish_rate = 1_000_000;
        c.limits.publish_burst = 1_000_000;
        c.limits.subject_publish_rate = 1_000_000;
        c.mqtt.connect_timeout = Duration::from_millis(200);
        let gateway = rt
            .block_on(amqp_gateway::start(c))
            .expect("the gateway starts");
        let addrs = gateway.addrs();
        // Runs until the process ends.
        std::mem::forget(gateway);
        let token = amqp_gateway::auth::mint(
            SECRET,
            "fuzzer",
            "gateway.tag:administrator",
            Duration::from_secs(24 * 3600),
            "gateway",
            None,
        )
        .expect("a token");
        Harness {
            rt,
            http: addrs.http,
            mqtt: addrs.mqtt,
            token,
            client: reqwest::Client::builder()
                .timeout(Duration::from_secs(5))
                .build()
                .expect("an HTTP client"),
        }
    })
}
