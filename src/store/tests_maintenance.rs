//! Tests of snapshots, retention, deletion, the HTTP reads and the `roomd log` tooling,
//! through the store's public handle (helpers from `tests.rs`).

use std::path::Path;

use redb::{ReadableDatabase, ReadableTable};

use super::tests::{batch, commit, event, meta, open};
use super::*;

fn snapshot(seq: u64) -> Snapshot {
    Snapshot {
        seq,
        public: vec![
            ("gone".to_owned(), Slot::new(None, 1)),
            (
                format!("key{seq}"),
                Slot::new(Some(Value::Int(seq as i64)), seq),
            ),
        ],
        private: vec![("creator".to_owned(), Value::Str("user1".into()))],
        tombstone_floor: seq / 2,
    }
}

/// A batch of events `first..=last` carrying a snapshot at `snapshot_seq`.
fn batch_with_snapshot(room: &str, first: u64, last: u64, snapshot_seq: u64) -> Batch {
    Batch {
        snapshot: Some(snapshot(snapshot_seq)),
        ..batch(room, first, last)
    }
}

/// Commits events `1..=head` of `room` in batches of `step`, with a snapshot at the end
/// of every batch whose last seq is in `snapshots_at`.
fn fill(store: &Store, room: &str, head: u64, step: u64, snapshots_at: &[u64]) {
    let mut first = 1;
    while first <= head {
        let last = (first + step - 1).min(head);
        let mut next = batch(room, first, last);
        if snapshots_at.contains(&last) {
            next.snapshot = Some(snapshot(last));
        }
        commit(store, next).unwrap();
        first = last + 1;
    }
}

/// Writes events `1..=head` of `room` one row each (as batches of one event are
/// written), with a snapshot at every seq in `snapshots_at`, in one transaction beside
/// the idle writer: thousands of rows without thousands of fsyncs, for the tests that
/// count rows per maintenance piece (a commit writes one row per room batch).
fn fill_rows(store: &Store, room: &str, head: u64, snapshots_at: &[u64]) {
    let db = store.inner.db.read().as_ref().expect("open").clone();
    let txn = db.begin_write().unwrap();
    {
        let mut tables = tables::WriteTables::open(&txn).unwrap();
        for seq in 1..=head {
            let one = batch(room, seq, seq);
            let rows = tables::encode_events(room, &one.events).unwrap();
            let snapshot = snapshots_at
                .contains(&seq)
                .then(|| record::encode_snapshot(&snapshot(seq)).unwrap());
            tables
                .apply(&one, &rows, None, snapshot.as_deref().map(|row| (seq, row)))
                .unwrap()
                .unwrap();
        }
    }
    txn.commit().unwrap();
}

fn trim(store: &Store, room: &str, history_events: u64) -> TrimOutcome {
    trim_by(store, room, TrimPolicy::history_events(history_events))
}

fn trim_by(store: &Store, room: &str, policy: TrimPolicy) -> TrimOutcome {
    store
        .submit_trim(room, policy)
        .expect("the queue has room: tests trim one room at a time here")
        .blocking_recv()
        .expect("the writer answers every trim it takes")
        .unwrap()
}

fn delete(store: &Store, room: &str) {
    store
        .submit_delete(room)
        .expect("the queue has room")
        .blocking_recv()
        .expect("the writer answers every deletion it takes")
        .unwrap();
}

/// Holds redb's one write transaction, so the writer parks at its next commit.
fn hold_writer(store: &Store) -> redb::WriteTransaction {
    store
        .inner
        .db
        .read()
        .as_ref()
        .expect("open")
        .begin_write()
        .unwrap()
}

fn seqs(events: &[EventRecord]) -> Vec<u64> {
    events.iter().map(|event| event.seq).collect()
}

/// Rewrites rows of a closed store's database file.
fn with_closed_db(dir: &Path, edit: impl FnOnce(&mut tables::WriteTables)) {
    let db = redb::Database::open(dir.join(format::DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut tables = tables::WriteTables::open(&txn).unwrap();
        edit(&mut tables);
    }
    txn.commit().unwrap();
}

#[test]
fn snapshot_survives_reopen_and_load_is_latest_snapshot_plus_tail() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch_with_snapshot("a", 1, 10, 5)).unwrap();
    commit(&store, batch_with_snapshot("a", 11, 20, 18)).unwrap();
    store.shutdown();
    drop(store);

    let store = open(dir.path());
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.head, loaded.first_retained), (20, 1));
    assert_eq!(loaded.snapshot, Some(snapshot(18)));
    assert_eq!(loaded.events, vec![event(19), event(20)]);
    assert_eq!(
        store.room_snapshots("a").unwrap(),
        vec![snapshot(5), snapshot(18)]
    );
    // A snapshot at the head, in a batch without events.
    commit(
        &store,
        Batch {
            snapshot: Some(snapshot(20)),
            ..Batch::new("a")
        },
    )
    .unwrap();
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(loaded.snapshot, Some(snapshot(20)));
    assert!(loaded.events.is_empty());
}

