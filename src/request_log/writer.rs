//! The request log's files: one open file per model, closed (renamed from
//! `NAME.tfrecord.open` to `NAME.tfrecord`) when it reaches `max_file_bytes` or
//! `max_file_age`, and the oldest closed files deleted while all of them pass
//! `max_total_bytes`.
//!
//! Records are framed into a buffer and written to the open file at each flush
//! (every `flush_interval`, and whenever the buffer grows past `FLUSH_BYTES`), so an
//! open file is readable up to its last flush. A failed write (disk full, quota, I/O
//! error) drops the records of that flush, counted, and cuts the file back to its
//! last whole record, so that no closed file ever holds a torn or corrupt record. A
//! file left `.open` by a crash is cut to its last whole record and closed at the
//! next start.

use super::tfrecord;
use super::RequestLogStats;
use std::collections::{HashMap, VecDeque};
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc::UnboundedSender;
use tracing::warn;

/// Suffix of a file still being written.
pub const OPEN_SUFFIX: &str = ".tfrecord.open";
/// Suffix of a closed file.
pub const CLOSED_SUFFIX: &str = ".tfrecord";
/// Framed bytes buffered before a write to the file, between timed flushes.
const FLUSH_BYTES: usize = 256 << 10;
/// Files open at once, over all models; past it the least recently written closes.
const MAX_OPEN_FILES: usize = 64;
/// A warning about failed writes at most this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Where and how the files are kept.
#[derive(Debug, Clone)]
pub struct FileSettings {
    /// One folder per model below it.
    pub dir: PathBuf,
    pub max_file_bytes: u64,
    pub max_file_age: Duration,
    pub max_total_bytes: u64,
}

/// A file being written.
#[derive(Debug)]
struct OpenFile {
    /// Its name while open (`….tfrecord.open`).
    path: PathBuf,
    file: File,
    /// Bytes on disk that end with a whole record: where a failed write is cut back to.
    good_len: u64,
    /// Framed records not yet written.
    pending: Vec<u8>,
    /// Records in `pending`, counted as logged once they are on disk.
    pending_records: u64,
    opened_at: Instant,
    /// For closing the least recently written file when too many are open.
    last_write: Instant,
}

impl OpenFile {
    fn size(&self) -> u64 {
        self.good_len + self.pending.len() as u64
    }
}

/// A closed file counted against `max_total_bytes`.
#[derive(Debug)]
struct ClosedFile {
    path: PathBuf,
    bytes: u64,
}

/// The request log's files.
#[derive(Debug)]
pub struct RequestFiles {
    settings: FileSettings,
    stats: Arc<RequestLogStats>,
    /// Open files by model folder name.
    open: HashMap<String, OpenFile>,
    /// Closed files, oldest first.
    closed: VecDeque<ClosedFile>,
    /// Bytes of `closed`.
    closed_bytes: u64,
    /// Distinguishes files opened in the same second.
    sequence: u64,
    /// When failed writes were last reported.
    last_warning: Option<Instant>,
    /// Where closed files are announced for upload, when they are uploaded.
    closed_files: Option<UnboundedSender<PathBuf>>,
}

impl RequestFiles {
    /// Takes over `settings.dir`: closes files a crash left open (cut to their last
    /// whole record) and counts the closed files already there against the cap.
    /// Closed files (these and later ones) are sent to `closed_files` when given.
    pub fn open(
        settings: FileSettings,
        stats: Arc<RequestLogStats>,
        closed_files: Option<UnboundedSender<PathBuf>>,
    ) -> RequestFiles {
        let mut files = RequestFiles {
            settings,
            stats,
            open: HashMap::new(),
            closed: VecDeque::new(),
            closed_bytes: 0,
            sequence: 0,
            last_warning: None,
            closed_files,
        };
        files.recover();
        files.enforce_cap();
        files
    }

