//! Tests of the journal (`journal.rs`) through the store's handle: reads right after
//! an ack fold on demand, a stop without a fold is replayed (twice alike), batches
//! that are not journaled, trims and deletions of rooms with pending batches, a room
//! created again under the name of a deleted one, gaps against the pending head, and
//! folds spread over several transactions, groups journaled while the committer
//! thread commits an earlier group's transaction. The writer's test hook `hold_folds` keeps
//! it from folding unless asked (and at shutdown), so a test decides what is pending.

use std::path::Path;
use std::sync::atomic::Ordering;

use redb::{ReadableDatabase, ReadableTableMetadata};

use super::journal_file;
use super::record::{self, JournalEntryRef, JournalLogRowRef, JournalRowRef};
use super::tables::JOURNAL;
use super::tests::{batch, commit, event, open};
use super::*;
use super::{journal, tables};

fn hold_folds(store: &Store) {
    store.inner.health.hold_folds.store(true, Ordering::Relaxed);
}

/// Lets the writer fold by policy again, and gives it a job (creating `room`) so one
/// blocked on its queue since folds were held looks at the pending rooms.
fn release_folds(store: &Store, room: &str) {
    store
        .inner
        .health
        .hold_folds
        .store(false, Ordering::Relaxed);
    commit(store, batch(room, 1, 1)).unwrap();
}

/// Journal rows in the open store's segment files.
fn journal_rows(store: &Store) -> u64 {
    let dir = store
        .inner
        .db_path
        .parent()
        .unwrap()
        .join(journal_file::DIR);
    journal_file::read_all(&dir).unwrap().rows.len() as u64
}

/// The journal rows of a closed data dir's segment files.
fn journal_of(dir: &Path) -> Vec<(u64, Vec<u8>)> {
    journal_file::read_all(&dir.join(journal_file::DIR))
        .unwrap()
        .rows
        .into_iter()
        .map(|row| (row.key, row.bytes))
        .collect()
}

/// Writes journal rows into a closed data dir, as a crash would have left them: a
/// segment after the ones there.
fn put_journal(dir: &Path, rows: &[(u64, Vec<u8>)]) {
    let journal = dir.join(journal_file::DIR);
    let number = journal_file::read_all(&journal).unwrap().next_segment;
    journal_file::write_segment(&journal, number, rows);
}

