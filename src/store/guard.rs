//! Turning redb's panics on damaged pages into errors.
//!
//! redb trusts the bytes of a page it reads: a page whose type byte or offsets were
//! damaged on disk makes it panic (`Invalid page type byte 254 for page r0.11/0`, a slice
//! index out of range) rather than return an error, and it checks page checksums only
//! when it repairs. Every call into redb that reads rows therefore runs through
//! [`catch`], which catches the panic, keeps the panic hook from printing it as a crash,
//! and returns its message so the caller can name the room or table it was reading.
//!
//! What is safe after a caught panic: a read transaction dropped while unwinding leaves
//! nothing behind (redb tracks it like any ended read). A write transaction dropped
//! while unwinding skips its rollback; redb keeps the session usable but marks the file
//! as needing a repair at the next open, and that repair verifies every page checksum,
//! so it fails while the damaged page is reachable. The writer therefore probes what a
//! write will touch in a read transaction first (`writer.rs`), and treats a panic inside
//! a write transaction as fail-stop for all writes.
//!
//! Not here: deciding what a caught panic means (which room is damaged, whether the
//! store stops writing); that is the caller's.

use std::cell::{Cell, RefCell};
use std::panic::{self, AssertUnwindSafe};
use std::sync::Once;

thread_local! {
    /// Set while this thread runs inside [`catch`]: the hook then records the panic's
    /// message here instead of printing it.
    static GUARDED: Cell<bool> = const { Cell::new(false) };
    /// The message of the last panic caught on this thread.
    static MESSAGE: RefCell<Option<String>> = const { RefCell::new(None) };
}

static HOOK: Once = Once::new();

/// Installs (once per process) a panic hook that stays silent for panics inside
/// [`catch`] and hands every other panic to the hook that was there before.
fn install_hook() {
    HOOK.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            if GUARDED.with(Cell::get) {
                let location = info
                    .location()
                    .map(|l| format!(" (at {}:{})", crate_relative(l.file()), l.line()))
                    .unwrap_or_default();
                let text = payload_text(info.payload());
                MESSAGE.with(|m| *m.borrow_mut() = Some(format!("{text}{location}")));
            } else {
                previous(info);
            }
        }));
    });
}

/// A source path from the crate's own directory on (`redb-4.6.0/src/...`), without the
/// build machine's registry prefix.
fn crate_relative(file: &str) -> &str {
    match file.find("/src/") {
        Some(src) => {
            let start = file[..src].rfind('/').map_or(0, |slash| slash + 1);
            &file[start..]
        }
        None => file,
    }
}

fn payload_text(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(text) = payload.downcast_ref::<&str>() {
        (*text).to_owned()
    } else if let Some(text) = payload.downcast_ref::<String>() {
        text.clone()
    } else {
        "panic without a message".to_owned()
    }
}

/// Runs `read`, returning `Err(message)` if it panicked instead of unwinding further.
/// The panic is not printed; the caller reports it as damage.
///
/// `read` must leave nothing shared half-updated when it panics: it is for calls into
/// redb (whose own state survives a panic, see the module doc) and for the decoding
/// around them.
pub fn catch<T>(read: impl FnOnce() -> T) -> Result<T, String> {
    install_hook();
    // Nested use (a guarded read calling another) keeps the outer flag.
    let outer = GUARDED.with(|g| g.replace(true));
    let outcome = panic::catch_unwind(AssertUnwindSafe(read));
    GUARDED.with(|g| g.set(outer));
    outcome.map_err(|payload| {
        MESSAGE
            .with(|m| m.borrow_mut().take())
            .unwrap_or_else(|| payload_text(payload.as_ref()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_inside_becomes_its_message_and_values_pass_through() {
        assert_eq!(catch(|| 7), Ok(7));
        let caught = catch(|| -> u8 { panic!("page r0.11/0 is damaged") }).unwrap_err();
        assert!(caught.starts_with("page r0.11/0 is damaged"), "{caught}");
        // The guard is left as it was found, so later panics on this thread are printed.
        assert!(!GUARDED.with(Cell::get));
        let nested = catch(|| catch(|| -> u8 { panic!("inner") }));
        assert!(
            matches!(nested, Ok(Err(ref m)) if m.starts_with("inner")),
            "{nested:?}"
        );
    }
}
