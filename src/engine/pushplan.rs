//! Who gets a push, and who gets an event live: the rules' `push` and `devices` decisions carried out.
//!
//! A publish whose Decision asks for a push records one **plan** per target channel (`user:` and
//! `room:` targets) in the same backend step as the append: queued in the outbox at once, or, for
//! `unacked`, kept as a timer due `after` from now. O(1) backend writes per publish, whatever the
//! room's size. Any node's sending loop ([`super::pushsend`]) takes the plan when it is due and
//! expands it here: the channel's recipients (the user, or the room's members less `except`), their
//! live devices (presence, any node), their registered push devices, whether they are focused on the
//! room (any node) and, for `unacked`, whether any of their devices acked the event's seq (acks are
//! positions per user and channel, like read pointers). [`plan_recipient`] decides per device; it is
//! pure, and the dry run uses it too.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::{Engine, EngineResult, backend};
use crate::backend::PushStep;
use crate::channels::{ChannelName, Kind};
use crate::device::{DevicePolicy, DeviceState, PushDevice};
use crate::event::Seq;
use crate::presence::UserPresence;
use crate::push::{ProviderKind, PushJob, PushReason};
use crate::rules::{Decision, PushWhen};

/// What the outbox carries (the backend keeps it as opaque bytes).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub(crate) enum Work {
    /// A publish's plan for one channel, to expand when due.
    Plan(Plan),
    /// One notification to one device (`attempt`: sends tried so far).
    Job {
        /// The job.
        job: PushJob,
        /// Sends tried so far.
        attempt: u32,
    },
    /// A burst window closed: send what it held as one summary.
    Summary {
        /// The gate key (`user|device|collapse`).
        key: String,
    },
}

impl Work {
    pub(crate) fn encode(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("push work serialises"))
    }
}

/// A publish's push plan for one channel.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct Plan {
    pub(crate) event: String,
    pub(crate) event_id: String,
    pub(crate) channel: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) except: Vec<String>,
    pub(crate) when: PushWhen,
    pub(crate) devices: DevicePolicy,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) title: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) body: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) data: Option<serde_json::Value>,
    pub(crate) collapse: String,
    pub(crate) ttl: u64,
}

/// Default time to live of a push (seconds) when the rule gives none: a day.
const DEFAULT_TTL: u64 = 86_400;

/// One recipient as the planner sees them.
#[derive(Clone, Copy, Debug)]
pub struct Recipient<'a> {
    /// The user.
    pub user: &'a str,
    /// Their presence (live devices with app state and platform), on any node.
    pub presence: &'a UserPresence,
    /// Their registered push devices.
    pub registered: &'a [PushDevice],
    /// Focused on the event's room on some device.
    pub focused: bool,
    /// Some device acked the event (its seq or later on the channel).
    pub acked: bool,
}

/// Which recipients [`Engine::plan_channel`] plans.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlanScope {
    /// Everyone (the dry run shows who gets it live too).
    Everyone,
    /// Only those with a registered push device (the sending loop: nobody else can be pushed).
    Pushed,
}

/// What one device of a recipient gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DevicePlan {
    /// Device id.
    pub device: String,
    /// Connected now, on any node.
    pub connected: bool,
    /// App state when connected.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<DeviceState>,
    /// Gets the event live (connected and admitted by the device policy).
    pub live: bool,
    /// Registered with this push provider.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub provider: Option<ProviderKind>,
    /// Gets a push, for this reason.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub push: Option<PushReason>,
    /// Why (or why not).
    pub why: &'static str,
}

/// What one recipient gets.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct RecipientPlan {
    /// The user.
    pub user: String,
    /// Per device (live ones and registered ones, by id).
    pub devices: Vec<DevicePlan>,
    /// Why no device gets a push, when none does and it is the user's state that says so.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_push: Option<&'static str>,
}

impl RecipientPlan {
    /// The devices that get a push.
    pub fn pushed(&self) -> impl Iterator<Item = &DevicePlan> {
        self.devices.iter().filter(|d| d.push.is_some())
    }
}