/// Writes journal rows into a closed data dir's `journal` table, as a crash of a
/// version 4 build (which journaled there) would have left them.
fn put_journal_table(dir: &Path, rows: &[(u64, Vec<u8>)]) {
    let db = redb::Database::open(dir.join(format::DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut table = txn.open_table(JOURNAL).unwrap();
        for (key, row) in rows {
            table.insert(*key, row.as_slice()).unwrap();
        }
    }
    txn.commit().unwrap();
}

/// Rows in a closed data dir's `journal` table.
fn journal_table_rows(dir: &Path) -> u64 {
    let db = redb::Database::open(dir.join(format::DB_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    txn.open_table(JOURNAL).unwrap().len().unwrap()
}

/// A journal row of one entry: `room`'s events `first..=last` under stored `epoch`.
fn journal_row(room: &str, epoch: u64, first: u64, last: u64) -> Vec<u8> {
    let events: Vec<EventRecord> = (first..=last).map(event).collect();
    let row = encode_log_row(&events).unwrap();
    let room = room.to_owned();
    record::encode_journal_row(&JournalRowRef {
        entries: vec![JournalEntryRef {
            room: &room,
            epoch,
            first,
            events: last - first + 1,
            expire_op_ids_through: 0,
            rows: vec![JournalLogRowRef { last, row: &row }],
        }],
    })
    .unwrap()
}

fn with_op_id(mut batch: Batch, op_id: &str) -> Batch {
    batch.events[0].op_id = Some(op_id.to_owned());
    batch
}

fn seqs(events: &[EventRecord]) -> Vec<u64> {
    events.iter().map(|event| event.seq).collect()
}

#[test]
fn journaled_batches_are_read_back_right_after_their_ack_with_their_op_ids() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    hold_folds(&store);
    commit(&store, batch("a", 1, 1)).unwrap();
    commit(&store, with_op_id(batch("a", 2, 3), "op-2")).unwrap();
    commit(&store, batch("a", 4, 5)).unwrap();
    assert!(store.inner.health.is_journaled("a"));
    assert!(journal_rows(&store) > 0);

    let page = store.read_events("a", 0, 100).unwrap().unwrap();
    assert_eq!(page.head, 5);
    assert_eq!(seqs(&page.events), vec![1, 2, 3, 4, 5]);
    assert_eq!(page.events[1].op_id.as_deref(), Some("op-2"));
    assert!(!store.inner.health.is_journaled("a"));
    assert_eq!(
        journal_rows(&store),
        0,
        "a fold deletes the rows it emptied"
    );

    commit(&store, batch("a", 6, 7)).unwrap();
    let at = store.read_at("a", 7).unwrap().unwrap();
    assert_eq!((at.head, seqs(&at.events)), (7, (1..=7).collect()));
    commit(&store, batch("a", 8, 8)).unwrap();
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(loaded.head, 8);
    assert_eq!(seqs(&loaded.events), (1..=8).collect::<Vec<_>>());
    assert_eq!(loaded.op_ids.len(), 1);
    assert_eq!(loaded.op_ids[0].seq, 2);
    commit(&store, batch("a", 9, 9)).unwrap();
    let listed = store.list_rooms().unwrap();
    assert_eq!(listed[0].head, 9);
    assert!(!store.inner.health.any_journaled());
    store.shutdown();
}

#[test]
fn a_stop_without_a_fold_is_replayed_and_a_second_replay_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    hold_folds(&store);
    commit(&store, batch("a", 1, 1)).unwrap();
    commit(&store, batch("b", 1, 2)).unwrap();
    commit(&store, with_op_id(batch("a", 2, 4), "op-a2")).unwrap();
    commit(&store, batch("b", 3, 3)).unwrap();
    // "a" folded on demand while later batches of both stay journaled.
    assert_eq!(store.load_room("a").unwrap().unwrap().head, 4);
    commit(&store, with_op_id(batch("a", 5, 6), "op-a5")).unwrap();
    commit(&store, batch("b", 4, 5)).unwrap();
    let before: Vec<_> = ["a", "b"]
        .iter()
        .map(|room| {
            let db = store.db().unwrap();
            // Read past the fold, as a crash sees the file: only what is in the rows.
            tables::read_room(&db, store.db_path(), room)
                .unwrap()
                .unwrap()
                .head
        })
        .collect();
    assert_eq!(
        before,
        vec![4, 2],
        "the journaled batches are not in the rows yet"
    );
    store.shutdown();
    drop(store);
    let journal = journal_of(dir.path());
    assert!(!journal.is_empty());

    let check = |store: &Store, b_head: u64| {
        let a = store.load_room("a").unwrap().unwrap();
        assert_eq!(a.head, 6);
        assert_eq!(seqs(&a.events), (1..=6).collect::<Vec<_>>());
        let ids: Vec<_> = a.op_ids.iter().map(|op| op.op_id.as_str()).collect();
        assert_eq!(ids, vec!["op-a2", "op-a5"]);
        let b = store.load_room("b").unwrap().unwrap();
        assert_eq!((b.head, seqs(&b.events)), (b_head, (1..=b_head).collect()));
        assert!(store.verify().unwrap().is_empty());
        assert_eq!(journal_rows(store), 0);
    };
    let store = open(dir.path());
    check(&store, 5);
    // The rows keep taking batches where the replay left them.
    commit(&store, batch("b", 6, 6)).unwrap();
    store.shutdown();
    drop(store);

    // The same journal again, over rows that already hold it: every entry is at or
    // below its room's head and is skipped.
    put_journal(dir.path(), &journal);
    let store = open(dir.path());
    check(&store, 6);
    store.shutdown();
}

fn snapshot_at(seq: u64) -> Snapshot {
    Snapshot {
        seq,
        public: vec![(
            format!("key{seq}"),
            crate::kind::Slot::new(Some(Value::Int(seq as i64)), seq),
        )],
        private: Vec::new(),
        tombstone_floor: 0,
    }
}

#[test]
fn snapshots_trims_and_op_id_expiry_keep_their_order_with_pending_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    hold_folds(&store);
    commit(&store, batch("a", 1, 1)).unwrap();
    commit(&store, with_op_id(batch("a", 2, 3), "op-2")).unwrap();
    // A snapshot riding with journaled events is stored at once, ahead of the rows.
    let mut snapshotted = batch("a", 4, 4);
    snapshotted.snapshot = Some(snapshot_at(4));
    commit(&store, snapshotted).unwrap();
    assert!(store.inner.health.is_journaled("a"));
    let refused = batch("a", 5, 5);
    let refused = Batch {
        snapshot: Some(snapshot_at(6)),
        ..refused
    };
    assert!(matches!(
        commit(&store, refused),
        Err(StoreError::SnapshotSeq {
            seq: 6,
            head: 5,
            ..
        })
    ));
    commit(&store, batch("a", 5, 6)).unwrap();
    // A batch without events is written directly, after the room's pending batches.
    commit(
        &store,
        Batch {
            snapshot: Some(snapshot_at(6)),
            ..Batch::new("a")
        },
    )
    .unwrap();
    assert!(
        !store.inner.health.is_journaled("a"),
        "the direct batch folded it"
    );
    commit(&store, batch("a", 7, 8)).unwrap();
    commit(&store, batch("a", 9, 9)).unwrap();
    assert!(store.inner.health.is_journaled("a"));

    // A trim while 7..9 are pending folds them first (it plans from the folded head),
    // so events up to the newest snapshot, at 6, go.
    let trimmed = store
        .submit_trim("a", TrimPolicy::history_events(1))
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    let TrimOutcome::Done(report) = trimmed else {
        panic!("the trim ran: {trimmed:?}");
    };
    assert_eq!(report.first_retained, 7);
    assert!(!store.inner.health.is_journaled("a"), "the trim folded it");
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.head, loaded.first_retained), (9, 7));
    assert_eq!(loaded.snapshot.as_ref().map(|s| s.seq), Some(6));
    assert_eq!(seqs(&loaded.events), vec![7, 8, 9]);
    let ids: Vec<_> = loaded.op_ids.iter().map(|op| op.seq).collect();
    assert_eq!(
        ids,
        vec![2],
        "the trim kept the trimmed event's op id apart"
    );
    let snapshots = store.room_snapshots("a").unwrap();
    assert_eq!(
        snapshots.iter().map(|s| s.seq).collect::<Vec<_>>(),
        [6],
        "the snapshot before the new base went with the events"
    );

    // Expiry rides in the journal and is applied by the fold.
    commit(
        &store,
        Batch {
            expire_op_ids_through: 2,
            ..batch("a", 10, 10)
        },
    )
    .unwrap();
    assert!(store.inner.health.is_journaled("a"));
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!(loaded.head, 10);
    assert!(loaded.op_ids.is_empty(), "{:?}", loaded.op_ids);
    let mut snapshotted = batch("a", 11, 11);
    snapshotted.snapshot = Some(snapshot_at(11));
    commit(&store, snapshotted).unwrap();
    store.shutdown();
    drop(store);

    // On disk the snapshot at 11 is past the folded head until the replay.
    assert!(!journal_of(dir.path()).is_empty());
    let store = open(dir.path());
    let loaded = store.load_room("a").unwrap().unwrap();
    assert_eq!((loaded.head, loaded.first_retained), (11, 7));
    assert_eq!(loaded.snapshot.as_ref().map(|s| s.seq), Some(11));
    check_events(&store, "a", 7, 11);
    store.shutdown();
}

