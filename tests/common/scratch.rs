//! Directories the tests leave behind on purpose, and their removal.
//!
//! A gateway's data directory must outlive the gateway (the restart tests start a second one on
//! it), and a RabbitMQ node's must outlive the node's shutdown, so neither can be a `TempDir`
//! dropped with the test's first handle on it. Each test process keeps them all under one
//! directory of its own, named by its pid and start time; the first directory a process asks for
//! removes the directories of processes that have ended. A run leaves at most its last
//! processes' directories, where it left one per gateway (about 575 a run, 252 KB each).

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

pub const PREFIX: &str = "amqp-gateway-tests-";

/// A new directory named `prefix…` under this process's own, kept until a later test process
/// finds this one ended. World-traversable like `/tmp` itself: a RabbitMQ node the tests start
/// runs as the `rabbitmq` user in a directory chowned to it below.
pub fn dir(prefix: &str) -> PathBuf {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in(process_dir())
        .expect("a scratch directory")
        .keep()
}

/// This process's directory, made on first use after removing those of ended processes.
fn process_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::temp_dir();
        sweep(&tmp);
        let me = std::process::id();
        let name = match start_time(me) {
            Some(start) => format!("{PREFIX}{me}-{start}"),
            // No /proc: a name no sweep takes for an ended process's.
            None => format!("{PREFIX}{me}"),
        };
        let dir = tmp.join(name);
        std::fs::create_dir_all(&dir).expect("the test process's scratch directory");
        // Whatever the umask: the node's user must reach its directory through this one.
        std::fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .expect("the scratch directory's mode");
        dir
    })
}

/// Removes the directories of test processes that have ended: a pid that is gone, or taken by
/// a process started at another time. A directory whose name does not say both is left alone.
pub fn sweep(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some((pid, start)) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|rest| rest.split_once('-'))
            .and_then(|(pid, start)| Some((pid.parse().ok()?, start.parse::<u64>().ok()?)))
        else {
            continue;
        };
        if start_time(pid) != Some(start) {
            // Another process may be removing it too: what is already gone is no error.
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// When process `pid` started, in clock ticks after boot (`/proc/PID/stat`, field 22); `None`
/// when there is no such process (or no `/proc`).
pub fn start_time(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: count fields after its last `)`, where
    // the state (field 3) comes first.
    let (_, rest) = stat.rsplit_once(')')?;
    rest.split_whitespace().nth(19)?.parse().ok()
}
