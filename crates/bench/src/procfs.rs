//! What Linux's `/proc` says about a process: CPU time used and peak memory. `None`
//! elsewhere (the figures that need it are then left out).

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times (`sysconf(_SC_CLK_TCK)`, 100 on every
/// mainstream Linux).
const CLOCK_TICKS: u64 = 100;

fn path(pid: Option<u32>, file: &str) -> String {
    match pid {
        Some(p) => format!("/proc/{p}/{file}"),
        None => format!("/proc/self/{file}"),
    }
}

/// User + system CPU time used so far by process `pid` (this process when `None`), all
/// threads together.
pub fn cpu_time(pid: Option<u32>) -> Option<Duration> {
    let stat = std::fs::read_to_string(path(pid, "stat")).ok()?;
    // The command name (field 2) may hold spaces; the fields after it start after ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of the line, 12 and 13 after the name.
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 1000 / CLOCK_TICKS))
}

/// Peak resident memory (`VmHWM`) of process `pid`, in MiB.
pub fn peak_rss_mib(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(path(Some(pid), "status")).ok()?;
    let kib: f64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib / 1024.0)
}

/// CPU microseconds per item between two readings.
pub fn us_per(before: Option<Duration>, after: Option<Duration>, items: u64) -> Option<f64> {
    let used = after?.checked_sub(before?)?;
    #[allow(clippy::cast_precision_loss)]
    Some(used.as_secs_f64() * 1e6 / items.max(1) as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_process() {
        if std::path::Path::new("/proc/self/stat").exists() {
            assert!(cpu_time(None).is_some());
            assert!(peak_rss_mib(std::process::id()).is_some_and(|m| m > 0.0));
        }
        assert_eq!(
            us_per(
                Some(Duration::from_millis(10)),
                Some(Duration::from_millis(30)),
                10
            ),
            Some(2000.0)
        );
    }
}
