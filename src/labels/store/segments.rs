//! The embedded store's exchange log on disk: one append-only segment file per
//! generation of sequences, beside the redb file (`labels.redb.log/<generation>.seg`).
//!
//! A segment starts with a header (`SEGMENT_MAGIC`, the sequence of its first record),
//! then one frame per record: the entry's length (u32, little-endian) and the entry.
//! The offset of every frame is kept in memory, so a record is one `pread` away from
//! its sequence. Frames appended by a transaction are buffered and written with one
//! `pwrite` when it closes; a durable commit first syncs the segments written since
//! the last one. Segments are never rewritten: what changes after a record is
//! appended (the rows labels took) lives in redb, and the log's committed end
//! (`meta.log_end`) says which frames a reopened store may read, so frames written
//! after the last durable commit are cut off exactly as redb forgets that commit.
//!
//! This module knows files and frames only; the index, the taken rows and the
//! counts are the store's.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::io::ErrorKind;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

/// First bytes of a segment file.
const SEGMENT_MAGIC: &[u8; 8] = b"mltaplg1";
/// Header bytes: the magic and the first record's sequence.
const HEADER_BYTES: u64 = 16;
/// Bytes of a frame's length prefix.
const FRAME_PREFIX: usize = 4;
/// Largest segment: offsets are kept as u32 to halve the index's memory.
const MAX_SEGMENT_BYTES: u64 = u32::MAX as u64;
/// Bytes read at a time when scanning a segment on open.
const SCAN_CHUNK: usize = 1 << 20;
/// Segment files kept open at most: a store of one-row records at its bound has
/// hundreds of segments, and file descriptors are the proxy's (connections) first.
/// Older segments are opened again when a label reads them.
const MAX_OPEN_FILES: usize = 16;

/// The segment files of one store.
pub struct Segments {
    dir: PathBuf,
    /// Open segments by generation.
    open: BTreeMap<u64, Segment>,
    /// Generations written since the last sync.
    unsynced: BTreeSet<u64>,
    /// Whether a segment file was created since the last sync (the directory is then
    /// synced too, so the file's name survives a power loss).
    created: bool,
    /// Files of dropped generations, removed after the next durable commit: until
    /// then, a crash rolls redb back to a log that still needs them.
    doomed: Vec<PathBuf>,
}

struct Segment {
    path: PathBuf,
    /// The open file; None when closed to bound open files (`MAX_OPEN_FILES`).
    file: Option<File>,
    /// The sequence of the first record.
    first: u64,
    /// Offset of each record's frame, by sequence from `first`.
    offsets: Vec<u32>,
    /// Bytes in the file.
    written: u64,
    /// Frames appended since the last flush; they follow `written`.
    buffered: Vec<u8>,
}

/// Segment files written but not yet synced (`Segments::take_unsynced`).
pub struct Unsynced {
    files: Vec<File>,
    dir: Option<PathBuf>,
}

impl Unsynced {
    /// Syncs the files, and the directory when a segment was created.
    pub fn sync(self) -> std::io::Result<()> {
        for file in &self.files {
            file.sync_data()?;
        }
        if let Some(dir) = &self.dir {
            File::open(dir)?.sync_all()?;
        }
        Ok(())
    }
}

/// A record met by the scan on open: its sequence and entry.
pub type Visit<'v> = &'v mut dyn FnMut(u64, &[u8]);

impl Segments {
    /// The directory of the segments of the store file `store`.
    pub fn dir_of(store: &Path) -> PathBuf {
        let mut dir = store.as_os_str().to_owned();
        dir.push(".log");
        PathBuf::from(dir)
    }

    /// No segments open yet (until `open`).
    pub fn empty(dir: &Path) -> Segments {
        Segments {
            dir: dir.to_path_buf(),
            open: BTreeMap::new(),
            unsynced: BTreeSet::new(),
            created: false,
            doomed: Vec::new(),
        }
    }