#[test]
fn snapshot_past_the_batch_is_refused_whole_and_a_bad_one_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 3)).unwrap();
    let err = commit(&store, batch_with_snapshot("a", 4, 5, 6)).unwrap_err();
    assert_eq!(
        err.to_string(),
        "batch for room a carries a snapshot at seq 6, outside 1..=5"
    );
    let empty_at_zero = Snapshot {
        seq: 0,
        public: vec![],
        private: vec![],
        tombstone_floor: 0,
    };
    let at_zero = Batch {
        snapshot: Some(empty_at_zero),
        ..batch("a", 4, 5)
    };
    assert!(matches!(
        commit(&store, at_zero),
        Err(StoreError::SnapshotSeq { seq: 0, .. })
    ));
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 3);

    // Keys out of order cannot be encoded: the events commit, the snapshot does not.
    let mut unsorted = batch_with_snapshot("a", 4, 5, 5);
    if let Some(snapshot) = unsorted.snapshot.as_mut() {
        snapshot.public.reverse();
    }
    commit(&store, unsorted).unwrap();
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.head, loaded.snapshot), (5, None));
}

#[test]
fn trim_keeps_what_the_policy_says_in_bounded_pieces_while_other_rooms_commit() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill_rows(&store, "big", 5_000, &[1_000, 3_000, 4_500]);
    commit(&store, batch_with_snapshot("big", 5_001, 5_010, 5_010)).unwrap();
    commit(&store, batch("big", 5_011, 5_011)).unwrap();
    let pieces_before = store.maintenance_pieces();

    // Head 5,011, history 500: the newest snapshot at or below 4,511 is 4,500.
    let blocker = hold_writer(&store);
    let trimming = store
        .submit_trim("big", TrimPolicy::history_events(500))
        .unwrap();
    let other = store.submit(batch("other", 1, 1)).unwrap();
    drop(blocker);
    let outcome = trimming.blocking_recv().unwrap().unwrap();
    // 4,500 events and 2 snapshots at 2,000 rows a piece take 3 transactions, and the
    // batch queued behind the first piece was answered before the last.
    assert_eq!(
        outcome,
        TrimOutcome::Done(TrimReport {
            first_retained: 4_501,
            events_deleted: 4_500,
            snapshots_deleted: 2,
            pieces: 3,
        })
    );
    assert_eq!(store.maintenance_pieces() - pieces_before, 3);
    let mut other = other;
    assert!(matches!(other.try_recv(), Ok(Ok(()))));

    let loaded = store.load_room("big").unwrap().unwrap();
    assert_eq!((loaded.head, loaded.first_retained), (5_011, 4_501));
    assert_eq!(loaded.snapshot, Some(snapshot(5_010)));
    assert_eq!(seqs(&loaded.events), vec![5_011]);
    let kept: Vec<u64> = store
        .room_snapshots("big")
        .unwrap()
        .iter()
        .map(|s| s.seq)
        .collect();
    assert_eq!(kept, vec![4_500, 5_010]);
    let page = store.read_events("big", 0, 3).unwrap().unwrap();
    assert_eq!(seqs(&page.events), vec![4_501, 4_502, 4_503]);
    assert!(store.verify().unwrap().is_empty());

    // Done again right away, nothing is due: the snapshot at 4,500 is still the base.
    assert_eq!(
        trim(&store, "big", 500),
        TrimOutcome::Done(TrimReport {
            first_retained: 4_501,
            events_deleted: 0,
            snapshots_deleted: 0,
            pieces: 1,
        })
    );
}

#[test]
fn trim_without_a_snapshot_old_enough_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "a", 100, 10, &[90]);
    let nothing = TrimOutcome::Done(TrimReport {
        first_retained: 1,
        events_deleted: 0,
        snapshots_deleted: 0,
        pieces: 0,
    });
    // History longer than the log, and no snapshot at or below 100 - 20.
    assert_eq!(trim(&store, "a", 1_000), nothing);
    assert_eq!(trim(&store, "a", 20), nothing);
    assert_eq!(trim(&store, "missing", 0), TrimOutcome::Cancelled);
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.first_retained, loaded.events.len()), (1, 10));
}

/// The timestamp `event(seq)` is stamped with (see `tests.rs`).
fn ts_of(seq: u64) -> i64 {
    event(seq).ts_ms
}

fn by_age(history_events: u64, older_than_ms: i64) -> TrimPolicy {
    TrimPolicy {
        older_than_ms: Some(older_than_ms),
        ..TrimPolicy::history_events(history_events)
    }
}

fn snapshot_seqs(store: &Store, room: &str) -> Vec<u64> {
    store
        .room_snapshots(room)
        .unwrap()
        .iter()
        .map(|s| s.seq)
        .collect()
}

