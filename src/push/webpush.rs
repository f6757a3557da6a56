//! Web Push: RFC 8030 delivery to a browser's push service, the body encrypted for the browser
//! (RFC 8291 `aes128gcm`, by `web-push-native`) and the request signed with VAPID (RFC 8292, an ES256
//! JWT made with `jsonwebtoken`).
//!
//! A subscription's endpoint is a URL the *client* gave us, so sending to it is a server-side request
//! to an address of the client's choosing. [`check_subscription`] keeps endpoints to the browsers' push
//! services (or `push.webpush.allowed_hosts`) over https and refuses literal private addresses; at send
//! time the host is resolved and vetted again (DNS rebinding), and the HTTP client's own resolver
//! refuses private addresses too, so the connection only ever goes to a vetted address.
//!
//! Endpoints are capabilities (whoever knows one can push to that browser): no endpoint, key or
//! payload text goes into a log line or an [`Outcome`] reason.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Mutex;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use p256::elliptic_curve::sec1::ToEncodedPoint as _;
use p256::pkcs8::{DecodePrivateKey as _, EncodePrivateKey as _};
use p256::{PublicKey, SecretKey};
use reqwest::Url;
use serde_json::Value;
use sha2::Digest as _;

use super::http_util::{network_outcome, status_outcome, unix_now};
use super::{Outcome, Provider, ProviderKind, PushJob, PushReason};
use crate::config::WebPushConfig;
use crate::primitives::lock;

/// The browsers' push services, the default `push.webpush.allowed_hosts`: Chrome/Edge (FCM), Firefox
/// (Mozilla autopush), Windows (WNS) and Safari (Apple). A leading `*.` matches any subdomain, not the
/// bare domain.
pub const DEFAULT_ALLOWED_HOSTS: &[&str] = &[
    "fcm.googleapis.com",
    "updates.push.services.mozilla.com",
    "*.push.services.mozilla.com",
    "*.notify.windows.com",
    "web.push.apple.com",
    "*.push.apple.com",
];

/// Longest endpoint accepted: real ones are a few hundred characters; this bounds what we store.
const MAX_ENDPOINT_LEN: usize = 2048;
/// Largest plaintext payload: with the aes128gcm header (86 bytes) and tag it stays well under the
/// 4,096 bytes push services accept.
pub const MAX_PAYLOAD: usize = 3000;
/// How long a VAPID JWT is valid (RFC 8292 allows at most 24 h).
const VAPID_LIFETIME: Duration = Duration::from_secs(12 * 3600);
/// A cached VAPID JWT is replaced this long before it expires.
const VAPID_REFRESH_BEFORE: Duration = Duration::from_secs(3600);
/// Bound on cached VAPID JWTs (one per push-service origin).
const VAPID_CACHE_MAX: usize = 1024;
/// Longest TTL asked for: push services keep messages at most about four weeks.
const MAX_TTL: u64 = 28 * 24 * 3600;

/// The Web Push provider.
pub struct WebPush {
    /// VAPID signing key (PKCS#8 DER inside).
    signing: jsonwebtoken::EncodingKey,
    /// The VAPID public key, base64url uncompressed point.
    public_b64: String,
    /// VAPID `sub`.
    subject: String,
    config: WebPushConfig,
    client: reqwest::Client,
    /// VAPID `Authorization` header values per push-service origin, with their `exp`.
    vapid: Mutex<HashMap<String, (String, u64)>>,
}

impl std::fmt::Debug for WebPush {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WebPush")
            .field("public_key", &self.public_b64)
            .finish_non_exhaustive()
    }
}

/// A subscription that passed [`check_subscription`].
struct Subscription {
    endpoint: Url,
    ua_public: PublicKey,
    auth: [u8; 16],
    /// The endpoint is the test-only loopback form (`allow_loopback`).
    loopback: bool,
}

