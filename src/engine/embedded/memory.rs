//! How much memory this process may use: the smaller of the machine's RAM and the cgroup's
//! limit (a container's `--memory`), so `engine.memory_high_watermark = "40%"` means 40 % of
//! what the gateway can really have. Read from `/proc` and `/sys`; two files do not justify a
//! system-information crate. `None` where neither is readable (not Linux).

use std::fs;

/// Bytes available to the process, if known.
pub fn available() -> Option<u64> {
    let ram = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| meminfo_total(&s));
    let cgroup = cgroup_limit();
    match (ram, cgroup) {
        (Some(r), Some(c)) => Some(r.min(c)),
        (r, c) => r.or(c),
    }
}

/// `MemTotal:  24684092 kB` → bytes.
fn meminfo_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    kb.checked_mul(1024)
}

/// cgroup v2 `memory.max` (`max` = none) or v1 `memory.limit_in_bytes` (a huge number = none).
fn cgroup_limit() -> Option<u64> {
    let v2 = fs::read_to_string("/sys/fs/cgroup/memory.max").ok();
    let v1 = fs::read_to_string("/sys/fs/cgroup/memory/memory.limit_in_bytes").ok();
    v2.or(v1)
        .and_then(|s| s.trim().parse::<u64>().ok())
        .filter(|limit| *limit < 1 << 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_is_read_in_bytes() {
        let s = "MemTotal:       24684092 kB\nMemFree:        1000 kB\n";
        assert_eq!(meminfo_total(s), Some(24_684_092 * 1024));
        assert_eq!(meminfo_total("MemFree: 1 kB"), None);
    }

    #[test]
    fn this_machine_has_some() {
        if cfg!(target_os = "linux") {
            assert!(available().is_some_and(|b| b > 0));
        }
    }
}
