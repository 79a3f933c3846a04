//! The spool: the Anodot files the engine writes (`anodot/MODEL/YYYYMMDDTHHMMSSZ.json`,
//! each a JSON array of points, rewritten atomically with more points appended when
//! label metrics arrive), and the durable cursor of how many points of each file
//! Anodot has answered for.
//!
//! The cursor is a snapshot (`cursor.json`) plus an append-only journal
//! (`cursor.journal`, one JSON line per acknowledged request, fsynced): an
//! acknowledgement costs one small append, a crash mid-append loses only that
//! request's line (its points are sent again), and the journal is folded into the
//! snapshot from time to time. This module never sends anything and never changes a
//! spool file except to delete one that retention allows.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use super::Point;
use crate::atomic_file;

/// Journal lines after which the journal is folded into the snapshot.
const COMPACT_AFTER_LINES: usize = 512;

/// One spool file, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpoolFile {
    /// `MODEL/NAME.json`, the file's key in the cursor.
    pub key: String,
    /// The model directory's name.
    pub model: String,
    /// Bucket start from the file name, epoch seconds.
    pub bucket_start: i64,
    /// Full path.
    pub path: PathBuf,
    /// Size in bytes when listed; a rewrite with more points changes it.
    pub size: u64,
}

/// Parses `YYYYMMDDTHHMMSSZ` (the file stem) into epoch seconds.
pub fn parse_bucket_stem(stem: &str) -> Option<i64> {
    let b = stem.as_bytes();
    if b.len() != 16 || b[8] != b'T' || b[15] != b'Z' {
        return None;
    }
    let digits = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = stem.get(r)?;
        if !s.bytes().all(|c| c.is_ascii_digit()) {
            return None;
        }
        s.parse().ok()
    };
    let (y, mo, d) = (digits(0..4)?, digits(4..6)?, digits(6..8)?);
    let (h, mi, s) = (digits(9..11)?, digits(11..13)?, digits(13..15)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || s > 60 {
        return None;
    }
    Some(days_from_civil(y, mo, d) * 86_400 + h * 3600 + mi * 60 + s)
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's algorithm).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// Lists the spool under `root` (the `anodot/` folder) in delivery order: bucket time,
/// then model. Names that are not `YYYYMMDDTHHMMSSZ.json` (temporary files of an
/// atomic write, anything else) are ignored.
pub fn list(root: &Path) -> io::Result<Vec<SpoolFile>> {
    let mut files = Vec::new();
    let models = match fs::read_dir(root) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(files),
        Err(e) => return Err(e),
    };
    for model in models {
        let model = model?;
        if !model.file_type()?.is_dir() {
            continue;
        }
        let Some(model_name) = model.file_name().to_str().map(str::to_string) else { continue };
        for entry in fs::read_dir(model.path())? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let Some(stem) = name.strip_suffix(".json") else { continue };
            let Some(bucket_start) = parse_bucket_stem(stem) else { continue };
            let meta = match entry.metadata() {
                Ok(m) if m.is_file() => m,
                _ => continue,
            };
            files.push(SpoolFile {
                key: format!("{model_name}/{name}"),
                model: model_name.clone(),
                bucket_start,
                path: entry.path(),
                size: meta.len(),
            });
        }
    }
    files.sort_by(|a, b| (a.bucket_start, &a.model).cmp(&(b.bucket_start, &b.model)));
    Ok(files)
}

/// Reads a spool file's points.
pub fn read_points(path: &Path) -> Result<Vec<Point>, String> {
    let bytes = fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    serde_json::from_slice(&bytes).map_err(|e| format!("{} is not a JSON array of Anodot points: {e}", path.display()))
}

/// What the cursor knows of one file.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileCursor {
    /// Points, from the start of the file, that Anodot has answered for (accepted or
    /// refused for good): delivery sends only the points past this.
    #[serde(rename = "a")]
    pub acked: usize,
    /// Of those, points Anodot refused.
    #[serde(rename = "r", default)]
    pub rejected: usize,
    /// Points the file held when last read, to know it is complete without reading it.
    #[serde(rename = "t", default)]
    pub total: usize,
    /// File size when last read: a different size means the file grew.
    #[serde(rename = "s", default)]
    pub size: u64,
    /// 3.0 watermarks posted for this bucket (bit flags of `anodot::encode3::Stream`).
    #[serde(rename = "w", default)]
    pub watermarks: u8,
}

impl FileCursor {
    /// Whether every point the file held when last read is answered for, and the file
    /// has not changed size since.
    pub fn settled(&self, size: u64) -> bool {
        self.size == size && self.acked >= self.total
    }
}

