//! A RabbitMQ node of the test's own (as `../shared/peers/start.sh` starts its bench node: own
//! ports, data directory and node name, no plugins), for what must never be done to the
//! machine's broker: raising its alarms. Stopped when dropped.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SERVER: &str = "/usr/lib/rabbitmq/bin/rabbitmq-server";
const STARTUP: Duration = Duration::from_secs(90);

pub struct RabbitNode {
    pub name: String,
    pub port: u16,
    dir: PathBuf,
    child: Child,
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

impl RabbitNode {
    /// Starts the node and waits for its AMQP port; fails saying why when it cannot.
    pub async fn start() -> RabbitNode {
        assert!(
            std::path::Path::new(SERVER).exists(),
            "{SERVER} is missing: these tests need RabbitMQ installed (.ci/run installs it)"
        );
        let (port, dist) = (free_port(), free_port());
        let name = format!("{}@localhost", super::unique("gw-node"));
        let dir = super::scratch::dir("rabbit-");
        for sub in ["etc", "data", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("node directories");
        }
        let conf =
            format!("listeners.tcp.default = 127.0.0.1:{port}\nloopback_users.guest = true\n");
        std::fs::write(dir.join("etc/rabbitmq.conf"), conf).expect("node config");
        // No plugins: the machine's enabled_plugins would bind its management port again.
        std::fs::write(dir.join("etc/enabled_plugins"), "[].\n").expect("node plugins");
        let owned = Command::new("chown")
            .args(["-R", "rabbitmq:rabbitmq"])
            .arg(&dir)
            .status()
            .expect("chown");
        assert!(owned.success(), "chown of the node directory");
        let log = std::fs::File::create(dir.join("server.out")).expect("node log");
        let child = Command::new("setpriv")
            .args([
                "--reuid=rabbitmq",
                "--regid=rabbitmq",
                "--init-groups",
                SERVER,
            ])
            .env("RABBITMQ_CONFIG_FILE", dir.join("etc/rabbitmq"))
            .env(
                "RABBITMQ_ENABLED_PLUGINS_FILE",
                dir.join("etc/enabled_plugins"),
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("data"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_NODENAME", &name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_DIST_PORT", dist.to_string())
            .env("HOME", "/var/lib/rabbitmq")
            .stdout(log.try_clone().expect("node log"))
            .stderr(log)
            .spawn()
            .expect("rabbitmq-server starts");
        let node = RabbitNode {
            name,
            port,
            dir,
            child,
        };
        let since = Instant::now();
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(
                since.elapsed() < STARTUP,
                "RabbitMQ node {} not listening after {STARTUP:?}; see {}",
                node.name,
                node.dir.join("server.out").display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        node
    }

    pub fn amqp_url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    /// `rabbitmqctl -n <node> <args…>`, which must succeed.
    pub async fn ctl(&self, args: &[&str]) {
        let out = tokio::process::Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.name)
            .args(args)
            .output()
            .await
            .expect("rabbitmqctl runs");
        assert!(
            out.status.success(),
            "rabbitmqctl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for RabbitNode {
    fn drop(&mut self) {
        let stopped = Command::new("rabbitmqctl")
            .arg("-n")
            .arg(&self.name)
            .arg("stop")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !matches!(stopped, Ok(s) if s.success()) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
