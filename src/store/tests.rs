//! Tests of the store through its public handle: durability across reopen, the dir
//! lock, group commit, refusal of bad batches, fail-stop after an I/O error, and
//! corrupt rows on disk. Snapshots, retention, deletion, the HTTP reads and the log
//! tooling are tested in `tests_maintenance.rs`, with the helpers here; row-format
//! tests live in `record.rs`.

use std::collections::BTreeMap;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use redb::backends::InMemoryBackend;
use redb::StorageBackend;

use super::*;

pub(super) fn meta() -> RoomMeta {
    RoomMeta {
        kind: "state".to_owned(),
        epoch: 7,
    }
}

pub(super) fn event(seq: u64) -> EventRecord {
    EventRecord {
        seq,
        user: format!("user{}", seq % 3),
        ts_ms: 1_700_000_000_000 + seq as i64,
        op: Value::map([
            ("set", Value::Str(format!("key{seq}"))),
            (
                "to",
                Value::List(vec![Value::Float(0.5), Value::Bytes(vec![1, 2])]),
            ),
        ]),
        changes: Changes {
            public: vec![(format!("key{seq}"), Some(Value::Int(seq as i64)))],
            private: vec![("creator".into(), None)],
        },
        op_id: None,
    }
}

/// A batch of `room` with events `first..=last`, creating the room when `first` is 1.
pub(super) fn batch(room: &str, first: u64, last: u64) -> Batch {
    Batch {
        create: (first == 1).then(meta),
        events: (first..=last).map(event).collect(),
        ..Batch::new(room)
    }
}

/// Submits and waits for the batch's outcome.
pub(super) fn commit(store: &Store, batch: Batch) -> Result<(), StoreError> {
    store
        .submit(batch)
        .expect("the queue has room: tests submit one batch at a time here")
        .blocking_recv()
        .expect("the writer answers every batch it takes")
}

pub(super) fn open(dir: &Path) -> Store {
    Store::open(StoreConfig::new(dir)).unwrap()
}

#[test]
fn reopen_after_shutdown_loads_every_committed_event_and_op_id() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    assert!(store.is_healthy());
    commit(&store, batch("a", 1, 3)).unwrap();
    let mut more = batch("a", 4, 5);
    // Event 4 is by user1 (see `event`).
    more.events[0].op_id = Some("op-4".into());
    commit(&store, more).unwrap();
    commit(&store, batch("b", 1, 1)).unwrap();
    store.shutdown();
    drop(store);

    let store = open(dir.path());
    let a = store.load_room("a").unwrap().unwrap();
    assert_eq!((a.meta, a.head, a.first_retained), (meta(), 5, 1));
    assert_eq!(a.snapshot, None);
    let mut expected: Vec<EventRecord> = (1..=5).map(event).collect();
    expected[3].op_id = Some("op-4".into());
    assert_eq!(a.events, expected);
    assert_eq!(
        a.op_ids,
        vec![OpIdRecord {
            user: "user1".into(),
            op_id: "op-4".into(),
            seq: 4
        }]
    );
    let b = store.load_room("b").unwrap().unwrap();
    assert_eq!((b.head, b.events.len()), (1, 1));
    assert!(store.load_room("c").unwrap().is_none());
}

#[test]
fn dropping_the_last_handle_commits_what_was_queued() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let _outcome = store.submit(batch("a", 1, 2)).unwrap();
    drop(store);
    let store = open(dir.path());
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 2);
}

#[test]
fn second_open_on_a_locked_dir_fails_naming_the_dir() {
    let dir = tempfile::tempdir().unwrap();
    let _first = open(dir.path());
    let err = Store::open(StoreConfig::new(dir.path()))
        .err()
        .expect("the dir is locked by the first store");
    assert_eq!(
        err.to_string(),
        format!(
            "data dir {} is locked by another roomd (pid {})",
            dir.path().display(),
            std::process::id()
        )
    );
}

#[test]
fn open_refuses_a_dir_of_another_format_version() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "1\n").unwrap();
    let err = Store::open(StoreConfig::new(dir.path())).err().unwrap();
    assert!(matches!(err, StoreError::FormatVersion { .. }), "{err}");
}