fn check_events(store: &Store, room: &str, from: u64, to: u64) {
    let page = store.read_events(room, from - 1, 1000).unwrap().unwrap();
    assert_eq!(seqs(&page.events), (from..=to).collect::<Vec<_>>());
}

#[test]
fn a_deleted_room_drops_its_pending_batches_and_a_new_one_under_its_name_keeps_its_own() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    hold_folds(&store);
    commit(&store, batch("r", 1, 1)).unwrap();
    commit(&store, batch("r", 2, 3)).unwrap();
    store
        .submit_delete("r")
        .unwrap()
        .blocking_recv()
        .unwrap()
        .unwrap();
    assert!(!store.inner.health.is_journaled("r"));
    assert!(store.load_room("r").unwrap().is_none());
    assert!(matches!(
        commit(&store, batch("r", 4, 4)),
        Err(StoreError::NoSuchRoom { .. })
    ));
    let mut again = batch("r", 1, 1);
    again.create = Some(RoomMeta {
        kind: "state".to_owned(),
        epoch: 8,
    });
    commit(&store, again).unwrap();
    commit(&store, batch("r", 2, 2)).unwrap();
    store.shutdown();
    drop(store);

    // The journal of the old room, as a crash right after its batches were acked would
    // leave it (stored epoch 7, `meta()`), and one row of the new room's epoch that
    // would leave a gap.
    let new_room_key = journal_of(dir.path()).last().map_or(0, |(key, _)| key + 1);
    put_journal(dir.path(), &[(new_room_key, journal_row("r", 7, 2, 6))]);
    let store = open(dir.path());
    let loaded = store.load_room("r").unwrap().unwrap();
    assert_eq!((loaded.meta.epoch, loaded.head), (8, 2));
    store.shutdown();
    drop(store);

    put_journal(dir.path(), &[(100, journal_row("r", 8, 5, 6))]);
    let refused = match Store::open(StoreConfig::new(dir.path())) {
        Ok(_) => panic!("a journal entry that leaves a gap must refuse the open"),
        Err(refused) => refused,
    };
    assert!(
        matches!(refused, StoreError::Journal { key: 100, .. }),
        "{refused}"
    );
    let text = refused.to_string();
    assert!(
        text.contains("journal row 100") && text.contains("room r"),
        "{text}"
    );
}

