//! Credentials: client JWTs (HS256 by default, RS256/ES256 with a public key; the algorithm is pinned
//! by config, so `none` and algorithm confusion are refused), the backend API key and the admin key.
//! Tokens are taken from `Authorization: Bearer`, `?token=`, or the WebSocket `connect` frame, and are
//! never logged.

use std::sync::Arc;

use axum::http::HeaderMap;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::channels::valid_id;
use crate::config::{Config, JwtAlgorithm, JwtConfig};

/// Claims of a client token.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Claims {
    /// User id.
    pub sub: String,
    /// Expiry, unix seconds.
    pub exp: u64,
    /// Not before, unix seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub nbf: Option<u64>,
    /// Audience.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub aud: Option<Value>,
    /// Issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// Device id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    /// Platform.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<String>,
    /// Attributes for announcement targeting.
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub attrs: Map<String, Value>,
}

/// Why a token was refused (the message is safe to show).
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// No credentials.
    #[error("missing token")]
    Missing,
    /// Expired.
    #[error("token expired")]
    Expired,
    /// Anything else.
    #[error("invalid token: {0}")]
    Invalid(String),
}

/// Verifies tokens and keys.
pub struct Auth {
    decoding: DecodingKey,
    validation: Validation,
    encoding: Option<(EncodingKey, Algorithm)>,
    api_key: String,
    admin_key: String,
}

fn alg(a: JwtAlgorithm) -> Algorithm {
    match a {
        JwtAlgorithm::HS256 => Algorithm::HS256,
        JwtAlgorithm::RS256 => Algorithm::RS256,
        JwtAlgorithm::ES256 => Algorithm::ES256,
    }
}

/// A JWT key herald cannot use, or a token it cannot mint.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The configured algorithm has no key (a public key for RS256/ES256, a secret for HS256).
    #[error("no key for the configured JWT algorithm")]
    Missing,
    /// The key does not parse, or signing failed.
    #[error("JWT key: {0}")]
    Jwt(#[from] jsonwebtoken::errors::Error),
    /// Minting needs the HS256 secret; a public key only verifies.
    #[error("herald can only mint HS256 tokens (no private key)")]
    CannotMint,
}

impl Auth {
    /// Builds the verifier from the config.
    pub fn new(config: &Config) -> Result<Arc<Auth>, KeyError> {
        let j: &JwtConfig = &config.jwt;
        let algorithm = alg(j.algorithm);
        let (decoding, encoding) = match (j.algorithm, &j.public_key_pem, &j.secret) {
            (JwtAlgorithm::HS256, _, Some(secret)) => (
                DecodingKey::from_secret(secret.as_bytes()),
                Some((EncodingKey::from_secret(secret.as_bytes()), algorithm)),
            ),
            (JwtAlgorithm::RS256, Some(pem), _) => (DecodingKey::from_rsa_pem(pem)?, None),
            (JwtAlgorithm::ES256, Some(pem), _) => (DecodingKey::from_ec_pem(pem)?, None),
            _ => return Err(KeyError::Missing),
        };
        let mut validation = Validation::new(algorithm);
        validation.algorithms = vec![algorithm];
        validation.leeway = j.leeway.as_secs();
        validation.validate_exp = true;
        validation.validate_nbf = true;
        // A configured audience or issuer must be present, not only right when present.
        let mut required = vec!["exp", "sub"];
        if j.audience.is_some() {
            required.push("aud");
        }
        if j.issuer.is_some() {
            required.push("iss");
        }
        validation.set_required_spec_claims(&required);
        match &j.audience {
            Some(a) => validation.set_audience(&[a]),
            None => validation.validate_aud = false,
        }
        if let Some(i) = &j.issuer {
            validation.set_issuer(&[i]);
        }
        Ok(Arc::new(Auth {
            decoding,
            validation,
            encoding,
            api_key: config.api_key.clone(),
            admin_key: config.admin_key.clone(),
        }))
    }

    /// Verifies a client token.
    pub fn verify(&self, token: &str) -> Result<Claims, AuthError> {
        use jsonwebtoken::errors::ErrorKind;
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|e| match e.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidAlgorithm => AuthError::Invalid("algorithm not accepted".into()),
                ErrorKind::ImmatureSignature => {
                    AuthError::Invalid("token not valid yet (nbf)".into())
                }
                ErrorKind::InvalidAudience => AuthError::Invalid("wrong audience".into()),
                ErrorKind::InvalidIssuer => AuthError::Invalid("wrong issuer".into()),
                ErrorKind::InvalidSignature => AuthError::Invalid("bad signature".into()),
                ErrorKind::MissingRequiredClaim(c) => {
                    AuthError::Invalid(format!("missing claim {c}"))
                }
                _ => AuthError::Invalid("malformed token".into()),
            })?;
        let c = data.claims;
        if !valid_id(&c.sub) {
            return Err(AuthError::Invalid(
                "sub must be 1-128 characters of [A-Za-z0-9_.@-]".into(),
            ));
        }
        if let Some(p) = &c.platform
            && !crate::device::valid_platform(p)
        {
            return Err(AuthError::Invalid(
                "platform must be web, ios, android or desktop".into(),
            ));
        }
        Ok(c)
    }

    /// Mints a client token (HS256 only: with a public key herald cannot sign).
    pub fn mint(&self, claims: &Claims) -> Result<String, KeyError> {
        let (key, algorithm) = self.encoding.as_ref().ok_or(KeyError::CannotMint)?;
        Ok(jsonwebtoken::encode(&Header::new(*algorithm), claims, key)?)
    }

    /// True when `key` is the API key (constant time).
    pub fn is_api_key(&self, key: &str) -> bool {
        ct_eq(key.as_bytes(), self.api_key.as_bytes())
    }

    /// True when `key` is the admin key (constant time).
    pub fn is_admin_key(&self, key: &str) -> bool {
        ct_eq(key.as_bytes(), self.admin_key.as_bytes())
    }
}

/// Mints a token with `secret` (HS256) for `user`, valid `ttl_secs`.
pub fn mint_hs256(
    secret: &str,
    user: &str,
    device: Option<&str>,
    ttl_secs: u64,
) -> Result<String, jsonwebtoken::errors::Error> {
    let claims = Claims {
        sub: user.into(),
        exp: unix_now() + ttl_secs,
        nbf: None,
        aud: None,
        iss: None,
        device: device.map(str::to_string),
        platform: None,
        attrs: Map::new(),
    };
    sign_hs256(secret, &claims)
}

/// Signs `claims` with an HS256 `secret` (what `herald token` prints).
pub fn sign_hs256(secret: &str, claims: &Claims) -> Result<String, jsonwebtoken::errors::Error> {
    jsonwebtoken::encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn ct_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request: `Authorization: Bearer …`, else `?token=…`.
pub fn bearer(headers: &HeaderMap, query_token: Option<&str>) -> Option<String> {
    headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .map(|t| t.trim().to_string())
        .or_else(|| query_token.map(str::to_string))
        .filter(|t| !t.is_empty())
}