#[test]
fn age_limit_trims_old_events_up_to_a_snapshot_and_never_past_the_newest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "a", 100, 10, &[20, 40, 60, 80]);
    let done = |first_retained, events_deleted, snapshots_deleted| {
        TrimOutcome::Done(TrimReport {
            first_retained,
            events_deleted,
            snapshots_deleted,
            pieces: 1,
        })
    };

    // Nothing stamped before the cutoff: the one event read ends the run.
    assert_eq!(
        trim_by(&store, "a", by_age(10_000, ts_of(1))),
        done(1, 0, 0)
    );
    // Events 1..=50 are old; the newest snapshot among them is 40.
    assert_eq!(
        trim_by(&store, "a", by_age(10_000, ts_of(51))),
        done(41, 40, 1)
    );
    assert_eq!(snapshot_seqs(&store, "a"), vec![40, 60, 80]);
    let page = store.read_events("a", 0, 2).unwrap().unwrap();
    assert_eq!(
        (page.first_retained, seqs(&page.events)),
        (41, vec![41, 42])
    );
    // The count limit reaches further than the age here (due through 70): it wins.
    assert_eq!(trim_by(&store, "a", by_age(30, ts_of(45))), done(61, 20, 1));
    // Every event is old, but nothing goes past the newest snapshot.
    assert_eq!(
        trim_by(&store, "a", by_age(10_000, i64::MAX)),
        done(81, 20, 1)
    );
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.head, loaded.first_retained), (100, 81));
    assert_eq!(loaded.snapshot, Some(snapshot(80)));
    assert_eq!(seqs(&loaded.events), (81..=100).collect::<Vec<_>>());
    assert_eq!(snapshot_seqs(&store, "a"), vec![80]);
    assert!(store.verify().unwrap().is_empty());
}

#[test]
fn age_limit_stops_at_the_first_young_event_so_the_log_stays_gapless() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch_with_snapshot("a", 1, 10, 10)).unwrap();
    // Event 15 arrived late with a newer stamp than the events after it.
    let mut middle = batch_with_snapshot("a", 11, 20, 20);
    middle.events[4].ts_ms = ts_of(1_000);
    commit(&store, middle).unwrap();
    commit(&store, batch_with_snapshot("a", 21, 30, 30)).unwrap();

    // Everything but event 15 is old: the run ends at 14, so the base is 10.
    assert_eq!(
        trim_by(&store, "a", by_age(10_000, ts_of(100))),
        TrimOutcome::Done(TrimReport {
            first_retained: 11,
            events_deleted: 10,
            snapshots_deleted: 0,
            pieces: 1,
        })
    );
    let page = store.read_events("a", 10, 100).unwrap().unwrap();
    assert_eq!(seqs(&page.events), (11..=30).collect::<Vec<_>>());
    assert_eq!(snapshot_seqs(&store, "a"), vec![10, 20, 30]);
}

#[test]
fn age_limit_reports_a_corrupt_event_and_deletes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "a", 20, 10, &[10, 20]);
    drop(store);
    with_closed_db(dir.path(), |tables| {
        let garbage = [record::EVENT_VERSION, 0xde, 0xad].as_slice();
        tables.events.insert(("a", 5), garbage).unwrap();
    });

    let store = open(dir.path());
    let outcome = store
        .submit_trim("a", by_age(10_000, i64::MAX))
        .unwrap()
        .blocking_recv()
        .unwrap();
    assert!(
        matches!(outcome, Err(StoreError::Corrupt { seq: Some(5), .. })),
        "{outcome:?}"
    );
    let page = store.read_events("a", 5, 1).unwrap().unwrap();
    assert_eq!((page.first_retained, seqs(&page.events)), (1, vec![6]));
}

#[test]
fn age_limit_reads_the_log_in_bounded_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill_rows(&store, "a", 5_000, &[4_500]);
    let pieces_before = store.maintenance_pieces();
    // Reading 4,500 events takes three pieces (the last has 1,500 rows of budget left
    // for deleting), deleting them two more.
    assert_eq!(
        trim_by(&store, "a", by_age(10_000, i64::MAX)),
        TrimOutcome::Done(TrimReport {
            first_retained: 4_501,
            events_deleted: 4_500,
            snapshots_deleted: 0,
            pieces: 5,
        })
    );
    assert_eq!(store.maintenance_pieces() - pieces_before, 5);
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.first_retained, loaded.events.len()), (4_501, 500));
    assert!(store.verify().unwrap().is_empty());
}

#[test]
fn second_trim_of_a_room_and_trims_past_the_bound_are_not_queued_twice() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Big enough that its trim takes three pieces, so it still runs when the second
    // trim of the room is taken from the queue.
    fill_rows(&store, "a", 5_000, &[5_000]);
    let blocker = hold_writer(&store);
    // Park the writer on a batch first: it takes the batch, then blocks on the held
    // transaction, so every trim below stays queued. (Without this the writer could take
    // `second` while the others are still being submitted, answer it AlreadyRunning at
    // once and free its place early.)
    let parked = store.submit(batch("park", 1, 1)).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(200));
    let first = store
        .submit_trim("a", TrimPolicy::history_events(0))
        .unwrap();
    let second = store
        .submit_trim("a", TrimPolicy::history_events(0))
        .unwrap();
    let others: Vec<_> = (2..MAX_PENDING_TRIMS)
        .map(|i| {
            store
                .submit_trim(&format!("room{i}"), TrimPolicy::history_events(0))
                .unwrap()
        })
        .collect();
    // Every place is taken until the trims end, whether queued or running.
    assert_eq!(
        store
            .submit_trim("one-too-many", TrimPolicy::history_events(0))
            .err(),
        Some(SubmitError::Full)
    );
    drop(blocker);
    parked.blocking_recv().unwrap().unwrap();
    assert_eq!(
        second.blocking_recv().unwrap().unwrap(),
        TrimOutcome::AlreadyRunning
    );
    assert_eq!(
        first.blocking_recv().unwrap().unwrap(),
        TrimOutcome::Done(TrimReport {
            first_retained: 5_001,
            events_deleted: 5_000,
            snapshots_deleted: 0,
            pieces: 3,
        })
    );
    for other in others {
        assert_eq!(
            other.blocking_recv().unwrap().unwrap(),
            TrimOutcome::Cancelled
        );
    }
    // The places are given back once the trims end.
    assert!(matches!(trim(&store, "a", 0), TrimOutcome::Done(_)));
}