#[test]
fn a_gap_against_the_pending_head_is_refused_whole() {
    let store = Store::open_with_backend(
        redb::backends::InMemoryBackend::new(),
        Durability::Immediate,
    )
    .unwrap();
    hold_folds(&store);
    commit(&store, batch("a", 1, 1)).unwrap();
    commit(&store, batch("a", 2, 3)).unwrap();
    let refused = commit(&store, batch("a", 5, 6)).unwrap_err();
    assert!(
        matches!(
            refused,
            StoreError::SeqGap {
                expected: 4,
                found: 5,
                ..
            }
        ),
        "{refused}"
    );
    assert!(matches!(
        commit(&store, batch("a", 3, 3)),
        Err(StoreError::SeqGap { expected: 4, .. })
    ));
    assert!(matches!(
        commit(&store, batch("nobody", 2, 2)),
        Err(StoreError::NoSuchRoom { .. })
    ));
    commit(&store, batch("a", 4, 4)).unwrap();
    let page = store.read_events("a", 0, 100).unwrap().unwrap();
    assert_eq!(seqs(&page.events), vec![1, 2, 3, 4]);
    store.shutdown();
}

#[test]
fn folding_many_pending_rooms_takes_several_bounded_transactions_and_loses_nothing() {
    let store = Store::open_with_backend(
        redb::backends::InMemoryBackend::new(),
        Durability::Immediate,
    )
    .unwrap();
    hold_folds(&store);
    let rooms: Vec<String> = (0..600).map(|n| format!("room-{n:04}")).collect();
    let submit_all = |first: u64, last: u64| {
        let answers: Vec<_> = rooms
            .iter()
            .map(|room| store.submit(batch(room, first, last)).unwrap())
            .collect();
        for answer in answers {
            answer.blocking_recv().unwrap().unwrap();
        }
    };
    submit_all(1, 1);
    submit_all(2, 3);
    submit_all(4, 4);
    assert!(store.inner.health.any_journaled());
    let commits = store.commits();
    let listed = store.list_rooms().unwrap();
    let folds = store.commits() - commits;
    assert!(
        folds >= 600usize.div_ceil(journal::MAX_FOLD_ROOMS) as u64,
        "600 rooms folded in {folds} transactions"
    );
    assert_eq!(listed.len(), 600);
    assert!(listed.iter().all(|room| room.head == 4 && room.events == 4));
    assert_eq!(journal_rows(&store), 0);
    store.shutdown();
}

