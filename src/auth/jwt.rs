//! JWT verification (DESIGN.md §6): which keys exist, which key a token is checked against, and
//! the JWKS that supplies keys from a file or an https URL.
//!
//! Every key has exactly one algorithm (from the config, or the JWK's `alg`); a token is checked
//! only against keys of its header's `alg`, chosen by `kid` (a token without `kid` only when
//! there is exactly one key). `none` cannot even be parsed as an algorithm; HS256 is never
//! configured beside asymmetric keys (checked at start). Header `jku`/`x5u`/`jwk` are ignored.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use jsonwebtoken::jwk::{Jwk, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use parking_lot::{Mutex, RwLock};
use serde_json::Value;

use super::AuthError;
use crate::config::AuthConfig;

/// An unknown `kid` may trigger a JWKS fetch at most this often.
const UNKNOWN_KID_REFETCH: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("auth.public_keys: {path}: {reason}")]
    PublicKey { path: PathBuf, reason: String },
    #[error("JWKS from {source_name}: {reason}")]
    Jwks { source_name: String, reason: String },
    #[error("{0}")]
    Config(String),
}

struct Key {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Where a JWKS comes from.
enum JwksSource {
    File(PathBuf),
    Url {
        url: String,
        client: reqwest::Client,
    },
}

impl JwksSource {
    fn name(&self) -> String {
        match self {
            JwksSource::File(p) => p.display().to_string(),
            JwksSource::Url { url, .. } => url.clone(),
        }
    }

