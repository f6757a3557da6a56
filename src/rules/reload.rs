//! Hot reload: `notify` watches the rules directory and `channels.toml` (the directory, not the files:
//! editors replace files by rename), debounced. A reload compiles every file, re-reads `channels.toml`,
//! runs the fixtures, and swaps the new set in atomically only if all of that passes; otherwise the last
//! good set stays and the error (file:line:col) is kept for `GET /admin/rules`, logged, and counted.
//! Publishing never waits on a reload and never sees a half-loaded set (arc-swap).
//!
//! Compiles run off the watcher, on blocking threads, so an edit made while a slow compile runs (a
//! file of tens of thousands of functions takes seconds) starts its own compile at once; each reload
//! has a generation, and the result of one that a newer reload has overtaken is dropped, so what is in
//! force is always built from the newest files (or, if those fail, the last good set). At most
//! two run at a time; edits beyond that wait, merged into one, for a compile to end.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use notify_debouncer_full::notify::{EventKind, RecursiveMode};
use tokio_util::sync::CancellationToken;

use super::{Budget, OnError, RuleError, RuleSet, fixtures};
use crate::channels::ChannelKinds;
use crate::primitives::lock;

/// How long file events are debounced before a reload.
const DEBOUNCE: Duration = Duration::from_millis(200);
/// Reloads compiling at once: the one running and one that overtakes it.
const MAX_COMPILES: usize = 2;

/// Where rules come from and how they run.
#[derive(Clone, Debug)]
pub struct RulesConfig {
    /// The rules directory.
    pub dir: PathBuf,
    /// `channels.toml`.
    pub channels_file: PathBuf,
    /// Whether `channels.toml` must exist.
    pub channels_required: bool,
    /// Per-call budget.
    pub budget: Budget,
    /// Runtime failure policy.
    pub on_error: OnError,
}

/// What `GET /admin/rules` shows.
#[derive(Clone, Debug, serde::Serialize)]
pub struct RulesStatus {
    /// Version of the set in use.
    pub version: u64,
    /// When it was loaded, unix ms.
    pub loaded_at: i64,
    /// Its files, in evaluation order.
    pub files: Vec<String>,
    /// The event fields the `route` hooks read: the event map a publish builds has only these.
    pub event_fields: Vec<&'static str>,
    /// Whether `route` decisions are kept and reused for events that look the same to the rules
    /// (they read no `data`, `attrs`, `id` or `ts`, nor the clock).
    pub decision_cache: bool,
    /// The last refused reload's error, until a reload succeeds.
    pub last_error: Option<String>,
    /// When that happened, unix ms.
    pub last_error_at: Option<i64>,
    /// Whether a reload is compiling now (its result replaces this set, or becomes `last_error`).
    pub compiling: bool,
    /// When the newest compile running now started, unix ms.
    pub compiling_since: Option<i64>,
}

/// The live rule set and its reloads.
pub struct Rules {
    current: ArcSwap<RuleSet>,
    config: RulesConfig,
    last_error: Mutex<Option<(String, i64)>>,
    versions: AtomicU64,
    compiles: Mutex<Compiles>,
}

/// The reloads under way.
#[derive(Default)]
struct Compiles {
    /// The generation the newest reload started got; a result of an older one is dropped.
    started: u64,
    /// Generations compiling now, with when each started (unix ms).
    running: Vec<(u64, i64)>,
    /// A change came while [`MAX_COMPILES`] were running: reload again when one ends.
    pending: bool,
}

impl Compiles {
    /// Registers a new reload as running: its generation.
    fn begin(&mut self) -> u64 {
        self.started += 1;
        self.running.push((self.started, crate::event::now_ms()));
        self.started
    }
}

/// Builds and checks a complete rule set (compile + channels + fixtures).
pub fn build(config: &RulesConfig, version: u64) -> Result<RuleSet, String> {
    let kinds = ChannelKinds::load(&config.channels_file, config.channels_required)
        .map_err(|e| e.to_string())?;
    build_with(config, Arc::new(kinds), version)
}

/// Compiles the rules of `config.dir` with `kinds` and runs their fixtures: the set only when all of
/// that passes.
pub fn build_with(
    config: &RulesConfig,
    kinds: Arc<ChannelKinds>,
    version: u64,
) -> Result<RuleSet, String> {
    let set = RuleSet::load(&config.dir, kinds, config.budget, config.on_error, version)
        .map_err(|e| e.to_string())?;
    let report = fixtures::run(&config.dir, &set).map_err(|e: RuleError| e.to_string())?;
    if !report.failures.is_empty() {
        return Err(format!(
            "{} of {} fixture case(s) failed:\n{}",
            report.failures.len(),
            report.cases,
            report.failures.join("\n")
        ));
    }
    Ok(set)
}

impl Rules {
    /// A fixed set (no directory behind it; reloads keep it).
    pub fn fixed(set: RuleSet, config: RulesConfig) -> Arc<Self> {
        crate::metrics::rules_version(set.version);
        Arc::new(Rules {
            versions: AtomicU64::new(set.version),
            current: ArcSwap::from_pointee(set),
            config,
            last_error: Mutex::new(None),
            compiles: Mutex::default(),
        })
    }

    /// The set in use (cheap; hold it for one publish).
    pub fn current(&self) -> arc_swap::Guard<Arc<RuleSet>> {
        self.current.load()
    }