    /// Opens the segments of `dir` (created if missing) and scans them: files of
    /// generations before `start_generation` are removed, frames of sequences at or
    /// past `end` (written after the last commit redb kept) are cut off, and every
    /// other record is passed to `visit`, in sequence order, for the index to be
    /// rebuilt. Returns the segments and how many frames could not be read (torn or
    /// damaged: cut off with what followed them in their segment).
    pub fn open(
        dir: &Path,
        start_generation: u64,
        end: u64,
        generation_of: impl Fn(u64) -> u64,
        visit: Visit<'_>,
    ) -> std::io::Result<(Segments, u64)> {
        std::fs::create_dir_all(dir)?;
        let mut segments = Segments::empty(dir);
        let mut damaged = 0;
        let mut found: Vec<(u64, PathBuf)> = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            let generation = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".seg"))
                .and_then(|g| g.parse::<u64>().ok());
            if let Some(generation) = generation {
                found.push((generation, path));
            }
        }
        found.sort_unstable();
        for (generation, path) in found {
            if generation < start_generation || generation > generation_of(end.saturating_sub(1)) || end == 0 {
                std::fs::remove_file(&path)?;
                continue;
            }
            let file = std::fs::OpenOptions::new().read(true).write(true).open(&path)?;
            let mut header = [0u8; HEADER_BYTES as usize];
            let first = match file.read_exact_at(&mut header, 0) {
                Ok(()) if &header[..8] == SEGMENT_MAGIC => {
                    u64::from_le_bytes(header[8..].try_into().unwrap_or_default())
                }
                _ => {
                    // Not a segment this version wrote, or cut before its header.
                    damaged += 1;
                    drop(file);
                    std::fs::remove_file(&path)?;
                    continue;
                }
            };
            if generation_of(first) != generation || first >= end {
                drop(file);
                std::fs::remove_file(&path)?;
                continue;
            }
            let mut segment = Segment {
                path,
                file: Some(file),
                first,
                offsets: Vec::new(),
                written: HEADER_BYTES,
                buffered: Vec::new(),
            };
            let cut = segment.scan(end, &mut damaged, &mut *visit)?;
            if cut {
                let written = segment.written;
                segment.file()?.set_len(written)?;
                segment.file()?.sync_data()?;
            }
            // Opened again when needed.
            segment.file = None;
            segments.open.insert(generation, segment);
        }
        Ok((segments, damaged))
    }

    /// The sequence the next record of `generation` must have (its segment's end),
    /// or None for a generation without a segment yet.
    pub fn next_in(&self, generation: u64) -> Option<u64> {
        self.open.get(&generation).map(|s| s.first + s.offsets.len() as u64)
    }

    /// Whether an entry of `len` bytes still fits the segment of `generation`.
    pub fn fits(&self, generation: u64, len: usize) -> bool {
        self.open.get(&generation).is_none_or(|s| s.end() + (FRAME_PREFIX + len) as u64 <= MAX_SEGMENT_BYTES)
    }

    /// Appends `entry` as the record `seq` of `generation` (buffered until `flush`):
    /// `seq` must be the generation's next (`next_in`), or any sequence of that
    /// generation for its first record.
    pub fn append(&mut self, generation: u64, seq: u64, entry: &[u8]) -> std::io::Result<()> {
        let len = u32::try_from(entry.len())
            .map_err(|_| std::io::Error::new(ErrorKind::InvalidInput, "log entry over 4 GiB"))?;
        if !self.open.contains_key(&generation) {
            let path = self.path_of(generation);
            let file = std::fs::OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path)?;
            let mut header = Vec::with_capacity(HEADER_BYTES as usize);
            header.extend_from_slice(SEGMENT_MAGIC);
            header.extend_from_slice(&seq.to_le_bytes());
            file.write_all_at(&header, 0)?;
            self.created = true;
            self.open.insert(
                generation,
                Segment {
                    path,
                    file: Some(file),
                    first: seq,
                    offsets: Vec::new(),
                    written: HEADER_BYTES,
                    buffered: Vec::new(),
                },
            );
        }
        let segment = self.open.get_mut(&generation).expect("opened above");
        debug_assert_eq!(seq, segment.first + segment.offsets.len() as u64);
        segment.offsets.push(segment.end() as u32);
        segment.buffered.extend_from_slice(&len.to_le_bytes());
        segment.buffered.extend_from_slice(entry);
        self.unsynced.insert(generation);
        Ok(())
    }

    /// The entry of the record `seq` of `generation`, None if it has none.
    pub fn read(&mut self, generation: u64, seq: u64) -> std::io::Result<Option<Vec<u8>>> {
        let Some(segment) = self.open.get_mut(&generation) else { return Ok(None) };
        let Some((start, end)) = segment.frame(seq) else { return Ok(None) };
        segment.entry(start, end).map(Some)
    }

    /// The entries (and sequences) of up to `limit` records of `generation` from `seq` on, with one
    /// read: how the oldest records are scanned for expiry and eviction.
    pub fn read_run(&mut self, generation: u64, seq: u64, limit: usize) -> std::io::Result<Vec<(u64, Vec<u8>)>> {
        let Some(segment) = self.open.get_mut(&generation) else { return Ok(Vec::new()) };
        // Sequences before the segment's first have no record.
        let from = seq.saturating_sub(segment.first) as usize;
        let count = segment.offsets.len().saturating_sub(from).min(limit);
        if count == 0 {
            return Ok(Vec::new());
        }
        let start = u64::from(segment.offsets[from]);
        let end = segment.frame_end(from + count - 1);
        let bytes = segment.entry_span(start, end)?;
        let mut out = Vec::with_capacity(count);
        for i in from..from + count {
            let at = (u64::from(segment.offsets[i]) - start) as usize + FRAME_PREFIX;
            let to = (segment.frame_end(i) - start) as usize;
            out.push((segment.first + i as u64, bytes.get(at..to).unwrap_or_default().to_vec()));
        }
        Ok(out)
    }

    /// Writes the buffered frames: one write per segment appended to. Then closes
    /// the files of the oldest segments past `MAX_OPEN_FILES`.
    pub fn flush(&mut self) -> std::io::Result<()> {
        for segment in self.open.values_mut() {
            if !segment.buffered.is_empty() {
                let file = open_file(&mut segment.file, &segment.path)?;
                file.write_all_at(&segment.buffered, segment.written)?;
                segment.written += segment.buffered.len() as u64;
                segment.buffered.clear();
            }
        }
        let open_files = self.open.values().filter(|s| s.file.is_some()).count();
        if open_files > MAX_OPEN_FILES {
            // The newest stay open: appends and most labels go there.
            let excess = open_files - MAX_OPEN_FILES / 2;
            for segment in self.open.values_mut().filter(|s| s.file.is_some()).take(excess) {
                segment.file = None;
            }
        }
        Ok(())
    }

    /// Flushes, then syncs the segments written since the last sync (and the
    /// directory when a file was created): before a durable commit of redb.
    pub fn sync(&mut self) -> std::io::Result<()> {
        // A file closed since it was written syncs through a new handle: its dirty
        // pages are the inode's.
        self.take_unsynced()?.sync()
    }

    /// Writes the buffered frames and hands out what `sync` would sync (handles of the
    /// segments written since the last sync, and the directory if a segment was
    /// created), marking it synced: the caller syncs them without holding the store,
    /// so that appends go on meanwhile, and a durable commit then only syncs what was
    /// appended since.
    pub fn take_unsynced(&mut self) -> std::io::Result<Unsynced> {
        self.flush()?;
        let mut files = Vec::new();
        for generation in std::mem::take(&mut self.unsynced) {
            if let Some(segment) = self.open.get_mut(&generation) {
                files.push(segment.file()?.try_clone()?);
            }
        }
        let dir = std::mem::take(&mut self.created).then(|| self.dir.clone());
        Ok(Unsynced { files, dir })
    }

    /// Takes the files of the generations dropped so far, to be removed by
    /// `remove_files` once the durable commit that drops them is done (taken before
    /// it: a later transaction may drop more, which its own durable commit removes).
    pub fn take_doomed(&mut self) -> Vec<PathBuf> {
        std::mem::take(&mut self.doomed)
    }

    /// Removes segment files of dropped generations (`take_doomed`).
    pub fn remove_files(doomed: Vec<PathBuf>) {
        for path in doomed {
            if let Err(error) = std::fs::remove_file(&path) {
                if error.kind() != ErrorKind::NotFound {
                    tracing::warn!(message = "Label log segment not removed.", path = %path.display(), %error);
                }
            }
        }
    }

    /// Drops the generations before `generation`: closed now, their files removed
    /// after the next durable commit (`take_doomed`).
    pub fn drop_before(&mut self, generation: u64) -> Vec<u64> {
        let dead: Vec<u64> = self.open.range(..generation).map(|(g, _)| *g).collect();
        for g in &dead {
            self.open.remove(g);
            self.unsynced.remove(g);
            self.doomed.push(self.path_of(*g));
        }
        dead
    }

    /// The first generation after `generation` that has a segment.
    pub fn next_generation_after(&self, generation: u64) -> Option<u64> {
        self.open.range(generation + 1..).next().map(|(g, _)| *g)
    }

    /// Generations with a segment.
    #[cfg(test)]
    pub fn generations(&self) -> impl Iterator<Item = u64> + '_ {
        self.open.keys().copied()
    }

    /// Bytes in the segments, written or buffered.
    pub fn bytes(&self) -> u64 {
        self.open.values().map(|s| s.end()).sum()
    }

    fn path_of(&self, generation: u64) -> PathBuf {
        self.dir.join(format!("{generation}.seg"))
    }
}