impl WebPush {
    /// Builds the provider from `[push.webpush]`; errors name the key.
    pub fn from_config(config: &WebPushConfig) -> Result<WebPush, String> {
        let key = load_vapid_key(config.vapid_key.as_deref())?;
        let subject = check_subject(config.subject.as_deref())?;
        check_allowed_hosts(config.allowed_hosts.as_deref())?;
        let der = key
            .to_pkcs8_der()
            .map_err(|_| "push.webpush.vapid_key: cannot encode the key".to_string())?;
        let client = super::http_client_builder(false)
            .dns_resolver(VettingResolver {
                allow_loopback: config.allow_loopback,
            })
            .build()
            .map_err(|e| format!("push HTTP client: {e}"))?;
        Ok(WebPush {
            signing: jsonwebtoken::EncodingKey::from_ec_der(der.as_bytes()),
            public_b64: public_key_b64(&key.public_key()),
            subject,
            config: config.clone(),
            client,
            vapid: Mutex::new(HashMap::new()),
        })
    }

    /// The VAPID public key as base64url (uncompressed point): the browser's `applicationServerKey`.
    pub fn public_key(&self) -> String {
        self.public_b64.clone()
    }

    /// The `Authorization: vapid t=…, k=…` value for `origin`, reused until an hour before it expires.
    fn vapid_header(&self, origin: &str) -> Result<String, String> {
        let now = unix_now();
        let mut cache = lock(&self.vapid);
        if let Some((h, exp)) = cache.get(origin)
            && *exp > now + VAPID_REFRESH_BEFORE.as_secs()
        {
            return Ok(h.clone());
        }
        let exp = now + VAPID_LIFETIME.as_secs();
        let claims = serde_json::json!({ "aud": origin, "exp": exp, "sub": self.subject });
        let header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
        let jwt = jsonwebtoken::encode(&header, &claims, &self.signing)
            .map_err(|_| "webpush: VAPID signing failed".to_string())?;
        let value = format!("vapid t={jwt}, k={}", self.public_b64);
        if cache.len() >= VAPID_CACHE_MAX {
            let fresh = now + VAPID_REFRESH_BEFORE.as_secs();
            cache.retain(|_, (_, e)| *e > fresh);
            if cache.len() >= VAPID_CACHE_MAX {
                cache.clear();
            }
        }
        cache.insert(origin.to_string(), (value.clone(), exp));
        Ok(value)
    }

    /// Checks, vets and sends; `Err` is the outcome when it stops before the request.
    async fn try_send(&self, job: &PushJob) -> Result<Outcome, Outcome> {
        let raw = job.subscription.as_ref().ok_or_else(|| Outcome::Failed {
            reason: "webpush: job has no subscription".into(),
        })?;
        let sub = parse_subscription(raw, &self.config).map_err(|e| Outcome::Failed {
            reason: format!("webpush: {e}"),
        })?;
        vet_resolved(&sub).await?;
        let origin = sub.endpoint.origin().ascii_serialization();
        let auth = self
            .vapid_header(&origin)
            .map_err(|reason| Outcome::Failed { reason })?;
        let body = web_push_native::encrypt(
            payload(job),
            &sub.ua_public,
            &web_push_native::Auth::from(sub.auth),
        )
        .map_err(|_| Outcome::Failed {
            reason: "webpush: encryption failed".into(),
        })?;
        let res = self
            .client
            .post(sub.endpoint)
            .header("TTL", job.ttl.min(MAX_TTL))
            .header("Topic", topic(&job.collapse))
            .header("Urgency", urgency(job.reason))
            .header(reqwest::header::CONTENT_ENCODING, "aes128gcm")
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .header(reqwest::header::AUTHORIZATION, auth)
            .body(body)
            .send()
            .await
            .map_err(|e| network_outcome("webpush", &e))?;
        Ok(status_outcome(
            "webpush",
            res.status().as_u16(),
            res.headers(),
            &[404, 410],
        ))
    }
}

#[async_trait::async_trait]
impl Provider for WebPush {
    fn kind(&self) -> ProviderKind {
        ProviderKind::Webpush
    }

    fn check_registration(
        &self,
        _token: Option<&str>,
        subscription: Option<&Value>,
    ) -> Result<(), String> {
        check_subscription(
            subscription.ok_or("subscription: required (the browser's PushSubscription)")?,
            &self.config,
        )
    }

