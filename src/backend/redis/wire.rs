//! The format of what herald PUBLISHes to Redis Pub/Sub, defined here and nowhere else in Rust:
//! `<stored> <seq> <epoch> <event>\n<filter>\n<frame>`, where `<stored>` is `1` for a stored
//! event (with its seq and epoch) and `0` for a frame that is not stored (`-` for both), `<filter>` is
//! the live-delivery filter as JSON (empty when it filters nothing), and `<frame>` the frame every
//! recipient gets. `lua/publish.lua` writes the stored form inside Redis, the same bytes (the wire
//! tests hold it to them); the filter is also kept beside each stored event (`x` in the stream).

use std::sync::Arc;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::DeliveryFilter;
use crate::device::DevicePolicy;
use crate::event::{Epoch, Position};

/// The live-delivery filter as it travels in a Pub/Sub payload and is kept beside a stored event.
#[derive(Serialize, Deserialize, Default)]
struct WireFilter {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    except: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    audience: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default, skip_serializing_if = "is_all")]
    devices: DevicePolicy,
}

fn is_all(d: &DevicePolicy) -> bool {
    *d == DevicePolicy::All
}

pub(super) fn encode_filter(f: &DeliveryFilter) -> String {
    if f.is_empty() {
        return String::new();
    }
    serde_json::to_string(&WireFilter {
        except: f.except.iter().map(|u| u.to_string()).collect(),
        audience: f.audience.as_ref().map(|a| (**a).clone()),
        devices: f.devices,
    })
    .expect("filter serialises")
}

pub(super) fn decode_filter(s: &[u8]) -> DeliveryFilter {
    if s.is_empty() {
        return DeliveryFilter::default();
    }
    match serde_json::from_slice::<WireFilter>(s) {
        Ok(w) => DeliveryFilter {
            except: w.except.into_iter().map(Into::into).collect(),
            audience: w.audience.map(Arc::new),
            devices: w.devices,
        },
        Err(_) => DeliveryFilter::default(),
    }
}

/// A parsed Pub/Sub payload.
pub(super) struct Message {
    pub(super) position: Option<Position>,
    pub(super) event: Arc<str>,
    pub(super) filter: DeliveryFilter,
    pub(super) frame: Bytes,
}

pub(super) fn parse_payload(payload: Vec<u8>) -> Option<Message> {
    let bytes = Bytes::from(payload);
    let nl1 = bytes.iter().position(|b| *b == b'\n')?;
    let nl2 = nl1 + 1 + bytes[nl1 + 1..].iter().position(|b| *b == b'\n')?;
    let head = std::str::from_utf8(&bytes[..nl1]).ok()?;
    let mut parts = head.split(' ');
    let (stored, seq, epoch, event) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let position = match stored {
        "1" => Some(Position {
            epoch: Epoch::new(epoch),
            seq: seq.parse().ok()?,
        }),
        _ => None,
    };
    Some(Message {
        position,
        event: event.into(),
        filter: decode_filter(&bytes[nl1 + 1..nl2]),
        frame: bytes.slice(nl2 + 1..),
    })
}

/// The payload of a frame that is not stored: `0 - - <event>\n<filter>\n<frame>`.
pub(super) fn unstored_payload(event: &str, filter: &str, frame: &[u8]) -> Vec<u8> {
    let mut p = Vec::with_capacity(frame.len() + filter.len() + event.len() + 8);
    p.extend_from_slice(b"0 - - ");
    p.extend_from_slice(event.as_bytes());
    p.push(b'\n');
    p.extend_from_slice(filter.as_bytes());
    p.push(b'\n');
    p.extend_from_slice(frame);
    p
}