/// A segment's open file, opened again if it was closed (apart from `Segment::file`
/// so that a caller can borrow the segment's other fields meanwhile).
fn open_file<'f>(file: &'f mut Option<File>, path: &Path) -> std::io::Result<&'f File> {
    if file.is_none() {
        *file = Some(std::fs::OpenOptions::new().read(true).write(true).open(path)?);
    }
    Ok(file.as_ref().expect("opened above"))
}

impl Segment {
    /// The open file, opened again if it was closed.
    fn file(&mut self) -> std::io::Result<&File> {
        open_file(&mut self.file, &self.path)
    }

    /// Bytes written and buffered.
    fn end(&self) -> u64 {
        self.written + self.buffered.len() as u64
    }

    /// The end of the frame of the `i`-th record.
    fn frame_end(&self, i: usize) -> u64 {
        self.offsets.get(i + 1).map_or(self.end(), |o| u64::from(*o))
    }

    /// The span of the frame of record `seq`.
    fn frame(&self, seq: u64) -> Option<(u64, u64)> {
        let i = usize::try_from(seq.checked_sub(self.first)?).ok()?;
        let start = u64::from(*self.offsets.get(i)?);
        Some((start, self.frame_end(i)))
    }

    /// The entry of the frame spanning `start..end`.
    fn entry(&mut self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
        let mut bytes = self.entry_span(start, end)?;
        bytes.drain(..FRAME_PREFIX.min(bytes.len()));
        Ok(bytes)
    }