#[test]
fn deletion_removes_every_row_in_queue_order_and_the_room_can_start_again() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill_rows(&store, "a", 4_500, &[1_500, 3_000]);
    let mut with_ops = batch("a", 4_501, 4_501);
    with_ops.events[0].op_id = Some("x".into());
    commit(&store, with_ops).unwrap();
    // A room whose name starts with the deleted one keeps everything.
    let mut neighbour = batch_with_snapshot("ab", 1, 2, 2);
    neighbour.events[0].op_id = Some("x".into());
    commit(&store, neighbour).unwrap();
    let pieces_before = store.maintenance_pieces();

    // Queued back to back: the append before the deletion commits, the append after it
    // finds no room, and a create after it starts the room again at seq 1.
    let before = store.submit(batch("a", 4_502, 4_502)).unwrap();
    let deleted = store.submit_delete("a").unwrap();
    let stale = store.submit(batch("a", 4_503, 4_503)).unwrap();
    let created = store
        .submit(Batch {
            create: Some(RoomMeta {
                kind: "chat".to_owned(),
                epoch: 8,
            }),
            ..batch("a", 1, 1)
        })
        .unwrap();
    before.blocking_recv().unwrap().unwrap();
    deleted.blocking_recv().unwrap().unwrap();
    assert!(matches!(
        stale.blocking_recv().unwrap(),
        Err(StoreError::NoSuchRoom { .. })
    ));
    created.blocking_recv().unwrap().unwrap();
    // 4,502 events, 2 snapshots and 1 op id at 2,000 rows a piece.
    assert_eq!(store.maintenance_pieces() - pieces_before, 3);

    let again = store.load_room("a").unwrap().unwrap();
    assert_eq!(
        (
            again.meta.kind,
            again.meta.epoch,
            again.head,
            again.first_retained
        ),
        ("chat".to_owned(), 8, 1, 1)
    );
    assert_eq!((again.snapshot, seqs(&again.events)), (None, vec![1]));
    assert!(again.op_ids.is_empty());
    assert!(store.room_snapshots("a").unwrap().is_empty());
    let neighbour = store.load_room("ab").unwrap().unwrap();
    assert_eq!((neighbour.head, neighbour.op_ids.len()), (2, 1));
    assert!(neighbour.snapshot.is_some());

    delete(&store, "a");
    delete(&store, "never-existed");
    assert!(store.load_room("a").unwrap().is_none());
    assert!(store.read_events("a", 0, 10).unwrap().is_none());
    assert!(store.read_at("a", 1).unwrap().is_none());
    let rooms: Vec<String> = store
        .list_rooms()
        .unwrap()
        .into_iter()
        .map(|info| info.room)
        .collect();
    assert_eq!(rooms, vec!["ab".to_owned()]);
    assert!(store.verify().unwrap().is_empty());
}

#[test]
fn deletion_interrupted_by_a_crash_is_finished_at_the_next_open() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "a", 20, 10, &[10]);
    drop(store);
    // What a crash after the first piece leaves: no meta row, a mark, leftover rows.
    with_closed_db(dir.path(), |tables| {
        tables.meta.remove("a").unwrap();
        tables.deleting.insert("a", ()).unwrap();
    });

    let store = open(dir.path());
    assert!(store.load_room("a").unwrap().is_none());
    assert!(store.verify().unwrap().is_empty());
    commit(&store, batch("a", 1, 2)).unwrap();
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(
        (loaded.head, loaded.snapshot, loaded.events.len()),
        (2, None, 2)
    );
}

#[test]
fn read_events_pages_through_what_is_retained() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "a", 30, 10, &[20]);
    let page = store.read_events("a", 0, 10).unwrap().unwrap();
    assert_eq!((page.head, page.first_retained), (30, 1));
    assert_eq!(page.events, (1..=10).map(event).collect::<Vec<_>>());
    let page = store.read_events("a", 10, 100).unwrap().unwrap();
    assert_eq!(seqs(&page.events), (11..=30).collect::<Vec<_>>());
    assert!(store
        .read_events("a", 30, 10)
        .unwrap()
        .unwrap()
        .events
        .is_empty());
    assert!(store
        .read_events("a", 99, 10)
        .unwrap()
        .unwrap()
        .events
        .is_empty());
    assert!(store
        .read_events("a", 0, 0)
        .unwrap()
        .unwrap()
        .events
        .is_empty());
    assert!(store.read_events("missing", 0, 10).unwrap().is_none());

    trim(&store, "a", 0);
    let page = store.read_events("a", 5, 3).unwrap().unwrap();
    // The caller sees 5 + 1 < 21 and answers `gone`; what is returned is retained.
    assert_eq!((page.head, page.first_retained), (30, 21));
    assert_eq!(seqs(&page.events), vec![21, 22, 23]);
    let page = store.read_events("a", 25, usize::MAX).unwrap().unwrap();
    assert_eq!(seqs(&page.events), (26..=30).collect::<Vec<_>>());
}