    fn recover(&mut self) {
        let mut found: Vec<(SystemTime, PathBuf, u64)> = Vec::new();
        let Ok(models) = std::fs::read_dir(&self.settings.dir) else { return };
        for model in models.flatten() {
            let Ok(entries) = std::fs::read_dir(model.path()) else { continue };
            for entry in entries.flatten() {
                let path = entry.path();
                let name = entry.file_name().to_string_lossy().into_owned();
                if name.ends_with(OPEN_SUFFIX) {
                    match close_leftover(&path) {
                        Ok(closed) => {
                            let bytes = std::fs::metadata(&closed).map(|m| m.len()).unwrap_or(0);
                            found.push((SystemTime::now(), closed, bytes));
                        }
                        Err(error) => {
                            warn!(message = "A request log file left open cannot be closed.", file = %path.display(), %error)
                        }
                    }
                } else if name.ends_with(CLOSED_SUFFIX) {
                    if let Ok(meta) = entry.metadata() {
                        found.push((meta.modified().unwrap_or(SystemTime::UNIX_EPOCH), path, meta.len()));
                    }
                }
            }
        }
        found.sort();
        for (_, path, bytes) in found {
            self.announce(&path);
            self.closed_bytes += bytes;
            self.closed.push_back(ClosedFile { path, bytes });
        }
    }

    /// Appends one record to the model's open file (opening or rotating it first).
    pub fn append(&mut self, model: &str, record: &[u8]) {
        let folder = folder_name(model);
        let framed_len = (record.len() + tfrecord::RECORD_OVERHEAD) as u64;
        let rotate = self
            .open
            .get(&folder)
            .is_some_and(|f| f.size() > 0 && f.size() + framed_len > self.settings.max_file_bytes);
        if rotate {
            self.close(&folder);
        }
        if !self.open.contains_key(&folder) {
            if self.open.len() >= MAX_OPEN_FILES {
                if let Some(oldest) = self.open.iter().min_by_key(|(_, f)| f.last_write).map(|(k, _)| k.clone()) {
                    self.close(&oldest);
                }
            }
            match self.create(&folder) {
                Ok(file) => {
                    self.open.insert(folder.clone(), file);
                }
                Err(error) => {
                    self.stats.dropped_write_error.fetch_add(1, Ordering::Relaxed);
                    self.warn_failed("cannot create a request log file", &error);
                    return;
                }
            }
        }
        let Some(file) = self.open.get_mut(&folder) else { return };
        tfrecord::frame_into(&mut file.pending, record);
        file.pending_records += 1;
        file.last_write = Instant::now();
        if file.pending.len() >= FLUSH_BYTES {
            self.flush(&folder);
        }
        self.enforce_cap();
    }

    /// Flushes every file and closes the ones past their age.
    pub fn tick(&mut self) {
        let folders: Vec<String> = self.open.keys().cloned().collect();
        for folder in folders {
            let expired = self.open.get(&folder).is_some_and(|f| f.opened_at.elapsed() >= self.settings.max_file_age);
            if expired {
                self.close(&folder);
            } else {
                self.flush(&folder);
            }
        }
        self.enforce_cap();
    }

    /// Closes every open file (shutdown).
    pub fn close_all(&mut self) {
        let folders: Vec<String> = self.open.keys().cloned().collect();
        for folder in folders {
            self.close(&folder);
        }
        self.enforce_cap();
    }

