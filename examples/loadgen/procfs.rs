//! What /proc tells about processes: CPU times and RSS of the measured ones, and this process's
//! open-file limit.

use std::time::Instant;

use anyhow::{Context, bail};

use crate::ui::Ui;

/// USER_HZ: the unit of the CPU times in /proc/PID/stat. 100 on every mainstream Linux
/// (`getconf CLK_TCK`); the loadgen does not link libc to ask `sysconf(_SC_CLK_TCK)`.
pub(crate) const CLK_TCK: u64 = 100;

/// CPU time (utime + stime, every thread) of `pid` (a number or `self`), in clock ticks
/// ([`CLK_TCK`] per second).
pub(crate) fn proc_cpu_ticks(pid: &str) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line; 12 and 13 after the name and state.
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Resident set size of `pid` (`VmRSS` in /proc/PID/status), kB.
fn proc_rss_kb(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The processes whose CPU and memory a run reports.
pub(crate) struct Probes {
    engine: Vec<u32>,
    redis: Option<u32>,
}

/// CPU times at one moment, in ticks; `None` for a process not given (or gone).
#[derive(Clone, Copy)]
pub(crate) struct CpuSample {
    pub(crate) at: Instant,
    pub(crate) loadgen: Option<u64>,
    /// Summed over the engine PIDs.
    pub(crate) engine: Option<u64>,
    pub(crate) redis: Option<u64>,
}

impl Probes {
    /// Checks that every PID can be read now.
    pub(crate) fn new(engine: &[u32], redis: Option<u32>) -> anyhow::Result<Probes> {
        for (flag, pid) in engine
            .iter()
            .map(|p| ("--engine-pid", *p))
            .chain(redis.map(|p| ("--redis-pid", p)))
        {
            if proc_cpu_ticks(&pid.to_string()).is_none() {
                bail!(
                    "{flag} {pid}: cannot read /proc/{pid}/stat (no such process on this machine?)"
                );
            }
        }
        Ok(Probes {
            engine: engine.to_vec(),
            redis,
        })
    }

    pub(crate) fn sample(&self) -> CpuSample {
        let engine = if self.engine.is_empty() {
            None
        } else {
            self.engine
                .iter()
                .map(|p| proc_cpu_ticks(&p.to_string()))
                .sum()
        };
        CpuSample {
            at: Instant::now(),
            loadgen: proc_cpu_ticks("self"),
            engine,
            redis: self.redis.and_then(|p| proc_cpu_ticks(&p.to_string())),
        }
    }

    /// The engine's RSS, summed over its PIDs, kB.
    pub(crate) fn engine_rss_kb(&self) -> anyhow::Result<u64> {
        self.engine
            .iter()
            .map(|&p| {
                proc_rss_kb(p)
                    .with_context(|| format!("--engine-pid {p}: cannot read /proc/{p}/status"))
            })
            .sum()
    }
}

/// Raises the soft RLIMIT_NOFILE towards `need` (up to the hard limit) and fails clearly below it.
pub(crate) fn ensure_fd_limit(need: u64, ui: &Ui) -> anyhow::Result<()> {
    let Some((soft, hard)) = nofile_limits() else {
        ui.warn("cannot read /proc/self/limits; assuming the open-file limit is enough");
        return Ok(());
    };
    if soft >= need {
        return Ok(());
    }
    if hard > soft {
        // std cannot call setrlimit; prlimit(1) can set ours from outside.
        let target = if hard == u64::MAX {
            "unlimited".to_string()
        } else {
            hard.to_string()
        };
        let ok = std::process::Command::new("prlimit")
            .arg("--pid")
            .arg(std::process::id().to_string())
            .arg(format!("--nofile={target}:{target}"))
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        if ok && let Some((soft, _)) = nofile_limits() {
            ui.note(format_args!("raised the open-file limit to {soft}"));
            if soft >= need {
                return Ok(());
            }
        }
    }
    let soft = nofile_limits().map(|l| l.0).unwrap_or(soft);
    bail!(
        "the open-file limit is {soft} (hard {hard}) but {need} are needed for this many \
         connections: raise it with `ulimit -n {need}` (for herald too) or use fewer \
         --subscribers / --idle"
    )
}

/// (soft, hard) RLIMIT_NOFILE from /proc/self/limits; `unlimited` as u64::MAX.
fn nofile_limits() -> Option<(u64, u64)> {
    let text = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = text.lines().find(|l| l.starts_with("Max open files"))?;
    let mut it = line["Max open files".len()..].split_whitespace();
    let parse = |s: &str| {
        if s == "unlimited" {
            Some(u64::MAX)
        } else {
            s.parse().ok()
        }
    };
    Some((parse(it.next()?)?, parse(it.next()?)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures_of_this_process_are_readable() {
        assert!(proc_cpu_ticks("self").is_some());
        assert!(proc_rss_kb(std::process::id()).is_some_and(|kb| kb > 0));
        let probes = Probes::new(&[std::process::id()], None).unwrap();
        assert!(probes.sample().engine.is_some());
        assert!(Probes::new(&[u32::MAX], None).is_err());
    }
}
