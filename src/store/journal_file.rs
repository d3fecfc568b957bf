//! The journal's segment files (`DIR/journal/`): where a commit's journal rows go when
//! the store has a data dir, written and fsync'd once instead of through a redb
//! transaction.
//!
//! Why: a durable redb commit writes about 11 pages and fsyncs twice (quick repair's
//! two-phase commit) even when it carries 20 events, and took the writer 92% of the
//! wall clock at 20,000 ops/s; the same rows written to a file with one `fdatasync`
//! cost 0.1-0.2 ms on the same disk (`benches/README.md`, eleventh pass). A commit whose
//! batches are all journaled (the common case) now opens no redb transaction at all;
//! folds, snapshots, trims and direct batches still go through redb.
//!
//! Layout: numbered segments (`{n:020}.seg`) of 256 KiB after an open, each next one twice
//! as large up to [`SEGMENT_BYTES`], zero-filled before use (or reused, see "Recycling"), each a run of records `payload length: u32 LE | CRC-32 of key and payload: u32
//! LE | key: u64 LE | payload` (the payload a journal row, `record::write_journal_row`).
//! Keys increase from record to record and from segment to segment; a zero header ends
//! a segment's records.
//!
//! Durability: a commit's records are written with one `pwrite` (followed by a zero
//! header) and, when the commit must be durable, one `fdatasync`, before any batch in
//! it is answered. The segment's blocks are allocated and written (zeros) before, by a
//! helper thread while the previous segment fills, so the `fdatasync` changes no file
//! size and needs no filesystem journal commit: with appends that grew the file, ext4
//! took 180-280 ms for some of them under load. A full segment is fsync'd before the
//! next is used, so only the last segment with records can end in a record cut short
//! (the commit a crash interrupted, never answered).
//!
//! Deletion: a closed segment is let go once every batch in it is folded and that fold
//! is durable in redb (the writer calls [`JournalFile::release`] after each durable
//! commit, with the lowest key that still holds unfolded batches); the current one is
//! emptied in place (its first header zeroed) when nothing is pending at all. A segment
//! whose deletion a crash undid, or older records past the ones written after an
//! emptying, are harmless: replay skips entries at or below their room's head.
//!
//! Recycling: a full-size segment let go has its first header zeroed and is kept (at
//! most [`RECYCLED_MAX`]) rather than deleted; the helper renames it to the next
//! number instead of zero-filling a new one. A busy server so writes its journal bytes
//! once rather than twice (zeros, then records), and the helper's copying of zeros (3%
//! of the server's CPU at 100 rooms) goes. The records of its earlier use stay past
//! the header: each commit's `pwrite` ends in a zero header, and a commit a crash
//! interrupted reads as a record cut short (it was never answered) or, where an older
//! record happens to start, as an older key, which ends the segment cleanly.
//!
//! Reading ([`read_all`], at open): every segment in order, each up to its first record
//! that does not check out. A zero header, the file's end, or a key not above the last
//! one read (an older record past an emptying) ends it cleanly; anything else (short, a
//! length past the row limit, a wrong checksum) is a record cut short, and refuses the
//! open, naming the file and offset, if a later segment holds records.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use super::record::MAX_JOURNAL_ROW_BYTES;
use super::StoreError;

/// The journal's directory inside the data dir.
pub const DIR: &str = "journal";
/// The size of the largest segment: a commit that does not fit in the current one goes
/// to the next; a closed segment is deleted as a whole, so this is also about how much
/// journal outlives its folds.
pub const SEGMENT_BYTES: u64 = 32 * 1024 * 1024;
/// The size of the first segments after an open: each next one is twice as large, up to
/// [`SEGMENT_BYTES`], so a quiet server (or a test) zero-fills little and a busy one
/// rotates rarely.
pub const FIRST_SEGMENT_BYTES: u64 = 256 * 1024;
/// How much of a segment being prepared is written (zeros) and synced at a time.
const PREPARE_CHUNK: usize = 512 * 1024;
/// The size of each write of zeros, and so of the page cache's folios of a segment
/// (see `prepare`).
const PREPARE_WRITE: usize = 16 * 1024;
/// The most segments let go and kept for reuse (see "Recycling" above): 128 MiB of disk
/// at most. A server writing 25 MB/s of journal fills a segment every 1.3 s and lets
/// segments go in bunches, every fold age (4 s), so fewer would leave most new
/// segments zero-filled still.
pub const RECYCLED_MAX: usize = 4;
/// Length, checksum and key.
const HEADER: usize = 16;
const SUFFIX: &str = ".seg";
/// The name prefix of a file holding a damaged room's rows set aside.
const ASIDE: &str = "aside-";