#[test]
fn group_commit_puts_many_queued_batches_in_one_transaction() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let commits_before = store.commits();
    // Holding redb's one write transaction parks the writer after it takes at most one
    // group, so everything submitted meanwhile waits in the queue for the next group.
    let blocker = store
        .inner
        .db
        .read()
        .as_ref()
        .expect("open")
        .begin_write()
        .unwrap();
    let outcomes: Vec<_> = (0..100)
        .map(|i| store.submit(batch(&format!("room{i}"), 1, 1)).unwrap())
        .collect();
    drop(blocker);
    for outcome in outcomes {
        outcome.blocking_recv().unwrap().unwrap();
    }
    let n_commits = store.commits() - commits_before;
    assert!(n_commits <= 2, "100 batches took {n_commits} transactions");
}

#[test]
fn full_queue_is_reported_instead_of_blocking() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        queue_len: 4,
        ..StoreConfig::new(dir.path())
    };
    let store = Store::open(config).unwrap();
    let blocker = store
        .inner
        .db
        .read()
        .as_ref()
        .expect("open")
        .begin_write()
        .unwrap();
    // The parked writer holds at most one group, so the queue fills within this bound.
    let mut accepted = Vec::new();
    let full = (0..MAX_GROUP_BATCHES + 8).find_map(|i| {
        match store.submit(batch(&format!("room{i}"), 1, 1)) {
            Ok(outcome) => {
                accepted.push(outcome);
                None
            }
            Err(e) => Some(e),
        }
    });
    assert_eq!(full, Some(SubmitError::Full));
    drop(blocker);
    for outcome in accepted {
        outcome.blocking_recv().unwrap().unwrap();
    }
    assert!(store.is_healthy());
}

#[test]
fn op_ids_come_back_sorted_by_seq_from_the_event_rows() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let op = |user: &str, op_id: &str, seq| OpIdRecord {
        user: user.into(),
        op_id: op_id.into(),
        seq,
    };
    let mut first = batch("a", 1, 4);
    // Id order differs from seq order on purpose; event 3 carries none.
    for (event, id) in first
        .events
        .iter_mut()
        .zip([Some("z"), Some("b"), None, Some("x")])
    {
        event.op_id = id.map(Into::into);
    }
    commit(&store, first).unwrap();
    // Another room's op ids must not leak into this one's.
    let mut other = batch("ab", 1, 1);
    other.events[0].op_id = Some("q".into());
    commit(&store, other).unwrap();
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(
        loaded.op_ids,
        vec![
            op("user1", "z", 1),
            op("user2", "b", 2),
            op("user1", "x", 4)
        ]
    );
    assert_eq!(loaded.events[0].op_id.as_deref(), Some("z"));

    // Expiry forgets ids kept apart for trimmed events only: a retained event's id
    // stays with its row (the room bounds what it remembers).
    let mut second = batch("a", 5, 5);
    second.events[0].op_id = Some("n".into());
    second.expire_op_ids_through = 2;
    commit(&store, second).unwrap();
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(loaded.op_ids.len(), 4);
    assert_eq!(loaded.op_ids[3], op("user2", "n", 5));
}

#[test]
fn batch_that_does_not_continue_the_head_is_refused_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 2)).unwrap();
    let err = commit(&store, batch("a", 4, 4)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "batch for room a has event seq 4 where seq 3 comes next"
    );
    let mut inner_gap = batch("a", 3, 3);
    inner_gap.events.push(event(5));
    assert!(matches!(
        commit(&store, inner_gap),
        Err(StoreError::SeqGap { found: 5, .. })
    ));
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.head, loaded.events.len()), (2, 2));
    // A refusal is about one batch, not the store.
    assert!(store.is_healthy());
    commit(&store, batch("a", 3, 3)).unwrap();
}

/// What a room's commit pipeline relies on (`room::live::PIPELINE_DEPTH`): of two
/// batches of a room queued back to back (in one transaction or two, as the writer
/// drains its queue), the second never lands when the first is refused.
#[test]
fn a_batch_queued_behind_a_refused_one_is_refused_too() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 2)).unwrap();
    let refused = Batch {
        // A snapshot past the batch's head: the store refuses the batch alone.
        snapshot: Some(Snapshot {
            seq: 99,
            public: vec![],
            private: vec![],
            tombstone_floor: 0,
        }),
        ..batch("a", 3, 4)
    };
    let first = store.submit(refused).unwrap();
    let second = store.submit(batch("a", 5, 6)).unwrap();
    assert!(matches!(
        first.blocking_recv().unwrap(),
        Err(StoreError::SnapshotSeq { seq: 99, .. })
    ));
    assert!(matches!(
        second.blocking_recv().unwrap(),
        Err(StoreError::SeqGap {
            expected: 3,
            found: 5,
            ..
        })
    ));
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 2);
    assert!(store.is_healthy());
    commit(&store, batch("a", 3, 4)).unwrap();
}

