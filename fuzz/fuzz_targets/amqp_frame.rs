//! Any bytes a client can send into the AMQP frame decoder (after the protocol header): it may
//! refuse them, never panic or hang. The first byte picks the chunk size the stream arrives in
//! (frames split across reads), the second the frame-max (4 KiB steps).
//!
//!     cargo fuzz run amqp_frame --sanitizer none -- -max_total_time=300
#![no_main]

use amqp_gateway::protocol::amqp::frame::decode;
use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let [chunk, max, stream @ ..] = data else {
        return;
    };
    let frame_max = (usize::from(*max) + 1) * 4096;
    let mut buf = BytesMut::new();
    for piece in stream.chunks(usize::from(*chunk).max(1)) {
        buf.extend_from_slice(piece);
        loop {
            match decode(&mut buf, frame_max) {
                Ok(Some(_)) => continue,
                Ok(None) => break,
                Err(_) => return,
            }
        }
    }
});