/// A target a decision plans a push for: a `user:` or `room:` channel, with the users the decision
/// leaves out of it, and for `unacked` the fallback's delay.
#[derive(Clone, Debug)]
pub struct PushTarget {
    /// The channel.
    pub channel: ChannelName,
    /// Users left out (the decision's `except` and the kind's `except_sender`).
    pub except: Vec<String>,
    /// The rule's `when` (never `never`).
    pub when: PushWhen,
    /// For `unacked`: the rule's `after`, or `default_after`.
    pub after: Option<Duration>,
}

/// Whether a push on `channel` is planned at all: `when` is not `never`, and the channel is a
/// `user:` or `room:` channel (the kinds with recipients to push).
fn plans_push(when: PushWhen, channel: &ChannelName) -> bool {
    when != PushWhen::Never && matches!(channel.kind(), Kind::User | Kind::Room)
}

/// The push targets of `decision` for an event from `from` (what the dry run and `herald simulate`
/// show; the publish path plans the same channels in [`Engine::push_step`]).
pub fn push_targets(
    decision: &Decision,
    kinds: &crate::channels::ChannelKinds,
    from: Option<&str>,
    default_after: Duration,
) -> Vec<PushTarget> {
    let Some(p) = decision.push.as_ref() else {
        return Vec::new();
    };
    decision
        .to
        .iter()
        .filter(|ch| plans_push(p.when, ch))
        .map(|ch| PushTarget {
            channel: ch.clone(),
            except: decision
                .except_for(kinds, ch, from)
                .iter()
                .map(|u| u.to_string())
                .collect(),
            when: p.when,
            after: (p.when == PushWhen::Unacked).then(|| p.after.unwrap_or(default_after)),
        })
        .collect()
}

/// A made-up world for `herald simulate --world FILE`: who is connected where, who registered which
/// push device, who has the room open, who acked. Recipients of a room are `members[room]`, or every
/// user listed when the room has no entry.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct World {
    /// Room id -> members.
    #[serde(default)]
    pub members: BTreeMap<String, Vec<String>>,
    /// User id -> their state.
    #[serde(default)]
    pub users: BTreeMap<String, WorldUser>,
}

/// One user of a [`World`].
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldUser {
    /// Connected devices.
    #[serde(default)]
    pub live: Vec<WorldDevice>,
    /// Registered push devices.
    #[serde(default)]
    pub push: Vec<WorldPushDevice>,
    /// Has the room open (`focus`).
    #[serde(default)]
    pub focused: bool,
    /// Acked the event on some device.
    #[serde(default)]
    pub acked: bool,
}

/// A connected device of a [`WorldUser`].
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldDevice {
    /// Device id.
    pub device: String,
    /// Platform (`web|ios|android|desktop`).
    #[serde(default)]
    pub platform: Option<String>,
    /// App state (default foreground).
    #[serde(default)]
    pub state: DeviceState,
}

/// A registered push device of a [`WorldUser`].
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldPushDevice {
    /// Device id.
    pub device: String,
    /// `fcm|apns|webpush|webhook`.
    pub provider: String,
    /// Platform.
    #[serde(default)]
    pub platform: Option<String>,
}

impl World {
    /// Plans `channel` (a `user:` or `room:` channel) in this world, as the sending loop would.
    pub fn plan(
        &self,
        channel: &ChannelName,
        except: &[String],
        when: PushWhen,
        policy: DevicePolicy,
    ) -> Vec<RecipientPlan> {
        let mut users: Vec<String> = match channel.kind() {
            Kind::User => vec![channel.id().to_string()],
            Kind::Room => self
                .members
                .get(channel.id())
                .cloned()
                .unwrap_or_else(|| self.users.keys().cloned().collect()),
            _ => Vec::new(),
        };
        users.retain(|u| !except.contains(u));
        let nobody = WorldUser::default();
        users
            .iter()
            .map(|user| {
                let u = self.users.get(user).unwrap_or(&nobody);
                let presence = UserPresence {
                    user: user.clone(),
                    online: !u.live.is_empty(),
                    status: Default::default(),
                    text: None,
                    devices: u
                        .live
                        .iter()
                        .map(|d| crate::presence::DevicePresence {
                            device: d.device.clone(),
                            platform: d.platform.clone(),
                            state: d.state,
                        })
                        .collect(),
                    last_seen: None,
                };
                let registered: Vec<PushDevice> = u
                    .push
                    .iter()
                    .map(|d| PushDevice {
                        device: d.device.clone(),
                        provider: d.provider.clone(),
                        token: None,
                        subscription: None,
                        platform: d.platform.clone(),
                    })
                    .collect();
                plan_recipient(
                    when,
                    policy,
                    Recipient {
                        user,
                        presence: &presence,
                        registered: &registered,
                        focused: u.focused && channel.kind() == Kind::Room,
                        acked: u.acked && when == PushWhen::Unacked,
                    },
                )
            })
            .collect()
    }
}

