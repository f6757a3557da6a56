//! Coalesced writes (`[http] coalesce`): while the machine's CPU is saturated, fan-outs queue each
//! delivery without waking anyone, and a node-wide tick every `coalesce_window` writes what queued up
//! for each connection in one write. On loopback, and on any box whose CPU is the limit, one TCP
//! segment per delivery is most of a delivery's cost (the sender's `send()`, the receiver's read and
//! wake-up); two or three frames per segment halve it, and the queueing that a saturated CPU adds to
//! every delivery falls with it. What it costs is up to one window of added latency per delivery,
//! which is why `auto` (the default) coalesces only while the CPU is busy: an idle box writes every
//! delivery at once, as before.
//!
//! Nagle's algorithm (`tcp_nodelay = false`) batches too, but holds a frame until the client ACKs
//! the previous one, so a client that delays its ACKs (40 ms on Linux, up to 200 ms elsewhere) sets
//! the hold; here the hold is at most the window, and only under load.

use std::time::Duration;

use super::Engine;
use crate::config::Coalesce;

/// How often `auto` looks at the CPU.
const SAMPLE_EVERY: Duration = Duration::from_millis(500);
/// `auto` starts coalescing once this share of the CPU was busy in [`ENGAGE_SAMPLES`] samples in a
/// row while the deliveries came fast enough for a window's write to carry [`ENGAGE_BATCH`] of them
/// on average (a CPU saturated by something else, a connect storm say, is no reason to hold
/// deliveries that would each go out alone anyway). Not 90 %: nodes sharing a machine see one
/// another's relief, and once the first coalesces the machine may sit at 85 % with the others
/// still writing every delivery alone...
const ENGAGE_BUSY: f64 = 0.80;
const ENGAGE_BATCH: f64 = 1.5;
const ENGAGE_SAMPLES: u32 = 2;
/// ... and stops once its writes carried fewer than [`RELEASE_BATCH`] deliveries each in
/// [`RELEASE_SAMPLES`] samples in a row (the deliveries come too far apart to share a window:
/// holding them only adds latency; that is how it stops when the load falls), or the CPU was below
/// [`RELEASE_BUSY`] while fewer than [`RELEASE_LOAD`] of the deliveries of the sample that started
/// it were handed over. Not on the CPU alone: coalescing itself frees CPU, and the more deliveries
/// a write carries the more (at 100k deliveries/s in the two-node benchmark a coalesced box sat at
/// 48-70 % busy; one node at 200k/s with eight deliveries per write fell from 96 % to 21 %), so a
/// CPU threshold alone stops it only because it worked, and it starts again a second later.
const RELEASE_BUSY: f64 = 0.35;
const RELEASE_LOAD: f64 = 0.5;
const RELEASE_BATCH: f64 = 1.3;
const RELEASE_SAMPLES: u32 = 6;

/// The flush tick, and under `auto` the CPU watch that turns coalescing on and off.
pub(super) async fn run(engine: Engine) {
    let mode = engine.config.coalesce;
    if mode == Coalesce::Off {
        return;
    }
    let hub = &engine.hub;
    hub.set_coalescing(mode == Coalesce::On);
    crate::metrics::coalescing(hub.coalescing());
    let mut tick = tokio::time::interval(engine.config.coalesce_window);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut cpu = CpuBusy::new();
    let mut next_sample = tokio::time::Instant::now() + SAMPLE_EVERY;
    let mut policy = Policy::default();
    loop {
        tokio::select! {
            _ = engine.shutdown.cancelled() => {
                hub.set_coalescing(false);
                hub.flush_held();
                return;
            }
            _ = tick.tick() => {}
        }
        hub.flush_held();
        let now = tokio::time::Instant::now();
        if mode != Coalesce::Auto || now < next_sample {
            continue;
        }
        next_sample = now + SAMPLE_EVERY;
        let (handed, writes) = hub.take_window_counts();
        let Some(busy) = cpu.sample() else { continue };
        let on = hub.coalescing();
        let batch = handed as f64 / writes.max(1) as f64;
        let want = policy.next(on, busy, handed, batch);
        if want != on {
            hub.set_coalescing(want);
            crate::metrics::coalescing(want);
            tracing::info!(
                coalescing = want,
                cpu_busy = format!("{:.0}%", busy * 100.0),
                deliveries_per_write = format!("{batch:.1}"),
                window_ms = engine.config.coalesce_window.as_millis() as u64,
                "Coalesced writes switched."
            );
        }
    }
}

