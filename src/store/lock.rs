//! The exclusive lock on a data dir, so two roomd processes never share one log.
//!
//! The lock is an `flock` on `DIR/LOCK`, held for as long as the [`DirLock`] lives and
//! released by the kernel when the process dies, so a crash never leaves a stale lock.
//! The holder writes its pid into the file only to make the refusal message useful; the
//! pid is never trusted for anything else. redb's own file lock stays in place underneath.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use super::StoreError;

/// Holds the data dir's lock until dropped (closing the file releases the `flock`).
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

impl DirLock {
    /// Takes the lock on `dir` without waiting; fails with [`StoreError::Locked`], naming
    /// the holder's pid when it can be read, if another holder has it.
    pub fn acquire(dir: &Path) -> Result<DirLock, StoreError> {
        let path = dir.join("LOCK");
        let io_error = |what, source| StoreError::Io {
            what,
            path: path.clone(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)
            .map_err(|e| io_error("cannot open lock file", e))?;
        // SAFETY: flock takes a file descriptor and flags and touches no memory; the
        // descriptor is valid because `file` is open for the duration of the call.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(StoreError::Locked {
                    dir: dir.to_owned(),
                    pid: read_pid(&mut file),
                });
            }
            return Err(io_error("cannot lock", err));
        }
        file.set_len(0)
            .and_then(|()| file.write_all_at(format!("{}\n", std::process::id()).as_bytes(), 0))
            .map_err(|e| io_error("cannot write pid to lock file", e))?;
        Ok(DirLock { _file: file })
    }
}

/// The pid the current holder wrote, if it is there and readable.
fn read_pid(file: &mut File) -> Option<u32> {
    let mut text = String::new();
    file.read_to_string(&mut text).ok()?;
    text.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_on_same_dir_is_refused_with_holder_pid() {
        let dir = tempfile::tempdir().unwrap();
        let _held = DirLock::acquire(dir.path()).unwrap();
        let err = DirLock::acquire(dir.path()).unwrap_err();
        let expected = format!(
            "data dir {} is locked by another roomd (pid {})",
            dir.path().display(),
            std::process::id()
        );
        assert_eq!(err.to_string(), expected);
    }

    #[test]
    fn lock_is_free_again_after_the_holder_drops_it() {
        let dir = tempfile::tempdir().unwrap();
        drop(DirLock::acquire(dir.path()).unwrap());
        DirLock::acquire(dir.path()).unwrap();
    }
}