/// Decides, for one recipient, which devices get the event live and which get a push (see the module
/// doc and README "Push"). `when` is the rule's; for `unacked` this is the decision at the due time.
///
/// - live: a connected device the device policy admits (`latest` admits every device here: each node
///   keeps only the latest of its own sessions of the user);
/// - never: no push; focused on the room: no push; `unacked` and acked: no push;
/// - `always` and `unacked` (not acked): every registered device;
/// - `offline`: every registered device when the user has no live session; `background`: every
///   registered device when none of the user's devices is live in the foreground;
/// - otherwise, a registered device the device policy left out live (connected but not admitted)
///   still gets a push ("background"): it was not shown the event.
pub fn plan_recipient(when: PushWhen, policy: DevicePolicy, r: Recipient<'_>) -> RecipientPlan {
    let mut devices: BTreeMap<&str, DevicePlan> = BTreeMap::new();
    for d in &r.presence.devices {
        devices.insert(
            &d.device,
            DevicePlan {
                device: d.device.clone(),
                connected: true,
                state: Some(d.state),
                live: policy.admits(d.state, d.platform.as_deref()),
                provider: None,
                push: None,
                why: "",
            },
        );
    }
    for reg in r.registered {
        let e = devices.entry(&reg.device).or_insert_with(|| DevicePlan {
            device: reg.device.clone(),
            connected: false,
            state: None,
            live: false,
            provider: None,
            push: None,
            why: "",
        });
        e.provider = ProviderKind::parse(&reg.provider);
    }
    let online = r.presence.online && !r.presence.devices.is_empty();
    let foreground_live = devices
        .values()
        .any(|d| d.live && d.state == Some(DeviceState::Foreground));
    let no_push = match when {
        PushWhen::Never => Some("the rule says push: never"),
        _ if r.focused => Some("focused on the room"),
        PushWhen::Unacked if r.acked => Some("acked on a device"),
        _ => None,
    };
    // Everyone registered gets it (with this reason), or only those left out live.
    let all = match (no_push, when) {
        (Some(_), _) => None,
        (None, PushWhen::Always) => Some((PushReason::Always, "the rule says push: always")),
        (None, PushWhen::Unacked) => Some((PushReason::Unacked, "not acked on any device in time")),
        (None, PushWhen::Offline) if !online => Some((PushReason::Offline, "no live session")),
        (None, PushWhen::Background) if !foreground_live => {
            Some((PushReason::Background, "no device live in the foreground"))
        }
        _ => None,
    };
    for d in devices.values_mut() {
        let left_out = d.connected && !d.live;
        match (d.provider, no_push, all) {
            (None, _, _) if d.live => d.why = "live",
            (None, _, _) if left_out => {
                d.why = "left out live by the device policy; no push device registered"
            }
            (None, _, _) => d.why = "no push device registered",
            (Some(_), Some(why), _) => d.why = if d.live { "live" } else { why },
            (Some(_), None, Some((reason, why))) => {
                d.push = Some(reason);
                d.why = why;
            }
            (Some(_), None, None) if left_out => {
                d.push = Some(PushReason::Background);
                d.why = "left out live by the device policy";
            }
            (Some(_), None, None) => {
                d.why = if d.live {
                    "live"
                } else {
                    "the user is online on another device"
                }
            }
        }
    }
    RecipientPlan {
        user: r.user.to_string(),
        devices: devices.into_values().collect(),
        no_push,
    }
}

/// The collapse key of a push on `channel`: the rule's, else one per room (or per channel).
fn collapse_key(rule: Option<&str>, channel: &ChannelName) -> String {
    match rule {
        Some(c) => c.to_string(),
        None => channel.to_string(),
    }
}

