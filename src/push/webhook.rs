//! The webhook provider: each job POSTed as JSON to one URL, signed so the receiver can trust it.
//!
//! `X-Herald-Signature: sha256=<lowercase hex HMAC-SHA256(secret, raw body)>` and `X-Herald-Job: <job id>`
//! (the same for a retried job: a receiver that keeps the ids it saw drops the rare duplicate). The
//! receiver answers 2xx (sent), 410 (the device is gone: it is removed), 429/5xx (retried, honouring
//! `Retry-After`) or another 4xx (dead-lettered).

use hmac::{Hmac, Mac};
use sha2::Sha256;

use super::http_util::{network_outcome, status_outcome};
use super::{Outcome, Provider, ProviderKind, PushJob, http_client};
use crate::config::WebhookConfig;

/// The signature header.
pub const SIGNATURE_HEADER: &str = "x-herald-signature";
/// The job id header.
pub const JOB_HEADER: &str = "x-herald-job";

/// The webhook provider.
pub struct Webhook {
    url: String,
    secret: String,
    http: reqwest::Client,
}

impl Webhook {
    /// From `[push.webhook]`: `url` (http or https) and `secret` are required.
    pub fn from_config(c: &WebhookConfig) -> Result<Webhook, String> {
        let url = c
            .url
            .clone()
            .filter(|u| !u.is_empty())
            .ok_or("push.webhook.url: required")?;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err("push.webhook.url: an http:// or https:// URL".into());
        }
        let secret = c
            .secret
            .clone()
            .filter(|s| !s.is_empty())
            .ok_or("push.webhook.secret: required (the receiver checks X-Herald-Signature)")?;
        Ok(Webhook {
            url,
            secret,
            http: http_client(false)?,
        })
    }
}

/// `sha256=<hex HMAC-SHA256(secret, body)>`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(body);
    let digest = mac.finalize().into_bytes();
    let mut out = String::with_capacity(7 + 64);
    out.push_str("sha256=");
    for b in digest {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

#[async_trait::async_trait]
impl Provider for Webhook {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Webhook
    }

    async fn send(&self, job: &PushJob) -> Outcome {
        let body = match serde_json::to_vec(job) {
            Ok(b) => b,
            Err(e) => {
                return Outcome::Failed {
                    reason: format!("webhook encode: {e}"),
                };
            }
        };
        let res = self
            .http
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .header(SIGNATURE_HEADER, signature(&self.secret, &body))
            .header(JOB_HEADER, &job.id)
            .body(body)
            .send()
            .await;
        match res {
            Err(e) => network_outcome("webhook", &e),
            Ok(r) => status_outcome("webhook", r.status().as_u16(), r.headers(), &[410]),
        }
    }
}