/// One record read back at open.
pub struct Row {
    pub key: u64,
    pub bytes: Vec<u8>,
    /// Index into [`Replayed::segments`] of the segment holding it.
    pub segment: usize,
}

/// Everything [`read_all`] found.
pub struct Replayed {
    pub rows: Vec<Row>,
    pub segments: Vec<PathBuf>,
    /// The number the next segment takes (past every one found).
    pub next_segment: u64,
}

/// A closed segment, its size and the last key in it.
struct Closed {
    path: PathBuf,
    size: u64,
    last_key: u64,
}

/// A segment zero-filled and ready, or being made ready by a helper thread.
type Spare = JoinHandle<io::Result<(File, PathBuf)>>;

/// The segment being written, the next one, and the closed ones the writer will delete.
pub struct JournalFile {
    dir: PathBuf,
    /// The segment being written, prepared at the first write after an open (an idle
    /// store writes no segment at all).
    current: Option<(File, PathBuf)>,
    /// This segment's number and size.
    number: u64,
    size: u64,
    /// [`SEGMENT_BYTES`] (smaller in tests): the size segments grow to, and the size of
    /// those recycled.
    max_size: u64,
    /// Bytes of records in it.
    len: u64,
    /// The last key written to it.
    last_key: Option<u64>,
    closed: Vec<Closed>,
    /// Full-size segments let go, their first header zeroed, for the next spares.
    recycled: Vec<PathBuf>,
    spare: Option<Spare>,
    /// The current commit's records, written by [`JournalFile::flush`].
    buf: Vec<u8>,
    buf_last_key: Option<u64>,
    /// Written since the last `fdatasync`.
    unsynced: bool,
}

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn segment_path(dir: &Path, number: u64) -> PathBuf {
    dir.join(format!("{number:020}{SUFFIX}"))
}

/// Syncs a directory, so a file created in it stays after a crash.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The checksum of one record: its key and payload.
fn checksum(key: u64, payload: &[u8]) -> u32 {
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&key.to_le_bytes());
    hasher.update(payload);
    hasher.finalize()
}

/// How reading a segment's records ended.
enum End {
    /// A zero header, the file's end, or an older record.
    Clean,
    /// A record cut short or damaged, at this offset, and why.
    Cut(usize, String),
}