#[test]
fn read_at_rebuilds_from_the_newest_usable_snapshot_or_the_whole_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "plain", 8, 8, &[]);
    let at = store.read_at("plain", 5).unwrap().unwrap();
    assert!(at.can_rebuild());
    assert_eq!((at.meta, at.head, at.first_retained), (meta(), 8, 1));
    assert_eq!((at.snapshot, seqs(&at.events)), (None, vec![1, 2, 3, 4, 5]));

    fill(&store, "a", 30, 10, &[10, 20]);
    let at = store.read_at("a", 15).unwrap().unwrap();
    assert_eq!(at.snapshot, Some(snapshot(10)));
    assert_eq!(seqs(&at.events), (11..=15).collect::<Vec<_>>());
    let at = store.read_at("a", 20).unwrap().unwrap();
    assert_eq!((at.snapshot, at.events.len()), (Some(snapshot(20)), 0));
    let at = store.read_at("a", 7).unwrap().unwrap();
    assert_eq!((at.snapshot, seqs(&at.events)), (None, (1..=7).collect()));
    // Past the head nothing is read; the caller answers `invalid` from `head`.
    let at = store.read_at("a", 31).unwrap().unwrap();
    assert_eq!((at.head, at.snapshot, at.events.len()), (30, None, 0));

    // History 10 of head 30: base 20, so seqs before 20 cannot be rebuilt.
    trim(&store, "a", 10);
    let at = store.read_at("a", 25).unwrap().unwrap();
    assert_eq!(at.snapshot, Some(snapshot(20)));
    assert_eq!(seqs(&at.events), (21..=25).collect::<Vec<_>>());
    for gone in [0, 15, 19] {
        let at = store.read_at("a", gone).unwrap().unwrap();
        assert!(!at.can_rebuild(), "seq {gone}");
        assert_eq!(
            (at.first_retained, at.snapshot, at.events.len()),
            (21, None, 0)
        );
    }
}

#[test]
fn verify_reports_a_gap_and_a_corrupt_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "a", 10, 4, &[4, 8]);
    fill(&store, "b", 3, 3, &[]);
    assert!(store.verify().unwrap().is_empty());
    drop(store);
    with_closed_db(dir.path(), |tables| {
        // The row of events 5..=8 (rows are keyed by their last seq).
        tables.events.remove(("a", 8)).unwrap().unwrap();
        let garbage = [record::SNAPSHOT_VERSION, 0xde, 0xad].as_slice();
        tables.snapshots.insert(("a", 8), garbage).unwrap();
        // Leftovers of a room with no meta row.
        tables.events.insert(("zombie", 1), garbage).unwrap();
        tables.creators.insert("zombie", "user1").unwrap();
    });

    let store = open(dir.path());
    let problems = store.verify().unwrap();
    let kinds: Vec<(&str, &ProblemKind)> = problems
        .iter()
        .map(|p| (p.room.as_str(), &p.kind))
        .collect();
    assert!(
        matches!(
            kinds.as_slice(),
            [
                (
                    "a",
                    ProblemKind::Gap {
                        expected: 5,
                        found: 9
                    }
                ),
                ("a", ProblemKind::CorruptSnapshot { seq: 8, .. }),
                (
                    "zombie",
                    ProblemKind::Orphan {
                        table: "event",
                        rows: 1
                    }
                ),
                (
                    "zombie",
                    ProblemKind::Orphan {
                        table: "creator",
                        rows: 1
                    }
                ),
            ]
        ),
        "{problems:?}"
    );
    assert_eq!(
        problems[0].to_string(),
        "room a: events are not gapless: expected seq 5, found 9"
    );
    // Loading uses the newest snapshot, which is the corrupt one.
    assert!(matches!(
        store.load_room("a"),
        Err(StoreError::CorruptSnapshot { seq: 8, .. })
    ));
}

#[test]
fn list_rooms_counts_rows_and_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    fill(&store, "a", 30, 10, &[10, 20]);
    fill(&store, "b", 2, 2, &[]);
    trim(&store, "a", 10);
    let rooms = store.list_rooms().unwrap();
    // One row per batch: events 21..=30 of "a" (its older rows trimmed), 1..=2 of "b".
    let row_bytes = |first, last| {
        let events: Vec<EventRecord> = (first..=last).map(event).collect();
        record::encode_log_row(&events).unwrap().len() as u64
    };
    assert_eq!(
        rooms,
        vec![
            RoomInfo {
                room: "a".into(),
                kind: "state".to_owned(),
                epoch: 7,
                head: 30,
                first_retained: 21,
                events: 10,
                bytes: row_bytes(21, 30),
                snapshots: 1,
                damage: None,
            },
            RoomInfo {
                room: "b".into(),
                kind: "state".to_owned(),
                epoch: 7,
                head: 2,
                first_retained: 1,
                events: 2,
                bytes: row_bytes(1, 2),
                snapshots: 0,
                damage: None,
            },
        ]
    );
}