    async fn send(&self, job: &PushJob) -> Outcome {
        let outcome = self.try_send(job).await.unwrap_or_else(|o| o);
        tracing::debug!(job = %job.id, outcome = ?outcome, "webpush send");
        outcome
    }
}

/// Loads the VAPID key: base64url of the raw 32-byte scalar, or a file holding that text or a
/// PKCS#8 / SEC1 PEM. Errors never echo the value (it may be the key itself).
fn load_vapid_key(value: Option<&str>) -> Result<SecretKey, String> {
    let value = value
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or_else(|| "push.webpush.vapid_key: required".to_string())?;
    if let Some(key) = key_from_b64(value) {
        return Ok(key);
    }
    let text = std::fs::read_to_string(value).map_err(|_| {
        "push.webpush.vapid_key: neither a base64url P-256 private key nor a readable key file"
            .to_string()
    })?;
    key_from_text(text.trim()).ok_or_else(|| {
        "push.webpush.vapid_key: the file holds no P-256 private key (base64url, PKCS#8 or SEC1 PEM)"
            .to_string()
    })
}

/// A raw 32-byte scalar in base64url (padding tolerated).
fn key_from_b64(s: &str) -> Option<SecretKey> {
    let bytes = URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()?;
    if bytes.len() != 32 {
        return None;
    }
    SecretKey::from_slice(&bytes).ok()
}

/// A key file's text: PEM (PKCS#8 or SEC1) or base64url.
fn key_from_text(text: &str) -> Option<SecretKey> {
    if text.starts_with("-----BEGIN") {
        SecretKey::from_pkcs8_pem(text)
            .ok()
            .or_else(|| SecretKey::from_sec1_pem(text).ok())
    } else {
        key_from_b64(text)
    }
}

/// VAPID `sub`: a contact the push service can reach, `mailto:` or `https:`.
fn check_subject(subject: Option<&str>) -> Result<String, String> {
    let s = subject
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .ok_or_else(|| "push.webpush.subject: required".to_string())?;
    if (s.starts_with("mailto:") && s.len() > "mailto:".len())
        || (s.starts_with("https:") && s.len() > "https:".len())
    {
        Ok(s.to_string())
    } else {
        Err("push.webpush.subject: must start with mailto: or https:".into())
    }
}

/// `allowed_hosts` entries are host names, optionally with a leading `*.`: a URL, a port or a `*`
/// elsewhere is a mistake that would silently match nothing (or too much).
fn check_allowed_hosts(hosts: Option<&[String]>) -> Result<(), String> {
    for h in hosts.unwrap_or_default() {
        let name = h.strip_prefix("*.").unwrap_or(h);
        let ok = !name.is_empty()
            && name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if !ok {
            return Err(format!(
                "push.webpush.allowed_hosts: {h:?} is not a host name (or *.domain)"
            ));
        }
    }
    Ok(())
}

fn public_key_b64(key: &PublicKey) -> String {
    URL_SAFE_NO_PAD.encode(key.to_encoded_point(false).as_bytes())
}

/// Checks a browser subscription (`{endpoint, keys: {p256dh, auth}}`) when a device registers and
/// again before each send; the error names the field and never carries its value.
pub fn check_subscription(sub: &Value, cfg: &WebPushConfig) -> Result<(), String> {
    parse_subscription(sub, cfg).map(|_| ())
}

fn parse_subscription(sub: &Value, cfg: &WebPushConfig) -> Result<Subscription, String> {
    let obj = sub
        .as_object()
        .ok_or_else(|| "subscription: must be an object".to_string())?;
    let endpoint = obj
        .get("endpoint")
        .and_then(Value::as_str)
        .ok_or_else(|| "subscription.endpoint: missing (a string)".to_string())?;
    let (endpoint, loopback) = check_endpoint(endpoint, cfg)?;
    let keys = obj
        .get("keys")
        .and_then(Value::as_object)
        .ok_or_else(|| "subscription.keys: missing (an object)".to_string())?;
    let p256dh = keys
        .get("p256dh")
        .and_then(Value::as_str)
        .ok_or_else(|| "subscription.keys.p256dh: missing (a string)".to_string())?;
    let auth = keys
        .get("auth")
        .and_then(Value::as_str)
        .ok_or_else(|| "subscription.keys.auth: missing (a string)".to_string())?;
    Ok(Subscription {
        endpoint,
        ua_public: check_p256dh(p256dh)?,
        auth: check_auth(auth)?,
        loopback,
    })
}