/// `auto`'s decision, sample by sample: how many samples in a row spoke for a switch.
#[derive(Debug, Default)]
struct Policy {
    runs: u32,
    /// The deliveries handed over in the sample that started coalescing.
    engaged_load: u64,
}

impl Policy {
    /// Whether to coalesce from now on, given whether fan-outs do now, how busy the CPU was over
    /// the sample (0-1), how many deliveries fan-outs handed over in it and how many of them a
    /// window's write carried (or would have).
    fn next(&mut self, on: bool, busy: f64, handed: u64, batch: f64) -> bool {
        let for_switch = if on {
            batch < RELEASE_BATCH
                || (busy < RELEASE_BUSY
                    && (handed as f64) < self.engaged_load as f64 * RELEASE_LOAD)
        } else {
            busy >= ENGAGE_BUSY && batch >= ENGAGE_BATCH
        };
        self.runs = if for_switch { self.runs + 1 } else { 0 };
        let needed = if on { RELEASE_SAMPLES } else { ENGAGE_SAMPLES };
        if self.runs < needed {
            return on;
        }
        self.runs = 0;
        if !on {
            self.engaged_load = handed;
        }
        !on
    }
}

/// How busy the CPU this process may use was since the last sample: the machine's (`/proc/stat`;
/// steal counts as busy, it is CPU the process could not have), or, under a cgroup CPU quota (v2
/// `cpu.max`, v1 `cpu.cfs_quota_us`), the cgroup's share of its quota, whichever is higher.
struct CpuBusy {
    machine: Option<(u64, u64)>,
    cgroup: Option<Quota>,
}

/// A cgroup's CPU quota and the cgroup's use of it.
#[derive(Debug)]
struct Quota {
    /// The file that counts the cgroup's CPU time: v2 `cpu.stat` (`usage_usec`, microseconds) or
    /// v1 `cpuacct.usage` (nanoseconds).
    usage: Usage,
    /// CPUs' worth of time the quota allows.
    cpus: f64,
    /// The last usage in microseconds, and when it was read.
    last: Option<(u64, std::time::Instant)>,
}

#[derive(Debug, PartialEq)]
enum Usage {
    V2(std::path::PathBuf),
    V1(std::path::PathBuf),
}

impl CpuBusy {
    fn new() -> Self {
        let cgroup = std::fs::read_to_string("/proc/self/cgroup")
            .ok()
            .and_then(|own| Quota::find(std::path::Path::new("/sys/fs/cgroup"), &own));
        let mut c = CpuBusy {
            machine: None,
            cgroup,
        };
        c.sample();
        c
    }

    /// The busy share since the last call, 0-1; `None` on the first call or when nothing can be
    /// read (off Linux).
    fn sample(&mut self) -> Option<f64> {
        let machine = read_proc_stat().and_then(|now| {
            let before = self.machine.replace(now)?;
            let total = now.0.saturating_sub(before.0);
            let idle = now.1.saturating_sub(before.1);
            (total > 0).then(|| 1.0 - idle as f64 / total as f64)
        });
        let cgroup = self.cgroup.as_mut().and_then(Quota::sample);
        match (machine, cgroup) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }
}

/// The machine's CPU time so far, in ticks: (all of it, idle and iowait).
fn read_proc_stat() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    parse_proc_stat(&stat)
}

