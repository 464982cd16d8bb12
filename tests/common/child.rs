//! The gateway binary as a child process (for what only a real process shows: signals,
//! `kill -9`, restarts on the same data directory), with the addresses it logged.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use tokio::sync::mpsc;

use super::{SECRET, WAIT};

/// How long a child gateway may take to log its listeners.
const STARTUP: std::time::Duration = std::time::Duration::from_secs(30);

pub struct ChildGateway {
    pub child: Child,
    pub http: SocketAddr,
    pub mqtt: SocketAddr,
    /// The AMQP listener (embedded engine only).
    pub amqp: Option<SocketAddr>,
    /// The TLS listeners (with `tls.cert`/`tls.key` set).
    pub mqtt_tls: Option<SocketAddr>,
    pub amqp_tls: Option<SocketAddr>,
    /// Every log line (JSON) after the listener lines.
    pub lines: mpsc::UnboundedReceiver<String>,
    /// The log lines read while starting (recovery reports among them).
    pub startup: Vec<String>,
}

/// A small disk the test can fill without touching the machine's: a tmpfs on `dir` mounted in
/// a mount namespace of its own (`unshare -m`, root only), held by a sleeping process so that
/// gateways can start and restart on it and the test can grow it. Gone when dropped.
pub struct Tmpfs {
    holder: Child,
    pub dir: PathBuf,
}

impl Tmpfs {
    /// Mounts a tmpfs of `size` (`"32m"`) on `dir`.
    pub fn mount(dir: &Path, size: &str) -> Tmpfs {
        let mut holder = Command::new("unshare")
            .args(["-m", "--propagation", "private", "sh", "-c"])
            .arg(
                "mount -t tmpfs -o size=\"$2\" tmpfs \"$1\" && echo mounted && exec sleep infinity",
            )
            .args(["sh".as_ref(), dir.as_os_str(), size.as_ref()])
            .stdout(Stdio::piped())
            .spawn()
            .expect("unshare (util-linux)");
        let mut line = String::new();
        let stdout = holder.stdout.take().expect("piped stdout");
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("the mount's answer");
        assert_eq!(
            line.trim(),
            "mounted",
            "tmpfs of {size} on {}",
            dir.display()
        );
        Tmpfs {
            holder,
            dir: dir.to_owned(),
        }
    }

    /// A command run inside the tmpfs's mount namespace: add the program and its arguments.
    pub fn enter(&self) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.args(["-t", &self.holder.id().to_string(), "-m", "--"]);
        cmd
    }

    /// Grows (or shrinks) the tmpfs to `size`, as an operator gives a full disk room.
    pub fn resize(&self, size: &str) {
        let status = self
            .enter()
            .args(["mount", "-o", &format!("remount,size={size}")])
            .arg(&self.dir)
            .status()
            .expect("nsenter (util-linux)");
        assert!(status.success(), "remount to {size}: {status}");
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = self.holder.kill();
        let _ = self.holder.wait();
    }
}

impl ChildGateway {
    /// Starts the binary on `data_dir` (ports 0, JSON logs at `info`) and waits for its
    /// listeners.
    pub async fn start(data_dir: &Path) -> ChildGateway {
        Self::start_with(data_dir, &[]).await
    }

    /// As [`ChildGateway::start`], with configuration from `env` (`GATEWAY_…` variables).
    pub async fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> ChildGateway {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_amqp-gateway"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, data_dir).await
    }

    /// A line of the child's `/proc/PID/status` (`VmRSS`, `VmHWM`: peak), in bytes.
    pub fn memory(&self, field: &str) -> u64 {
        self.status(field)
            .parse::<u64>()
            .map(|kib| kib * 1024)
            .unwrap_or_else(|_| panic!("{field} in /proc status is not a number"))
    }

    /// The first word of `field`'s line in the child's `/proc/PID/status`.
    pub fn status(&self, field: &str) -> String {
        proc_status(&self.child.id().to_string(), field)
    }

    /// As [`ChildGateway::start`], with its data directory on `disk` (entering its mount
    /// namespace). `env` adds configuration.
    pub async fn start_on(disk: &Tmpfs, env: &[(&str, &str)]) -> ChildGateway {
        // nsenter execs the gateway: the child's pid is the gateway's, for signals.
        let mut cmd = disk.enter();
        cmd.arg(env!("CARGO_BIN_EXE_amqp-gateway"));
        for (k, v) in env {
            cmd.env(k, v);
        }
        Self::spawn(cmd, &disk.dir).await
    }

