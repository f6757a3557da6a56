//! Push providers: a [`PushJob`] in, an [`Outcome`] out (sent, retry after, dead token, failed).
//!
//! Each provider speaks its service's real API with a configurable base URL (tests run real local HTTP
//! servers in place of Google's, Apple's and the browsers' push services): [`fcm`] (HTTP v1 with an
//! OAuth token from a service account), [`apns`] (HTTP/2 with an ES256 provider token), [`webpush`]
//! (VAPID + aes128gcm) and [`webhook`] (the job as signed JSON).
//!
//! This module knows nothing of rooms, rules or backends: the engine plans jobs, keeps the outbox and
//! runs the sending loop (claims a job, calls [`Provider::send`], retries, removes dead tokens).
//! Logs never carry a token, a subscription or notification text.

use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::PushConfig;

pub mod apns;
pub mod fcm;
mod http_util;
pub mod webhook;
pub mod webpush;

/// Which provider a device is registered with.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    /// Firebase Cloud Messaging HTTP v1.
    Fcm,
    /// Apple Push Notification service.
    Apns,
    /// Web Push (RFC 8030/8291/8292).
    Webpush,
    /// A signed webhook.
    Webhook,
}

impl ProviderKind {
    /// Every provider.
    pub const ALL: [ProviderKind; 4] = [
        ProviderKind::Fcm,
        ProviderKind::Apns,
        ProviderKind::Webpush,
        ProviderKind::Webhook,
    ];

    /// The name in registrations, config and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Fcm => "fcm",
            ProviderKind::Apns => "apns",
            ProviderKind::Webpush => "webpush",
            ProviderKind::Webhook => "webhook",
        }
    }

    /// The provider named `s`.
    pub fn parse(s: &str) -> Option<ProviderKind> {
        ProviderKind::ALL.into_iter().find(|k| k.as_str() == s)
    }
}

/// Why a push was planned.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PushReason {
    /// The user had no live session.
    Offline,
    /// No device of the user was in the foreground (or the device policy left this one out live).
    Background,
    /// No device acknowledged the event within the rule's `after`.
    Unacked,
    /// The rule says always.
    Always,
}

/// One notification to one device.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PushJob {
    /// Stable job id (the same for a retried or duplicated job): providers that can collapse use it
    /// or [`PushJob::collapse`] so a rare duplicate shows once.
    pub id: String,
    /// Recipient user.
    pub user: String,
    /// Recipient device id.
    pub device: String,
    /// Provider.
    pub provider: ProviderKind,
    /// Provider token (fcm, apns; optional for webhook).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Web Push subscription (`{endpoint, keys: {p256dh, auth}}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub subscription: Option<serde_json::Value>,
    /// Notification title.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub title: Option<String>,
    /// Notification body.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<String>,
    /// Extra data from the rule (a JSON object), passed to the app.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<serde_json::Value>,
    /// Collapse key: one per room by default (FCM `collapse_key`, `apns-collapse-id`, Web Push
    /// `Topic` derived from it): a newer notification for the room replaces the older one.
    pub collapse: String,
    /// How long the provider should keep trying to deliver it (seconds).
    pub ttl: u64,
    /// Why it was planned.
    pub reason: PushReason,
    /// The channel the event was published on.
    pub channel: String,
    /// The room, for room events (the app opens it and syncs from `seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room: Option<String>,
    /// The event's seq on `channel`, when stored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seq: Option<u64>,
    /// The event type.
    pub event: String,
    /// The event id.
    pub event_id: String,
    /// How many events this notification stands for (more than 1: a burst merged into one).
    pub count: u32,
}

impl PushJob {
    /// The key/value data every provider hands to the app (FCM `data`, APNs custom keys, the Web Push
    /// and webhook bodies): `room`, `seq`, `channel`, `event`, `event_id`, `count`, `reason`, and the
    /// rule's `data` under `data` (as JSON text where the provider needs strings).
    pub fn app_data(&self) -> serde_json::Map<String, serde_json::Value> {
        let mut m = serde_json::Map::new();
        m.insert("channel".into(), self.channel.clone().into());
        if let Some(r) = &self.room {
            m.insert("room".into(), r.clone().into());
        }
        if let Some(s) = self.seq {
            m.insert("seq".into(), s.into());
        }
        m.insert("event".into(), self.event.clone().into());
        m.insert("event_id".into(), self.event_id.clone().into());
        m.insert("count".into(), self.count.into());
        m.insert(
            "reason".into(),
            serde_json::to_value(self.reason).expect("reason serialises"),
        );
        if let Some(d) = &self.data {
            m.insert("data".into(), d.clone());
        }
        m
    }
}