impl Engine {
    /// Whether pushes are planned at all: some provider is configured.
    pub fn push_enabled(&self) -> bool {
        !self.push.kinds().is_empty()
    }

    /// The push step of a publish to `channel`, when the Decision asks for a push there.
    pub(crate) fn push_step(
        &self,
        decision: &Decision,
        event: &str,
        event_id: &str,
        channel: &ChannelName,
        except: &[Arc<str>],
    ) -> Option<PushStep> {
        let p = decision.push.as_ref()?;
        if !plans_push(p.when, channel) || !self.push_enabled() {
            return None;
        }
        let plan = Plan {
            event: event.to_string(),
            event_id: event_id.to_string(),
            channel: channel.to_string(),
            except: except.iter().map(|u| u.to_string()).collect(),
            when: p.when,
            devices: decision.devices,
            title: p.title.clone(),
            body: p.body.clone(),
            data: p.data.clone(),
            collapse: collapse_key(p.collapse.as_deref(), channel),
            ttl: p.ttl.map_or(DEFAULT_TTL, |t| t.as_secs().max(1)),
        };
        let after = (p.when == PushWhen::Unacked)
            .then(|| p.after.unwrap_or_else(|| self.config.push.default_after()));
        crate::metrics::push_planned(p.when.as_str());
        Some(PushStep {
            id: format!("plan:{event_id}:{channel}").into(),
            after,
            body: Work::Plan(plan).encode(),
        })
    }

    /// The recipients of a push on `channel`: the user of a `user:` channel, the members of a room;
    /// less `except`.
    async fn push_recipients(
        &self,
        channel: &ChannelName,
        except: &[String],
    ) -> EngineResult<Vec<String>> {
        let mut users = match channel.kind() {
            Kind::User => vec![channel.id().to_string()],
            Kind::Room => {
                backend(
                    "membership.members",
                    self.backends.membership.members(channel.id()),
                )
                .await?
            }
            _ => Vec::new(),
        };
        users.retain(|u| !except.contains(u));
        Ok(users)
    }

    /// Plans a channel's recipients from the shared state now (the sending loop at the due time, and
    /// the dry run): one [`RecipientPlan`] per recipient.
    pub(crate) async fn plan_channel(
        &self,
        channel: &ChannelName,
        except: &[String],
        when: PushWhen,
        policy: DevicePolicy,
        seq: Option<Seq>,
        scope: PlanScope,
    ) -> EngineResult<Vec<RecipientPlan>> {
        let mut users = self.push_recipients(channel, except).await?;
        if users.is_empty() {
            return Ok(Vec::new());
        }
        let focused: HashSet<String> = if channel.kind() == Kind::Room {
            backend("unread.focused", self.backends.unread.focused(channel.id()))
                .await?
                .into_iter()
                .collect()
        } else {
            HashSet::new()
        };
        let mut acked: Vec<bool> = match (when, seq) {
            (PushWhen::Unacked, Some(seq)) => backend(
                "outbox.push_acked",
                self.backends.outbox.push_acked(channel.as_str(), &users),
            )
            .await?
            .into_iter()
            .map(|a| a >= seq)
            .collect(),
            _ => vec![false; users.len()],
        };
        // Registrations are read only for those who may get a push, in one round trip.
        let may_push =
            |u: &String, acked: bool| when != PushWhen::Never && !focused.contains(u) && !acked;
        let asked: Vec<String> = users
            .iter()
            .zip(&acked)
            .filter(|(u, a)| may_push(u, **a))
            .map(|(u, _)| u.clone())
            .collect();
        let mut found = backend(
            "devices.devices_of",
            self.backends.devices.devices_of(&asked),
        )
        .await?
        .into_iter();
        let mut registered: Vec<Vec<PushDevice>> = users
            .iter()
            .zip(&acked)
            .map(|(u, a)| {
                if may_push(u, *a) {
                    found.next().unwrap_or_default()
                } else {
                    Vec::new()
                }
            })
            .collect();
        if scope == PlanScope::Pushed {
            // Nobody without a registered device can be pushed: their presence is not read.
            let keep: Vec<bool> = registered.iter().map(|r| !r.is_empty()).collect();
            let mut k = keep.iter();
            users.retain(|_| *k.next().unwrap_or(&false));
            let mut k = keep.iter();
            acked.retain(|_| *k.next().unwrap_or(&false));
            registered.retain(|r| !r.is_empty());
            if users.is_empty() {
                return Ok(Vec::new());
            }
        }
        let presence = backend("presence.get", self.backends.presence.get(&users)).await?;
        let mut out = Vec::with_capacity(users.len());
        for (((user, presence), acked), registered) in
            users.iter().zip(&presence).zip(acked).zip(&registered)
        {
            out.push(plan_recipient(
                when,
                policy,
                Recipient {
                    user,
                    presence,
                    registered,
                    focused: focused.contains(user),
                    acked,
                },
            ));
        }
        Ok(out)
    }