/// Reads every segment under `dir` (a data dir's journal directory; none yet reads as
/// empty), in order.
pub fn read_all(dir: &Path) -> Result<Replayed, StoreError> {
    let mut numbered: Vec<(u64, PathBuf)> = Vec::new();
    match fs::read_dir(dir) {
        Ok(entries) => {
            for entry in entries {
                let entry = entry.map_err(io_error("cannot list the journal directory", dir))?;
                let name = entry.file_name();
                let Some(number) = name
                    .to_str()
                    .and_then(|name| name.strip_suffix(SUFFIX))
                    .and_then(|number| number.parse::<u64>().ok())
                else {
                    continue;
                };
                numbered.push((number, entry.path()));
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_error("cannot list the journal directory", dir)(e)),
    }
    numbered.sort();
    let mut segments = Vec::with_capacity(numbered.len());
    let mut rows = Vec::new();
    // Rows of damaged rooms set aside: older than every segment's, one file each.
    let mut aside: Vec<PathBuf> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(|entry| entry.ok().map(|entry| entry.path()))
            .filter(|path| {
                path.file_name()
                    .and_then(|name| name.to_str())
                    .is_some_and(|name| name.starts_with(ASIDE) && name.ends_with(SUFFIX))
            })
            .collect(),
        Err(_) => Vec::new(),
    };
    aside.sort();
    for path in aside {
        let bytes = fs::read(&path).map_err(io_error("cannot read the journal file", &path))?;
        let mut at = 0;
        while let Some((key, payload)) =
            record_at(&bytes, at, None).map_err(|detail| StoreError::Journal {
                path: path.clone(),
                key: 0,
                room: "(unknown)".to_owned(),
                detail: format!("the record at offset {at} is damaged: {detail}"),
            })?
        {
            rows.push(Row {
                key,
                bytes: payload.to_vec(),
                segment: segments.len(),
            });
            at += HEADER + payload.len();
        }
        segments.push(path);
    }
    let next_segment = numbered.last().map_or(0, |(number, _)| number + 1);
    let mut last_key: Option<u64> = None;
    // A segment whose records ended in a cut record: only fine if nothing follows.
    let mut cut: Option<(PathBuf, usize, String)> = None;
    for (_, path) in numbered {
        let index = segments.len();
        let mut bytes = Vec::new();
        File::open(&path)
            .and_then(|mut file| file.read_to_end(&mut bytes))
            .map_err(io_error("cannot read the journal segment", &path))?;
        let mut at = 0;
        let end = loop {
            match record_at(&bytes, at, last_key) {
                Ok(Some((key, payload))) => {
                    if let Some((path, offset, detail)) = cut.take() {
                        return Err(StoreError::Journal {
                            path,
                            key,
                            room: "(unknown)".to_owned(),
                            detail: format!(
                                "the record at offset {offset} is damaged ({detail}), and later segments hold records"
                            ),
                        });
                    }
                    rows.push(Row {
                        key,
                        bytes: payload.to_vec(),
                        segment: index,
                    });
                    last_key = Some(key);
                    at += HEADER + payload.len();
                }
                Ok(None) => break End::Clean,
                Err(detail) => break End::Cut(at, detail),
            }
        };
        if let End::Cut(offset, detail) = end {
            tracing::info!(
                segment = %path.display(),
                offset,
                detail,
                "a journal segment ends in a record cut short (a commit the stop interrupted, never answered)"
            );
            cut = Some((path.clone(), offset, detail));
        }
        segments.push(path);
    }
    Ok(Replayed {
        rows,
        segments,
        next_segment,
    })
}

/// The record at `at` in `bytes`: its key and payload, None at a clean end, or why it
/// is cut short.
fn record_at(
    bytes: &[u8],
    at: usize,
    last_key: Option<u64>,
) -> Result<Option<(u64, &[u8])>, String> {
    let rest = &bytes[at.min(bytes.len())..];
    let Some(header) = rest.get(..HEADER) else {
        return if rest.iter().all(|byte| *byte == 0) {
            Ok(None)
        } else {
            Err("the header is cut short".to_owned())
        };
    };
    if header.iter().all(|byte| *byte == 0) {
        return Ok(None);
    }
    let len = u32::from_le_bytes(header[0..4].try_into().expect("4 bytes")) as usize;
    let sum = u32::from_le_bytes(header[4..8].try_into().expect("4 bytes"));
    let key = u64::from_le_bytes(header[8..16].try_into().expect("8 bytes"));
    if len == 0 || len > MAX_JOURNAL_ROW_BYTES {
        return Err(format!(
            "its length {len} is outside 1..={MAX_JOURNAL_ROW_BYTES}"
        ));
    }
    let payload = rest
        .get(HEADER..HEADER + len)
        .ok_or("the payload is cut short")?;
    if checksum(key, payload) != sum {
        return Err("its checksum does not match".to_owned());
    }
    if last_key.is_some_and(|last| key <= last) {
        // Written before the segment was emptied in place: folded long ago.
        return Ok(None);
    }
    Ok(Some((key, payload)))
}