fn parse_proc_stat(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let fields: Vec<u64> = line
        .split_ascii_whitespace()
        .map(|f| f.parse().unwrap_or(0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user already).
    let total: u64 = fields.iter().take(8).sum();
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    Some((total, idle))
}

impl Quota {
    /// The quota of the cgroup this process is in (`own` is its `/proc/self/cgroup`, `root` where
    /// cgroup file systems are mounted), when one is set: cgroup v2 first, then v1's `cpu`
    /// controller with `cpuacct` counting the time (a container runtime on a v1 host mounts the
    /// container's own cgroup at `root/cpu`, and `/proc/self/cgroup` then names `/`).
    fn find(root: &std::path::Path, own: &str) -> Option<Quota> {
        let v2 = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .and_then(|path| {
                let dir = root.join(path.trim().trim_start_matches('/'));
                let cpus = parse_cpu_max(&std::fs::read_to_string(dir.join("cpu.max")).ok()?)?;
                Some(Quota {
                    usage: Usage::V2(dir.join("cpu.stat")),
                    cpus,
                    last: None,
                })
            });
        v2.or_else(|| {
            // `file` in `controller`'s directory: the line naming it in `/proc/self/cgroup`, under
            // the mount named after its co-mounted list (`cpu,cpuacct`) or after it alone.
            let v1 = |controller: &str, file: &str| {
                let (list, path) = own.lines().find_map(|l| {
                    let mut parts = l.splitn(3, ':');
                    let (_, list, path) = (parts.next()?, parts.next()?, parts.next()?);
                    list.split(',')
                        .any(|c| c == controller)
                        .then_some((list, path))
                })?;
                let path = path.trim().trim_start_matches('/');
                [list, controller]
                    .iter()
                    .map(|m| root.join(m).join(path).join(file))
                    .find(|f| f.exists())
            };
            let quota = v1("cpu", "cpu.cfs_quota_us")?;
            let read = |f: &std::path::Path| std::fs::read_to_string(f).ok();
            let period = read(&quota.with_file_name("cpu.cfs_period_us"))?;
            let cpus = parse_cfs_quota(&read(&quota)?, &period)?;
            Some(Quota {
                usage: Usage::V1(v1("cpuacct", "cpuacct.usage")?),
                cpus,
                last: None,
            })
        })
    }

    fn sample(&mut self) -> Option<f64> {
        let usage = match &self.usage {
            Usage::V2(stat) => std::fs::read_to_string(stat)
                .ok()?
                .lines()
                .find_map(|l| l.strip_prefix("usage_usec "))?
                .trim()
                .parse()
                .ok()?,
            Usage::V1(usage) => {
                std::fs::read_to_string(usage)
                    .ok()?
                    .trim()
                    .parse::<u64>()
                    .ok()?
                    / 1000
            }
        };
        let now = std::time::Instant::now();
        let (before, at) = self.last.replace((usage, now))?;
        let wall = now.duration_since(at).as_micros() as f64;
        (wall > 0.0).then(|| (usage.saturating_sub(before) as f64 / (wall * self.cpus)).min(1.0))
    }
}

/// CPUs' worth of a `cpu.max` ("quota period", or "max period": no quota).
fn parse_cpu_max(max: &str) -> Option<f64> {
    let mut it = max.split_ascii_whitespace();
    let quota: f64 = it.next()?.parse().ok()?;
    let period: f64 = it.next()?.parse().ok()?;
    (quota > 0.0 && period > 0.0).then(|| quota / period)
}

/// CPUs' worth of a cgroup v1 `cpu.cfs_quota_us` over its `cpu.cfs_period_us` (-1: no quota).
fn parse_cfs_quota(quota: &str, period: &str) -> Option<f64> {
    parse_cpu_max(&format!("{} {}", quota.trim(), period.trim()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_coalesces_while_the_cpu_is_saturated_and_deliveries_would_share_writes() {
        let mut p = Policy::default();
        // Saturated, but each write would carry one delivery: nothing to gain.
        for _ in 0..10 {
            assert!(!p.next(false, 1.0, 50_000, 1.2));
        }
        // One busy sample is not enough; two in a row are.
        assert!(!p.next(false, 0.95, 50_000, 2.5));
        assert!(!p.next(false, 0.60, 50_000, 2.5));
        assert!(!p.next(false, 0.85, 50_000, 2.5));
        assert!(p.next(false, 0.85, 50_000, 2.5));
        // On, it holds while it pays, however much CPU it freed: an idle CPU with the load it
        // started at (or more, or a bit less) is coalescing working.
        for load in [50_000, 80_000, 30_000] {
            for _ in 0..20 {
                assert!(p.next(true, 0.20, load, 2.5));
            }
        }
        // It stops after three seconds of writes that carry too little, or of an idle CPU with
        // less than half the load; a sample in between starts the count again.
        for _ in 0..5 {
            assert!(p.next(true, 0.30, 20_000, 2.5));
        }
        assert!(p.next(true, 0.45, 20_000, 2.5));
        assert!(p.next(true, 0.30, 30_000, 2.5));
        for _ in 0..5 {
            assert!(p.next(true, 0.95, 50_000, 1.1));
        }
        assert!(!p.next(true, 0.95, 50_000, 1.1));
        // Off again, the count starts from nothing, and the load to compare with is the new one.
        assert!(!p.next(false, 0.95, 10_000, 2.5));
        assert!(p.next(false, 0.95, 10_000, 2.5));
        for _ in 0..5 {
            assert!(p.next(true, 0.10, 6_000, 2.5));
        }
        for _ in 0..5 {
            assert!(p.next(true, 0.10, 4_000, 2.5));
        }
        assert!(!p.next(true, 0.10, 4_000, 2.5));
    }

    #[test]
    fn proc_stat_counts_idle_and_iowait_as_idle_and_steal_as_busy() {
        let stat = "cpu  100 5 50 800 20 0 10 15 7 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n";
        assert_eq!(parse_proc_stat(stat), Some((1000, 820)));
        assert_eq!(parse_proc_stat("intr 1 2 3\n"), None);
    }

    #[test]
    fn cpu_max_is_a_number_of_cpus_or_none() {
        assert_eq!(parse_cpu_max("150000 100000\n"), Some(1.5));
        assert_eq!(parse_cpu_max("max 100000\n"), None);
        assert_eq!(parse_cpu_max(""), None);
        assert_eq!(parse_cfs_quota("150000\n", "100000\n"), Some(1.5));
        assert_eq!(parse_cfs_quota("-1\n", "100000\n"), None);
    }

    /// A cgroup tree under a scratch directory: `files` are (path, content).
    fn tree(name: &str, files: &[(&str, &str)]) -> std::path::PathBuf {
        let root = std::env::temp_dir().join(format!("herald-cg-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (path, content) in files {
            let f = root.join(path);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(f, content).unwrap();
        }
        root
    }

    #[test]
    fn the_quota_is_found_in_cgroup_v2_and_in_v1_and_none_without_one() {
        let v2 = tree(
            "v2",
            &[
                ("app/cpu.max", "50000 100000\n"),
                ("app/cpu.stat", "usage_usec 10\n"),
            ],
        );
        let q = Quota::find(&v2, "0::/app\n").unwrap();
        assert_eq!((q.cpus, q.usage), (0.5, Usage::V2(v2.join("app/cpu.stat"))));
        assert!(Quota::find(&tree("v2max", &[("cpu.max", "max 100000\n")]), "0::/\n").is_none());

        // v1 with cpu and cpuacct co-mounted, the way Docker on a v1 host shows it.
        let v1 = tree(
            "v1",
            &[
                ("cpu,cpuacct/c1/cpu.cfs_quota_us", "200000\n"),
                ("cpu,cpuacct/c1/cpu.cfs_period_us", "100000\n"),
                ("cpu,cpuacct/c1/cpuacct.usage", "5000000\n"),
            ],
        );
        let own = "12:memory:/c1\n3:cpu,cpuacct:/c1\n0::/\n";
        let mut q = Quota::find(&v1, own).unwrap();
        let usage = v1.join("cpu,cpuacct/c1/cpuacct.usage");
        assert_eq!((q.cpus, &q.usage), (2.0, &Usage::V1(usage.clone())));
        assert_eq!(
            q.sample(),
            None,
            "the first sample has nothing to compare with"
        );
        std::fs::write(&usage, "900000000000\n").unwrap();
        assert_eq!(q.sample(), Some(1.0), "more than the quota is all of it");

        // Separate mounts (`cpu` and `cpuacct`), no quota: the machine's figure alone.
        let none = tree(
            "v1none",
            &[
                ("cpu/cpu.cfs_quota_us", "-1\n"),
                ("cpu/cpu.cfs_period_us", "100000\n"),
                ("cpuacct/cpuacct.usage", "1\n"),
            ],
        );
        assert!(Quota::find(&none, "2:cpuacct:/\n1:cpu:/\n0::/\n").is_none());
        for d in [v2, v1, none] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
