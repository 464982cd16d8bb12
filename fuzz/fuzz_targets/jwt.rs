//! Tokens a client can present, through the gateway's verification: any string (first byte
//! even), or any bytes as the claims of a token correctly signed with the gateway's secret
//! (first byte odd) — so claim and scope parsing are reached too. Refused or accepted, never a
//! panic.
//!
//!     cargo fuzz run jwt --sanitizer none -- -max_total_time=60
#![no_main]

use std::sync::OnceLock;

use amqp_gateway::auth::Authenticator;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
use libfuzzer_sys::fuzz_target;

const SECRET: &str = "fuzzing-secret-0123456789abcdef";

fn auth() -> &'static (tokio::runtime::Runtime, Authenticator) {
    static A: OnceLock<(tokio::runtime::Runtime, Authenticator)> = OnceLock::new();
    A.get_or_init(|| {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime");
        let mut config = amqp_gateway::config::AuthConfig::default();
        config.hs256_secret = Some(SECRET.into());
        let auth = rt
            .block_on(Authenticator::new(&config))
            .expect("an authenticator");
        (rt, auth)
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, input)) = data.split_first() else {
        return;
    };
    let token = if mode & 1 == 0 {
        String::from_utf8_lossy(input).into_owned()
    } else {
        let signing_input = format!(
            "{}.{}",
            B64URL.encode(br#"{"alg":"HS256","typ":"JWT"}"#),
            B64URL.encode(input)
        );
        let key = jsonwebtoken::EncodingKey::from_secret(SECRET.as_bytes());
        let Ok(signature) = jsonwebtoken::crypto::sign(
            signing_input.as_bytes(),
            &key,
            jsonwebtoken::Algorithm::HS256,
        ) else {
            return;
        };
        format!("{signing_input}.{signature}")
    };
    let (rt, auth) = auth();
    let _ = rt.block_on(auth.authenticate(&token));
});
