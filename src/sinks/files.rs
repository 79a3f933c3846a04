//! Anodot 2.0 JSON files: one file per closed bucket and model,
//! `OUTPUT_DIR/anodot/MODEL/YYYYMMDDTHHMMSSZ.json` (bucket start, UTC), each a JSON
//! array of points.
//!
//! Every write is atomic (`atomic_file`: a temporary file in the same directory, then a
//! rename), so a reader or an uploader never sees half a file. When the file already
//! exists (label metrics computed later for the same bucket, or a restart inside a
//! bucket), the new points are merged in: the existing points first, the new ones
//! appended. Writers in this process are serialized so that merges never lose points.
//! This module never decides what a point means.

use crate::atomic_file;
use crate::sinks::Point;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// Serializes read-merge-write cycles of this process (the monitor and the label
/// metrics may write the same bucket's file).
static MERGE_LOCK: Mutex<()> = Mutex::new(());

/// Writes the Anodot files of closed buckets under `OUTPUT_DIR/anodot/`.
#[derive(Debug, Clone)]
pub struct FileSink {
    /// `OUTPUT_DIR/anodot`.
    root: PathBuf,
}

impl FileSink {
    /// A sink writing under `output_dir/anodot`.
    pub fn new(output_dir: &Path) -> Self {
        FileSink { root: output_dir.join("anodot") }
    }

    /// The file of one model's bucket.
    pub fn path(&self, model: &str, bucket_start: i64) -> PathBuf {
        self.root.join(fs_safe_name(model)).join(format!("{}.json", utc_stamp(bucket_start)))
    }

    /// Writes (or merges into) the file of one model's bucket; returns its path.
    /// Writing no points leaves the file system unchanged.
    pub fn write(&self, model: &str, bucket_start: i64, points: &[Point]) -> std::io::Result<PathBuf> {
        let path = self.path(model, bucket_start);
        if points.is_empty() {
            return Ok(path);
        }
        let _guard = MERGE_LOCK.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let mut all: Vec<Point> = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<Point>>(&bytes) {
                Ok(existing) => existing,
                Err(error) => {
                    // Never overwrite what we cannot read: keep it aside for an operator.
                    let aside = path.with_extension(format!("json.unreadable-{}", std::process::id()));
                    tracing::warn!(message = "Existing Anodot file is not a point array; kept aside.", %error,
                        path = %path.display(), aside = %aside.display());
                    std::fs::rename(&path, &aside)?;
                    Vec::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(e),
        };
        all.extend_from_slice(points);
        let json = serde_json::to_vec(&all).map_err(std::io::Error::other)?;
        atomic_file::write(&path, &json)?;
        Ok(path)
    }
}

/// A model or signature name made safe as one path component: characters other than
/// ASCII letters, digits, `-`, `_` and `.` become `_`, and `.`/`..`/empty become `_`.
pub fn fs_safe_name(name: &str) -> String {
    let s: String =
        name.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { '_' }).collect();
    if s.is_empty() || s.chars().all(|c| c == '.') {
        "_".repeat(s.len().max(1))
    } else {
        s
    }
}

/// `YYYYMMDDTHHMMSSZ` of an epoch second (UTC, proleptic Gregorian).
pub fn utc_stamp(epoch_seconds: i64) -> String {
    let days = epoch_seconds.div_euclid(86_400);
    let secs = epoch_seconds.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    format!("{y:04}{m:02}{d:02}T{:02}{:02}{:02}Z", secs / 3600, (secs % 3600) / 60, secs % 60)
}

/// Howard Hinnant's days-to-civil algorithm.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stamps_are_utc_calendar_times() {
        assert_eq!(utc_stamp(0), "19700101T000000Z");
        assert_eq!(utc_stamp(1_700_000_000), "20231114T221320Z");
        assert_eq!(utc_stamp(951_782_400), "20000229T000000Z");
    }

    #[test]
    fn unsafe_names_become_one_path_component() {
        assert_eq!(fs_safe_name("iris"), "iris");
        assert_eq!(fs_safe_name("../etc/passwd"), ".._etc_passwd");
        assert_eq!(fs_safe_name(".."), "__");
        assert_eq!(fs_safe_name(""), "_");
    }
}