    fn create(&mut self, folder: &str) -> std::io::Result<OpenFile> {
        let dir = self.settings.dir.join(folder);
        std::fs::create_dir_all(&dir)?;
        let stamp = humantime::format_rfc3339_seconds(SystemTime::now()).to_string().replace(['-', ':'], "");
        loop {
            self.sequence += 1;
            let base = format!("{stamp}-{:06}", self.sequence);
            let path = dir.join(format!("{base}{OPEN_SUFFIX}"));
            if dir.join(format!("{base}{CLOSED_SUFFIX}")).exists() {
                continue;
            }
            let file = match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => file,
                Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(error) => return Err(error),
            };
            let now = Instant::now();
            return Ok(OpenFile {
                path,
                file,
                good_len: 0,
                pending: Vec::new(),
                pending_records: 0,
                opened_at: now,
                last_write: now,
            });
        }
    }

    /// Writes a file's pending records; on failure drops them (counted) and cuts the
    /// file back to its last whole record. Returns false when the file is unusable.
    fn flush(&mut self, folder: &str) -> bool {
        let Some(file) = self.open.get_mut(folder) else { return true };
        if file.pending.is_empty() {
            return true;
        }
        let result = file.file.write_all(&file.pending);
        let records = std::mem::take(&mut file.pending_records);
        let bytes = file.pending.len() as u64;
        file.pending.clear();
        match result {
            Ok(()) => {
                file.good_len += bytes;
                self.stats.logged.fetch_add(records, Ordering::Relaxed);
                self.stats.bytes_written.fetch_add(bytes, Ordering::Relaxed);
                true
            }
            Err(error) => {
                self.stats.dropped_write_error.fetch_add(records, Ordering::Relaxed);
                let good_len = file.good_len;
                let repaired = file.file.set_len(good_len).and_then(|()| file.file.seek(SeekFrom::Start(good_len)));
                self.warn_failed("records dropped: writing the request log failed", &error);
                if repaired.is_err() {
                    // Left `.open`: the next start cuts it to its last whole record.
                    self.open.remove(folder);
                    return false;
                }
                true
            }
        }
    }

    /// Flushes and closes a file: it takes its final name, and counts against the cap.
    fn close(&mut self, folder: &str) {
        if !self.flush(folder) {
            return;
        }
        let Some(file) = self.open.remove(folder) else { return };
        if file.good_len == 0 {
            let _ = std::fs::remove_file(&file.path);
            return;
        }
        // On disk before it is called closed: a crash never leaves a closed file short.
        let _ = file.file.sync_data();
        let closed = closed_name(&file.path);
        match std::fs::rename(&file.path, &closed) {
            Ok(()) => {
                self.stats.files_closed.fetch_add(1, Ordering::Relaxed);
                self.announce(&closed);
                self.closed_bytes += file.good_len;
                self.closed.push_back(ClosedFile { path: closed, bytes: file.good_len });
            }
            Err(error) => self.warn_failed("a request log file cannot be renamed to its closed name", &error),
        }
    }

    /// Deletes the oldest closed files while all files together pass the cap.
    fn enforce_cap(&mut self) {
        let open_bytes: u64 = self.open.values().map(OpenFile::size).sum();
        while self.closed_bytes + open_bytes > self.settings.max_total_bytes {
            let Some(oldest) = self.closed.pop_front() else { break };
            self.closed_bytes -= oldest.bytes;
            match std::fs::remove_file(&oldest.path) {
                Ok(()) => {
                    self.stats.files_deleted.fetch_add(1, Ordering::Relaxed);
                }
                // Already gone (an operator or an upload moved it): nothing to free.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => self.warn_failed("an old request log file cannot be deleted", &error),
            }
        }
    }

    fn announce(&self, closed: &Path) {
        if let Some(uploads) = &self.closed_files {
            let _ = uploads.send(closed.to_path_buf());
        }
    }

    fn warn_failed(&mut self, what: &str, error: &std::io::Error) {
        if self.last_warning.is_some_and(|at| at.elapsed() < WARN_EVERY) {
            return;
        }
        self.last_warning = Some(Instant::now());
        warn!(
            message = "Request log write failed; proxied traffic is unaffected.",
            what,
            %error,
            dropped_so_far = self.stats.dropped_write_error.load(Ordering::Relaxed),
            dir = %self.settings.dir.display(),
        );
    }
}

/// The closed name of an open file.
fn closed_name(open: &Path) -> PathBuf {
    let name = open.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    open.with_file_name(format!("{}{CLOSED_SUFFIX}", name.trim_end_matches(OPEN_SUFFIX)))
}

/// Cuts a file left open to its last whole record and gives it its closed name.
fn close_leftover(path: &Path) -> std::io::Result<PathBuf> {
    let bytes = std::fs::read(path)?;
    let valid = tfrecord::read(&bytes).valid_len() as u64;
    let closed = closed_name(path);
    if valid == 0 {
        std::fs::remove_file(path)?;
        return Ok(closed);
    }
    if valid < bytes.len() as u64 {
        let file = OpenOptions::new().write(true).open(path)?;
        file.set_len(valid)?;
        file.sync_data()?;
    }
    std::fs::rename(path, &closed)?;
    Ok(closed)
}

