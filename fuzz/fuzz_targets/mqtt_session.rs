//! Any packet sequence after a valid CONNECT, into a running gateway's MQTT session (3.1.1 or 5
//! by the first byte): it may refuse and close, never panic. A PINGREQ and the end of the
//! client's stream follow the input; the run ends when the gateway has closed.
//!
//!     cargo fuzz run mqtt_session --sanitizer none -- -max_total_time=60
#![no_main]

use std::time::Duration;

use amqp_gateway_fuzz::harness;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// CONNECT, clean session, keep-alive 60, client id "fz", no credentials (anonymous).
const CONNECT_311: &[u8] = &[
    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'f', b'z',
];
const CONNECT_5: &[u8] = &[
    0x10, 15, 0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 60, 0, 0, 2, b'f', b'z',
];

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let h = harness();
    h.rt.block_on(async {
        let Ok(mut s) = tokio::net::TcpStream::connect(h.mqtt).await else {
            return;
        };
        let connect = if mode & 1 == 1 {
            CONNECT_5
        } else {
            CONNECT_311
        };
        if s.write_all(connect).await.is_err()
            || s.write_all(input).await.is_err()
            || s.write_all(&[0xC0, 0]).await.is_err()
            || s.shutdown().await.is_err()
        {
            return;
        }
        let mut buf = vec![0u8; 64 * 1024];
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {}
                }
            }
        })
        .await;
    });
});