/// One journal line.
#[derive(Debug, Default, Serialize, Deserialize)]
struct JournalLine {
    /// New states of files, absolute (replaying a line twice changes nothing).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    set: Vec<(String, FileCursor)>,
    /// Files deleted by retention or gone from the spool.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    forget: Vec<String>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct Snapshot {
    /// Format version, for a later change of the layout.
    version: u32,
    /// State per spool file key.
    files: BTreeMap<String, FileCursor>,
}

/// The durable cursor, in its own directory (e.g. `OUTPUT_DIR/delivery/`).
#[derive(Debug)]
pub struct Cursor {
    /// Directory holding `cursor.json` and `cursor.journal`.
    dir: PathBuf,
    /// Current state: snapshot with the journal applied.
    files: BTreeMap<String, FileCursor>,
    /// Open journal, appended and fsynced per commit.
    journal: File,
    /// Lines in the journal, to know when to compact.
    journal_lines: usize,
    /// Keeps a second process (or a second engine) off this cursor while it is open.
    _lock: CursorLock,
}

impl Cursor {
    /// Opens (or creates) the cursor in `dir`, replaying the journal; a torn last line
    /// (crash while appending) is ignored.
    pub fn open(dir: &Path) -> io::Result<Cursor> {
        fs::create_dir_all(dir)?;
        let lock = CursorLock::acquire(dir)?;
        let snapshot_path = dir.join("cursor.json");
        let mut files = match fs::read(&snapshot_path) {
            Ok(bytes) => {
                serde_json::from_slice::<Snapshot>(&bytes)
                    .map_err(|e| {
                        io::Error::new(io::ErrorKind::InvalidData, format!("{}: {e}", snapshot_path.display()))
                    })?
                    .files
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e),
        };
        let journal_path = dir.join("cursor.journal");
        if let Ok(file) = File::open(&journal_path) {
            for line in BufReader::new(file).lines() {
                let Ok(line) = line else { break };
                let Ok(entry) = serde_json::from_str::<JournalLine>(&line) else { break };
                apply(&mut files, entry);
            }
        }
        let journal = OpenOptions::new().create(true).append(true).open(&journal_path)?;
        let mut cursor = Cursor { dir: dir.to_path_buf(), files, journal, journal_lines: 0, _lock: lock };
        cursor.compact()?;
        Ok(cursor)
    }

    /// The state of one file (zero when unknown).
    pub fn get(&self, key: &str) -> FileCursor {
        self.files.get(key).copied().unwrap_or_default()
    }

    /// All known files.
    pub fn files(&self) -> &BTreeMap<String, FileCursor> {
        &self.files
    }

    /// Records new states of several files as one durable step.
    pub fn commit(&mut self, updates: &[(String, FileCursor)]) -> io::Result<()> {
        self.write(JournalLine { set: updates.to_vec(), forget: Vec::new() })
    }

    /// Drops files (deleted by retention) from the cursor.
    pub fn forget(&mut self, keys: &[String]) -> io::Result<()> {
        self.write(JournalLine { set: Vec::new(), forget: keys.to_vec() })
    }

    fn write(&mut self, line: JournalLine) -> io::Result<()> {
        if line.set.is_empty() && line.forget.is_empty() {
            return Ok(());
        }
        let mut bytes = serde_json::to_vec(&line).map_err(io::Error::other)?;
        bytes.push(b'\n');
        self.journal.write_all(&bytes)?;
        self.journal.sync_data()?;
        apply(&mut self.files, line);
        self.journal_lines += 1;
        if self.journal_lines >= COMPACT_AFTER_LINES {
            self.compact()?;
        }
        Ok(())
    }

    /// Writes the snapshot atomically, then empties the journal. A crash in between
    /// replays journal lines onto a snapshot that already holds them: harmless, since
    /// lines hold absolute states.
    fn compact(&mut self) -> io::Result<()> {
        let snapshot = Snapshot { version: 1, files: self.files.clone() };
        let bytes = serde_json::to_vec(&snapshot).map_err(io::Error::other)?;
        atomic_file::write(&self.dir.join("cursor.json"), &bytes)?;
        let journal_path = self.dir.join("cursor.journal");
        self.journal = OpenOptions::new().create(true).write(true).truncate(true).open(&journal_path)?;
        self.journal.sync_all()?;
        self.journal = OpenOptions::new().append(true).open(&journal_path)?;
        self.journal_lines = 0;
        Ok(())
    }
}