#[test]
fn the_room_list_shows_journaled_heads_without_asking_for_a_fold() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    hold_folds(&store);
    commit(&store, batch("a", 1, 1)).unwrap();
    commit(&store, batch("a", 2, 3)).unwrap();
    commit(&store, batch("b", 1, 2)).unwrap();
    commit(&store, batch("b", 3, 3)).unwrap();
    commit(&store, batch("c", 1, 1)).unwrap();
    assert!(store.inner.health.is_journaled("a") && store.inner.health.is_journaled("b"));
    let (commits, rows) = (store.commits(), journal_rows(&store));

    let (listed, more) = store.rooms_page("", None, 10).unwrap();
    let heads: Vec<(&str, u64)> = listed.iter().map(|r| (r.room.as_str(), r.head)).collect();
    assert_eq!(heads, vec![("a", 3), ("b", 3), ("c", 1)]);
    assert!(!more);
    assert_eq!(store.commits(), commits, "the listing committed nothing");
    assert_eq!(journal_rows(&store), rows, "the listing folded nothing");
    assert!(store.inner.health.is_journaled("a") && store.inner.health.is_journaled("b"));

    // After a fold the meta rows carry the same heads and the journaled ones are gone.
    store.read_events("a", 0, 10).unwrap().unwrap();
    store.read_events("b", 0, 10).unwrap().unwrap();
    assert!(!store.inner.health.any_journaled());
    let (listed, _) = store.rooms_page("", Some("a"), 10).unwrap();
    let heads: Vec<(&str, u64)> = listed.iter().map(|r| (r.room.as_str(), r.head)).collect();
    assert_eq!(heads, vec![("b", 3), ("c", 1)]);
    store.shutdown();
}

/// `room`'s head in its meta row: what is folded, whatever is journaled.
fn folded_head(store: &Store, room: &str) -> u64 {
    let db = store.db().unwrap();
    let (listed, _) = listing::rooms_page(&db, store.db_path(), room, None, 1).unwrap();
    listed[0].head
}

/// An event carrying `size` bytes of payload, so few batches make a big room.
fn big_event(seq: u64, size: usize) -> EventRecord {
    let mut event = event(seq);
    event.op = Value::map([("blob", Value::Bytes(vec![seq as u8; size]))]);
    event
}

/// Journals `count` batches of `room` (two events of 8 KiB each) after `head`, all
/// submitted before the first answer, so the writer takes runs of them into one commit
/// and one journal row; returns the new head.
fn journal_big(store: &Store, room: &str, head: u64, count: u64) -> u64 {
    let answers: Vec<_> = (0..count)
        .map(|n| {
            let first = head + 1 + 2 * n;
            store
                .submit(Batch {
                    events: (first..first + 2)
                        .map(|seq| big_event(seq, 8 * 1024))
                        .collect(),
                    ..Batch::new(room)
                })
                .unwrap()
        })
        .collect();
    for answer in answers {
        answer.blocking_recv().unwrap().unwrap();
    }
    head + 2 * count
}