    /// Rebuilds from disk now, on this thread; swaps only if everything passes (and no newer reload
    /// started meanwhile). Returns the new version.
    pub fn reload(&self) -> Result<u64, String> {
        let generation = lock(&self.compiles).begin();
        self.compile(generation)
    }

    /// One reload of generation `generation` (registered as running).
    fn compile(&self, generation: u64) -> Result<u64, String> {
        let built = build(&self.config, 0);
        let mut c = lock(&self.compiles);
        c.running.retain(|(g, _)| *g != generation);
        if generation < c.started {
            // A newer reload read newer files: this one's result, good or bad, is stale.
            tracing::info!(
                generation,
                newer = c.started,
                "Rules reload overtaken by a newer edit; its result is dropped."
            );
            return Err("overtaken by a newer reload".into());
        }
        // Under the lock: a newer reload's result is applied after this one, never before.
        match built {
            Ok(mut set) => {
                let version = self.versions.load(Ordering::Acquire) + 1;
                set.version = version;
                let files = set.files();
                self.current.store(Arc::new(set));
                self.versions.store(version, Ordering::Release);
                *lock(&self.last_error) = None;
                crate::metrics::rules_reload("ok");
                crate::metrics::rules_version(version);
                tracing::info!(version, files = ?files, "Rules reloaded.");
                Ok(version)
            }
            Err(e) => {
                *lock(&self.last_error) = Some((e.clone(), crate::event::now_ms()));
                crate::metrics::rules_reload("refused");
                tracing::error!(error = %e, "Rules reload refused; the last good rules stay.");
                Err(e)
            }
        }
    }

    /// Starts a reload on a blocking thread, unless [`MAX_COMPILES`] are running (then one more
    /// runs when one of them ends). Never waits for a compile.
    fn start_reload(self: &Arc<Self>) {
        let generation = {
            let mut c = lock(&self.compiles);
            if c.running.len() >= MAX_COMPILES {
                c.pending = true;
                return;
            }
            c.begin()
        };
        let rules = self.clone();
        // Compiling and running fixtures is CPU work: keep it off the I/O threads.
        tokio::task::spawn_blocking(move || {
            let _ = rules.compile(generation);
            let again = std::mem::take(&mut lock(&rules.compiles).pending);
            if again {
                rules.start_reload();
            }
        });
    }

    /// Status for operators.
    pub fn status(&self) -> RulesStatus {
        let cur = self.current();
        let err = lock(&self.last_error).clone();
        let since = lock(&self.compiles)
            .running
            .iter()
            .max_by_key(|(g, _)| *g)
            .map(|(_, at)| *at);
        RulesStatus {
            version: cur.version,
            loaded_at: cur.loaded_at,
            files: cur.files(),
            event_fields: cur.event_fields().keys().collect(),
            decision_cache: cur.caches_decisions(),
            last_error: err.as_ref().map(|(e, _)| e.clone()),
            last_error_at: err.map(|(_, t)| t),
            compiling: since.is_some(),
            compiling_since: since,
        }
    }

    /// Watches the rules directory and `channels.toml` until `shutdown`; reloads on changes.
    pub fn watch(self: &Arc<Self>, shutdown: CancellationToken) -> Result<(), String> {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<()>(1);
        let (rules_dir, channels_file) =
            (self.config.dir.clone(), self.config.channels_file.clone());
        // The directory of channels.toml may hold much else (the repository root): only changes to
        // the rules or to channels.toml itself reload.
        let relevant = move |p: &Path| p.starts_with(&rules_dir) || p == channels_file;
        let mut debouncer = notify_debouncer_full::new_debouncer(
            DEBOUNCE,
            None,
            move |res: notify_debouncer_full::DebounceEventResult| {
                let hit = res.is_ok_and(|events| {
                    events.iter().any(|e| {
                        // Reads (ours included: a reload opens every file) are not changes; without
                        // this filter each reload would trigger the next.
                        !matches!(e.kind, EventKind::Access(_) | EventKind::Other)
                            && e.paths.iter().any(|p| relevant(p))
                    })
                });
                if hit {
                    // A full channel already holds a pending reload, which will see this change too
                    // (the watcher task takes each one at once: compiles do not hold it up).
                    let _ = tx.try_send(());
                }
            },
        )
        .map_err(|e| format!("cannot watch rules: {e}"))?;
        let dir = &self.config.dir;
        if dir.is_dir() {
            debouncer
                .watch(dir, RecursiveMode::Recursive)
                .map_err(|e| format!("cannot watch {}: {e}", dir.display()))?;
        }
        if let Some(parent) = watch_dir_of(&self.config.channels_file)
            && parent != *dir
        {
            debouncer
                .watch(&parent, RecursiveMode::NonRecursive)
                .map_err(|e| format!("cannot watch {}: {e}", parent.display()))?;
        }
        let rules = self.clone();
        tokio::spawn(async move {
            // The debouncer stops watching when dropped: it lives as long as this task.
            let _debouncer = debouncer;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    got = rx.recv() => {
                        if got.is_none() {
                            return;
                        }
                        rules.start_reload();
                    }
                }
            }
        });
        Ok(())
    }
}

fn watch_dir_of(file: &Path) -> Option<PathBuf> {
    let parent = file.parent()?;
    let p = if parent.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        parent.to_path_buf()
    };
    p.is_dir().then_some(p)
}
