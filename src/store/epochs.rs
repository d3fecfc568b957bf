//! Epoch changes after an unclean stop under `--durability none`.
//!
//! Under `none`, commits reach the disk only at the periodic fsync, and redb loses every
//! commit since the last fsync'd one on a crash. Clients may already have seen those
//! events (acks and diffs go out after the non-durable commit), so after such a crash a
//! seq they hold can name a different event. The contract answers that with a new epoch
//! for every room. Rooms load lazily, so instead of rewriting every room's meta, the
//! store keeps one epoch salt for the data dir: the epoch clients see is the stored one
//! XOR the salt, and an unclean stop under `none` draws a new salt.
//!
//! `DIR/NONDURABLE_RUNNING` exists (fsync'd) while a server runs under `none` and is
//! removed after its final fsync'd commit at a clean shutdown; finding it at open means
//! the previous run under `none` did not shut down cleanly. `DIR/EPOCH_SALT` holds the
//! salt (16 hex chars), written atomically before the marker is cleared.

use std::fs::{self, File};
use std::io::{self, Write};
use std::path::Path;

use super::{Durability, StoreError};

const RUNNING_FILE: &str = "NONDURABLE_RUNNING";
const SALT_FILE: &str = "EPOCH_SALT";

fn io_error<'a>(what: &'static str, path: &'a Path) -> impl Fn(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

fn sync_dir(dir: &Path) -> Result<(), StoreError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_error("cannot sync the data dir", dir))
}

/// Reads the salt, draws a new one if the previous run under `none` stopped uncleanly,
/// and marks this run if it is under `none`. Called with the dir lock held.
pub fn open(dir: &Path, durability: Durability) -> Result<u64, StoreError> {
    let salt_path = dir.join(SALT_FILE);
    let mut salt = match fs::read_to_string(&salt_path) {
        Ok(text) => u64::from_str_radix(text.trim(), 16).map_err(|_| StoreError::Io {
            what: "corrupt epoch salt file",
            path: salt_path.clone(),
            source: io::Error::from(io::ErrorKind::InvalidData),
        })?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => 0,
        Err(e) => return Err(io_error("cannot read epoch salt", &salt_path)(e)),
    };
    let running = dir.join(RUNNING_FILE);
    if running.exists() {
        salt = rand::random::<u64>() | 1;
        let tmp = dir.join("EPOCH_SALT.tmp");
        let mut file = File::create(&tmp).map_err(io_error("cannot create epoch salt", &tmp))?;
        file.write_all(format!("{salt:016x}\n").as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(io_error("cannot write epoch salt", &tmp))?;
        fs::rename(&tmp, &salt_path).map_err(io_error("cannot rename epoch salt", &salt_path))?;
        sync_dir(dir)?;
        fs::remove_file(&running).map_err(io_error("cannot remove run marker", &running))?;
        sync_dir(dir)?;
        tracing::warn!(
            data_dir = %dir.display(),
            "the last run under --durability none did not shut down cleanly: \
             every room gets a new epoch, so clients take fresh snapshots"
        );
    }
    if let Durability::None { .. } = durability {
        File::create(&running)
            .and_then(|f| f.sync_all())
            .map_err(io_error("cannot create run marker", &running))?;
        sync_dir(dir)?;
    }
    Ok(salt)
}

/// Clears the run marker after the final fsync'd commit of a clean shutdown.
pub fn clean_shutdown(dir: &Path) -> Result<(), StoreError> {
    let running = dir.join(RUNNING_FILE);
    match fs::remove_file(&running) {
        Ok(()) => sync_dir(dir),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_error("cannot remove run marker", &running)(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const NONE: Durability = Durability::None {
        sync_interval: Duration::from_millis(100),
    };

    #[test]
    fn unclean_stop_under_none_draws_a_new_salt_and_clean_stop_keeps_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let first = open(dir.path(), NONE).expect("open");
        assert_eq!(first, 0);
        // No clean shutdown: the next open changes the salt.
        let second = open(dir.path(), NONE).expect("open after crash");
        assert_ne!(second, first);
        clean_shutdown(dir.path()).expect("clean shutdown");
        assert_eq!(
            open(dir.path(), Durability::Immediate).expect("reopen"),
            second
        );
        // Under immediate there is no marker, so a crash keeps the salt.
        assert_eq!(
            open(dir.path(), Durability::Immediate).expect("reopen"),
            second
        );
    }
}