/// A folder name for a model name that clients chose: the same injective encoding as
/// the Anodot files' directories (`file_names::fs_safe_name`).
pub fn folder_name(model: &str) -> String {
    crate::file_names::fs_safe_name(model)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(dir: &Path) -> FileSettings {
        FileSettings {
            dir: dir.to_path_buf(),
            max_file_bytes: 1000,
            max_file_age: Duration::from_secs(3600),
            max_total_bytes: 10_000,
        }
    }

    fn files_with(dir: &Path, suffix: &str) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for model in std::fs::read_dir(dir).unwrap().flatten() {
            for entry in std::fs::read_dir(model.path()).unwrap().flatten() {
                if entry.file_name().to_string_lossy().ends_with(suffix) {
                    out.push(entry.path());
                }
            }
        }
        out.sort();
        out
    }

    #[test]
    fn a_file_rotates_by_size_and_takes_its_closed_name() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(RequestLogStats::default());
        let mut files = RequestFiles::open(settings(dir.path()), stats.clone(), None);
        for _ in 0..10 {
            files.append("m", &[1u8; 184]); // 200 bytes framed: five per file
        }
        files.tick();
        let closed = files_with(dir.path(), CLOSED_SUFFIX);
        assert_eq!(closed.len(), 1, "{closed:?}");
        let open = files_with(dir.path(), OPEN_SUFFIX);
        assert_eq!(open.len(), 1);
        let bytes = std::fs::read(&open[0]).unwrap();
        assert_eq!(tfrecord::read(&bytes).records.len(), 5, "an open file is readable after a flush");
        files.close_all();
        assert!(files_with(dir.path(), OPEN_SUFFIX).is_empty());
        for path in files_with(dir.path(), CLOSED_SUFFIX) {
            let bytes = std::fs::read(&path).unwrap();
            let records = tfrecord::read(&bytes);
            assert_eq!((records.records.len(), records.tail), (5, tfrecord::Tail::Clean));
        }
        assert_eq!(stats.logged.load(Ordering::Relaxed), 10);
        assert_eq!(stats.files_closed.load(Ordering::Relaxed), 2);
    }

    #[test]
    fn the_oldest_files_go_first_past_the_total_cap() {
        let dir = tempfile::tempdir().unwrap();
        let stats = Arc::new(RequestLogStats::default());
        let mut files =
            RequestFiles::open(FileSettings { max_total_bytes: 2500, ..settings(dir.path()) }, stats.clone(), None);
        let mut first = Vec::new();
        for i in 0..30u8 {
            files.append("m", &[i; 184]);
            if i == 4 {
                files.tick();
                first = files_with(dir.path(), OPEN_SUFFIX);
            }
        }
        files.close_all();
        let total: u64 =
            files_with(dir.path(), CLOSED_SUFFIX).iter().map(|p| std::fs::metadata(p).unwrap().len()).sum();
        assert!(total <= 2500, "{total}");
        assert!(stats.files_deleted.load(Ordering::Relaxed) >= 3);
        let first_closed = closed_name(&first[0]);
        assert!(!first_closed.exists(), "the oldest file was deleted");
        let newest = files_with(dir.path(), CLOSED_SUFFIX).pop().unwrap();
        let bytes = std::fs::read(newest).unwrap();
        assert_eq!(tfrecord::read(&bytes).records.last().unwrap()[0], 29, "the newest records are kept");
    }

    #[test]
    fn a_file_left_open_is_cut_to_its_last_whole_record_at_start() {
        let dir = tempfile::tempdir().unwrap();
        let model = dir.path().join("m");
        std::fs::create_dir_all(&model).unwrap();
        let mut bytes = tfrecord::frame(b"one");
        tfrecord::frame_into(&mut bytes, b"two");
        let whole = bytes.len();
        tfrecord::frame_into(&mut bytes, b"torn by a crash");
        std::fs::write(model.join(format!("x{OPEN_SUFFIX}")), &bytes[..bytes.len() - 3]).unwrap();
        let _files = RequestFiles::open(settings(dir.path()), Arc::new(RequestLogStats::default()), None);
        let closed = std::fs::read(model.join(format!("x{CLOSED_SUFFIX}"))).unwrap();
        assert_eq!(closed.len(), whole);
        assert_eq!(tfrecord::read(&closed).tail, tfrecord::Tail::Clean);
    }

    #[test]
    fn model_names_cannot_leave_the_folder() {
        assert_eq!(folder_name("../../etc"), "..%2F..%2Fetc");
        assert_eq!(folder_name(""), "%");
        assert_eq!(folder_name("churn-v2.1"), "churn-v2.1");
        // Distinct names get distinct folders.
        assert_eq!(folder_name("a/b"), "a%2Fb");
        assert_ne!(folder_name("a/b"), folder_name("a\nb"));
    }
}