    /// The bytes `start..end`, from the file or the buffer (a flush writes whole
    /// frames, so a frame is in one or the other).
    fn entry_span(&mut self, start: u64, end: u64) -> std::io::Result<Vec<u8>> {
        let len = (end - start) as usize;
        if start >= self.written {
            let at = (start - self.written) as usize;
            return Ok(self.buffered[at..at + len].to_vec());
        }
        let mut bytes = vec![0u8; len];
        if end <= self.written {
            self.file()?.read_exact_at(&mut bytes, start)?;
        } else {
            let on_disk = (self.written - start) as usize;
            self.file()?.read_exact_at(&mut bytes[..on_disk], start)?;
            bytes[on_disk..].copy_from_slice(&self.buffered[..len - on_disk]);
        }
        Ok(bytes)
    }

    /// Reads the frames of the file, records their offsets and entries, and stops at
    /// the first frame at or past `end` or the first that cannot be read (counted);
    /// true if it stopped before the file's end (the file is then cut there).
    fn scan(&mut self, end: u64, damaged: &mut u64, visit: Visit<'_>) -> std::io::Result<bool> {
        let size = self.file()?.metadata()?.len();
        let mut at = HEADER_BYTES;
        let mut chunk: Vec<u8> = Vec::new();
        let mut chunk_at = at;
        let mut entry = Vec::new();
        loop {
            let seq = self.first + self.offsets.len() as u64;
            if at == size {
                self.written = at;
                return Ok(false);
            }
            if seq >= end || at + FRAME_PREFIX as u64 > size || at > MAX_SEGMENT_BYTES {
                self.written = at;
                if seq < end {
                    *damaged += 1;
                }
                return Ok(true);
            }
            let mut prefix = [0u8; FRAME_PREFIX];
            self.read_buffered(&mut chunk, &mut chunk_at, at, &mut prefix)?;
            let len = u64::from(u32::from_le_bytes(prefix));
            let frame_end = at + FRAME_PREFIX as u64 + len;
            if frame_end > size {
                self.written = at;
                *damaged += 1;
                return Ok(true);
            }
            entry.resize(len as usize, 0);
            self.read_buffered(&mut chunk, &mut chunk_at, at + FRAME_PREFIX as u64, &mut entry)?;
            self.offsets.push(at as u32);
            visit(seq, &entry);
            at = frame_end;
        }
    }

