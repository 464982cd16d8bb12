//! Any bytes where the durable store keeps a record (exchange, queue, binding, queue entry,
//! message; the first byte picks which, the second where the key ends): decoded or refused as
//! corrupt, never a panic; what decodes encodes back to the same bytes.
//!
//!     cargo fuzz run store_record --sanitizer none -- -max_total_time=60
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [kind, split, rest @ ..] = data else {
        return;
    };
    let (key, value) = rest.split_at(usize::from(*split).min(rest.len()));
    amqp_gateway::engine::embedded::store::fuzz_record(*kind, key, value);
});