#[test]
fn compact_shrinks_the_file_after_deletions_and_needs_the_dir_lock() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for room in 0..20 {
        fill_rows(&store, &format!("room{room}"), 1_000, &[1_000]);
    }
    for room in 1..20 {
        delete(&store, &format!("room{room}"));
    }
    assert!(matches!(
        Store::compact(dir.path()),
        Err(StoreError::Locked { .. })
    ));
    store.shutdown();
    drop(store);

    let report = Store::compact(dir.path()).unwrap();
    assert!(report.after_bytes < report.before_bytes / 2, "{report:?}");
    let store = open(dir.path());
    assert_eq!(store.load_room("room0").unwrap().unwrap().head, 1_000);
    assert!(store.verify().unwrap().is_empty());
    drop(store);
    let empty = tempfile::tempdir().unwrap();
    assert!(matches!(
        Store::compact(empty.path()),
        Err(StoreError::NoDatabase { .. })
    ));
}

#[test]
fn rooms_per_creator_count_creations_and_deletions_and_survive_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // The creation event (seq 1) is by "user1" in these batches.
    commit(&store, batch("a", 1, 3)).unwrap();
    commit(&store, batch("b", 1, 1)).unwrap();
    let mut other = batch("c", 1, 1);
    other.events[0].user = "zed".into();
    commit(&store, other).unwrap();
    // Later events by others do not count, nor does a refused creation.
    commit(&store, batch("a", 4, 6)).unwrap();
    assert!(commit(&store, batch("b", 1, 1)).is_err());
    assert_eq!(store.rooms_created_by("user1"), 2);
    assert_eq!(store.rooms_created_by("zed"), 1);
    assert_eq!(store.rooms_created_by("user2"), 0);

    delete(&store, "a");
    assert_eq!(store.rooms_created_by("user1"), 1);
    store.shutdown();
    drop(store);

    let store = open(dir.path());
    assert_eq!(store.rooms_created_by("user1"), 1);
    assert_eq!(store.rooms_created_by("zed"), 1);
    delete(&store, "c");
    assert_eq!(store.rooms_created_by("zed"), 0);
    // Created again, it counts again.
    commit(&store, batch("a", 1, 1)).unwrap();
    assert_eq!(store.rooms_created_by("user1"), 2);
}

#[test]
fn trimmed_events_keep_their_op_ids_from_the_policys_seq_until_expired() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let mut first = batch("ids", 1, 10);
    first.events[2].op_id = Some("three".into());
    first.events[6].op_id = Some("seven".into());
    first.snapshot = Some(snapshot(10));
    commit(&store, first).unwrap();
    let mut last = batch("ids", 11, 12);
    last.events[1].op_id = Some("twelve".into());
    commit(&store, last).unwrap();

    // Events 1..=10 go (the snapshot at 10 covers them); ids from seq 5 on are kept.
    let policy = TrimPolicy {
        keep_op_ids_from: 5,
        ..TrimPolicy::history_events(0)
    };
    assert!(matches!(
        trim_by(&store, "ids", policy),
        TrimOutcome::Done(_)
    ));
    let loaded = store.load_room("ids").unwrap().unwrap();
    assert_eq!(loaded.first_retained, 11);
    let ids: Vec<(u64, &str)> = loaded
        .op_ids
        .iter()
        .map(|op| (op.seq, op.op_id.as_str()))
        .collect();
    assert_eq!(ids, vec![(7, "seven"), (12, "twelve")]);

    // The room forgets ids up to 7: the kept one goes, the retained row's stays.
    let expire = Batch {
        expire_op_ids_through: 7,
        ..batch("ids", 13, 13)
    };
    commit(&store, expire).unwrap();
    let loaded = store.load_room("ids").unwrap().unwrap();
    let seqs: Vec<u64> = loaded.op_ids.iter().map(|op| op.seq).collect();
    assert_eq!(seqs, vec![12]);
    assert!(store.verify().unwrap().is_empty());
}

#[test]
fn a_load_reads_only_the_newest_op_ids_of_a_long_log() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let total = super::tables::MAX_LOADED_OP_IDS as u64 + 1_000;
    let mut first = 1;
    while first <= total {
        // Batches end at the snapshot (10 before the head), then the last 10.
        let last = if first <= total - 10 {
            (first + 999).min(total - 10)
        } else {
            total
        };
        let mut next = batch("long", first, last);
        for event in &mut next.events {
            event.op_id = Some(format!("id{}", event.seq));
        }
        if last == total - 10 {
            next.snapshot = Some(snapshot(last));
        }
        commit(&store, next).unwrap();
        first = last + 1;
    }
    let loaded = store.load_room("long").unwrap().unwrap();
    assert_eq!(loaded.op_ids.len(), super::tables::MAX_LOADED_OP_IDS);
    // The newest ones, in seq order, the 10 after the snapshot included.
    assert_eq!(loaded.op_ids.first().map(|op| op.seq), Some(1_001));
    assert_eq!(loaded.op_ids.last().map(|op| op.seq), Some(total));
    assert!(loaded.op_ids.windows(2).all(|w| w[0].seq + 1 == w[1].seq));
}

/// Events `first..=last`, each with the op id `op{seq}`.
fn with_op_ids(room: &str, first: u64, last: u64) -> Batch {
    let mut batch = batch(room, first, last);
    for event in &mut batch.events {
        event.op_id = Some(format!("op{}", event.seq));
    }
    batch
}

