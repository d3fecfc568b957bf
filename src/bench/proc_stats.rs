//! A server process's CPU time and memory, read from /proc (Linux, local servers only).
//!
//! CPU time is `utime + stime` of `/proc/PID/stat` (all threads, including ones that
//! have ended); RSS is `VmRSS` of `/proc/PID/status`. Per-thread CPU comes from
//! `/proc/PID/task/*/stat`, so a report can show where the server's time went and
//! whether one thread is saturated (connection workers, rooms, the store writer).
//!
//! [`HostCpu`] reads the machine's own counters (`/proc/stat`): whether the cores were
//! saturated during a run, and how much the hypervisor took (steal), which tells a run
//! bound by CPU from one bound by waiting, and a slow machine from a slow server.

use std::collections::BTreeMap;

/// One reading of a process.
#[derive(Debug, Clone, Default)]
pub struct ProcSample {
    /// User plus system CPU seconds since the process started.
    pub cpu_s: f64,
    /// Resident set size in MiB.
    pub rss_mb: f64,
    /// CPU seconds per thread, keyed `name/tid` (Linux cuts names to 15 bytes, so
    /// actix's `actix-rt|system:0|arbiter:N` threads all read `actix-rt|system`).
    pub threads: BTreeMap<String, f64>,
}

impl ProcSample {
    /// Reads process `pid`; None when it does not exist or /proc is not readable.
    pub fn read(pid: u32) -> Option<ProcSample> {
        let (_, cpu_s) = read_stat(&format!("/proc/{pid}/stat"))?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let rss_kb = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|rest| {
                rest.trim()
                    .trim_end_matches("kB")
                    .trim()
                    .parse::<f64>()
                    .ok()
            })
            .unwrap_or(0.0);
        let mut threads = BTreeMap::new();
        if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
            for task in tasks.flatten() {
                if let Some((name, cpu)) = read_stat(&task.path().join("stat").to_string_lossy()) {
                    let tid = task.file_name().to_string_lossy().into_owned();
                    threads.insert(format!("{name}/{tid}"), cpu);
                }
            }
        }
        Some(ProcSample {
            cpu_s,
            rss_mb: rss_kb / 1024.0,
            threads,
        })
    }

    /// CPU seconds per thread spent between `earlier` and `self`, largest first.
    pub fn thread_cpu_since(&self, earlier: &ProcSample) -> Vec<(String, f64)> {
        let mut spent: Vec<(String, f64)> = self
            .threads
            .iter()
            .map(|(name, cpu)| {
                let before = earlier.threads.get(name).copied().unwrap_or(0.0);
                (name.clone(), (cpu - before).max(0.0))
            })
            .filter(|(_, cpu)| *cpu >= 0.005)
            .collect();
        spent.sort_by(|a, b| b.1.total_cmp(&a.1));
        spent
    }
}

/// The machine's CPU time over all cores, in seconds, from the first line of
/// `/proc/stat` (`cpu  user nice system idle iowait irq softirq steal ...`).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct HostCpu {
    /// Every counted state, steal included.
    pub total_s: f64,
    /// Not idle and not waiting for I/O (steal excluded).
    pub busy_s: f64,
    /// Time the hypervisor ran something else while this machine had work.
    pub steal_s: f64,
}

impl HostCpu {
    /// Reads `/proc/stat`; None when it is not readable.
    pub fn read() -> Option<HostCpu> {
        let stat = std::fs::read_to_string("/proc/stat").ok()?;
        HostCpu::parse(stat.lines().next()?, clock_ticks_per_second())
    }

    /// Parses the aggregate `cpu` line; `ticks` per second (`_SC_CLK_TCK`).
    pub fn parse(line: &str, ticks: f64) -> Option<HostCpu> {
        let mut fields = line.split_whitespace();
        if fields.next()? != "cpu" {
            return None;
        }
        // user nice system idle iowait irq softirq steal; guest time is already in
        // user and nice, so the later columns are not added again.
        let n: Vec<u64> = fields
            .take(8)
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        let [user, nice, system, idle, iowait, irq, softirq, steal] = n[..] else {
            return None;
        };
        let busy = user + nice + system + irq + softirq;
        Some(HostCpu {
            total_s: (busy + idle + iowait + steal) as f64 / ticks,
            busy_s: busy as f64 / ticks,
            steal_s: steal as f64 / ticks,
        })
    }

    /// The time spent between `earlier` and `self`.
    pub fn since(&self, earlier: &HostCpu) -> HostCpu {
        HostCpu {
            total_s: (self.total_s - earlier.total_s).max(0.0),
            busy_s: (self.busy_s - earlier.busy_s).max(0.0),
            steal_s: (self.steal_s - earlier.steal_s).max(0.0),
        }
    }
}

/// `(comm, utime + stime in seconds)` of one stat file.
fn read_stat(path: &str) -> Option<(String, f64)> {
    let stat = std::fs::read_to_string(path).ok()?;
    // comm is in parentheses and may itself contain spaces or parentheses, so the
    // numeric fields start after the last ')'.
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_string();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // Fields 14 and 15 of proc(5) (utime, stime); index 0 here is field 3 (state).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, (utime + stime) as f64 / clock_ticks_per_second()))
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf only reads a constant of the running system.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 {
        ticks as f64
    } else {
        100.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_has_cpu_time_and_memory() {
        let sample = ProcSample::read(std::process::id()).expect("/proc is readable");
        assert!(sample.rss_mb > 0.0);
        assert!(sample.cpu_s >= 0.0);
        assert!(!sample.threads.is_empty());
    }

    #[test]
    fn the_host_line_splits_into_busy_idle_and_steal() {
        // user nice system idle iowait irq softirq steal guest guest_nice
        let line = "cpu  700 100 200 5000 300 40 60 250 90 10";
        let host = HostCpu::parse(line, 100.0).expect("a cpu line");
        assert_eq!(
            host,
            HostCpu {
                total_s: 66.5,
                busy_s: 11.0,
                steal_s: 2.5,
            }
        );
        assert_eq!(HostCpu::parse("cpu0 1 2 3 4 5 6 7 8", 100.0), None);
        assert_eq!(HostCpu::parse("cpu  1 2 3", 100.0), None);
        let later = HostCpu::parse("cpu  800 100 200 5100 300 40 60 260", 100.0).unwrap();
        let spent = later.since(&host);
        let close = |a: f64, b: f64| (a - b).abs() < 1e-9;
        assert!(
            close(spent.busy_s, 1.0) && close(spent.steal_s, 0.1) && close(spent.total_s, 2.1),
            "{spent:?}"
        );
    }

    #[test]
    fn this_machine_reports_its_cpu() {
        let host = HostCpu::read().expect("/proc/stat is readable");
        assert!(host.total_s > 0.0 && host.busy_s <= host.total_s);
    }
}
