//! Page checksums of the data file, checked without writing to it.
//!
//! redb keeps a checksum (XXH3) of every page of its committed B-trees, but verifies
//! them only when it repairs a file or is asked to. A changed byte inside a stored value
//! leaves the page's structure and the row's encoding intact, so reading every row (what
//! the rest of `verify` does) cannot see it; only the checksum can. [`check`] runs
//! redb's own integrity check on a copy-on-write view of the file ([`Overlay`]): redb
//! reads the file, and whatever its check writes (a rebuilt allocator state, a commit)
//! stays in memory, so verifying never changes the file on disk, however damaged.
//!
//! Not here: which room a bad page belongs to (the check names no page), and reading
//! rows (`tools.rs`).

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use redb::{DatabaseError, StorageError};

use super::guard;
use super::StoreError;

/// The overlay's unit of copy-on-write.
const BLOCK: u64 = 4096;

/// The page cache of the check's redb handle: it reads the file once, front to back.
const CHECK_CACHE_BYTES: usize = 16 << 20;

/// Runs redb's integrity check over the file at `path` without writing to it.
/// `Ok(None)`: every page of the committed trees matches its checksum. `Ok(Some(why))`:
/// the file is damaged. `Err`: the file could not be read.
pub fn check(path: &Path) -> Result<Option<String>, StoreError> {
    let io_error = |source| StoreError::Io {
        what: "cannot read the data file to check its page checksums",
        path: path.to_owned(),
        source,
    };
    let file = File::open(path).map_err(io_error)?;
    let overlay = Overlay::new(file).map_err(io_error)?;
    // redb's repair calls back at progress 0.3 only when the newest commit's pages fail
    // their checksums and it is about to fall back to the commit before: stop there,
    // that is the damage this check exists to find.
    let fell_back = Arc::new(AtomicBool::new(false));
    let seen = Arc::clone(&fell_back);
    let opened = guard::catch(move || {
        redb::Builder::new()
            .set_cache_size(CHECK_CACHE_BYTES)
            .set_check_integrity_on_open(true)
            .set_repair_callback(move |session| {
                if session.progress() > 0.0 && session.progress() < 0.5 {
                    seen.store(true, Ordering::Relaxed);
                    session.abort();
                }
            })
            .create_with_backend(overlay)
            .map(drop)
    });
    match opened {
        Ok(Ok(())) => Ok(None),
        Ok(Err(DatabaseError::RepairAborted)) if fell_back.load(Ordering::Relaxed) => Ok(Some(
            "pages of the newest commit do not match their checksums".to_owned(),
        )),
        Ok(Err(DatabaseError::Storage(StorageError::Corrupted(why)))) => Ok(Some(why)),
        Ok(Err(DatabaseError::Storage(StorageError::Io(source)))) => Err(io_error(source)),
        Ok(Err(other)) => Ok(Some(other.to_string())),
        Err(panic) => Ok(Some(format!("redb panicked checking it: {panic}"))),
    }
}

/// A file seen through an in-memory layer: reads come from the layer where something
/// was written, from the file elsewhere; writes and length changes touch only the layer.
/// It grows by what redb writes during its check (the allocator state and one commit,
/// a small fraction of the file).
#[derive(Debug)]
pub struct Overlay {
    file: File,
    state: Mutex<Layer>,
}

#[derive(Debug)]
struct Layer {
    /// The length redb sees.
    len: u64,
    /// Bytes of the file at or past this offset read as zeros: the file's length, or
    /// less once redb shrank the view.
    file_visible: u64,
    /// Blocks written, by index.
    blocks: HashMap<u64, Box<[u8]>>,
}

impl Overlay {
    pub fn new(file: File) -> io::Result<Self> {
        let len = file.metadata()?.len();
        Ok(Self {
            file,
            state: Mutex::new(Layer {
                len,
                file_visible: len,
                blocks: HashMap::new(),
            }),
        })
    }

    /// Reads block `index` as the file holds it (zeros past the visible part).
    fn file_block(&self, index: u64, visible: u64, out: &mut [u8]) -> io::Result<()> {
        out.fill(0);
        let start = index * BLOCK;
        if start < visible {
            let n = (visible - start).min(BLOCK) as usize;
            self.file.read_exact_at(&mut out[..n], start)?;
        }
        Ok(())
    }
}