#[test]
fn a_batch_is_one_row_and_reads_page_inside_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, with_op_ids("a", 1, 10)).unwrap();
    commit(&store, with_op_ids("a", 11, 12)).unwrap();
    let rooms = store.list_rooms().unwrap();
    assert_eq!((rooms[0].events, rooms[0].head), (12, 12));
    store.shutdown();
    drop(store);
    // One row per batch, keyed by its last seq.
    let db = redb::Database::open(dir.path().join(format::DB_FILE)).unwrap();
    let keys: Vec<u64> = {
        let txn = db.begin_read().unwrap();
        let events = txn.open_table(tables::EVENTS).unwrap();
        events
            .iter()
            .unwrap()
            .map(|entry| entry.unwrap().0.value().1)
            .collect()
    };
    assert_eq!(keys, vec![10, 12]);
    drop(db);

    let store = open(dir.path());
    // Pages start and end inside a row, and run across rows.
    let page = store.read_events("a", 3, 4).unwrap().unwrap();
    assert_eq!(seqs(&page.events), vec![4, 5, 6, 7]);
    assert_eq!(page.events[0], {
        let mut e = event(4);
        e.op_id = Some("op4".into());
        e
    });
    let page = store.read_events("a", 8, 3).unwrap().unwrap();
    assert_eq!(seqs(&page.events), vec![9, 10, 11]);
    let page = store.read_events("a", 11, 100).unwrap().unwrap();
    assert_eq!(seqs(&page.events), vec![12]);
    let page = store.read_events("a", 12, 100).unwrap().unwrap();
    assert!(page.events.is_empty());
    // Time travel to a seq inside a row.
    let at = store.read_at("a", 5).unwrap().unwrap();
    assert_eq!(seqs(&at.events), vec![1, 2, 3, 4, 5]);
    // A snapshot inside a row: the load reads the events after it from the same row,
    // and the op ids before it out of that row too.
    commit(
        &store,
        Batch {
            snapshot: Some(snapshot(11)),
            ..Batch::new("a")
        },
    )
    .unwrap();
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(seqs(&loaded.events), vec![12]);
    let ids: Vec<(u64, &str)> = loaded
        .op_ids
        .iter()
        .map(|op| (op.seq, op.op_id.as_str()))
        .collect();
    let expected: Vec<(u64, String)> = (1..=12).map(|seq| (seq, format!("op{seq}"))).collect();
    let expected: Vec<(u64, &str)> = expected.iter().map(|(s, id)| (*s, id.as_str())).collect();
    assert_eq!(ids, expected);
    assert!(store.verify().unwrap().is_empty());
}

#[test]
fn trim_to_a_snapshot_inside_a_row_rewrites_the_rest_of_it() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(
        &store,
        Batch {
            snapshot: Some(snapshot(4)),
            ..with_op_ids("a", 1, 10)
        },
    )
    .unwrap();
    commit(&store, with_op_ids("a", 11, 12)).unwrap();
    let policy = TrimPolicy {
        keep_op_ids_from: 3,
        ..TrimPolicy::history_events(0)
    };
    assert_eq!(
        trim_by(&store, "a", policy),
        TrimOutcome::Done(TrimReport {
            first_retained: 5,
            events_deleted: 4,
            snapshots_deleted: 0,
            pieces: 1,
        })
    );
    let page = store.read_events("a", 0, 100).unwrap().unwrap();
    assert_eq!(page.first_retained, 5);
    assert_eq!(seqs(&page.events), (5..=12).collect::<Vec<_>>());
    assert_eq!(page.events[0].op_id.as_deref(), Some("op5"));
    // The op ids of trimmed events 3 and 4 moved to the op_ids table; 1 and 2 are gone.
    let loaded = store.load_room("a").unwrap().unwrap();
    let ids: Vec<u64> = loaded.op_ids.iter().map(|op| op.seq).collect();
    assert_eq!(ids, (3..=12).collect::<Vec<_>>());
    assert_eq!(loaded.snapshot.map(|s| s.seq), Some(4));
    assert!(store.verify().unwrap().is_empty());
    let rooms = store.list_rooms().unwrap();
    assert_eq!(rooms[0].events, 8);
}

#[test]
fn age_trim_stops_inside_a_row() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(
        &store,
        Batch {
            snapshot: Some(snapshot(6)),
            ..batch("a", 1, 10)
        },
    )
    .unwrap();
    // Events are stamped 1_700_000_000_000 + seq: those before 8 are old enough, and
    // the newest snapshot among them is 6.
    assert_eq!(
        trim_by(&store, "a", by_age(10_000, 1_700_000_000_008)),
        TrimOutcome::Done(TrimReport {
            first_retained: 7,
            events_deleted: 6,
            snapshots_deleted: 0,
            pieces: 1,
        })
    );
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(
        (loaded.first_retained, seqs(&loaded.events)),
        (7, vec![7, 8, 9, 10])
    );
    assert!(store.verify().unwrap().is_empty());
}

