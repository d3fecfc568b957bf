//! The committer: a thread that commits the redb transactions the writer hands it, so
//! the writer goes on with journal-only groups while redb writes a fold's pages and
//! fsyncs them.
//!
//! Under `--durability immediate` with segment files, a group whose batches are all
//! journaled is answered before redb's transaction (folds, snapshots, a trim piece)
//! commits (`writer.rs`). That commit still held the writer thread for its page writes
//! and two fsyncs (1-2 ms at 20,000 ops/s), and every op that arrived meanwhile waited
//! for it: the open loop's ack p99 fell from 4.4 to 3.0 ms with folds held off in a
//! 10 s run (`benches/README.md`, thirteenth pass). The writer now hands such a
//! transaction here and takes the answer later (`Writer::finish_commit`); what may run
//! beside it is the writer's rule, not this file's.
//!
//! At most one transaction is in flight (redb has one writer, and the writer waits for
//! the answer before it opens another), so both channels hold at most one item.

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::time::Duration;

use super::guard;

/// How a handed-over commit ended: redb's answer, or Err with the message of a panic
/// inside the commit (the writer fail-stops on either error).
pub type Committed = Result<Result<(), redb::CommitError>, String>;

/// The committer thread's two ends, held by the writer.
pub struct Committer {
    /// Bounded at one: a second transaction is never handed over before the first's
    /// answer is taken, so a send never waits.
    to_thread: SyncSender<redb::WriteTransaction>,
    /// Bounded at one, for the same reason.
    answers: Receiver<Committed>,
}

/// Whether the handed-over commit has ended.
pub enum Poll {
    Done(Committed),
    Running,
}

impl Committer {
    /// Starts the thread; it ends when the `Committer` is dropped.
    pub fn spawn() -> std::io::Result<Committer> {
        let (to_thread, from_writer) = mpsc::sync_channel::<redb::WriteTransaction>(1);
        let (answer, answers) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("roomd-store-com".into())
            .spawn(move || {
                for txn in from_writer {
                    let committed = guard::catch(|| txn.commit());
                    if answer.send(committed).is_err() {
                        return;
                    }
                }
            })?;
        Ok(Committer { to_thread, answers })
    }

    /// Hands `txn` to the thread (None); gives it back if the thread is gone or still
    /// holds one (the caller then commits it itself).
    pub fn hand(&self, txn: redb::WriteTransaction) -> Option<redb::WriteTransaction> {
        match self.to_thread.try_send(txn) {
            Ok(()) => None,
            Err(mpsc::TrySendError::Full(txn) | mpsc::TrySendError::Disconnected(txn)) => Some(txn),
        }
    }

    /// Waits up to `timeout` for the answer of the handed-over commit.
    pub fn poll_for(&self, timeout: Duration) -> Poll {
        match self.answers.recv_timeout(timeout) {
            Ok(committed) => Poll::Done(committed),
            Err(RecvTimeoutError::Timeout) => Poll::Running,
            Err(RecvTimeoutError::Disconnected) => Poll::Done(Err(GONE.into())),
        }
    }

    /// Waits for the answer of the handed-over commit.
    pub fn wait(&self) -> Committed {
        self.answers.recv().unwrap_or_else(|_| Err(GONE.into()))
    }
}

const GONE: &str = "the store's committer thread ended";

#[cfg(test)]
mod tests {
    use super::*;
    use redb::ReadableDatabase;

    const TABLE: redb::TableDefinition<u64, u64> = redb::TableDefinition::new("t");

    #[test]
    fn a_handed_transaction_is_committed_and_answered_once() {
        let dir = tempfile::tempdir().unwrap();
        let db = redb::Database::create(dir.path().join("db")).unwrap();
        let committer = Committer::spawn().unwrap();
        assert!(matches!(committer.poll_for(Duration::ZERO), Poll::Running));
        let txn = db.begin_write().unwrap();
        txn.open_table(TABLE).unwrap().insert(1, 7).unwrap();
        assert!(committer.hand(txn).is_none());
        assert!(matches!(committer.wait(), Ok(Ok(()))));
        assert!(matches!(committer.poll_for(Duration::ZERO), Poll::Running));
        let read = db.begin_read().unwrap();
        let table = read.open_table(TABLE).unwrap();
        assert_eq!(table.get(1).unwrap().map(|v| v.value()), Some(7));
    }
}