/// Cursor directories held by this process.
static HELD: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());

/// `DIR/lock`, held with an exclusive OS file lock (`flock`) by the process
/// delivering from the cursor. Two writers would interleave journal lines, so a second
/// one is refused with a clear error. The kernel releases the lock when its holder
/// exits, however it exits, so a crash leaves nothing to clean up; and it tells two
/// containers sharing a volume apart even when both run mltap as pid 1. The file
/// holds the holder's pid and host name, for the error message only.
#[derive(Debug)]
struct CursorLock {
    /// The open lock file: closing it releases the lock.
    _file: File,
    /// The cursor directory, as recorded in `HELD`.
    dir: PathBuf,
}

impl CursorLock {
    fn acquire(dir: &Path) -> io::Result<CursorLock> {
        let dir = fs::canonicalize(dir)?;
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        if held.contains(&dir) {
            return Err(io::Error::new(
                io::ErrorKind::WouldBlock,
                format!("the delivery cursor in {} is already open in this process", dir.display()),
            ));
        }
        let path = dir.join("lock");
        let mut file = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&path)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(fs::TryLockError::WouldBlock) => {
                let holder = fs::read_to_string(&path).unwrap_or_default();
                let holder = holder.trim();
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    format!(
                        "another mltap process ({}) is delivering with the cursor in {}; stop it first",
                        if holder.is_empty() { "unknown" } else { holder },
                        dir.display()
                    ),
                ));
            }
            Err(fs::TryLockError::Error(error)) => return Err(error),
        }
        let host = fs::read_to_string("/etc/hostname").unwrap_or_default();
        let holder = format!("pid {} on {}", std::process::id(), host.trim());
        file.set_len(0)?;
        file.write_all(holder.as_bytes())?;
        held.push(dir.clone());
        Ok(CursorLock { _file: file, dir })
    }
}

impl Drop for CursorLock {
    fn drop(&mut self) {
        // The lock file stays: removing it would let a third process lock a new file
        // of the same name while a second one still waits on the old one.
        let mut held = HELD.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|d| *d != self.dir);
    }
}

fn apply(files: &mut BTreeMap<String, FileCursor>, line: JournalLine) {
    for (key, state) in line.set {
        files.insert(key, state);
    }
    for key in line.forget {
        files.remove(&key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_names_parse_to_epoch_seconds() {
        assert_eq!(parse_bucket_stem("19700101T000000Z"), Some(0));
        assert_eq!(parse_bucket_stem("20231114T221320Z"), Some(1_700_000_000));
        assert_eq!(parse_bucket_stem("20240229T120000Z"), Some(1_709_208_000));
        assert_eq!(parse_bucket_stem("20241301T000000Z"), None);
        assert_eq!(parse_bucket_stem("2024-01-01T0000Z"), None);
        assert_eq!(parse_bucket_stem(".20240101T000000Z"), None);
    }

    #[test]
    fn the_cursor_survives_reopening_and_ignores_a_torn_last_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cursor::open(dir.path()).unwrap();
        let state = FileCursor { acked: 10, rejected: 1, total: 10, size: 99, watermarks: 0 };
        c.commit(&[("m/20240101T000000Z.json".into(), state)]).unwrap();
        drop(c);
        let mut journal = OpenOptions::new().append(true).open(dir.path().join("cursor.journal")).unwrap();
        journal.write_all(b"{\"set\":[[\"m/x.json\",{\"a\":5").unwrap();
        drop(journal);
        let c = Cursor::open(dir.path()).unwrap();
        assert_eq!(c.get("m/20240101T000000Z.json"), state);
        assert_eq!(c.get("m/x.json"), FileCursor::default());
    }

    #[test]
    fn a_cursor_is_open_once_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = Cursor::open(dir.path()).unwrap();
        let e = Cursor::open(dir.path()).unwrap_err();
        assert!(e.to_string().contains("already open"), "{e}");
        drop(first);
        Cursor::open(dir.path()).unwrap();
    }

    #[test]
    fn compaction_keeps_every_state() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Cursor::open(dir.path()).unwrap();
        for i in 0..(COMPACT_AFTER_LINES + 3) {
            c.commit(&[(format!("m/{i}"), FileCursor { acked: i, ..Default::default() })]).unwrap();
        }
        c.forget(&["m/0".to_string()]).unwrap();
        drop(c);
        let c = Cursor::open(dir.path()).unwrap();
        assert_eq!(c.files().len(), COMPACT_AFTER_LINES + 2);
        assert_eq!(c.get("m/7").acked, 7);
    }
}