#[test]
fn create_of_existing_room_and_append_to_missing_room_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 1)).unwrap();
    assert!(matches!(
        commit(&store, batch("a", 1, 1)),
        Err(StoreError::RoomExists { head: 1, .. })
    ));
    assert!(matches!(
        commit(&store, batch("missing", 2, 2)),
        Err(StoreError::NoSuchRoom { .. })
    ));
    assert!(store.load_room("missing").unwrap().is_none());
}

#[test]
fn event_that_cannot_be_encoded_refuses_only_its_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut bad = batch("a", 1, 1);
    bad.events[0].op = Value::Float(f64::INFINITY);
    let bad_outcome = store.submit(bad).unwrap();
    let good_outcome = store.submit(batch("b", 1, 1)).unwrap();
    assert!(matches!(
        bad_outcome.blocking_recv().unwrap(),
        Err(StoreError::Encode { seq: 1, .. })
    ));
    good_outcome.blocking_recv().unwrap().unwrap();
    assert!(store.load_room("a").unwrap().is_none());
}

#[test]
fn corrupt_event_row_on_disk_gives_an_error_not_a_panic() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 2)).unwrap();
    commit(&store, batch("a", 3, 3)).unwrap();
    drop(store);
    // Corrupt the file behind a closed store, then open it again: the row of the
    // second batch is gone.
    let db = redb::Database::open(dir.path().join(format::DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(tables::EVENTS)
        .unwrap()
        .insert(("a", 2), [record::EVENT_VERSION, 0xde, 0xad].as_slice())
        .unwrap();
    txn.commit().unwrap();
    drop(db);
    let store = open(dir.path());
    let err = store.load_room("a").unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { seq: Some(2), .. }),
        "{err}"
    );
}

#[test]
fn missing_event_row_on_disk_is_reported_as_a_gap() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 2)).unwrap();
    commit(&store, batch("a", 3, 3)).unwrap();
    drop(store);
    // Corrupt the file behind a closed store, then open it again: the row of the
    // second batch is gone.
    let db = redb::Database::open(dir.path().join(format::DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    txn.open_table(tables::EVENTS)
        .unwrap()
        .remove(("a", 3))
        .unwrap();
    txn.commit().unwrap();
    drop(db);
    let store = open(dir.path());
    assert!(matches!(
        store.load_room("a"),
        Err(StoreError::LogGap {
            head: 3,
            found: 2,
            ..
        })
    ));
}

#[test]
fn shutdown_is_idempotent_and_later_submits_are_stopped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let clone = store.clone();
    store.shutdown();
    clone.shutdown();
    assert!(!store.is_healthy());
    assert_eq!(
        store.submit(batch("a", 1, 1)).err(),
        Some(SubmitError::Stopped)
    );
}

#[test]
fn non_durable_commits_are_synced_by_shutdown_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        // Long enough that only shutdown can trigger the sync in this test.
        durability: Durability::None {
            sync_interval: Duration::from_secs(3600),
        },
        ..StoreConfig::new(dir.path())
    };
    let store = Store::open(config.clone()).unwrap();
    let before = store.commits();
    commit(&store, batch("a", 1, 2)).unwrap();
    store.shutdown();
    // One non-durable commit for the batch, one fsync'd commit at shutdown.
    assert_eq!(store.commits() - before, 2);
    drop(store);
    let store = Store::open(config).unwrap();
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 2);
}

#[test]
fn zero_sync_interval_makes_every_commit_after_the_first_durable() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        durability: Durability::None {
            sync_interval: Duration::ZERO,
        },
        ..StoreConfig::new(dir.path())
    };
    let store = Store::open(config).unwrap();
    for i in 1..=3 {
        commit(&store, batch("a", i, i)).unwrap();
    }
    store.shutdown();
    drop(store);
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 3);
}

/// An in-memory redb backend whose writes and syncs fail once `failing` is set.
#[derive(Debug)]
struct FailingBackend {
    inner: InMemoryBackend,
    failing: Arc<AtomicBool>,
}

