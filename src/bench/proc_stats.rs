//! A server process's CPU time and memory, read from /proc (Linux, local servers only).
//!
//! CPU time is `utime + stime` of `/proc/PID/stat` (all threads, including ones that
//! have ended); RSS is `VmRSS` of `/proc/PID/status`. Per-thread CPU comes from
//! `/proc/PID/task/*/stat`, so a report can show where the server's time went and
//! whether one thread is saturated (connection workers, rooms, the store writer).

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
}