#[test]
fn a_big_room_is_folded_over_several_bounded_transactions_and_loses_nothing() {
    let store = Store::open_with_backend(
        redb::backends::InMemoryBackend::new(),
        Durability::Immediate,
    )
    .unwrap();
    hold_folds(&store);
    commit(&store, batch("big", 1, 1)).unwrap();
    // 90 batches of about 16 KiB: 1.4 MiB, once folded in one transaction.
    let head = journal_big(&store, "big", 1, 90);
    assert_eq!(folded_head(&store, "big"), 1);
    let commits = store.commits();

    release_folds(&store, "wake");
    let started = std::time::Instant::now();
    let mut heads = vec![1];
    while store.inner.health.is_journaled("big") {
        assert!(started.elapsed() < Duration::from_secs(60), "folds stalled");
        // Mid-way the list still shows the whole head, the rows a prefix of it.
        let (listed, _) = store.rooms_page("big", None, 1).unwrap();
        assert_eq!(listed[0].head, head);
        let folded = folded_head(&store, "big");
        assert!(folded >= *heads.last().unwrap() && folded <= head);
        if folded != *heads.last().unwrap() {
            heads.push(folded);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let transactions = store.commits() - commits;
    let bytes: usize = 90 * 16 * 1024;
    assert!(
        transactions >= bytes.div_ceil(journal::MAX_FOLD_BYTES) as u64,
        "a 1.4 MiB room folded in {transactions} transactions"
    );
    assert!(heads.len() > 2, "folded heads seen on the way: {heads:?}");
    assert_eq!(folded_head(&store, "big"), head);
    check_events(&store, "big", 1, head);
    assert_eq!(journal_rows(&store), 0);
    store.shutdown();
}

#[test]
fn a_stop_in_the_middle_of_a_big_rooms_folds_is_replayed_from_its_folded_head() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    hold_folds(&store);
    commit(&store, batch("big", 1, 1)).unwrap();
    commit(&store, batch("small", 1, 1)).unwrap();
    let head = journal_big(&store, "big", 1, 90);
    commit(&store, with_op_id(batch("small", 2, 3), "op-s2")).unwrap();

    // Let the writer fold by policy until part of "big" is in its rows, then stop it
    // without the fold at shutdown, as a crash would.
    release_folds(&store, "wake");
    let started = std::time::Instant::now();
    while folded_head(&store, "big") == 1 {
        assert!(started.elapsed() < Duration::from_secs(60), "no fold came");
        std::thread::sleep(Duration::from_millis(1));
    }
    hold_folds(&store);
    // A transaction may have been under way; the hook holds the ones after it.
    std::thread::sleep(Duration::from_millis(50));
    let folded = folded_head(&store, "big");
    assert!(
        folded > 1 && folded < head,
        "stopped mid-way: {folded} of {head}"
    );
    store.shutdown();
    drop(store);

    // The journal still holds the folded batches' rows where they share a row with
    // unfolded ones, and one entry runs across the folded head.
    let journal = journal_of(dir.path());
    let straddles = journal.iter().any(|(_, row)| {
        record::decode_journal_row(row)
            .unwrap()
            .iter()
            .any(|entry| {
                entry.room == "big"
                    && entry.first <= folded
                    && entry.first + entry.events - 1 > folded
            })
    });
    assert!(straddles, "a fold stopped inside a journal row's entry");

    let check = |store: &Store| {
        let big = store.load_room("big").unwrap().unwrap();
        assert_eq!(big.head, head);
        assert_eq!(seqs(&big.events), (1..=head).collect::<Vec<_>>());
        let small = store.load_room("small").unwrap().unwrap();
        assert_eq!(seqs(&small.events), vec![1, 2, 3]);
        assert_eq!(small.op_ids.len(), 1);
        assert!(store.verify().unwrap().is_empty());
        assert_eq!(journal_rows(store), 0);
    };
    let store = open(dir.path());
    check(&store);
    store.shutdown();
    drop(store);
    // The same journal again is all at or below the heads: nothing changes.
    put_journal(dir.path(), &journal);
    let store = open(dir.path());
    check(&store);
    store.shutdown();
}

#[test]
fn a_journal_entry_across_the_stored_head_is_applied_from_the_head_and_a_gap_refused() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("r", 1, 1)).unwrap();
    commit(&store, batch("r", 2, 3)).unwrap();
    store.shutdown();
    drop(store);

    // Events 2..=5 in two log rows, as a commit of two batches journals them; a partial
    // fold took the first (the stored head is 3).
    let row = |first: u64, last: u64| {
        let events: Vec<EventRecord> = (first..=last).map(event).collect();
        encode_log_row(&events).unwrap()
    };
    let (a, b, c) = (row(2, 3), row(4, 5), row(5, 7));
    let room = "r".to_owned();
    let entry = |first: u64, rows: Vec<JournalLogRowRef<'_>>| {
        let last = rows.last().unwrap().last;
        record::encode_journal_row(&JournalRowRef {
            entries: vec![JournalEntryRef {
                room: &room,
                epoch: 7,
                first,
                events: last - first + 1,
                expire_op_ids_through: 0,
                rows,
            }],
        })
        .unwrap()
    };
    let across = entry(
        2,
        vec![
            JournalLogRowRef { last: 3, row: &a },
            JournalLogRowRef { last: 5, row: &b },
        ],
    );
    put_journal(dir.path(), &[(0, across)]);
    let store = open(dir.path());
    let loaded = store.load_room("r").unwrap().unwrap();
    assert_eq!(
        (loaded.head, seqs(&loaded.events)),
        (5, vec![1, 2, 3, 4, 5])
    );
    assert_eq!(journal_rows(&store), 0);
    store.shutdown();
    drop(store);

    // A head inside a log row (5 in 5..=7) is no partial fold's: the open is refused.
    let inside = entry(5, vec![JournalLogRowRef { last: 7, row: &c }]);
    put_journal(dir.path(), &[(1, inside)]);
    let refused = match Store::open(StoreConfig::new(dir.path())) {
        Ok(_) => panic!("a journal entry that overlaps the head inside a row must refuse"),
        Err(refused) => refused,
    };
    assert!(
        matches!(refused, StoreError::Journal { key: 1, .. }),
        "{refused}"
    );
}