    async fn spawn(mut cmd: Command, data_dir: &Path) -> ChildGateway {
        // `info` unless the test asked for another level.
        if !cmd.get_envs().any(|(k, _)| k == "GATEWAY_LOG__LEVEL") {
            cmd.env("GATEWAY_LOG__LEVEL", "info");
        }
        let mut child = cmd
            .args([
                "--http-listen",
                "127.0.0.1:0",
                "--metrics-listen",
                "127.0.0.1:0",
            ])
            .args(["--mqtt-listen", "127.0.0.1:0"])
            .args(["--amqp-listen", "127.0.0.1:0"])
            .arg("--data-dir")
            .arg(data_dir)
            .args(["--log-format", "json"])
            .env("GATEWAY_AUTH__HS256_SECRET", SECRET)
            .env_remove("RUST_LOG")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn the gateway binary");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, mut lines) = mpsc::unbounded_channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let mut startup = Vec::new();
        let (mut http, mut mqtt, mut amqp) = (None, None, None);
        let (mut mqtt_tls, mut amqp_tls) = (None, None);
        // A bound against a hang, not a speed check: recovering a large store while the
        // rest of the suite (and RabbitMQ for the upstream tests) loads both cores took > 5 s.
        let found = tokio::time::timeout(STARTUP, async {
            // The listener lines come before this one.
            let mut started = false;
            while !started {
                let Some(line) = lines.recv().await else {
                    panic!("the gateway exited while starting:\n{}", startup.join("\n"));
                };
                let v: serde_json::Value = serde_json::from_str(&line).expect("a JSON log line");
                let addr = || v["fields"]["addr"].as_str().and_then(|a| a.parse().ok());
                match v["fields"]["listener"].as_str() {
                    Some("http") => http = addr(),
                    Some("mqtt") => mqtt = addr(),
                    Some("amqp") => amqp = addr(),
                    Some("mqtt_tls") => mqtt_tls = addr(),
                    Some("amqp_tls") => amqp_tls = addr(),
                    _ => {}
                }
                started = v["fields"]["message"] == "gateway started";
                startup.push(line);
            }
        })
        .await;
        assert!(
            found.is_ok(),
            "listeners logged in time:\n{}",
            startup.join("\n")
        );
        ChildGateway {
            child,
            http: http.expect("http address"),
            mqtt: mqtt.expect("mqtt address"),
            amqp,
            mqtt_tls,
            amqp_tls,
            lines,
            startup,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    /// Sends `signal` (`KILL`, `TERM`) and waits (within [`WAIT`]) for the process to end.
    pub async fn signal(&mut self, signal: &str) -> std::process::ExitStatus {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal}");
        // A child's exit has no awaitable event here: poll it, bounded.
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(status) = self.child.try_wait().expect("try_wait") {
                    return status;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        })
        .await
        .expect("the gateway ends after the signal")
    }

    /// Sends `signal` (`HUP`) and returns at once.
    pub fn signal_only(&self, signal: &str) {
        let sent = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(sent.success(), "kill -{signal}");
    }

    /// Waits (within [`WAIT`]) for a log line containing `text`.
    pub async fn logged(&mut self, text: &str) -> String {
        // A bound against a hang, not a speed check: recovering a large store while the
        // rest of the suite (and RabbitMQ for the upstream tests) loads both cores took > 5 s.
        let found = tokio::time::timeout(STARTUP, async {
            while let Some(line) = self.lines.recv().await {
                if line.contains(text) {
                    return Some(line);
                }
            }
            None
        })
        .await;
        match found {
            Ok(Some(line)) => line,
            _ => panic!("no log line with '{text}'"),
        }
    }
}

impl Drop for ChildGateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The first word of `field`'s line in `/proc/PROCESS/status` (`self` for this process).
pub fn proc_status(process: &str, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{process}/status"))
        .unwrap_or_else(|e| panic!("/proc/{process}/status: {e}"));
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| Some(v.split_whitespace().next()?.to_owned()))
        .unwrap_or_else(|| panic!("no {field} in /proc/{process}/status"))
}