/// Decodes base64url as browsers send it (unpadded; padding tolerated).
fn b64url(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s.trim_end_matches('=')).ok()
}

/// The browser's ECDH key: a 65-byte uncompressed point on P-256.
fn check_p256dh(s: &str) -> Result<PublicKey, String> {
    let bytes = b64url(s).ok_or_else(|| "subscription.keys.p256dh: not base64url".to_string())?;
    if bytes.len() != 65 || bytes[0] != 0x04 {
        return Err("subscription.keys.p256dh: must be a 65-byte uncompressed P-256 point".into());
    }
    PublicKey::from_sec1_bytes(&bytes)
        .map_err(|_| "subscription.keys.p256dh: not a point on P-256".to_string())
}

/// The browser's auth secret: 16 bytes.
fn check_auth(s: &str) -> Result<[u8; 16], String> {
    let bytes = b64url(s).ok_or_else(|| "subscription.keys.auth: not base64url".to_string())?;
    bytes
        .try_into()
        .map_err(|_| "subscription.keys.auth: must be 16 bytes".to_string())
}

/// The endpoint URL, and whether it is the test-only loopback form.
fn check_endpoint(endpoint: &str, cfg: &WebPushConfig) -> Result<(Url, bool), String> {
    if endpoint.len() > MAX_ENDPOINT_LEN {
        return Err(format!(
            "subscription.endpoint: longer than {MAX_ENDPOINT_LEN} characters"
        ));
    }
    let url = Url::parse(endpoint).map_err(|_| "subscription.endpoint: not a URL".to_string())?;
    if !url.username().is_empty() || url.password().is_some() {
        return Err("subscription.endpoint: must not carry credentials".into());
    }
    let host = url
        .host()
        .ok_or_else(|| "subscription.endpoint: has no host".to_string())?;
    if cfg.allow_loopback && is_loopback_host(&host) && matches!(url.scheme(), "http" | "https") {
        return Ok((url, true));
    }
    if url.scheme() != "https" {
        return Err("subscription.endpoint: must be https".into());
    }
    let ip = match host {
        url::Host::Ipv4(a) => Some(IpAddr::V4(a)),
        url::Host::Ipv6(a) => Some(IpAddr::V6(a)),
        url::Host::Domain(_) => None,
    };
    if let Some(ip) = ip
        && !address_allowed(ip, false)
    {
        return Err("subscription.endpoint: a private or reserved address".into());
    }
    let host = url.host_str().unwrap_or_default();
    if !host_on_list(host, cfg.allowed_hosts.as_deref()) {
        return Err("subscription.endpoint: host not on push.webpush.allowed_hosts".into());
    }
    Ok((url, false))
}

/// `127.0.0.1` or `localhost`, the only hosts `allow_loopback` opens.
fn is_loopback_host(host: &url::Host<&str>) -> bool {
    match host {
        url::Host::Ipv4(a) => *a == Ipv4Addr::LOCALHOST,
        url::Host::Domain(d) => d.eq_ignore_ascii_case("localhost"),
        url::Host::Ipv6(_) => false,
    }
}

/// Whether `host` is on `allowed` (or [`DEFAULT_ALLOWED_HOSTS`]); `*.example.com` matches
/// subdomains of example.com only. A trailing dot (absolute name) is the same host.
fn host_on_list(host: &str, allowed: Option<&[String]>) -> bool {
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let matches = |pattern: &str| host_matches(&host, &pattern.to_ascii_lowercase());
    match allowed {
        Some(list) => list.iter().any(|p| matches(p)),
        None => DEFAULT_ALLOWED_HOSTS.iter().any(|p| matches(p)),
    }
}