/// What a send came to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Accepted by the provider.
    Sent,
    /// Try again: after the provider's `Retry-After` when it gave one, else with backoff.
    Retry {
        /// The provider's `Retry-After`.
        after: Option<Duration>,
        /// Short reason (status, provider error code): no token, no payload.
        reason: String,
    },
    /// The provider says the token or subscription is gone: remove the device.
    DeadToken {
        /// Short reason.
        reason: String,
    },
    /// Permanent failure (bad request, auth refused): dead-lettered, not retried.
    Failed {
        /// Short reason.
        reason: String,
    },
}

/// A push provider.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Which one.
    fn kind(&self) -> ProviderKind;
    /// Sends one job. Never panics; network errors are [`Outcome::Retry`].
    async fn send(&self, job: &PushJob) -> Outcome;
    /// Checks a registration's token / subscription shape before it is stored; the error names the
    /// field (`token: ...`, `subscription.endpoint: ...`).
    fn check_registration(
        &self,
        token: Option<&str>,
        subscription: Option<&serde_json::Value>,
    ) -> Result<(), String> {
        let _ = (token, subscription);
        Ok(())
    }
}

/// The configured providers.
#[derive(Clone, Default)]
pub struct Providers {
    by_kind: Vec<(ProviderKind, Arc<dyn Provider>)>,
    webpush: Option<Arc<webpush::WebPush>>,
}

impl std::fmt::Debug for Providers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.by_kind.iter().map(|(k, _)| k.as_str()))
            .finish()
    }
}

impl Providers {
    /// Builds every provider `config` configures; an error names the provider and the key.
    pub fn from_config(config: &PushConfig) -> Result<Providers, String> {
        let mut p = Providers::default();
        if let Some(c) = &config.fcm {
            p.insert(Arc::new(fcm::Fcm::from_config(c)?));
        }
        if let Some(c) = &config.apns {
            p.insert(Arc::new(apns::Apns::from_config(c)?));
        }
        if let Some(c) = &config.webhook {
            p.insert(Arc::new(webhook::Webhook::from_config(c)?));
        }
        if let Some(c) = &config.webpush {
            let w = Arc::new(webpush::WebPush::from_config(c)?);
            p.webpush = Some(w.clone());
            p.insert(w);
        }
        Ok(p)
    }

    /// Adds (or replaces) a provider.
    pub fn insert(&mut self, p: Arc<dyn Provider>) {
        self.by_kind.retain(|(k, _)| *k != p.kind());
        self.by_kind.push((p.kind(), p));
    }

    /// The provider for `kind`, when configured.
    pub fn get(&self, kind: ProviderKind) -> Option<&Arc<dyn Provider>> {
        self.by_kind
            .iter()
            .find(|(k, _)| *k == kind)
            .map(|(_, p)| p)
    }

    /// The Web Push VAPID public key (base64url), when Web Push is configured: what browsers need
    /// as `applicationServerKey` to subscribe.
    pub fn webpush_public_key(&self) -> Option<String> {
        self.webpush.as_ref().map(|w| w.public_key())
    }

    /// The configured kinds.
    pub fn kinds(&self) -> Vec<ProviderKind> {
        self.by_kind.iter().map(|(k, _)| *k).collect()
    }
}

/// The HTTP client every provider uses: reqwest on rustls with the `ring` provider (no openssl, no
/// second crypto stack). An `http://` base URL is spoken to as HTTP/2 with prior knowledge by
/// providers that need HTTP/2 (FCM, APNs), so local test servers need no TLS.
pub fn http_client(http2_prior_knowledge: bool) -> Result<reqwest::Client, String> {
    http_client_builder(http2_prior_knowledge)
        .build()
        .map_err(|e| format!("push HTTP client: {e}"))
}

/// [`http_client`] before `build()`, for a provider that adds to it (Web Push plugs in a DNS
/// resolver that refuses private addresses) while keeping the shared timeouts and TLS setup.
pub fn http_client_builder(http2_prior_knowledge: bool) -> reqwest::ClientBuilder {
    crate::primitives::install_crypto_provider();
    let mut b = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(15))
        .pool_idle_timeout(Duration::from_secs(90))
        .redirect(reqwest::redirect::Policy::none());
    if http2_prior_knowledge {
        b = b.http2_prior_knowledge();
    }
    b
}
