//! Authentication and authorization for every protocol: a bearer token becomes a [`Principal`]
//! (subject, expiry, [`Permissions`]). No HTTP, WebSocket or MQTT types here — each adapter
//! extracts the token its own way and maps [`AuthError`] to its own answer.
//!
//! Tokens never reach the logs: nothing here formats one, and `Principal`'s `Debug` shows the
//! subject only.

mod interned;
pub mod jwt;
pub mod scopes;

use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

pub use self::scopes::Permissions;
use crate::config::AuthConfig;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("a bearer token is required")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Who a client is and what it may do.
#[derive(Clone)]
pub struct Principal {
    pub subject: Arc<str>,
    /// Boxed, not a `String`: kept by every connection, and never grows.
    pub issuer: Option<Box<str>>,
    /// Seconds since the epoch ([`Principal::expires_at`]); `None` for anonymous clients and
    /// tokens without `exp`. Never 0 (1970 is past, as 1 is), so the option is 8 bytes where
    /// `Option<u64>` is 16 (every connection keeps its principal).
    expires: Option<NonZeroU64>,
    pub permissions: Arc<Permissions>,
    /// No token at all: the subject is `anonymous:{connection}`.
    pub anonymous: bool,
}

impl std::fmt::Debug for Principal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Principal")
            .field("subject", &self.subject)
            .field("anonymous", &self.anonymous)
            .finish_non_exhaustive()
    }
}

impl Principal {
    /// The token's `exp`, seconds since the epoch; `None` for anonymous clients.
    pub fn expires_at(&self) -> Option<u64> {
        self.expires.map(NonZeroU64::get)
    }

    /// The subject rate limits and MQTT sessions are keyed by: anonymous clients share
    /// `anonymous` (DESIGN.md §6).
    pub fn shared_subject(&self) -> &str {
        if self.anonymous {
            "anonymous"
        } else {
            &self.subject
        }
    }

    /// [`Self::shared_subject`] as the per-subject rate buckets' key, borrowed: a publish checks
    /// its subject's bucket without allocating or touching a reference count.
    pub fn shared_subject_key(&self) -> &Arc<str> {
        static ANONYMOUS: std::sync::LazyLock<Arc<str>> =
            std::sync::LazyLock::new(|| Arc::from("anonymous"));
        if self.anonymous {
            &ANONYMOUS
        } else {
            &self.subject
        }
    }
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs()
}

/// A year: as good as never for a connection, and safe to add to any `Instant`.
pub const NEVER: Duration = Duration::from_secs(365 * 24 * 3600);

/// How long a connection with a token expiring at `expires_at` (seconds since the epoch) may
/// last: until `leeway` after it, at most [`NEVER`]. Saturating, so a token with an `exp` near
/// `u64::MAX` (valid, if signed) neither overflows the sum nor an `Instant` it is added to.
pub fn time_left(expires_at: u64, leeway: Duration) -> Duration {
    let closes_at = expires_at.saturating_add(leeway.as_secs());
    Duration::from_secs(closes_at.saturating_sub(now_secs())).min(NEVER)
}

/// Sleeps until a connection with a token expiring at `expires_at` (seconds since the epoch)
/// must end, `leeway` after it; an anonymous one (`None`) never in practice.
pub fn expiry_sleep(expires_at: Option<u64>, leeway: Duration) -> tokio::time::Sleep {
    // A year for none keeps a caller's select uniform.
    tokio::time::sleep(expires_at.map_or(NEVER, |exp| time_left(exp, leeway)))
}

/// Turns tokens into principals.
pub struct Authenticator {
    verifier: Arc<jwt::Verifier>,
    resource_server_id: String,
    scope_claim: String,
    anonymous: Option<Arc<Permissions>>,
    anonymous_ids: AtomicU64,
    permissions: interned::Interned,
}

impl Authenticator {
    pub async fn new(config: &AuthConfig) -> Result<Authenticator, jwt::KeyError> {
        let verifier = Arc::new(jwt::Verifier::new(config).await?);
        let anonymous = config.anonymous_scope.as_ref().map(|scopes| {
            Arc::new(Permissions::from_scopes(
                scopes.split_whitespace(),
                &config.resource_server_id,
                "anonymous",
            ))
        });
        Ok(Authenticator {
            verifier,
            resource_server_id: config.resource_server_id.clone(),
            scope_claim: config.scope_claim.clone(),
            anonymous,
            anonymous_ids: AtomicU64::new(1),
            permissions: Default::default(),
        })
    }

    pub fn verifier(&self) -> Arc<jwt::Verifier> {
        self.verifier.clone()
    }

    pub fn allows_anonymous(&self) -> bool {
        self.anonymous.is_some()
    }