fn host_matches(host: &str, pattern: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(domain) => host
            .strip_suffix(domain)
            .and_then(|sub| sub.strip_suffix('.'))
            .is_some_and(|sub| !sub.is_empty()),
        None => host == pattern,
    }
}

/// Whether a push may go to `ip`: public unicast only. Refused: private, loopback (unless
/// `allow_loopback`, test-only), link-local, unspecified, multicast, broadcast and other reserved
/// IPv4, documentation, CGNAT 100.64/10, benchmarking; IPv6 outside global unicast 2000::/3 (which
/// covers unique-local fc00::/7, link-local, multicast), documentation, Teredo, and IPv4-mapped,
/// NAT64 and 6to4 addresses whose embedded IPv4 address is refused.
pub fn address_allowed(ip: IpAddr, allow_loopback: bool) -> bool {
    match ip {
        IpAddr::V4(a) => v4_allowed(a, allow_loopback),
        IpAddr::V6(a) => v6_allowed(a, allow_loopback),
    }
}

fn v4_allowed(a: Ipv4Addr, allow_loopback: bool) -> bool {
    if a.is_loopback() {
        return allow_loopback;
    }
    let [o0, o1, o2, _] = a.octets();
    let refused = o0 == 0 // "this network", unspecified
        || a.is_private()
        || a.is_link_local()
        || (o0 == 100 && (o1 & 0xc0) == 64) // CGNAT 100.64/10
        || (o0 == 192 && o1 == 0 && o2 == 0) // IETF protocol assignments
        || a.is_documentation()
        || (o0 == 198 && (o1 & 0xfe) == 18) // benchmarking 198.18/15
        || o0 >= 224; // multicast, reserved 240/4, broadcast
    !refused
}

fn v6_allowed(a: Ipv6Addr, allow_loopback: bool) -> bool {
    if a.is_loopback() {
        return allow_loopback;
    }
    if let Some(v4) = a.to_ipv4_mapped() {
        return v4_allowed(v4, allow_loopback);
    }
    let s = a.segments();
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        // NAT64 well-known prefix 64:ff9b::/96: judge the IPv4 address inside.
        let [_, _, _, _, _, _, hi, lo] = s;
        return v4_allowed(Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo)), false);
    }
    if (s[0] & 0xe000) != 0x2000 {
        return false; // not global unicast: ::/8, fc00::/7, fe80::/10, ff00::/8, ...
    }
    if s[0] == 0x2002 {
        // 6to4: the IPv4 address is in bits 16..48.
        return v4_allowed(
            Ipv4Addr::from((u32::from(s[1]) << 16) | u32::from(s[2])),
            false,
        );
    }
    let documentation = s[0] == 0x2001 && s[1] == 0x0db8;
    let teredo = s[0] == 0x2001 && s[1] == 0;
    let orchid = s[0] == 0x2001 && matches!(s[1] & 0xfff0, 0x0010 | 0x0020);
    !(documentation || teredo || orchid)
}

/// Resolves the endpoint's host and refuses the send when any address is not allowed, before a
/// connection is made. The client's [`VettingResolver`] applies the same rule to the addresses it
/// actually connects to, so a name that re-resolves elsewhere between the two (DNS rebinding) fails
/// to connect rather than reaching a private address.
async fn vet_resolved(sub: &Subscription) -> Result<(), Outcome> {
    let host = match sub.endpoint.host() {
        Some(url::Host::Domain(d)) => d.to_string(),
        Some(_) => return Ok(()), // a literal IP, vetted by check_subscription
        None => {
            return Err(Outcome::Failed {
                reason: "webpush: subscription.endpoint: has no host".into(),
            });
        }
    };
    let port = sub.endpoint.port_or_known_default().unwrap_or(443);
    let addrs: Vec<SocketAddr> = match tokio::net::lookup_host((host.as_str(), port)).await {
        Ok(a) => a.collect(),
        Err(_) => {
            return Err(Outcome::Retry {
                after: None,
                reason: "webpush: DNS lookup failed".into(),
            });
        }
    };
    if addrs.is_empty() {
        return Err(Outcome::Retry {
            after: None,
            reason: "webpush: DNS lookup found no address".into(),
        });
    }
    if addrs.iter().any(|a| !address_allowed(a.ip(), sub.loopback)) {
        return Err(Outcome::Failed {
            reason: "endpoint resolves to a private address".into(),
        });
    }
    Ok(())
}