/// Creates segment `number`, zero-filled to `size` bytes and durable with its directory
/// entry.
fn prepare(dir: &Path, number: u64, size: u64) -> io::Result<(File, PathBuf)> {
    let path = segment_path(dir, number);
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    // Written 16 KiB per call, so the page cache holds the segment in folios of 16 KiB: a
    // folio is written back whole, and with the segment zero-filled in 512 KiB writes
    // each commit's `fdatasync` wrote 512 KiB (43 GB in 60 s at 20,000 ops/s). Pages (4
    // KiB writes) made the helper 2.6 times slower. Synced a chunk at a time: one flush
    // of the whole segment queued ahead of the writer's `fdatasync` held a commit up by
    // 116 ms.
    let zeros = [0u8; PREPARE_WRITE];
    let mut at = 0;
    while at < size {
        let chunk_end = (at + PREPARE_CHUNK as u64).min(size);
        while at < chunk_end {
            let n = (chunk_end - at).min(PREPARE_WRITE as u64) as usize;
            file.write_all_at(&zeros[..n], at)?;
            at += n as u64;
        }
        file.sync_data()?;
    }
    file.sync_all()?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// Makes the segment `old` (let go, its first header zeroed) segment `number`: its
/// header made durable, then renamed, durable with its directory entry. None when it
/// is smaller than `size` (it is deleted then).
fn reuse(dir: &Path, old: &Path, number: u64, size: u64) -> io::Result<Option<(File, PathBuf)>> {
    let file = OpenOptions::new().read(true).write(true).open(old)?;
    if file.metadata()?.len() < size {
        drop(file);
        fs::remove_file(old)?;
        return Ok(None);
    }
    // Zeroed at release, unsynced; durable before the name says it is the newest
    // segment, so a crash never leaves its older records under the new number.
    file.write_all_at(&[0; HEADER], 0)?;
    file.sync_data()?;
    let path = segment_path(dir, number);
    fs::rename(old, &path)?;
    sync_dir(dir)?;
    // No read-ahead advice: it would bring the segment back in large folios (see
    // `prepare`). It was written a few seconds ago and is usually still cached.
    Ok(Some((file, path)))
}

/// Starts a helper thread preparing segment `number` of `size` bytes: `recycled` renamed
/// when given (and large enough), else a new zero-filled file.
fn prepare_spare(
    dir: &Path,
    number: u64,
    size: u64,
    recycled: Option<PathBuf>,
) -> io::Result<Spare> {
    let dir = dir.to_owned();
    std::thread::Builder::new()
        .name("roomd-journal-prep".to_owned())
        .spawn(move || {
            if let Some(old) = recycled {
                match reuse(&dir, &old, number, size) {
                    Ok(Some(reused)) => return Ok(reused),
                    Ok(None) => {}
                    Err(error) => {
                        tracing::warn!(segment = %old.display(), %error, "cannot reuse a folded journal segment; deleting it and writing a new one");
                        let _ = fs::remove_file(&old);
                    }
                }
            }
            prepare(&dir, number, size)
        })
}

/// The size of the segment after one of `size` bytes, at most `max`.
fn next_size(size: u64, max: u64) -> u64 {
    (size * 2).min(max)
}

impl JournalFile {
    /// Deletes the segments [`read_all`] found (`read`) except those whose index is in
    /// `keep` (they hold rows of damaged rooms: read again at every open until the room
    /// is restored); the first write prepares segment `number` and the one after it.
    pub fn start(
        dir: &Path,
        read: &[PathBuf],
        keep: &[usize],
        number: u64,
    ) -> Result<JournalFile, StoreError> {
        fs::create_dir_all(dir).map_err(io_error("cannot create the journal directory", dir))?;
        for (index, path) in read.iter().enumerate() {
            if !keep.contains(&index) {
                fs::remove_file(path)
                    .map_err(io_error("cannot delete the journal segment", path))?;
            }
        }
        Ok(JournalFile {
            dir: dir.to_owned(),
            current: None,
            number,
            size: FIRST_SEGMENT_BYTES,
            max_size: SEGMENT_BYTES,
            len: 0,
            last_key: None,
            closed: Vec::new(),
            recycled: Vec::new(),
            spare: None,
            buf: Vec::new(),
            buf_last_key: None,
            unsynced: false,
        })
    }

    /// Adds a record of `len` payload bytes under `key` to the current commit;
    /// `write` fills the payload.
    pub fn append<E>(
        &mut self,
        key: u64,
        len: usize,
        write: impl FnOnce(&mut [u8]) -> Result<(), E>,
    ) -> Result<(), E> {
        let start = self.buf.len();
        self.buf.resize(start + HEADER + len, 0);
        let payload_at = start + HEADER;
        write(&mut self.buf[payload_at..])?;
        let sum = checksum(key, &self.buf[payload_at..]);
        let header = &mut self.buf[start..payload_at];
        header[0..4].copy_from_slice(&(len as u32).to_le_bytes());
        header[4..8].copy_from_slice(&sum.to_le_bytes());
        header[8..16].copy_from_slice(&key.to_le_bytes());
        self.buf_last_key = Some(key);
        Ok(())
    }

    /// Writes the current commit's records (in the next segment if they do not fit in
    /// this one), and syncs them with anything written unsynced before when `sync`.
    pub fn flush(&mut self, sync: bool) -> io::Result<()> {
        if !self.buf.is_empty() {
            if self.current.is_none() {
                self.current = Some(prepare(&self.dir, self.number, self.size)?);
                self.start_spare()?;
            }
            let records = self.buf.len() as u64;
            if self.len > 0 && self.len + records + HEADER as u64 > self.size {
                self.rotate()?;
            }
            // A zero header after the records ends them, whatever an earlier use of
            // the segment left there (a commit larger than a segment grows the file).
            self.buf.extend_from_slice(&[0; HEADER]);
            let (file, _) = self.current.as_ref().expect("prepared above");
            file.write_all_at(&self.buf, self.len)?;
            self.len += records;
            self.last_key = self.buf_last_key.take();
            self.unsynced = true;
            self.buf.clear();
            // A large commit's buffer is not kept for the small ones after it.
            if self.buf.capacity() > 4 * 1024 * 1024 {
                self.buf = Vec::new();
            }
        }
        if sync {
            self.sync()?;
        }
        Ok(())
    }

    /// Closes the current segment (synced) and moves to the spare, starting the next.
    fn rotate(&mut self) -> io::Result<()> {
        self.sync()?;
        let (file, path) = match self.spare.take().map(JoinHandle::join) {
            Some(Ok(prepared)) => prepared?,
            Some(Err(_)) => return Err(io::Error::other("the journal segment helper panicked")),
            None => prepare(
                &self.dir,
                self.number + 1,
                next_size(self.size, self.max_size),
            )?,
        };
        let (_, old) = self
            .current
            .replace((file, path))
            .expect("a segment with records is open");
        let old_size = self.size;
        self.number += 1;
        self.size = next_size(self.size, self.max_size);
        self.len = 0;
        if let Some(last_key) = self.last_key.take() {
            self.closed.push(Closed {
                path: old,
                size: old_size,
                last_key,
            });
        } else {
            // Nothing in it (a commit larger than a segment came first).
            fs::remove_file(&old)?;
        }
        self.start_spare()
    }

    /// Starts preparing the segment after the current one, from a recycled one when it
    /// is full-size.
    fn start_spare(&mut self) -> io::Result<()> {
        let size = next_size(self.size, self.max_size);
        let recycled = if size == self.max_size {
            self.recycled.pop()
        } else {
            None
        };
        self.spare = Some(prepare_spare(&self.dir, self.number + 1, size, recycled)?);
        Ok(())
    }

    /// Writes a damaged room's journal row `(key, row)` to a file of its own
    /// (`aside-{key}.seg`), durably, so the segments it came from can go: it is read
    /// (first) at every open and kept until its room is restored.
    pub fn set_aside(&mut self, key: u64, row: &[u8]) -> io::Result<()> {
        let path = self.dir.join(format!("{ASIDE}{key:020}{SUFFIX}"));
        let mut bytes = Vec::with_capacity(HEADER + row.len());
        bytes.extend_from_slice(&(row.len() as u32).to_le_bytes());
        bytes.extend_from_slice(&checksum(key, row).to_le_bytes());
        bytes.extend_from_slice(&key.to_le_bytes());
        bytes.extend_from_slice(row);
        let mut file = File::create(&path)?;
        file.write_all(&bytes)?;
        file.sync_all()?;
        sync_dir(&self.dir)
    }

    /// Drops the current commit's records unwritten (its transaction failed).
    pub fn discard(&mut self) {
        self.buf.clear();
        self.buf_last_key = None;
    }

    /// Syncs what was written since the last sync.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced {
            if let Some((file, _)) = &self.current {
                file.sync_data()?;
            }
            self.unsynced = false;
        }
        Ok(())
    }

    /// Whether [`JournalFile::release`] would delete or empty anything, given the
    /// lowest key holding unfolded batches (None: nothing is pending).
    pub fn releasable(&self, min_unfolded: Option<u64>) -> bool {
        let folded = |last_key: u64| min_unfolded.is_none_or(|min| last_key < min);
        self.closed.iter().any(|segment| folded(segment.last_key))
            || (min_unfolded.is_none() && self.len > 0)
    }

    /// After a durable commit: lets go of the closed segments whose batches are all
    /// folded (every key below `min_unfolded`, or all when it is None): up to
    /// [`RECYCLED_MAX`] full-size ones are kept for reuse, their first header zeroed,
    /// the others deleted; and empties the current one when nothing is pending. A
    /// segment that cannot be deleted or zeroed is logged and left (it is read again at
    /// the next open, harmlessly).
    pub fn release(&mut self, min_unfolded: Option<u64>) -> io::Result<()> {
        let folded = |last_key: u64| min_unfolded.is_none_or(|min| last_key < min);
        let (recycled, max_size) = (&mut self.recycled, self.max_size);
        self.closed.retain(|segment| {
            if !folded(segment.last_key) {
                return true;
            }
            if segment.size == max_size && recycled.len() < RECYCLED_MAX {
                // Unsynced: a crash that keeps its older records keeps only folded ones;
                // `reuse` syncs it before the segment takes its new number.
                let zeroed = OpenOptions::new()
                    .write(true)
                    .open(&segment.path)
                    .and_then(|file| file.write_all_at(&[0; HEADER], 0));
                match zeroed {
                    Ok(()) => {
                        recycled.push(segment.path.clone());
                        return false;
                    }
                    Err(error) => {
                        tracing::warn!(segment = %segment.path.display(), %error, "cannot keep a folded journal segment for reuse; deleting it");
                    }
                }
            }
            if let Err(error) = fs::remove_file(&segment.path) {
                tracing::warn!(segment = %segment.path.display(), %error, "cannot delete a folded journal segment; the next open reads it again and skips its entries");
            }
            false
        });
        if min_unfolded.is_none() && self.len > 0 {
            // Its first header zeroed: the next records start at offset 0. Unsynced: a
            // crash that keeps the old records keeps only folded ones.
            if let Some((file, _)) = &self.current {
                file.write_all_at(&[0; HEADER], 0)?;
            }
            self.len = 0;
            self.last_key = None;
        }
        Ok(())
    }
}