    /// A client that presented no token at all: anonymous when `auth.anonymous_scope` is set.
    pub fn anonymous(&self) -> Result<Principal, AuthError> {
        let permissions = self.anonymous.clone().ok_or(AuthError::Missing)?;
        let id = self.anonymous_ids.fetch_add(1, Ordering::Relaxed);
        Ok(Principal {
            subject: format!("anonymous:{id}").into(),
            issuer: None,
            expires: None,
            permissions,
            anonymous: true,
        })
    }

    /// Verifies a bearer token.
    pub async fn authenticate(&self, token: &str) -> Result<Principal, AuthError> {
        let claims = self.verifier.verify(token).await?;
        let subject = match claims.get("sub") {
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            _ => return Err(AuthError::Invalid("the token has no \"sub\"".into())),
        };
        let scopes: Vec<&str> = match claims.get(&self.scope_claim) {
            Some(Value::String(s)) => s.split_whitespace().collect(),
            Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
            _ => Vec::new(),
        };
        let source = permissions_source(&scopes, &subject);
        let permissions = self.permissions.get_or_make(&source, || {
            Permissions::from_scopes(scopes, &self.resource_server_id, &subject)
        });
        Ok(Principal {
            issuer: claims.get("iss").and_then(Value::as_str).map(Box::from),
            expires: claims
                .get("exp")
                .and_then(Value::as_u64)
                .map(|exp| NonZeroU64::new(exp).unwrap_or(NonZeroU64::MIN)),
            subject: subject.into(),
            permissions,
            anonymous: false,
        })
    }
}

/// What a token's permissions depend on, as one key: the scopes, each with its length (an
/// array's items may hold spaces), and the subject when one of them names it.
fn permissions_source(scopes: &[&str], subject: &str) -> String {
    let mut source = String::new();
    for scope in scopes {
        source.push_str(&format!("{}:{scope};", scope.len()));
    }
    if source.contains(scopes::SUBJECT_PLACEHOLDER) {
        source.push('\n');
        source.push_str(subject);
    }
    source
}

/// Claims of a token the gateway mints (`amqp-gateway token`, `--dev`).
#[derive(Debug, serde::Serialize)]
struct MintClaims<'a> {
    sub: &'a str,
    scope: &'a str,
    aud: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    iss: Option<&'a str>,
    iat: u64,
    exp: u64,
}

/// Signs an HS256 token.
pub fn mint(
    secret: &str,
    subject: &str,
    scope: &str,
    ttl: Duration,
    audience: &str,
    issuer: Option<&str>,
) -> Result<String, jsonwebtoken::errors::Error> {
    let now = now_secs();
    let claims = MintClaims {
        sub: subject,
        scope,
        aud: audience,
        iss: issuer,
        iat: now,
        exp: now + ttl.as_secs(),
    };
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        &claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
}

pub const DEV_SECRET_FILE: &str = "dev-secret";

pub fn dev_secret_path(data_dir: &Path) -> PathBuf {
    data_dir.join(DEV_SECRET_FILE)
}

/// `--dev`: the secret in `{data_dir}/dev-secret` (mode 0600), created on first use.
pub fn dev_secret(data_dir: &Path) -> std::io::Result<String> {
    let path = dev_secret_path(data_dir);
    match std::fs::read_to_string(&path) {
        Ok(s) if s.trim().len() >= 32 => return Ok(s.trim().to_owned()),
        Ok(_) | Err(_) => {}
    }
    std::fs::create_dir_all(data_dir)?;
    let mut bytes = [0u8; 32];
    rand::fill(&mut bytes);
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(&path)?;
    std::io::Write::write_all(&mut file, secret.as_bytes())?;
    Ok(secret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn permissions_are_shared_only_by_tokens_granting_the_same() {
        let key = |scopes: &[&str], sub| permissions_source(scopes, sub);
        assert_eq!(key(&["gw.read:a/#"], "alice"), key(&["gw.read:a/#"], "bob"));
        assert_ne!(
            key(&["gw.read:a b"], "alice"),
            key(&["gw.read:a", "b"], "alice")
        );
        assert_ne!(
            key(&["gw.read:{sub}/#"], "alice"),
            key(&["gw.read:{sub}/#"], "bob"),
            "a scope naming the subject is the subject's own"
        );
    }

    #[test]
    fn time_left_runs_to_the_leeway_and_never_overflows() {
        let leeway = Duration::from_secs(30);
        let now = now_secs();
        let left = time_left(now + 60, leeway);
        // 90 s, less the second `now_secs` may have turned meanwhile.
        assert!((89..=90).contains(&left.as_secs()), "{left:?}");
        assert_eq!(time_left(now - 60, leeway), Duration::ZERO);
        assert_eq!(time_left(u64::MAX, leeway), NEVER);
        // As far off as it goes, it still makes an `Instant`.
        let _ = std::time::Instant::now() + time_left(u64::MAX, Duration::MAX);
    }
}