    async fn fetch(&self) -> Result<JwkSet, KeyError> {
        let err = |reason: String| KeyError::Jwks {
            source_name: self.name(),
            reason,
        };
        let text = match self {
            JwksSource::File(path) => tokio::fs::read_to_string(path)
                .await
                .map_err(|e| err(e.to_string()))?,
            JwksSource::Url { url, client } => {
                let resp = client
                    .get(url)
                    .send()
                    .await
                    .map_err(|e| err(e.to_string()))?;
                if !resp.status().is_success() {
                    return Err(err(format!("HTTP {}", resp.status())));
                }
                resp.text().await.map_err(|e| err(e.to_string()))?
            }
        };
        serde_json::from_str(&text).map_err(|e| err(format!("not a JWKS document: {e}")))
    }
}

/// The verifier: static keys from the config plus the current JWKS.
pub struct Verifier {
    static_keys: Vec<Arc<Key>>,
    jwks_keys: RwLock<Vec<Arc<Key>>>,
    jwks: Option<JwksSource>,
    /// When an unknown `kid` last made us fetch (scheduled refreshes do not count: a rotation
    /// right after one must still be picked up).
    last_kid_fetch: Mutex<Option<Instant>>,
    fetch_lock: tokio::sync::Mutex<()>,
    audience: Option<String>,
    issuer: Option<String>,
    leeway: u64,
}

fn jwk_keys(set: &JwkSet) -> Vec<Arc<Key>> {
    let mut keys = Vec::new();
    for jwk in &set.keys {
        match jwk_key(jwk) {
            Ok(k) => keys.push(Arc::new(k)),
            Err(reason) => tracing::warn!(
                kid = jwk.common.key_id.as_deref().unwrap_or("-"),
                "JWKS key skipped: {reason}"
            ),
        }
    }
    keys
}

fn jwk_key(jwk: &Jwk) -> Result<Key, String> {
    let named = jwk
        .common
        .key_algorithm
        .ok_or("it has no \"alg\" (every key must name its one algorithm)")?;
    // Symmetric and encryption algorithms are refused here by not being in the list.
    let alg = parse_algorithm(&format!("{named:?}"))
        .ok_or_else(|| format!("alg {named:?} is not a signature algorithm the gateway accepts"))?;
    let key = DecodingKey::from_jwk(jwk).map_err(|e| e.to_string())?;
    Ok(Key {
        kid: jwk.common.key_id.clone(),
        alg,
        key,
    })
}

fn parse_algorithm(name: &str) -> Option<Algorithm> {
    match name {
        "RS256" => Some(Algorithm::RS256),
        "RS384" => Some(Algorithm::RS384),
        "RS512" => Some(Algorithm::RS512),
        "PS256" => Some(Algorithm::PS256),
        "ES256" => Some(Algorithm::ES256),
        "ES384" => Some(Algorithm::ES384),
        "EdDSA" => Some(Algorithm::EdDSA),
        _ => None,
    }
}

impl Verifier {
    /// Loads the configured keys (reading PEM files and the JWKS once). `dev_secret` stands in
    /// for `auth.hs256_secret` in `--dev` mode.
    pub async fn new(config: &AuthConfig) -> Result<Verifier, KeyError> {
        let asymmetric = !config.public_keys.is_empty()
            || config.jwks_url.is_some()
            || config.jwks_file.is_some();
        if config.hs256_secret.is_some() && asymmetric {
            return Err(KeyError::Config(
                "auth.hs256_secret cannot be combined with public keys or a JWKS (a token could \
                 then be forged with a public key as HMAC secret)"
                    .into(),
            ));
        }
        let mut static_keys = Vec::new();
        if let Some(secret) = &config.hs256_secret {
            if secret.len() < 16 {
                return Err(KeyError::Config(
                    "auth.hs256_secret must be at least 16 bytes".into(),
                ));
            }
            static_keys.push(Arc::new(Key {
                kid: None,
                alg: Algorithm::HS256,
                key: DecodingKey::from_secret(secret.as_bytes()),
            }));
        }
        for pk in &config.public_keys {
            let err = |reason: String| KeyError::PublicKey {
                path: pk.path.clone(),
                reason,
            };
            let alg = parse_algorithm(&pk.algorithm).ok_or_else(|| {
                err(format!(
                    "algorithm '{}' is not one of RS256, RS384, RS512, PS256, ES256, ES384, EdDSA",
                    pk.algorithm
                ))
            })?;
            let pem = std::fs::read(&pk.path).map_err(|e| err(e.to_string()))?;
            let key = match alg {
                Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                _ => DecodingKey::from_rsa_pem(&pem),
            }
            .map_err(|e| err(format!("not a {} public key: {e}", pk.algorithm)))?;
            static_keys.push(Arc::new(Key {
                kid: pk.kid.clone(),
                alg,
                key,
            }));
        }
        let jwks = match (&config.jwks_url, &config.jwks_file) {
            (Some(_), Some(_)) => {
                return Err(KeyError::Config(
                    "set auth.jwks_url or auth.jwks_file, not both".into(),
                ));
            }
            (Some(url), None) => {
                if !url.starts_with("https://") {
                    return Err(KeyError::Config(
                        "auth.jwks_url must be an https URL".into(),
                    ));
                }
                let mut builder = reqwest::Client::builder()
                    .redirect(reqwest::redirect::Policy::none())
                    .timeout(Duration::from_secs(10));
                if let Some(ca) = &config.jwks_ca {
                    let pem = std::fs::read(ca).map_err(|e| {
                        KeyError::Config(format!("auth.jwks_ca: {}: {e}", ca.display()))
                    })?;
                    let cert = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                        KeyError::Config(format!("auth.jwks_ca: {}: {e}", ca.display()))
                    })?;
                    builder = builder.add_root_certificate(cert);
                }
                let client = builder
                    .build()
                    .map_err(|e| KeyError::Config(format!("JWKS client: {e}")))?;
                Some(JwksSource::Url {
                    url: url.clone(),
                    client,
                })
            }
            (None, Some(path)) => Some(JwksSource::File(path.clone())),
            (None, None) => None,
        };
        let verifier = Verifier {
            static_keys,
            jwks_keys: RwLock::new(Vec::new()),
            jwks,
            last_kid_fetch: Mutex::new(None),
            fetch_lock: tokio::sync::Mutex::new(()),
            audience: config.verify_aud.then(|| config.resource_server_id.clone()),
            issuer: config.issuer.clone(),
            leeway: config.leeway.as_secs(),
        };
        if verifier.jwks.is_some() {
            verifier.refresh().await?;
        }
        Ok(verifier)
    }

    pub fn has_keys(&self) -> bool {
        !self.static_keys.is_empty() || self.jwks.is_some()
    }

    pub fn has_jwks(&self) -> bool {
        self.jwks.is_some()
    }

    /// Fetches the JWKS again and swaps the keys in.
    pub async fn refresh(&self) -> Result<(), KeyError> {
        let Some(source) = &self.jwks else {
            return Ok(());
        };
        let _one_at_a_time = self.fetch_lock.lock().await;
        let set = source.fetch().await?;
        let keys = jwk_keys(&set);
        tracing::debug!(keys = keys.len(), source = %source.name(), "JWKS loaded");
        *self.jwks_keys.write() = keys;
        Ok(())
    }

    fn candidates(&self, alg: Algorithm, kid: Option<&str>) -> Vec<Arc<Key>> {
        let jwks = self.jwks_keys.read();
        let all: Vec<&Arc<Key>> = self.static_keys.iter().chain(jwks.iter()).collect();
        match kid {
            Some(kid) => all
                .into_iter()
                .filter(|k| k.alg == alg && k.kid.as_deref() == Some(kid))
                .cloned()
                .collect(),
            // Without a kid a token is tried only when there is one key at all.
            None if all.len() == 1 && all[0].alg == alg => vec![all[0].clone()],
            None => Vec::new(),
        }
    }

    /// Verifies signature and registered claims; returns the claims.
    pub async fn verify(&self, token: &str) -> Result<serde_json::Map<String, Value>, AuthError> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| AuthError::Invalid(format!("malformed token: {e}")))?;
        let kid = header.kid.as_deref();
        let mut keys = self.candidates(header.alg, kid);
        if keys.is_empty() && kid.is_some() && self.jwks.is_some() {
            let due = {
                let mut last = self.last_kid_fetch.lock();
                let due = last.is_none_or(|at| at.elapsed() >= UNKNOWN_KID_REFETCH);
                if due {
                    *last = Some(Instant::now());
                }
                due
            };
            if due {
                if let Err(e) = self.refresh().await {
                    tracing::warn!("JWKS refresh for an unknown kid failed: {e}");
                }
                keys = self.candidates(header.alg, kid);
            }
        }
        if keys.is_empty() {
            return Err(AuthError::Invalid(match kid {
                Some(kid) => format!("no {:?} key with kid '{kid}'", header.alg),
                None => format!("no {:?} key for a token without kid", header.alg),
            }));
        }
        let mut validation = Validation::new(header.alg);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        // jsonwebtoken checks aud/iss only when the token has them unless they are required:
        // a configured issuer or audience must be present, not merely not wrong.
        let mut required = vec!["exp"];
        match &self.audience {
            Some(aud) => {
                validation.set_audience(&[aud]);
                required.push("aud");
            }
            None => validation.validate_aud = false,
        }
        if let Some(iss) = &self.issuer {
            validation.set_issuer(&[iss]);
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        let mut last = None;
        for key in keys {
            match jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                token,
                &key.key,
                &validation,
            ) {
                Ok(data) => return Ok(data.claims),
                Err(e) => last = Some(e),
            }
        }
        let e = last.map(|e| e.into_kind());
        Err(match e {
            Some(jsonwebtoken::errors::ErrorKind::ExpiredSignature) => AuthError::Expired,
            Some(kind) => AuthError::Invalid(format!("{kind:?}")),
            None => AuthError::Invalid("no key".into()),
        })
    }
}

/// Re-reads the JWKS every `every` until shutdown.
pub fn spawn_refresh(
    verifier: Arc<Verifier>,
    every: Duration,
    shutdown: crate::shutdown::Shutdown,
) -> Option<tokio::task::JoinHandle<()>> {
    if !verifier.has_jwks() || every.is_zero() {
        return None;
    }
    Some(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = shutdown.wait() => return,
                _ = tokio::time::sleep(every) => {}
            }
            if let Err(e) = verifier.refresh().await {
                tracing::warn!("JWKS refresh failed (keeping the previous keys): {e}");
            }
        }
    }))
}