/// A closed data dir holding room "r" (stored epoch 7) with its creation, event 1.
fn closed_dir_with_room_r() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    commit(&store, batch("r", 1, 1)).unwrap();
    store.shutdown();
    drop(store);
    dir
}

#[test]
fn a_version_4_dirs_journal_table_is_replayed_at_the_open_and_left_empty() {
    let dir = closed_dir_with_room_r();
    // What a version 4 build's crash left: events 2..=4 acked in its journal table.
    put_journal_table(dir.path(), &[(0, journal_row("r", 7, 2, 4))]);
    std::fs::write(dir.path().join("FORMAT"), "4\n").unwrap();

    let store = open(dir.path());
    let loaded = store.load_room("r").unwrap().unwrap();
    assert_eq!((loaded.head, seqs(&loaded.events)), (4, vec![1, 2, 3, 4]));
    commit(&store, batch("r", 5, 5)).unwrap();
    store.shutdown();
    drop(store);
    assert_eq!(journal_table_rows(dir.path()), 0);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("FORMAT")).unwrap(),
        format!("{FORMAT_VERSION}\n")
    );
    let store = open(dir.path());
    assert_eq!(store.load_room("r").unwrap().unwrap().head, 5);
    store.shutdown();
}

#[test]
fn a_damaged_rooms_pending_batches_are_set_aside_in_one_row_and_its_keys_count_folded() {
    let stored = |_: &str| -> journal::StoredMetaResult {
        Ok(Ok(Some(record::StoredMeta {
            meta: RoomMeta {
                kind: "state".to_owned(),
                epoch: 7,
            },
            head: 1,
            first_retained: 1,
        })))
    };
    for set_aside in [true, false] {
        let mut pending = journal::Pending::new(0, set_aside);
        pending.begin_commit();
        for (first, last) in [(2, 3), (4, 4)] {
            let events: Vec<EventRecord> = (first..=last).map(event).collect();
            let mut rows = tables::encode_events("bad", &events).unwrap();
            pending
                .journal(stored, "bad", &mut rows, 0, None)
                .unwrap()
                .unwrap();
        }
        assert_eq!(pending.min_unfolded(), Some(0));
        pending.abandon("bad");
        assert!(!pending.contains("bad"));
        let aside = pending.take_aside();
        if !set_aside {
            // The journal table keeps the rows: they stay unfolded.
            assert!(aside.is_empty());
            assert_eq!(pending.min_unfolded(), Some(0));
            continue;
        }
        assert_eq!(
            pending.min_unfolded(),
            None,
            "nothing holds the segments now"
        );
        assert_eq!(aside.len(), 1);
        let entries = record::decode_journal_row(&aside[0].1).unwrap();
        assert_eq!(entries.len(), 1);
        let entry = &entries[0];
        assert_eq!(
            (entry.room, entry.epoch, entry.first, entry.events),
            ("bad", 7, 2, 3)
        );
        assert_eq!(entry.rows.len(), 2);
    }
}