impl Drop for JournalFile {
    /// Waits for the segment being prepared: a store opened again on the same dir (in
    /// this process) must not find it half made, or prepare the same number alongside.
    fn drop(&mut self) {
        if let Some(spare) = self.spare.take() {
            let _ = spare.join();
        }
    }
}

/// Writes `rows` as segment `number` of a closed data dir's journal, as a crash would
/// have left them (tests).
#[cfg(test)]
pub fn write_segment(dir: &Path, number: u64, rows: &[(u64, Vec<u8>)]) {
    fs::create_dir_all(dir).unwrap();
    let mut buf = Vec::new();
    for (key, payload) in rows {
        buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        buf.extend_from_slice(&checksum(*key, payload).to_le_bytes());
        buf.extend_from_slice(&key.to_le_bytes());
        buf.extend_from_slice(payload);
    }
    fs::write(segment_path(dir, number), buf).unwrap();
}

#[cfg(test)]
mod tests {
    use super::*;

    fn payload(key: u64, len: usize) -> Vec<u8> {
        (0..len).map(|i| (key as usize + i) as u8 | 1).collect()
    }

    /// The record of `key` with a payload of `len` bytes, only `written` of them there.
    fn record(key: u64, len: usize, written: usize) -> Vec<u8> {
        let mut bytes = Vec::new();
        bytes.extend_from_slice(&(len as u32).to_le_bytes());
        bytes.extend_from_slice(&checksum(key, &payload(key, len)).to_le_bytes());
        bytes.extend_from_slice(&key.to_le_bytes());
        bytes.extend_from_slice(&payload(key, len)[..written]);
        bytes
    }