    /// Expands a due plan into jobs, one per pushed device.
    pub(crate) async fn expand_plan(
        &self,
        plan: &Plan,
        seq: Option<Seq>,
    ) -> EngineResult<Vec<PushJob>> {
        let Ok(channel) = ChannelName::parse(&plan.channel) else {
            return Ok(Vec::new());
        };
        let recipients = self
            .plan_channel(
                &channel,
                &plan.except,
                plan.when,
                plan.devices,
                seq,
                PlanScope::Pushed,
            )
            .await?;
        let mut jobs = Vec::new();
        for r in &recipients {
            if r.pushed().next().is_none() {
                continue;
            }
            // The registrations again, for the token of each pushed device.
            let registered =
                backend("devices.devices", self.backends.devices.devices(&r.user)).await?;
            for d in r.pushed() {
                let Some(reg) = registered.iter().find(|x| x.device == d.device) else {
                    continue;
                };
                let Some(provider) = ProviderKind::parse(&reg.provider) else {
                    continue;
                };
                jobs.push(PushJob {
                    id: format!("{}.{}.{}", plan.event_id, r.user, d.device),
                    user: r.user.clone(),
                    device: d.device.clone(),
                    provider,
                    token: reg.token.clone(),
                    subscription: reg.subscription.clone(),
                    title: plan.title.clone(),
                    body: plan.body.clone(),
                    data: plan.data.clone(),
                    collapse: plan.collapse.clone(),
                    ttl: plan.ttl,
                    reason: d.push.unwrap_or(PushReason::Always),
                    channel: plan.channel.clone(),
                    room: (channel.kind() == Kind::Room).then(|| channel.id().to_string()),
                    seq,
                    event: plan.event.clone(),
                    event_id: plan.event_id.clone(),
                    count: 1,
                });
            }
        }
        Ok(jobs)
    }
}

/// The burst gate's key of a job: its user, device and collapse key. Per device, so one event's
/// pushes to a user's phone and tablet both go at once, and a burst shows as one push plus one
/// summary on each of them.
pub(crate) fn gate_key(job: &PushJob) -> String {
    format!("{}|{}|{}", job.user, job.device, job.collapse)
}

/// The summary of `n` held pushes, the last of them being `last`.
pub(crate) fn summary_of(mut last: PushJob, n: u32) -> PushJob {
    if n > 1 {
        last.count = n;
        last.body = Some(match &last.room {
            Some(room) => format!("{n} new messages in {room}"),
            None => format!("{n} new notifications"),
        });
        last.id = format!("{}.sum{n}", last.id);
    }
    last
}