#[test]
fn rows_of_one_event_written_by_an_older_build_are_read_trimmed_and_extended() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 1)).unwrap();
    drop(store);
    // Events 1..=6 as format 2 wrote them: one row per event, op ids inside, a
    // snapshot at 3.
    with_closed_db(dir.path(), |tables| {
        for seq in 1..=6 {
            let mut old = event(seq);
            old.op_id = Some(format!("op{seq}"));
            let row = record::encode_event(&old).unwrap();
            assert_eq!(row[0], record::EVENT_VERSION);
            tables.events.insert(("a", seq), row.as_slice()).unwrap();
        }
        let snapshot_row = record::encode_snapshot(&snapshot(3)).unwrap();
        tables
            .snapshots
            .insert(("a", 3), snapshot_row.as_slice())
            .unwrap();
        let mut stored = tables.stored_meta("a").unwrap().unwrap().unwrap();
        stored.head = 6;
        tables.put_meta("a", &stored).unwrap();
    });
    let store = open(dir.path());
    commit(&store, with_op_ids("a", 7, 9)).unwrap();
    let page = store.read_events("a", 4, 4).unwrap().unwrap();
    assert_eq!(seqs(&page.events), vec![5, 6, 7, 8]);
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(seqs(&loaded.events), vec![4, 5, 6, 7, 8, 9]);
    assert_eq!(loaded.op_ids.len(), 9);
    assert!(store.verify().unwrap().is_empty());
    assert_eq!(
        trim(&store, "a", 0),
        TrimOutcome::Done(TrimReport {
            first_retained: 4,
            events_deleted: 3,
            snapshots_deleted: 0,
            pieces: 1,
        })
    );
    assert_eq!(store.list_rooms().unwrap()[0].events, 6);
    assert!(store.verify().unwrap().is_empty());
}

#[test]
fn a_batch_too_large_for_one_row_is_written_as_several() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    // Three events of 6 MiB: one row would pass MAX_LOG_ROW_BYTES.
    let mut big = batch("a", 1, 3);
    for event in &mut big.events {
        event.op = Value::Bytes(vec![7; 6 * 1024 * 1024]);
    }
    commit(&store, big).unwrap();
    let rooms = store.list_rooms().unwrap();
    assert_eq!((rooms[0].events, rooms[0].head), (3, 3));
    let page = store.read_events("a", 1, 10).unwrap().unwrap();
    assert_eq!(seqs(&page.events), vec![2, 3]);
    assert!(store.verify().unwrap().is_empty());
}

/// A room is probed whole (`probe::room`) before its first trim, not again before the
/// next ones within `TRIM_PROBE_EVERY` (its pages are in redb's cache); a room deleted
/// and made again under the same name is probed afresh.
#[test]
fn a_room_is_probed_whole_before_its_first_trim_not_before_every_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    let probes = || {
        store
            .inner
            .health
            .trim_probes
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    fill(&store, "a", 300, 10, &[100, 200, 300]);
    let TrimOutcome::Done(first) = trim(&store, "a", 150) else {
        panic!("the first trim ran")
    };
    assert_eq!(first.first_retained, 101);
    fill_more(&store, "a", 300, 400);
    let TrimOutcome::Done(second) = trim(&store, "a", 150) else {
        panic!("the second trim ran")
    };
    assert_eq!(second.first_retained, 201);
    assert_eq!(probes(), 1, "probed again within the period");
    delete(&store, "a");
    fill(&store, "a", 300, 10, &[100, 200, 300]);
    assert!(matches!(trim(&store, "a", 150), TrimOutcome::Done(_)));
    assert_eq!(probes(), 2, "a room made again is probed afresh");
    store.shutdown();
}

/// Commits events `from + 1..=head` of `room` in one batch with a snapshot at `head`.
fn fill_more(store: &Store, room: &str, from: u64, head: u64) {
    commit(store, batch_with_snapshot(room, from + 1, head, head)).unwrap();
}

#[test]
fn a_fold_puts_its_rows_after_the_room_and_replaces_a_stray_row_in_its_way() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("a", 1, 1)).unwrap();
    commit(&store, batch("b", 1, 1)).unwrap();
    drop(store);
    let row = |seq: u64, user: &str| {
        let mut event = event(seq);
        event.user = user.to_owned();
        record::encode_log_row(&[event]).unwrap()
    };
    with_closed_db(dir.path(), |tables| {
        // A row past the head, which no build writes: the run's cursor meets it.
        tables
            .events
            .insert(("a", 3), row(3, "stray").as_slice())
            .unwrap();
        let epoch = tables
            .stored_meta("a")
            .unwrap()
            .unwrap()
            .unwrap()
            .meta
            .epoch;
        let rows = [(2, row(2, "run")), (3, row(3, "run")), (4, row(4, "run"))];
        tables
            .append_run(
                "a",
                epoch,
                (2, 4),
                rows.iter().map(|(seq, row)| (*seq, row.as_slice())),
                0,
            )
            .unwrap()
            .unwrap();
        let stored: Vec<(u64, String)> = tables
            .events
            .range(("a", 0)..=("a", u64::MAX))
            .unwrap()
            .map(|entry| {
                let (key, value) = entry.unwrap();
                let last = key.value().1;
                let event = record::log_row(last, value.value())
                    .unwrap()
                    .event(last)
                    .unwrap();
                (last, event.user)
            })
            .collect();
        let run = |seq: u64| (seq, "run".to_owned());
        assert_eq!(stored[1..], [run(2), run(3), run(4)]);
        assert_eq!(tables.stored_meta("a").unwrap().unwrap().unwrap().head, 4);
        // The next room's rows are where they were.
        assert!(tables.events.get(("b", 1)).unwrap().is_some());
    });
    let store = open(dir.path());
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(seqs(&loaded.events), vec![1, 2, 3, 4]);
    assert!(store.verify().unwrap().is_empty());
}
