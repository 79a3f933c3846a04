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
        let dir = if model == PSEUDO_MODEL { pseudo_model_dir(model) } else { fs_safe_name(model) };
        self.root.join(dir).join(format!("{}.json", utc_stamp(bucket_start)))
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

/// The pseudo-model mltap counts what belongs to no model under (the monitor's
/// `GLOBAL_MODEL`); its directory is the only one named `__mltap__`.
pub const PSEUDO_MODEL: &str = "__mltap__";

pub use crate::file_names::{fs_safe_name, name_from_fs, pseudo_model_dir};

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
        assert_eq!(fs_safe_name("fraud-v2_model.3"), "fraud-v2_model.3");
        assert_eq!(fs_safe_name("../etc/passwd"), "..%2Fetc%2Fpasswd");
        assert_eq!(fs_safe_name(".."), "%2E%2E");
        assert_eq!(fs_safe_name(""), "%");
    }

    #[test]
    fn the_encoding_is_injective_and_decodes() {
        let names =
            ["a/b", "a\nb", "a_b", "", ".", "_", "%", "%2E", "__mltap__", "_mltap__", "a%2Fb", "é", "\u{202e}x"];
        let encoded: std::collections::HashSet<String> = names.iter().map(|n| fs_safe_name(n)).collect();
        assert_eq!(encoded.len(), names.len(), "{encoded:?}");
        for name in names {
            assert_eq!(name_from_fs(&fs_safe_name(name)).as_deref(), Some(name));
        }
        assert_ne!(fs_safe_name("__mltap__"), "__mltap__", "a client model never reaches the pseudo-model's directory");
    }

    #[test]
    fn long_names_are_cut_with_a_hash_of_the_whole_name() {
        let a = "m".repeat(300);
        let b = format!("{}n", "m".repeat(299));
        let (ea, eb) = (fs_safe_name(&a), fs_safe_name(&b));
        assert!(ea.len() <= 200 && eb.len() <= 200, "{} {}", ea.len(), eb.len());
        assert_ne!(ea, eb);
        assert_eq!(ea, fs_safe_name(&a), "stable");
        let escaped = fs_safe_name(&"/".repeat(100));
        assert!(escaped.len() <= 200 && !escaped[..escaped.len() - 17].ends_with('%'), "{escaped}");
        assert_eq!(name_from_fs(&ea), None);
    }
}
