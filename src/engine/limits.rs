//! The limits of engine operations, each checked in one place with one error code: an id that is
//! not 1-128 characters of `[A-Za-z0-9_.@-]` is `bad_channel` (as a channel id is), a list over its
//! bound is `too_large`, a history page size out of range is `bad_frame` (a bad field).

use super::{EngineError, EngineResult, ErrorCode};
use crate::channels::valid_id;

/// Most users one `presence`/`watch` op or presence query names.
pub const MAX_USERS_PER_OP: usize = 1000;
/// Most events one history call returns.
pub const MAX_HISTORY_LIMIT: usize = 1000;
/// Most contacts a user may have.
pub const MAX_CONTACTS: usize = 10_000;
/// Most target channels one publish may name.
pub const MAX_TARGETS: usize = 100;

/// `bad_channel` unless `id` is a valid id; `what` names it in the message (`room`, `user`, …).
pub(crate) fn check_id(what: &str, id: &str) -> EngineResult<()> {
    if valid_id(id) {
        Ok(())
    } else {
        Err(EngineError::new(
            ErrorCode::BadChannel,
            format!("bad {what} id: 1-128 characters of [A-Za-z0-9_.@-]"),
        ))
    }
}

/// A list of user ids (`what`: `users`, `contacts`) of at most `max`, each valid.
pub(crate) fn check_users(what: &str, users: &[String], max: usize) -> EngineResult<()> {
    if users.len() > max {
        return Err(EngineError::new(
            ErrorCode::TooLarge,
            format!("at most {max} {what}"),
        ));
    }
    users.iter().try_for_each(|u| check_id("user", u))
}

/// A history page size: 100 when not given, at most [`MAX_HISTORY_LIMIT`].
pub(crate) fn history_limit(limit: Option<usize>) -> EngineResult<usize> {
    match limit.unwrap_or(100) {
        n @ 1..=MAX_HISTORY_LIMIT => Ok(n),
        _ => Err(EngineError::new(
            ErrorCode::BadFrame,
            format!("limit: 1-{MAX_HISTORY_LIMIT}"),
        )),
    }
}