impl redb::StorageBackend for Overlay {
    fn len(&self) -> io::Result<u64> {
        Ok(self.state.lock().len)
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let layer = self.state.lock();
        let end = offset
            .checked_add(out.len() as u64)
            .filter(|&end| end <= layer.len)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let mut scratch = [0u8; BLOCK as usize];
        let mut at = offset;
        while at < end {
            let index = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = ((BLOCK as usize) - within).min((end - at) as usize);
            let block: &[u8] = match layer.blocks.get(&index) {
                Some(block) => block,
                None => {
                    self.file_block(index, layer.file_visible, &mut scratch)?;
                    &scratch
                }
            };
            let into = (at - offset) as usize;
            out[into..into + n].copy_from_slice(&block[within..within + n]);
            at += n as u64;
        }
        Ok(())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        let mut layer = self.state.lock();
        if len < layer.len {
            layer.file_visible = layer.file_visible.min(len);
            layer.blocks.retain(|&index, _| index * BLOCK < len);
            let cut = (len % BLOCK) as usize;
            if let Some(block) = layer.blocks.get_mut(&(len / BLOCK)) {
                block[cut..].fill(0);
            }
        }
        layer.len = len;
        Ok(())
    }

    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut layer = self.state.lock();
        let end = offset
            .checked_add(data.len() as u64)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let mut at = offset;
        while at < end {
            let index = at / BLOCK;
            let within = (at % BLOCK) as usize;
            let n = ((BLOCK as usize) - within).min((end - at) as usize);
            if !layer.blocks.contains_key(&index) {
                let mut block = vec![0u8; BLOCK as usize].into_boxed_slice();
                self.file_block(index, layer.file_visible, &mut block)?;
                layer.blocks.insert(index, block);
            }
            let from = (at - offset) as usize;
            let block = layer.blocks.get_mut(&index).expect("inserted above");
            block[within..within + n].copy_from_slice(&data[from..from + n]);
            at += n as u64;
        }
        layer.len = layer.len.max(end);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use redb::{StorageBackend, TableDefinition};

    const ROWS: TableDefinition<u64, &[u8]> = TableDefinition::new("rows");

    fn temp_file(bytes: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, bytes).unwrap();
        (dir, path)
    }

    #[test]
    fn the_overlay_reads_the_file_keeps_writes_in_memory_and_shrinks_and_grows() {
        let original: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let (_dir, path) = temp_file(&original);
        let overlay = Overlay::new(File::open(&path).unwrap()).unwrap();
        assert_eq!(overlay.len().unwrap(), 10_000);
        // A write across a block boundary, read back across both blocks.
        overlay.write(4090, &[7; 12]).unwrap();
        let mut out = vec![0; 20];
        overlay.read(4085, &mut out).unwrap();
        assert_eq!(&out[..5], &original[4085..4090]);
        assert_eq!(&out[5..17], &[7; 12]);
        assert_eq!(&out[17..], &original[4102..4105]);
        // Past the end is an error, as from a file.
        assert!(overlay.read(9_990, &mut [0; 20]).is_err());
        // Shrinking hides the file's bytes; growing again shows zeros there.
        overlay.set_len(4095).unwrap();
        overlay.set_len(12_000).unwrap();
        let mut tail = vec![1; 10];
        overlay.read(4093, &mut tail).unwrap();
        assert_eq!(tail, [7, 7, 0, 0, 0, 0, 0, 0, 0, 0]);
        overlay.write(11_990, &[9; 20]).unwrap();
        assert_eq!(overlay.len().unwrap(), 12_010);
        // The file itself never changed.
        assert_eq!(std::fs::read(&path).unwrap(), original);
    }

    fn database_with(rows: u64, marker: &[u8]) -> (tempfile::TempDir, std::path::PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("roomd.redb");
        let db = redb::Database::create(&path).unwrap();
        let txn = db.begin_write().unwrap();
        {
            let mut table = txn.open_table(ROWS).unwrap();
            for i in 0..rows {
                let mut value = marker.to_vec();
                value.extend_from_slice(&i.to_le_bytes());
                table.insert(i, value.as_slice()).unwrap();
            }
        }
        txn.commit().unwrap();
        drop(db);
        (dir, path)
    }

    #[test]
    fn a_sound_file_passes_and_is_left_byte_for_byte_as_it_was() {
        let (_dir, path) = database_with(500, b"a value of a room");
        let before = std::fs::read(&path).unwrap();
        assert_eq!(check(&path).unwrap(), None);
        assert_eq!(std::fs::read(&path).unwrap(), before);
    }

    #[test]
    fn one_changed_letter_inside_a_value_fails_the_check_and_the_file_is_untouched() {
        let marker = b"the-marker-of-one-value";
        let (_dir, path) = database_with(500, marker);
        let mut bytes = std::fs::read(&path).unwrap();
        let at = bytes
            .windows(marker.len())
            .position(|w| w == marker)
            .expect("the value is in the file");
        bytes[at + 4] ^= 0x20; // "marker" -> "mArker": still a valid row
        std::fs::write(&path, &bytes).unwrap();
        // The row still reads: only the checksum sees the change.
        {
            let db = redb::Database::open(&path).unwrap();
            let txn = redb::ReadableDatabase::begin_read(&db).unwrap();
            let table = txn.open_table(ROWS).unwrap();
            assert!(redb::ReadableTable::get(&table, 0).unwrap().is_some());
        }
        let damaged = std::fs::read(&path).unwrap();
        let found = check(&path).unwrap();
        let found = found.expect("the flipped byte is found");
        assert!(found.contains("corrupt"), "{found}");
        assert_eq!(
            std::fs::read(&path).unwrap(),
            damaged,
            "verify wrote nothing"
        );
    }
}
