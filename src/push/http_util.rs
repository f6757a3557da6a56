//! Small pieces the HTTP providers share: `Retry-After`, byte-bounded truncation, short reasons,
//! network-error classification. Nothing here ever echoes a token, URL or notification text.

use std::time::{Duration, SystemTime};

/// The `Retry-After` of a response: delay-seconds or an HTTP-date (RFC 9110 §10.2.3). A date in
/// the past is zero; anything unparsable is `None` (the caller backs off on its own); more than an
/// hour is an hour (a job is not parked for days on one odd header).
pub(crate) fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    retry_after_uncapped(headers).map(|d| d.min(Duration::from_secs(3600)))
}

fn retry_after_uncapped(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    let v = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(
        at.duration_since(SystemTime::now())
            .unwrap_or(Duration::ZERO),
    )
}

/// `s` cut to at most `max` bytes on a char boundary (provider limits are in bytes).
pub(crate) fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// A provider error code made safe for a reason string: only ASCII letters, digits and `_`, at
/// most 48 of them, so a misbehaving server cannot smuggle a token or text into logs.
pub(crate) fn safe_code(code: &str) -> String {
    code.chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '_')
        .take(48)
        .collect()
}

/// What kind of network failure a reqwest error is, in one word. reqwest's own message carries the
/// URL, which for APNs contains the device token.
pub(crate) fn network_kind(e: &reqwest::Error) -> &'static str {
    if e.is_timeout() {
        "timeout"
    } else if e.is_connect() {
        "connect"
    } else if e.is_body() || e.is_decode() {
        "body"
    } else {
        "request"
    }
}

/// Seconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// FCM's `apns-collapse-id` and APNs cap a collapse id at 64 bytes.
pub(crate) const MAX_COLLAPSE: usize = 64;

/// `url` without a trailing `/`, when it is an http(s) URL (a provider's configured base URL).
pub(crate) fn base_url(url: &str) -> Result<String, String> {
    let u = url.trim();
    if !(u.starts_with("https://") || u.starts_with("http://")) {
        return Err("not an http(s) URL".into());
    }
    Ok(u.trim_end_matches('/').to_string())
}

/// The outcome of a reply from a provider whose answer is its status alone (Web Push, the
/// webhook): 2xx sent; a status in `gone` the device is gone; 429 and 5xx retried (after the
/// reply's `Retry-After`); anything else permanent. Reasons are `"{provider} {status}"`.
pub(crate) fn status_outcome(
    provider: &str,
    status: u16,
    headers: &reqwest::header::HeaderMap,
    gone: &[u16],
) -> super::Outcome {
    use super::Outcome;
    let reason = format!("{provider} {status}");
    match status {
        200..=299 => Outcome::Sent,
        s if gone.contains(&s) => Outcome::DeadToken { reason },
        429 | 500..=599 => Outcome::Retry {
            after: retry_after(headers),
            reason,
        },
        _ => Outcome::Failed { reason },
    }
}

/// A request that got no response: retried; the reason names the kind of failure, never the URL.
pub(crate) fn network_outcome(provider: &str, e: &reqwest::Error) -> super::Outcome {
    super::Outcome::Retry {
        after: None,
        reason: format!("{provider} {}", network_kind(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
        h
    }

    #[test]
    fn push_retry_after_reads_seconds_and_http_dates() {
        assert_eq!(retry_after(&headers("2")), Some(Duration::from_secs(2)));
        assert_eq!(retry_after(&HeaderMap::new()), None);
        assert_eq!(retry_after(&headers("soon")), None);
        let at = SystemTime::now() + Duration::from_secs(120);
        let d = retry_after(&headers(&httpdate::fmt_http_date(at))).unwrap();
        assert!(
            d > Duration::from_secs(100) && d <= Duration::from_secs(120),
            "{d:?}"
        );
        let past = httpdate::fmt_http_date(SystemTime::now() - Duration::from_secs(60));
        assert_eq!(retry_after(&headers(&past)), Some(Duration::ZERO));
    }

    #[test]
    fn push_truncate_utf8_cuts_on_a_char_boundary() {
        assert_eq!(truncate_utf8("abc", 64), "abc");
        assert_eq!(truncate_utf8("aé", 2), "a");
        assert_eq!(truncate_utf8("aé", 3), "aé");
    }

    #[test]
    fn push_safe_code_keeps_only_a_short_identifier() {
        assert_eq!(safe_code("UNREGISTERED"), "UNREGISTERED");
        assert_eq!(safe_code("Bad token abc/def\n"), "Badtokenabcdef");
        assert_eq!(safe_code(&"A".repeat(100)).len(), 48);
    }
}