    /// Fills `out` with the file's bytes at `at`, through a chunk read ahead.
    fn read_buffered(
        &mut self,
        chunk: &mut Vec<u8>,
        chunk_at: &mut u64,
        at: u64,
        out: &mut [u8],
    ) -> std::io::Result<()> {
        let in_chunk = at >= *chunk_at && at + out.len() as u64 <= *chunk_at + chunk.len() as u64;
        if !in_chunk {
            let file = self.file()?;
            if out.len() > SCAN_CHUNK {
                return file.read_exact_at(out, at);
            }
            let size = file.metadata()?.len();
            let len = (size - at).min(SCAN_CHUNK as u64) as usize;
            chunk.resize(len, 0);
            file.read_exact_at(chunk, at)?;
            *chunk_at = at;
        }
        let from = (at - *chunk_at) as usize;
        out.copy_from_slice(&chunk[from..from + out.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PER_GENERATION: u64 = 4;

    fn generation_of(seq: u64) -> u64 {
        seq / PER_GENERATION
    }

    fn entry(seq: u64) -> Vec<u8> {
        format!("entry-{seq}-{}", "x".repeat(seq as usize % 7)).into_bytes()
    }

    /// Appends records `from..to` (buffered).
    fn append(segments: &mut Segments, from: u64, to: u64) {
        for seq in from..to {
            segments.append(generation_of(seq), seq, &entry(seq)).unwrap();
        }
    }

    fn reopen(dir: &Path, start_generation: u64, end: u64) -> (Segments, Vec<(u64, Vec<u8>)>, u64) {
        let mut seen = Vec::new();
        let (segments, damaged) =
            Segments::open(dir, start_generation, end, generation_of, &mut |seq, e| seen.push((seq, e.to_vec())))
                .unwrap();
        (segments, seen, damaged)
    }

    #[test]
    fn records_read_back_from_the_buffer_the_file_and_across_both() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, seen, _) = reopen(dir.path(), 0, 0);
        assert!(seen.is_empty());
        append(&mut segments, 0, 2);
        segments.flush().unwrap();
        append(&mut segments, 2, 6);
        for seq in 0..6 {
            assert_eq!(segments.read(generation_of(seq), seq).unwrap(), Some(entry(seq)), "record {seq}");
        }
        // Records 0 and 1 are in the file, 2 and 3 still buffered: one run spans both.
        let run = segments.read_run(0, 0, 10).unwrap();
        assert_eq!(run, (0..4).map(|s| (s, entry(s))).collect::<Vec<_>>());
        assert_eq!(segments.read_run(0, 1, 2).unwrap(), vec![(1, entry(1)), (2, entry(2))]);
        assert_eq!(segments.read(1, 9).unwrap(), None);
        assert_eq!(segments.next_in(1), Some(6));
        segments.sync().unwrap();
        assert_eq!(segments.read(1, 5).unwrap(), Some(entry(5)));
    }

    #[test]
    fn a_reopened_log_reads_up_to_its_committed_end_and_cuts_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _, _) = reopen(dir.path(), 0, 0);
        append(&mut segments, 0, 11);
        segments.sync().unwrap();
        drop(segments);
        // Committed up to 6: record 6 on (in generations 1 and 2) was written after
        // the last commit redb kept; generation 0 was dropped by it.
        let (mut segments, seen, damaged) = reopen(dir.path(), 1, 6);
        assert_eq!(damaged, 0);
        assert_eq!(seen, (4..6).map(|s| (s, entry(s))).collect::<Vec<_>>());
        assert!(!dir.path().join("0.seg").exists() && !dir.path().join("2.seg").exists());
        // Appending goes on after the cut, and a reopen reads it all.
        assert_eq!(segments.next_in(1), Some(6));
        append(&mut segments, 6, 9);
        segments.sync().unwrap();
        drop(segments);
        let (_, seen, _) = reopen(dir.path(), 1, 9);
        assert_eq!(seen, (4..9).map(|s| (s, entry(s))).collect::<Vec<_>>());
    }

    #[test]
    fn old_segments_are_closed_past_the_open_file_bound_and_read_again() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _, _) = reopen(dir.path(), 0, 0);
        let records = PER_GENERATION * (MAX_OPEN_FILES as u64 + 4);
        append(&mut segments, 0, records);
        segments.flush().unwrap();
        let open_files = segments.open.values().filter(|s| s.file.is_some()).count();
        assert!(open_files <= MAX_OPEN_FILES, "{open_files} files open");
        // The oldest record's file was closed; it reads through a new handle.
        assert!(segments.open[&0].file.is_none());
        assert_eq!(segments.read(0, 1).unwrap(), Some(entry(1)));
        assert_eq!(segments.read_run(0, 0, 2).unwrap(), vec![(0, entry(0)), (1, entry(1))]);
        // A closed segment written since the last sync is synced all the same.
        segments.sync().unwrap();
        drop(segments);
        let (_, seen, damaged) = reopen(dir.path(), 0, records);
        assert_eq!((seen.len() as u64, damaged), (records, 0));
    }

    #[test]
    fn a_torn_frame_is_counted_and_cut_with_what_follows_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut segments, _, _) = reopen(dir.path(), 0, 0);
        append(&mut segments, 0, 3);
        segments.sync().unwrap();
        drop(segments);
        let file = dir.path().join("0.seg");
        let len = std::fs::metadata(&file).unwrap().len();
        std::fs::OpenOptions::new().write(true).open(&file).unwrap().set_len(len - 3).unwrap();
        let (segments, seen, damaged) = reopen(dir.path(), 0, 3);
        assert_eq!(damaged, 1);
        assert_eq!(seen, (0..2).map(|s| (s, entry(s))).collect::<Vec<_>>());
        assert_eq!(segments.next_in(0), Some(2));
        // A file that is not a segment is not read as one.
        drop(segments);
        std::fs::write(dir.path().join("1.seg"), b"something else").unwrap();
        let (_, seen, damaged) = reopen(dir.path(), 0, 6);
        assert_eq!((seen.len(), damaged), (2, 1));
        assert!(!dir.path().join("1.seg").exists());
    }
}
