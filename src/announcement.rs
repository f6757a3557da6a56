//! Announcements (seed 004's global notices): what one is, the checks a new one must pass, and how it
//! looks on the wire (the `announcement` event's data, and the event in `connected.sync`).
//! Vocabulary: transports, the engine and the backends all use these; it imports nothing of them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::channels::parse_duration;

/// An announcement (seed 004's global notice).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Announcement {
    /// Id (time-ordered).
    pub id: String,
    /// Title.
    pub title: String,
    /// Body text.
    pub body: String,
    /// Landing URL.
    pub url: Option<String>,
    /// Image URL.
    pub image: Option<String>,
    /// Unix ms after which it is no longer shown; `None` = never expires.
    pub expires: Option<i64>,
    /// Attribute filter: every key must equal the user's JWT `attrs` value.
    #[serde(default)]
    pub audience: serde_json::Map<String, serde_json::Value>,
    /// Creation time, unix ms.
    pub ts: i64,
}

/// A new announcement as a backend asks for it (`POST /api/v1/announcements`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AnnouncementDraft {
    /// Title (1-256 characters).
    pub title: String,
    /// Body text.
    pub body: String,
    /// Landing URL.
    pub url: Option<String>,
    /// Image URL.
    pub image: Option<String>,
    /// Unix ms, or a duration from now ("7d").
    pub expires: Option<Value>,
    /// Attribute filter.
    #[serde(default)]
    pub audience: Map<String, Value>,
}

impl Announcement {
    /// The announcement `draft` describes, made at `now` (unix ms) with `id`; the error names the
    /// field that is wrong.
    pub fn create(draft: AnnouncementDraft, id: String, now: i64) -> Result<Announcement, String> {
        if draft.title.is_empty() || draft.title.chars().count() > 256 {
            return Err("title: 1-256 characters".into());
        }
        let expires = match draft.expires {
            None | Some(Value::Null) => None,
            Some(Value::Number(n)) => Some(n.as_i64().ok_or("expires: unix ms")?),
            Some(Value::String(d)) => Some(now + parse_duration(&d)?.as_millis() as i64),
            Some(_) => return Err("expires: unix ms or a duration like \"7d\"".into()),
        };
        if expires.is_some_and(|e| e <= now) {
            return Err("expires: already in the past".into());
        }
        Ok(Announcement {
            id,
            title: draft.title,
            body: draft.body,
            url: draft.url,
            image: draft.image,
            expires,
            audience: draft.audience,
            ts: now,
        })
    }

    /// The data of an `announcement` event (with its `audience`, which `announce` rules read).
    pub fn data(&self) -> Value {
        json!({
            "id": self.id, "title": self.title, "body": self.body, "url": self.url,
            "image": self.image, "expires": self.expires, "audience": self.audience,
        })
    }

    /// The announcement as an `event` object, as `connected.sync` lists it.
    pub fn event(&self) -> Value {
        json!({
            "type": "event", "channel": "global", "id": self.id, "event": "announcement",
            "data": self.data(), "ts": self.ts,
        })
    }
}