impl FailingBackend {
    fn check(&self) -> io::Result<()> {
        if self.failing.load(Ordering::Relaxed) {
            return Err(io::Error::other("injected I/O failure"));
        }
        Ok(())
    }
}

impl StorageBackend for FailingBackend {
    fn len(&self) -> io::Result<u64> {
        self.inner.len()
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        self.inner.read(offset, out)
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.check()?;
        self.inner.set_len(len)
    }
    fn sync_data(&self) -> io::Result<()> {
        self.check()?;
        self.inner.sync_data()
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        self.check()?;
        self.inner.write(offset, data)
    }
}

#[test]
fn failed_commit_fails_its_batches_and_every_later_one() {
    let dir = tempfile::tempdir().unwrap();
    let failing = Arc::new(AtomicBool::new(false));
    let backend = FailingBackend {
        inner: InMemoryBackend::new(),
        failing: failing.clone(),
    };
    let db = redb::Builder::new().create_with_backend(backend).unwrap();
    let lock = DirLock::acquire(dir.path()).unwrap();
    let config = StoreConfig::new(dir.path());
    // No segment files: every batch meets the failing backend.
    let store = Store::start(db, dir.path().join("memory"), Some(lock), None, &config, 0).unwrap();
    commit(&store, batch("a", 1, 1)).unwrap();

    failing.store(true, Ordering::Relaxed);
    let err = commit(&store, batch("a", 2, 2)).unwrap_err();
    assert!(
        matches!(err, StoreError::Commit { n_batches: 1, .. }),
        "{err}"
    );
    assert!(!store.is_healthy());

    // Even with the disk back, the store stays stopped until restart.
    failing.store(false, Ordering::Relaxed);
    let err = commit(&store, batch("a", 2, 2)).unwrap_err();
    assert!(matches!(err, StoreError::FailStopped { .. }), "{err}");
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 1);
    store.shutdown();
}

#[test]
fn values_of_every_shape_survive_the_disk() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut nested = batch("a", 1, 1);
    // A map inside lists inside the outer list: exactly MAX_DEPTH levels.
    let deep = (0..crate::value::MAX_DEPTH - 2).fold(
        Value::Map(BTreeMap::from([("x".to_owned(), Value::Null)])),
        |inner, _| Value::List(vec![inner]),
    );
    nested.events[0].op = Value::List(vec![
        Value::Float(-1.5e300),
        Value::Bytes(vec![0; 300]),
        Value::Str("ünïcode".into()),
        deep,
    ]);
    assert_eq!(nested.events[0].op.depth(), crate::value::MAX_DEPTH);
    let expected = nested.events.clone();
    commit(&store, nested).unwrap();
    assert_eq!(store.load_room("a").unwrap().unwrap().events, expected);
}

/// Polls `done` every 10 ms for up to 10 s.
fn wait_until(what: &str, done: impl Fn() -> bool) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn a_quiet_writer_reopens_the_database_unless_a_read_holds_it() {
    let dir = tempfile::tempdir().unwrap();
    let config = StoreConfig {
        quiet_reopen: Some(Duration::from_millis(50)),
        ..StoreConfig::new(dir.path())
    };
    let store = Store::open(config).unwrap();
    commit(&store, batch("a", 1, 2)).unwrap();
    wait_until("the first reopen", || store.reopens() == 1);
    // The reopened database has everything, and takes writes.
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 2);
    commit(&store, batch("a", 3, 4)).unwrap();

    // A read in progress (its handle on the database) postpones the next reopen.
    let reading = store.db().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(store.reopens(), 1, "reopened under a read in progress");
    drop(reading);
    wait_until("the second reopen", || store.reopens() == 2);
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 4);
    assert!(store.is_healthy());

    // Once quiet and reopened, no further reopen happens without a new job.
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(store.reopens(), 2);
    store.shutdown();
    drop(store);
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 4);
}

#[test]
fn reads_after_a_failed_reopen_report_the_failure_not_a_shutdown() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(StoreConfig::new(dir.path())).unwrap();
    commit(&store, batch("a", 1, 2)).unwrap();
    // What a failed reopen leaves: the store failed and no database in the slot.
    store
        .inner
        .health
        .fail("reopen failed: injected".to_owned());
    drop(store.inner.db.write().take());
    let err = store.load_room("a").unwrap_err();
    assert!(
        matches!(&err, StoreError::FailStopped { reason, .. } if reason.contains("injected")),
        "{err}"
    );
    assert!(!store.is_healthy());
}

