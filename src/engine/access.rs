//! Who may do what: subscribe to (or read the history of) a channel, publish to it from a client,
//! act as a room member, watch another user's presence. A rule hook decides first when it has an
//! answer; without one, the channel kind's policy in `channels.toml`.

use serde_json::{Map, Value};

use super::{Engine, EngineError, EngineResult, ErrorCode, backend};
use crate::channels::{ChannelName, PublishPolicy, SubscribePolicy};

impl Engine {
    /// Checks that `user` may subscribe to (or read the history of) `channel`.
    pub async fn can_subscribe(
        &self,
        user: &str,
        attrs: &Map<String, Value>,
        channel: &ChannelName,
    ) -> EngineResult<()> {
        if let Some(allowed) = self.rules.current().can_subscribe(user, attrs, channel) {
            return if allowed {
                Ok(())
            } else {
                Err(EngineError::new(
                    ErrorCode::Forbidden,
                    format!("{channel}: denied by a rule"),
                ))
            };
        }
        match self.kinds().of(channel).subscribe {
            SubscribePolicy::Any => Ok(()),
            SubscribePolicy::Owner if channel.id() == user => Ok(()),
            SubscribePolicy::Member => self.require_member(channel.id(), user).await,
            SubscribePolicy::Watcher => {
                if channel.id() == user || self.may_watch(user, channel.id()).await? {
                    Ok(())
                } else {
                    Err(EngineError::new(
                        ErrorCode::Forbidden,
                        format!("{channel}: only contacts and room mates may watch this user"),
                    ))
                }
            }
            SubscribePolicy::Owner | SubscribePolicy::Nobody => Err(EngineError::new(
                ErrorCode::Forbidden,
                format!("{channel}: not allowed to subscribe"),
            )),
        }
    }

    /// Checks that `user` may publish `event` to `channel` from a client.
    pub async fn can_publish(
        &self,
        user: &str,
        attrs: &Map<String, Value>,
        channel: &ChannelName,
        event: &str,
    ) -> EngineResult<()> {
        if let Some(allowed) = self
            .rules
            .current()
            .can_publish(user, attrs, channel, event)
        {
            return if allowed {
                Ok(())
            } else {
                Err(EngineError::new(
                    ErrorCode::Forbidden,
                    format!("{channel}: publishing {event:?} denied by a rule"),
                ))
            };
        }
        match self.kinds().of(channel).publish {
            PublishPolicy::Any => Ok(()),
            PublishPolicy::Owner if channel.id() == user => Ok(()),
            PublishPolicy::Member => self.require_member(channel.id(), user).await,
            PublishPolicy::Owner | PublishPolicy::Backend => Err(EngineError::new(
                ErrorCode::Forbidden,
                format!("{channel}: clients may not publish here"),
            )),
        }
    }

    /// `not_member` unless `user` is a member of `room`.
    pub async fn require_member(&self, room: &str, user: &str) -> EngineResult<()> {
        if backend(
            "membership.is_member",
            self.backends.membership.is_member(room, user),
        )
        .await?
        {
            Ok(())
        } else {
            Err(EngineError::new(
                ErrorCode::NotMember,
                format!("not a member of room {room}"),
            ))
        }
    }

    /// Whether `watcher` may see `target`'s presence: a contact, or they share a room.
    pub async fn may_watch(&self, watcher: &str, target: &str) -> EngineResult<bool> {
        if backend(
            "contacts.contacts",
            self.backends.contacts.contacts(watcher),
        )
        .await?
        .iter()
        .any(|c| c == target)
        {
            return Ok(true);
        }
        let membership = &self.backends.membership;
        let mine = backend("membership.rooms_of", membership.rooms_of(watcher)).await?;
        if mine.is_empty() {
            return Ok(false);
        }
        let theirs = backend("membership.rooms_of", membership.rooms_of(target)).await?;
        Ok(mine.iter().any(|r| theirs.binary_search(r).is_ok()))
    }

    /// `forbidden` unless `watcher` may see the presence of every one of `users` (themself aside).
    pub async fn require_watch(&self, watcher: &str, users: &[String]) -> EngineResult<()> {
        for u in users {
            if u != watcher && !self.may_watch(watcher, u).await? {
                return Err(EngineError::new(
                    ErrorCode::Forbidden,
                    format!("may not watch {u}: only contacts and room mates"),
                ));
            }
        }
        Ok(())
    }
}
