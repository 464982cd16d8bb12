//! Any text a browser can send as a `/ws` frame: parsed into a request or refused with a
//! `bad_request` error, never a panic.
//!
//!     cargo fuzz run ws_frame --sanitizer none -- -max_total_time=60
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = amqp_gateway::protocol::ws::frames::parse(&text);
});
