//! `mltap_build_info{version, commit}` and the standard process metrics
//! (`process_cpu_seconds_total`, `process_resident_memory_bytes`, ...), read from
//! `/proc/self` at scrape time. Off Linux only the build info is shown.

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;

/// The version of the crate and the git commit it was built from (`build.rs`;
/// "unknown" when built outside a checkout).
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
pub const COMMIT: &str = env!("MLTAP_GIT_COMMIT");

/// Clock ticks per second of `/proc/<pid>/stat` times: `USER_HZ`, 100 on every Linux
/// architecture mltap builds for.
const USER_HZ: f64 = 100.0;

/// `mltap_build_info` (registered under the app's prefix).
#[derive(Debug)]
pub struct BuildInfo;

impl Collector for BuildInfo {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let mut family = encoder.encode_descriptor(
            "build_info",
            "Always 1; the version of mltap and the git commit it was built from",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1).encode(family.encode_family(&[("version", VERSION), ("commit", COMMIT)])?)?;
        Ok(())
    }
}

/// The process metrics of the Prometheus client libraries (registered without prefix).
#[derive(Debug)]
pub struct ProcessMetrics;

/// What `/proc/self` says, in the units of the metrics.
#[derive(Debug, Default, PartialEq)]
pub struct ProcessStats {
    pub cpu_seconds: f64,
    pub resident_bytes: i64,
    pub virtual_bytes: i64,
    pub start_time_seconds: f64,
    pub open_fds: Option<i64>,
    pub max_fds: Option<i64>,
    pub threads: i64,
}

impl ProcessStats {
    /// Reads this process's figures; None where `/proc` is not there.
    pub fn read() -> Option<ProcessStats> {
        let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
        let boot_time = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
            s.lines().find_map(|l| l.strip_prefix("btime ")).and_then(|v| v.trim().parse::<f64>().ok())
        })?;
        let mut stats = ProcessStats::parse_stat(&stat, boot_time)?;
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        stats.resident_bytes = status_kib(&status, "VmRSS:").unwrap_or(0) * 1024;
        stats.open_fds = std::fs::read_dir("/proc/self/fd").ok().map(|d| d.count() as i64);
        stats.max_fds = std::fs::read_to_string("/proc/self/limits").ok().and_then(|limits| {
            let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
            line["Max open files".len()..].split_whitespace().next()?.parse().ok()
        });
        Some(stats)
    }

    /// The figures of a `/proc/<pid>/stat` line, with the boot time in epoch seconds.
    pub fn parse_stat(stat: &str, boot_time: f64) -> Option<ProcessStats> {
        // The command name (field 2) may hold spaces and parentheses: fields are
        // counted after its last ')'.
        let rest = &stat[stat.rfind(')')? + 1..];
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // Fields 3.. of the line are fields 0.. here: utime 14, stime 15,
        // num_threads 20, starttime 22, vsize 23.
        let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<f64>().ok());
        Some(ProcessStats {
            cpu_seconds: (field(14)? + field(15)?) / USER_HZ,
            threads: field(20)? as i64,
            start_time_seconds: boot_time + field(22)? / USER_HZ,
            virtual_bytes: field(23)? as i64,
            ..ProcessStats::default()
        })
    }
}

fn status_kib(status: &str, key: &str) -> Option<i64> {
    status.lines().find_map(|l| l.strip_prefix(key)).and_then(|v| v.split_whitespace().next()?.parse().ok())
}

impl Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(stats) = ProcessStats::read() else { return Ok(()) };
        let cpu = ConstCounter::new(stats.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            MetricType::Counter,
        )?)?;
        let mut gauges: Vec<(&str, &str, f64)> = vec![
            ("process_resident_memory_bytes", "Resident memory size in bytes", stats.resident_bytes as f64),
            ("process_virtual_memory_bytes", "Virtual memory size in bytes", stats.virtual_bytes as f64),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                stats.start_time_seconds,
            ),
            ("process_threads", "Number of OS threads in the process", stats.threads as f64),
        ];
        if let Some(open) = stats.open_fds {
            gauges.push(("process_open_fds", "Number of open file descriptors", open as f64));
        }
        if let Some(max) = stats.max_fds {
            gauges.push(("process_max_fds", "Maximum number of open file descriptors", max as f64));
        }
        for (name, help, value) in gauges {
            ConstGauge::new(value).encode(encoder.encode_descriptor(name, help, None, MetricType::Gauge)?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_stat_line_gives_cpu_threads_start_and_size() {
        // Field 2 with a space and a parenthesis, as a thread name may have.
        let line = "42 (mltap (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 7 0 1000 123456789 900 18446744073709551615";
        let stats = ProcessStats::parse_stat(line, 1_700_000_000.0).unwrap();
        assert_eq!(stats.cpu_seconds, 3.0);
        assert_eq!(stats.threads, 7);
        assert_eq!(stats.start_time_seconds, 1_700_000_010.0);
        assert_eq!(stats.virtual_bytes, 123_456_789);
    }

    #[test]
    fn this_process_is_read_on_linux() {
        if cfg!(target_os = "linux") {
            let stats = ProcessStats::read().unwrap();
            assert!(stats.resident_bytes > 0 && stats.open_fds.unwrap() > 0 && stats.max_fds.unwrap() > 0);
        }
    }
}