#[test]
fn rows_set_aside_are_replayed_before_the_segments_and_deleted_once_applied() {
    let dir = closed_dir_with_room_r();
    // A set-aside row of events 2..=3 and a segment with 4..=5 after it.
    let journal = dir.path().join(journal_file::DIR);
    {
        let read = journal_file::read_all(&journal).unwrap();
        let mut file =
            journal_file::JournalFile::start(&journal, &read.segments, &[], read.next_segment)
                .unwrap();
        file.set_aside(10, &journal_row("r", 7, 2, 3)).unwrap();
    }
    put_journal(dir.path(), &[(11, journal_row("r", 7, 4, 5))]);
    let read = journal_file::read_all(&journal).unwrap();
    assert_eq!(
        read.rows.iter().map(|row| row.key).collect::<Vec<_>>(),
        vec![10, 11]
    );
    let store = open(dir.path());
    let loaded = store.load_room("r").unwrap().unwrap();
    assert_eq!((loaded.head, seqs(&loaded.events)), (5, (1..=5).collect()));
    store.shutdown();
    drop(store);
    // Applied, so deleted with the segments it was read with.
    assert!(journal_of(dir.path()).is_empty());
}

/// A batch with a snapshot opens a redb transaction, is answered before it commits,
/// and the committer thread commits it (`committer.rs`) while the writer journals the
/// next groups of rooms with batches pending: every batch is read back in order, and
/// a restart finds the same heads.
#[test]
fn groups_journaled_beside_a_handed_over_commit_are_all_read_back_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    for room in ["a", "b"] {
        commit(&store, batch(room, 1, 1)).unwrap();
        commit(&store, batch(room, 2, 2)).unwrap();
    }
    let (mut a, mut b) = (2, 2);
    // Each round's second batch arrives while the first one's commit (an fsync'd redb
    // transaction) usually still runs; a few rounds make it certain enough.
    while store.beside_commits() == 0 && a < 200 {
        a += 1;
        let with_snapshot = Batch {
            snapshot: Some(Snapshot {
                seq: a,
                public: vec![],
                private: vec![],
                tombstone_floor: 0,
            }),
            ..batch("a", a, a)
        };
        commit(&store, with_snapshot).unwrap();
        b += 1;
        commit(&store, batch("b", b, b)).unwrap();
    }
    assert!(
        store.beside_commits() > 0,
        "no group was written beside a commit in {a} rounds"
    );
    for (room, head) in [("a", a), ("b", b)] {
        let page = store.read_events(room, 0, 1_000).unwrap().unwrap();
        assert_eq!(page.head, head);
        assert_eq!(seqs(&page.events), (1..=head).collect::<Vec<_>>());
    }
    store.shutdown();
    drop(store);
    let store = open(dir.path());
    for (room, head) in [("a", a), ("b", b)] {
        assert_eq!(store.load_room(room).unwrap().unwrap().head, head);
        let page = store.read_events(room, 0, 1_000).unwrap().unwrap();
        assert_eq!(seqs(&page.events), (1..=head).collect::<Vec<_>>());
    }
    assert!(store.is_healthy());
    store.shutdown();
}