/// The HTTP client's resolver: the system's, refusing a name when any of its addresses is not
/// allowed. Loopback is allowed only for `localhost` under the test-only `allow_loopback`.
struct VettingResolver {
    allow_loopback: bool,
}

impl reqwest::dns::Resolve for VettingResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_string();
        let loopback_ok = self.allow_loopback && host.eq_ignore_ascii_case("localhost");
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if addrs.iter().any(|a| !address_allowed(a.ip(), loopback_ok)) {
                return Err("endpoint resolves to a private address".into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(addrs.into_iter());
            Ok(addrs)
        })
    }
}

/// The `Topic` header for a collapse key: push services keep only the newest message per topic.
/// Topic is limited to 32 characters of the URL-safe base64 alphabet, so it is the first 32
/// characters of base64url(sha256(collapse)) (which also keeps room names out of the header).
pub fn topic(collapse: &str) -> String {
    let digest = sha2::Sha256::digest(collapse.as_bytes());
    let mut t = URL_SAFE_NO_PAD.encode(digest);
    t.truncate(32);
    t
}

/// `Urgency`: `high` when the user is waiting on it (offline, or left unacknowledged), else
/// `normal` (lets the push service batch it on battery).
fn urgency(reason: PushReason) -> &'static str {
    match reason {
        PushReason::Unacked | PushReason::Offline => "high",
        PushReason::Background | PushReason::Always => "normal",
    }
}

/// The plaintext the service worker receives: `{"title", "body", "data": app_data()}`, at most
/// [`MAX_PAYLOAD`] bytes so the encrypted record stays under push services' 4,096-byte limit. Too
/// long: the body is cut (on a char boundary, ending in "…"), then the title, then the rule's `data`
/// is left out, then everything but the room and seq.
pub fn payload(job: &PushJob) -> Vec<u8> {
    let mut data = job.app_data();
    let mut title = job.title.clone();
    let mut body = job.body.clone();
    let fits = |t: &Option<String>, b: &Option<String>, d: &serde_json::Map<String, Value>| {
        encode_payload(t, b, d).len() <= MAX_PAYLOAD
    };
    if !fits(&title, &body, &data) {
        body = body.map(|b| truncate_to_fit(&b, |c| fits(&title, &Some(c), &data)));
    }
    if !fits(&title, &body, &data) {
        title = title.map(|t| truncate_to_fit(&t, |c| fits(&Some(c), &body, &data)));
    }
    if !fits(&title, &body, &data) {
        data.remove("data");
    }
    if !fits(&title, &body, &data) {
        data.retain(|k, _| k == "room" || k == "seq");
        if !fits(&title, &body, &data) {
            data.clear();
        }
    }
    encode_payload(&title, &body, &data)
}

fn encode_payload(
    title: &Option<String>,
    body: &Option<String>,
    data: &serde_json::Map<String, Value>,
) -> Vec<u8> {
    let mut m = serde_json::Map::new();
    if let Some(t) = title {
        m.insert("title".into(), t.clone().into());
    }
    if let Some(b) = body {
        m.insert("body".into(), b.clone().into());
    }
    m.insert("data".into(), Value::Object(data.clone()));
    serde_json::to_vec(&Value::Object(m)).unwrap_or_default()
}

