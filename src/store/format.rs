//! The data dir's format version, in `DIR/FORMAT`.
//!
//! A roomd refuses a data dir written in a format it does not read, instead of
//! misreading it. The file is written once, before the database is created, and
//! atomically (temp file, fsync, rename, fsync of the dir), so a dir with a database but
//! no FORMAT file did not come from this code and is refused too. The per-row version
//! byte (`record.rs`) is a separate, finer-grained check.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::StoreError;

/// The data dir format this build reads and writes.
/// Version 2 keys the `op_ids` table by `(room, seq)` instead of `(room, user, op_id)`.
/// Version 3 writes one log row per room batch (keyed by its last seq) where version 2
/// wrote one row per event; a row of one event reads as a batch of one, so a version 2
/// dir is read as it is and its FORMAT file says 3 from the first open on (a build
/// that reads version 2 only would misread the new rows, and refuses the dir by name).
/// Version 4 adds the `journal` table (`journal.rs`): acked events may sit there until
/// they are folded into their rooms' rows, so a build that does not replay it must not
/// open the dir. A version 2 or 3 dir is upgraded by creating the empty table.
/// Version 5 journals to segment files in `DIR/journal/` (`journal_file.rs`) instead of
/// the table: a build that reads only the table would miss acked events. A version 4
/// dir is upgraded as it is: its table rows are replayed at the open, and the table
/// stays empty from then on.
pub const FORMAT_VERSION: u32 = 5;

/// The older formats this build still reads, upgrading the FORMAT file on open.
const UPGRADABLE_VERSIONS: [u32; 3] = [2, 3, 4];

/// The database file's name inside the data dir.
pub const DB_FILE: &str = "roomd.redb";

/// Checks `dir`'s FORMAT file, writing it first if the dir is new (holds no database).
/// The caller holds the dir lock, so nothing races this check.
pub fn check_or_write(dir: &Path) -> Result<(), StoreError> {
    let path = dir.join("FORMAT");
    match fs::read_to_string(&path) {
        Ok(text) => {
            let found = text.trim();
            match found.parse::<u32>() {
                Ok(FORMAT_VERSION) => Ok(()),
                Ok(version) if UPGRADABLE_VERSIONS.contains(&version) => {
                    tracing::info!(
                        dir = %dir.display(),
                        from = version,
                        to = FORMAT_VERSION,
                        "data dir format upgraded: its rows are read as they are, new \
                         events are written one row per room batch, through the journal's \
                         segment files"
                    );
                    write_atomically(dir, &path)
                }
                _ => Err(StoreError::FormatVersion {
                    path,
                    found: found.to_owned(),
                    expected: FORMAT_VERSION,
                }),
            }
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            if dir.join(DB_FILE).exists() {
                return Err(StoreError::FormatMissing {
                    dir: dir.to_owned(),
                });
            }
            write_atomically(dir, &path)
        }
        Err(source) => Err(StoreError::Io {
            what: "cannot read format file",
            path,
            source,
        }),
    }
}

fn write_atomically(dir: &Path, path: &Path) -> Result<(), StoreError> {
    let tmp = dir.join("FORMAT.tmp");
    let io_error = |what, source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    };
    let mut file = File::create(&tmp).map_err(|e| io_error("cannot create format file", e))?;
    file.write_all(format!("{FORMAT_VERSION}\n").as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io_error("cannot write format file", e))?;
    fs::rename(&tmp, path).map_err(|e| io_error("cannot rename format file into", e))?;
    // The rename is durable only once the directory entry is.
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io_error("cannot sync the data dir after writing", e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_dir_gets_format_and_passes_the_check_again() {
        let dir = tempfile::tempdir().unwrap();
        check_or_write(dir.path()).unwrap();
        assert_eq!(
            fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
            format!("{FORMAT_VERSION}\n")
        );
        check_or_write(dir.path()).unwrap();
    }

    #[test]
    fn other_format_version_is_refused_by_name() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("FORMAT"), "1\n").unwrap();
        let err = check_or_write(dir.path()).unwrap_err();
        let expected = format!(
            "{} says format version \"1\", but this roomd reads format version 5",
            dir.path().join("FORMAT").display()
        );
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn format_2_3_and_4_dirs_are_read_and_upgraded_to_5() {
        for old in ["2\n", "3\n", "4\n"] {
            let dir = tempfile::tempdir().unwrap();
            fs::write(dir.path().join("FORMAT"), old).unwrap();
            fs::write(dir.path().join(DB_FILE), b"").unwrap();
            check_or_write(dir.path()).unwrap();
            assert_eq!(
                fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
                "5\n"
            );
        }
    }

    #[test]
    fn database_without_format_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join(DB_FILE), b"").unwrap();
        assert!(matches!(
            check_or_write(dir.path()),
            Err(StoreError::FormatMissing { .. })
        ));
    }
}
