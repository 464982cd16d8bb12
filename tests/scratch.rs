//! The tests' own scratch directories (`common::scratch`): a sweep removes the directories of
//! ended test processes and nothing else.

mod common;

use common::scratch::{PREFIX, start_time, sweep};

#[test]
fn a_sweep_removes_ended_processes_directories_only() {
    let root = tempfile::tempdir().unwrap();
    let me = std::process::id();
    let my_start = start_time(me).expect("this process's start time from /proc");
    let mut child = std::process::Command::new("true").spawn().expect("true");
    let ended = child.id();
    child.wait().expect("true ends");
    let names = [
        (format!("{PREFIX}{me}-{my_start}"), true),
        // The same pid, started at another time: a process that ended, its pid given out again.
        (format!("{PREFIX}{me}-{}", my_start + 1), false),
        (format!("{PREFIX}{ended}-{my_start}"), false),
        // Names that do not say both pid and start time, and other programs' directories.
        (format!("{PREFIX}{ended}"), true),
        ("amqp-gateway-test-abc".to_string(), true),
    ];
    for (name, _) in &names {
        std::fs::create_dir_all(root.path().join(name).join("data")).unwrap();
    }
    sweep(root.path());
    for (name, kept) in &names {
        assert_eq!(root.path().join(name).exists(), *kept, "{name}");
    }
}

#[test]
fn a_directory_is_made_under_this_processs_own() {
    let dir = common::scratch::dir("scratch-");
    assert!(dir.is_dir());
    let parent = dir.parent().unwrap().file_name().unwrap().to_str().unwrap();
    let me = std::process::id();
    assert_eq!(parent, format!("{PREFIX}{me}-{}", start_time(me).unwrap()));
}