    /// Writes one commit of one record per key.
    fn commit(file: &mut JournalFile, keys: impl IntoIterator<Item = u64>, len: usize) {
        for key in keys {
            file.append(key, len, |out| {
                out.copy_from_slice(&payload(key, len));
                Ok::<(), ()>(())
            })
            .unwrap();
        }
        file.flush(true).unwrap();
    }

    fn keys(dir: &Path) -> Vec<u64> {
        let read = read_all(dir).unwrap();
        for row in &read.rows {
            assert_eq!(row.bytes, payload(row.key, row.bytes.len()));
        }
        read.rows.iter().map(|row| row.key).collect()
    }

    fn fresh(dir: &Path) -> JournalFile {
        let read = read_all(dir).unwrap();
        JournalFile::start(dir, &read.segments, &[], read.next_segment).unwrap()
    }

    #[test]
    fn commits_read_back_in_order_across_growing_segments_and_folded_ones_go() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR);
        let mut file = fresh(&dir);
        // 40 commits of 100 KiB: past the first segments (256 KiB, 512 KiB, ...).
        for commit_no in 0..40u64 {
            commit(&mut file, [commit_no * 2, commit_no * 2 + 1], 50 * 1024);
        }
        assert_eq!(keys(&dir), (0..80).collect::<Vec<_>>());
        assert!(file.closed.len() >= 2, "{} closed", file.closed.len());
        assert_eq!(
            file.size,
            16 * FIRST_SEGMENT_BYTES,
            "each one twice the last"
        );

        // Keys below 30 folded: the segments holding only those go, the rest stay.
        assert!(file.releasable(Some(30)));
        file.release(Some(30)).unwrap();
        let left = keys(&dir);
        assert!(left[0] > 0 && left[0] <= 30, "{left:?}");
        assert_eq!(*left.last().unwrap(), 79);
        assert!(!file.releasable(Some(30)));

        // Everything folded: the closed segments go and the current one is emptied.
        file.release(None).unwrap();
        assert!(keys(&dir).is_empty());
        assert!(!file.releasable(None));
        // Written again from its start, over the older records: only the new ones read.
        commit(&mut file, [200], 10);
        assert_eq!(keys(&dir), vec![200]);
    }

    /// The segment files under `dir`, by number.
    fn numbers(dir: &Path) -> Vec<u64> {
        let mut numbers: Vec<u64> = fs::read_dir(dir)
            .unwrap()
            .filter_map(|entry| {
                let name = entry.unwrap().file_name().into_string().unwrap();
                name.strip_suffix(SUFFIX)?.parse().ok()
            })
            .collect();
        numbers.sort();
        numbers
    }

    /// Waits for the spare being prepared, so the files on disk are settled.
    fn settle(file: &mut JournalFile) {
        let prepared = file.spare.take().unwrap().join().unwrap();
        file.spare = Some(std::thread::spawn(move || prepared));
    }

    #[test]
    fn full_size_segments_let_go_are_renamed_to_the_next_numbers_and_their_old_records_stay_unread()
    {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR);
        let mut file = fresh(&dir);
        file.max_size = 2 * FIRST_SEGMENT_BYTES;
        // Commits of two 50 KiB records: two fit in the first segment (256 KiB), five in
        // each full-size one (512 KiB here).
        for n in 0..17u64 {
            commit(&mut file, [2 * n, 2 * n + 1], 50 * 1024);
        }
        settle(&mut file);
        assert_eq!(file.closed.len(), 3, "0 (256 KiB), 1 and 2 (full size)");
        assert_eq!(numbers(&dir), vec![0, 1, 2, 3, 4], "3 current, 4 the spare");

        // Everything in 0..=2 folded: 0 (not full size) is deleted, 1 and 2 are kept
        // with their first header zeroed, so none of their records reads back.
        file.release(Some(24)).unwrap();
        assert_eq!(file.recycled.len(), 2);
        assert_eq!(numbers(&dir), vec![1, 2, 3, 4]);
        assert_eq!(keys(&dir), (24..34).collect::<Vec<_>>());

        // Commits of three 20 KiB records: eight fill 4, then 5 is segment 2 renamed and
        // 6 (the spare) segment 1 renamed: no new file was zero-filled.
        for n in 0..12u64 {
            commit(&mut file, (34 + 3 * n)..(37 + 3 * n), 20 * 1024);
        }
        settle(&mut file);
        assert!(file.recycled.is_empty());
        assert_eq!(numbers(&dir), vec![3, 4, 5, 6]);
        assert_eq!(keys(&dir), (24..70).collect::<Vec<_>>());
        assert_eq!(
            (file.number, file.len),
            (5, 4 * 3 * (HEADER as u64 + 20 * 1024))
        );

        // Past 5's four commits: the zero header, then the bytes of its first use.
        let five = segment_path(&dir, 5);
        let mut bytes = fs::read(&five).unwrap();
        let tail = file.len as usize;
        assert!(bytes[tail..tail + HEADER].iter().all(|byte| *byte == 0));
        assert!(bytes[tail + HEADER..].iter().any(|byte| *byte != 0));

        // A commit a crash interrupted after its records reached the disk but before
        // the zero header behind them did: what follows is the first use's bytes. Where
        // an older record starts there, the segment ends cleanly (an older key) ...
        let old = record(7, 8, 8);
        bytes[tail..tail + old.len()].copy_from_slice(&old);
        fs::write(&five, &bytes).unwrap();
        assert_eq!(keys(&dir), (24..70).collect::<Vec<_>>());
        // ... and anywhere else it reads as a record cut short, in the last segment
        // with records (the renamed spare's first header is zero), so the open goes on.
        bytes[tail..tail + old.len()].copy_from_slice(&[0x5a; 24]);
        fs::write(&five, &bytes).unwrap();
        assert_eq!(keys(&dir), (24..70).collect::<Vec<_>>());
    }

    #[test]
    fn a_record_cut_short_ends_the_last_segment_and_refuses_the_open_before_later_records() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR);
        let mut file = fresh(&dir);
        commit(&mut file, [1, 2], 100);
        let path = file.current.as_ref().unwrap().1.clone();
        drop(file);
        // The commit a crash interrupted: its header and half its payload.
        let mut bytes = fs::read(&path).unwrap();
        let end = 2 * (HEADER + 100);
        let cut = record(3, 100, 50);
        bytes[end..end + cut.len()].copy_from_slice(&cut);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(keys(&dir), vec![1, 2], "the cut record is left out");

        // A later segment with records: the cut one was not the last write.
        write_segment(
            &dir,
            read_all(&dir).unwrap().next_segment,
            &[(9, payload(9, 8))],
        );
        let refused = match read_all(&dir) {
            Ok(_) => panic!("a cut record before later records must refuse the open"),
            Err(refused) => refused.to_string(),
        };
        assert!(
            refused.contains(&format!("offset {end}")) && refused.contains("checksum"),
            "{refused}"
        );

        // A changed byte in a whole record is refused alike.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR);
        write_segment(&dir, 0, &[(1, payload(1, 30)), (2, payload(2, 30))]);
        write_segment(&dir, 1, &[(3, payload(3, 30))]);
        let first = segment_path(&dir, 0);
        let mut bytes = fs::read(&first).unwrap();
        bytes[HEADER + 5] ^= 0x40;
        fs::write(&first, &bytes).unwrap();
        assert!(read_all(&dir).is_err());
    }

    #[test]
    fn an_open_deletes_the_segments_it_read_but_those_it_keeps_and_numbers_on() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join(DIR);
        write_segment(&dir, 4, &[(1, payload(1, 30))]);
        write_segment(&dir, 5, &[(2, payload(2, 30))]);
        let read = read_all(&dir).unwrap();
        assert_eq!(read.next_segment, 6);
        let mut file = JournalFile::start(&dir, &read.segments, &[1], read.next_segment).unwrap();
        assert_eq!(file.number, 6);
        assert!(
            !segment_path(&dir, 6).exists(),
            "nothing is prepared before the first write"
        );
        commit(&mut file, [3], 30);
        assert!(segment_path(&dir, 6).exists());
        assert_eq!(keys(&dir), vec![2, 3], "segment 5 kept, segment 4 deleted");
    }
}