/// The longest prefix of `s` (cut on a char boundary, "…" appended) that `fits`; "" when none does.
fn truncate_to_fit(s: &str, fits: impl Fn(String) -> bool) -> String {
    let bounds: Vec<usize> = s.char_indices().map(|(i, _)| i).collect();
    let cut = |n: usize| format!("{}…", &s[..bounds[n]]);
    // Binary search the number of chars kept: fits(cut(lo)) holds or lo == 0.
    let (mut lo, mut hi) = (0usize, bounds.len());
    while lo < hi {
        let mid = (lo + hi).div_ceil(2);
        if fits(cut(mid)) {
            lo = mid;
        } else {
            hi = mid - 1;
        }
    }
    if lo == 0 && !fits(cut(0)) {
        String::new()
    } else {
        cut(lo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn provider() -> WebPush {
        WebPush::from_config(&WebPushConfig {
            vapid_key: Some(URL_SAFE_NO_PAD.encode([5u8; 32])),
            subject: Some("mailto:ops@example.com".into()),
            ..WebPushConfig::default()
        })
        .expect("provider")
    }

    #[test]
    fn vapid_header_is_reused_per_origin() {
        let wp = provider();
        let a = wp.vapid_header("https://fcm.googleapis.com").unwrap();
        // (ES256 here is deterministic, so mark the cached entry to see it come back.)
        let fresh = unix_now() + 2 * 3600;
        wp.vapid.lock().unwrap().insert(
            "https://fcm.googleapis.com".into(),
            ("cached".into(), fresh),
        );
        assert_eq!(
            wp.vapid_header("https://fcm.googleapis.com").unwrap(),
            "cached"
        );
        assert_ne!(a, wp.vapid_header("https://web.push.apple.com").unwrap());
        assert!(a.starts_with("vapid t=") && a.ends_with(&format!(", k={}", wp.public_key())));
        // One close to expiry is replaced.
        let stale = unix_now() + VAPID_REFRESH_BEFORE.as_secs() - 1;
        wp.vapid
            .lock()
            .unwrap()
            .get_mut("https://fcm.googleapis.com")
            .unwrap()
            .1 = stale;
        let renewed = wp.vapid_header("https://fcm.googleapis.com").unwrap();
        assert!(renewed.starts_with("vapid t="), "{renewed}");
        let exp = wp.vapid.lock().unwrap()["https://fcm.googleapis.com"].1;
        assert!(
            exp >= unix_now() + VAPID_LIFETIME.as_secs() - 5,
            "not re-signed"
        );
    }

    #[test]
    fn allowed_hosts_must_be_host_names() {
        for bad in [
            "",
            "*",
            "https://fcm.googleapis.com",
            "a.b:443",
            "*.*.x.com",
        ] {
            let e = check_allowed_hosts(Some(&[bad.to_string()])).unwrap_err();
            assert!(e.starts_with("push.webpush.allowed_hosts:"), "{e}");
        }
        check_allowed_hosts(Some(&[
            "*.push.example.org".into(),
            "push.example.net".into(),
        ]))
        .unwrap();
    }

    #[tokio::test]
    async fn client_resolver_refuses_loopback_unless_allowed_for_localhost() {
        use reqwest::dns::Resolve as _;
        let name = |s: &str| s.parse::<reqwest::dns::Name>().unwrap();
        let strict = VettingResolver {
            allow_loopback: false,
        };
        assert!(strict.resolve(name("localhost")).await.is_err());
        let test = VettingResolver {
            allow_loopback: true,
        };
        let addrs: Vec<SocketAddr> = test.resolve(name("localhost")).await.unwrap().collect();
        assert!(addrs.iter().all(|a| a.ip().is_loopback()) && !addrs.is_empty());
    }

    #[test]
    fn wildcard_matches_subdomains_only() {
        assert!(host_matches("a.push.apple.com", "*.push.apple.com"));
        assert!(!host_matches("push.apple.com", "*.push.apple.com"));
        assert!(!host_matches("evilpush.apple.com", "*.push.apple.com"));
    }

    #[test]
    fn nat64_and_6to4_judge_the_embedded_address() {
        assert!(!address_allowed("64:ff9b::a00:1".parse().unwrap(), false));
        assert!(address_allowed("64:ff9b::808:808".parse().unwrap(), false));
        assert!(!address_allowed("2002:c0a8:101::1".parse().unwrap(), false));
        assert!(address_allowed("2a00:1450:4001::1".parse().unwrap(), false));
    }
}