/// How long a retry waits after `attempt` failed sends: 1 s, 2 s, 4 s … up to 5 minutes, with ±20 %
/// jitter.
pub(crate) fn backoff(attempt: u32) -> Duration {
    let base = Duration::from_secs(1u64 << attempt.min(8)).min(Duration::from_secs(300));
    let jitter = rand::random_range(0.8..1.2);
    base.mul_f64(jitter)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::presence::{DevicePresence, Status};

    fn presence(devices: &[(&str, &str, DeviceState)]) -> UserPresence {
        UserPresence {
            user: "bob".into(),
            online: !devices.is_empty(),
            status: Status::default(),
            text: None,
            devices: devices
                .iter()
                .map(|(d, p, s)| DevicePresence {
                    device: d.to_string(),
                    platform: Some(p.to_string()),
                    state: *s,
                })
                .collect(),
            last_seen: None,
        }
    }

    fn reg(device: &str, provider: &str) -> PushDevice {
        PushDevice {
            device: device.into(),
            provider: provider.into(),
            token: Some("t".into()),
            subscription: None,
            platform: None,
        }
    }

    fn pushed(p: &RecipientPlan) -> Vec<(&str, PushReason)> {
        p.pushed()
            .map(|d| (d.device.as_str(), d.push.expect("pushed")))
            .collect()
    }

    fn plan(
        when: PushWhen,
        policy: DevicePolicy,
        live: &[(&str, &str, DeviceState)],
        focused: bool,
        acked: bool,
    ) -> RecipientPlan {
        let pres = presence(live);
        let regs = [reg("phone", "fcm"), reg("laptop", "webpush")];
        plan_recipient(
            when,
            policy,
            Recipient {
                user: "bob",
                presence: &pres,
                registered: &regs,
                focused,
                acked,
            },
        )
    }

    use DeviceState::{Background, Foreground};

    #[test]
    fn seed_000_foreground_policy_pushes_the_background_phone_only() {
        let p = plan(
            PushWhen::Offline,
            DevicePolicy::Foreground,
            &[("phone", "ios", Background), ("laptop", "web", Foreground)],
            false,
            false,
        );
        assert_eq!(pushed(&p), vec![("phone", PushReason::Background)]);
        let laptop = p.devices.iter().find(|d| d.device == "laptop").unwrap();
        assert!(laptop.live);
    }

    #[test]
    fn offline_pushes_every_device_and_online_pushes_none() {
        let p = plan(PushWhen::Offline, DevicePolicy::All, &[], false, false);
        assert_eq!(
            pushed(&p),
            vec![
                ("laptop", PushReason::Offline),
                ("phone", PushReason::Offline)
            ]
        );
        let p = plan(
            PushWhen::Offline,
            DevicePolicy::All,
            &[("phone", "ios", Background)],
            false,
            false,
        );
        assert!(pushed(&p).is_empty());
    }

    #[test]
    fn background_pushes_when_no_device_is_in_the_foreground() {
        let live = [("phone", "ios", Background)];
        let p = plan(PushWhen::Background, DevicePolicy::All, &live, false, false);
        assert_eq!(pushed(&p).len(), 2);
        let live = [("phone", "ios", Background), ("laptop", "web", Foreground)];
        let p = plan(PushWhen::Background, DevicePolicy::All, &live, false, false);
        assert!(pushed(&p).is_empty());
    }

    #[test]
    fn focus_ack_and_never_stop_every_push() {
        for (when, focused, acked) in [
            (PushWhen::Always, true, false),
            (PushWhen::Unacked, false, true),
            (PushWhen::Never, false, false),
        ] {
            let p = plan(when, DevicePolicy::Foreground, &[], focused, acked);
            assert!(pushed(&p).is_empty(), "{when:?}");
            assert!(p.no_push.is_some());
        }
        let p = plan(PushWhen::Unacked, DevicePolicy::All, &[], false, false);
        assert_eq!(pushed(&p).len(), 2);
    }

    #[test]
    fn summary_counts_and_backoff_grows() {
        let job = PushJob {
            id: "e.u.d".into(),
            user: "u".into(),
            device: "d".into(),
            provider: ProviderKind::Webhook,
            token: None,
            subscription: None,
            title: Some("t".into()),
            body: Some("hi".into()),
            data: None,
            collapse: "room:r1".into(),
            ttl: 60,
            reason: PushReason::Offline,
            channel: "room:r1".into(),
            room: Some("r1".into()),
            seq: Some(3),
            event: "chat.message".into(),
            event_id: "e".into(),
            count: 1,
        };
        assert_eq!(summary_of(job.clone(), 1), job);
        let s = summary_of(job, 9);
        assert_eq!(s.count, 9);
        assert_eq!(s.body.as_deref(), Some("9 new messages in r1"));
        assert!(backoff(0) < Duration::from_millis(1300));
        assert!(backoff(20) <= Duration::from_secs(360));
    }
}
