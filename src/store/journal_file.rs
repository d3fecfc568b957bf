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
//! as large up to [`SEGMENT_BYTES`], zero-filled before use, each a run of records `payload length: u32 LE | CRC-32 of key and payload: u32
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
//! Deletion: a closed segment is deleted once every batch in it is folded and that fold
//! is durable in redb (the writer calls [`JournalFile::release`] after each durable
//! commit, with the lowest key that still holds unfolded batches); the current one is
//! emptied in place (its first header zeroed) when nothing is pending at all. A segment
//! whose deletion a crash undid, or older records past the ones written after an
//! emptying, are harmless: replay skips entries at or below their room's head.
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

/// A closed segment and the last key in it.
struct Closed {
    path: PathBuf,
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
    /// Bytes of records in it.
    len: u64,
    /// The last key written to it.
    last_key: Option<u64>,
    closed: Vec<Closed>,
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
    let mut file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)?;
    // Synced a chunk at a time: one flush of the whole segment queued ahead of the
    // writer's `fdatasync` held a commit up by 116 ms.
    let zeros = vec![0u8; PREPARE_CHUNK];
    let mut left = size;
    while left > 0 {
        let n = left.min(zeros.len() as u64) as usize;
        file.write_all(&zeros[..n])?;
        file.sync_data()?;
        left -= n as u64;
    }
    file.sync_all()?;
    sync_dir(dir)?;
    Ok((file, path))
}

/// Starts a helper thread preparing segment `number` of `size` bytes.
fn prepare_spare(dir: &Path, number: u64, size: u64) -> io::Result<Spare> {
    let dir = dir.to_owned();
    std::thread::Builder::new()
        .name("roomd-journal-prep".to_owned())
        .spawn(move || prepare(&dir, number, size))
}

/// The size of the segment after one of `size` bytes.
fn next_size(size: u64) -> u64 {
    (size * 2).min(SEGMENT_BYTES)
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
            len: 0,
            last_key: None,
            closed: Vec::new(),
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
                self.spare = Some(prepare_spare(
                    &self.dir,
                    self.number + 1,
                    next_size(self.size),
                )?);
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
            None => prepare(&self.dir, self.number + 1, next_size(self.size))?,
        };
        let (_, old) = self
            .current
            .replace((file, path))
            .expect("a segment with records is open");
        self.number += 1;
        self.size = next_size(self.size);
        self.len = 0;
        if let Some(last_key) = self.last_key.take() {
            self.closed.push(Closed {
                path: old,
                last_key,
            });
        } else {
            // Nothing in it (a commit larger than a segment came first).
            fs::remove_file(&old)?;
        }
        self.spare = Some(prepare_spare(
            &self.dir,
            self.number + 1,
            next_size(self.size),
        )?);
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

    /// After a durable commit: deletes the closed segments whose batches are all folded
    /// (every key below `min_unfolded`, or all when it is None), and empties the
    /// current one when nothing is pending. A segment that cannot be deleted is logged
    /// and left (it is read again at the next open, harmlessly).
    pub fn release(&mut self, min_unfolded: Option<u64>) -> io::Result<()> {
        let folded = |last_key: u64| min_unfolded.is_none_or(|min| last_key < min);
        self.closed.retain(|segment| {
            if !folded(segment.last_key) {
                return true;
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
        let mut cut = Vec::new();
        cut.extend_from_slice(&100u32.to_le_bytes());
        cut.extend_from_slice(&checksum(3, &payload(3, 100)).to_le_bytes());
        cut.extend_from_slice(&3u64.to_le_bytes());
        cut.extend_from_slice(&payload(3, 50));
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
