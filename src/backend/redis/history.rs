//! Redis history: a channel's position (creating its meta, with a fresh epoch, when absent) and
//! reads by seq range from its stream, with the age limit enforced when reading (`lua/position.lua`,
//! `lua/read.lua`).

use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use redis::Value;

use super::RedisBackend;
use super::err;
use super::shared::Shared;
use super::wire::decode_filter;
use crate::backend::{BackendError, BackendResult, DeliveryFilter, History, HistoryPage};
use crate::channels::ChannelName;
use crate::event::{Epoch, Position, Seq, StoredEvent};

/// Idle expiry of channel metadata created by a read (publishes set their kind's own).
const DEFAULT_IDLE_TTL: Duration = Duration::from_secs(30 * 86_400);

impl Shared {
    pub(super) async fn position(&self, channel: &ChannelName) -> BackendResult<Position> {
        let mut con = self.cmd.clone();
        let (epoch, seq): (String, u64) = self
            .scripts
            .position
            .key(self.keys.channel_meta(channel.as_str()))
            .key(self.keys.channel_log(channel.as_str()))
            .arg(Epoch::generate().as_str())
            .arg(DEFAULT_IDLE_TTL.as_secs())
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        Ok(Position {
            epoch: Epoch::new(&epoch),
            seq,
        })
    }

    pub(super) async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        until: Option<Seq>,
        limit: usize,
        max_age: Duration,
    ) -> BackendResult<(HistoryPage, Vec<(StoredEvent, DeliveryFilter)>)> {
        let mut con = self.cmd.clone();
        let age_ms = max_age.as_millis().min(i64::MAX as u128 / 2) as i64;
        let raw: Vec<Value> = self
            .scripts
            .read
            .key(self.keys.channel_meta(channel.as_str()))
            .key(self.keys.channel_log(channel.as_str()))
            .arg(after)
            .arg(until.map_or(-1, |u| u as i64))
            .arg(limit.max(1))
            .arg(age_ms)
            .arg(Epoch::generate().as_str())
            .arg(DEFAULT_IDLE_TTL.as_secs())
            .invoke_async(&mut con)
            .await
            .map_err(err)?;
        let bad = || BackendError::Internal("unexpected reply from read.lua".into());
        let mut it = raw.into_iter();
        let epoch: String =
            redis::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let seq: u64 = redis::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let first: u64 = redis::from_redis_value(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
        let mut events = Vec::new();
        while let Some(s) = it.next() {
            let (t, f, x) = (
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
                it.next().ok_or_else(bad)?,
            );
            let s: u64 = redis::from_redis_value(s).map_err(|_| bad())?;
            let t: i64 = redis::from_redis_value(t).map_err(|_| bad())?;
            let f: Vec<u8> = redis::from_redis_value(f).map_err(|_| bad())?;
            let x: Vec<u8> = redis::from_redis_value(x).map_err(|_| bad())?;
            events.push((
                StoredEvent {
                    seq: s,
                    ts: t,
                    frame: Bytes::from(f),
                },
                decode_filter(&x),
            ));
        }
        let page = HistoryPage {
            position: Position {
                epoch: Epoch::new(&epoch),
                seq,
            },
            first_available: first,
            events: Vec::new(),
        };
        Ok((page, events))
    }
}

#[async_trait]
impl History for RedisBackend {
    async fn position(&self, channel: &ChannelName) -> BackendResult<Position> {
        self.broker.shared.position(channel).await
    }

    async fn read(
        &self,
        channel: &ChannelName,
        after: Seq,
        until: Option<Seq>,
        limit: usize,
        max_age: Duration,
    ) -> BackendResult<HistoryPage> {
        let (mut page, events) = self
            .broker
            .shared
            .read(channel, after, until, limit, max_age)
            .await?;
        page.events = events.into_iter().map(|(e, _)| e).collect();
        Ok(page)
    }
}
