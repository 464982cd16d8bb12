//! Any bytes a client can send into the MQTT decoder: it may refuse them, never panic or hang.
//! The first byte picks the chunk size the stream arrives in (packets split across reads).
//!
//!     cargo fuzz run mqtt_decode --sanitizer none -- -max_total_time=300
#![no_main]

use amqp_gateway::protocol::mqtt::codec::Codec;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&chunk, stream)) = data.split_first() else {
        return;
    };
    let mut codec = Codec::new(64 * 1024);
    let mut buf = BytesMut::new();
    for piece in stream.chunks(usize::from(chunk).max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match codec.decode(&mut buf) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