/// An in-memory file shared across reopens, whose bytes a test can damage between them.
#[derive(Debug, Clone, Default)]
struct SharedFile(Arc<parking_lot::Mutex<Vec<u8>>>);

impl StorageBackend for SharedFile {
    fn len(&self) -> io::Result<u64> {
        Ok(self.0.lock().len() as u64)
    }
    fn read(&self, offset: u64, out: &mut [u8]) -> io::Result<()> {
        let bytes = self.0.lock();
        let start = offset as usize;
        let slice = bytes
            .get(start..start + out.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        out.copy_from_slice(slice);
        Ok(())
    }
    fn set_len(&self, len: u64) -> io::Result<()> {
        self.0.lock().resize(len as usize, 0);
        Ok(())
    }
    fn sync_data(&self) -> io::Result<()> {
        Ok(())
    }
    fn write(&self, offset: u64, data: &[u8]) -> io::Result<()> {
        let mut bytes = self.0.lock();
        let end = offset as usize + data.len();
        if bytes.len() < end {
            bytes.resize(end, 0);
        }
        bytes[offset as usize..end].copy_from_slice(data);
        Ok(())
    }
}

/// Flips the type byte of every 4 KiB leaf page holding `marker`; returns how many.
fn damage_leaves_holding(file: &SharedFile, marker: &[u8]) -> usize {
    let mut bytes = file.0.lock();
    let mut pages: Vec<usize> = bytes
        .windows(marker.len())
        .enumerate()
        .filter(|(_, window)| *window == marker)
        .map(|(at, _)| at / 4096 * 4096)
        .collect();
    pages.dedup();
    pages.retain(|&page| bytes[page] == 1);
    for &page in &pages {
        bytes[page] ^= 0xff;
    }
    pages.len()
}

#[test]
fn a_room_whose_pages_are_damaged_is_refused_and_the_writer_keeps_committing_the_others() {
    let file = SharedFile::default();
    let store = Store::open_with_backend(file.clone(), Durability::Immediate).unwrap();
    // Rows of about 2 KiB, so room "zbad"'s last events sit on leaves of their own; its
    // keys sort last, so its next event goes into its own last leaf.
    let padded = |room: &str, first: u64, last: u64| {
        let mut batch = batch(room, first, last);
        for event in &mut batch.events {
            event.op = Value::Str(format!("MARK-{room}-{}-{}", event.seq, "x".repeat(2000)));
        }
        batch
    };
    commit(&store, padded("a", 1, 1)).unwrap();
    for seq in 1..=12 {
        commit(&store, padded("zbad", seq, seq)).unwrap();
    }
    commit(&store, padded("b", 1, 1)).unwrap();
    store.shutdown();
    drop(store);
    assert!(damage_leaves_holding(&file, b"MARK-zbad-12-") > 0);

    // Nothing of "zbad" is read before its next batch: the writer's probe meets the damage.
    let store = Store::open_with_backend(file.clone(), Durability::Immediate).unwrap();
    let refused = commit(&store, padded("zbad", 13, 13)).unwrap_err();
    assert!(matches!(refused, StoreError::Damaged { .. }), "{refused}");
    assert!(refused.to_string().contains("room zbad"), "{refused}");
    assert_eq!(store.damaged_rooms().len(), 1);
    // Refused at once from now on, reads too; the other rooms write and read on.
    assert!(matches!(
        commit(&store, padded("zbad", 13, 13)),
        Err(StoreError::Damaged { .. })
    ));
    assert!(matches!(
        store.load_room("zbad"),
        Err(StoreError::Damaged { .. })
    ));
    commit(&store, padded("a", 2, 2)).unwrap();
    commit(&store, padded("b", 2, 2)).unwrap();
    assert!(store.is_healthy());
    store.shutdown();
    drop(store);

    // The clean shutdown left no repair to do: the file opens again, and the rooms
    // written after the damage was found hold everything.
    let store = Store::open_with_backend(file, Durability::Immediate).unwrap();
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 2);
    assert_eq!(store.load_room("b").unwrap().unwrap().head, 2);
    assert!(store.load_room("zbad").is_err());
    store.shutdown();
}
