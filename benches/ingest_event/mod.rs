//! The event `roomd bench ingest` makes the server log, as a store record: a `state`
//! `set` of key `k<n>` to a 16-byte string by user `w0`, and the creation event of the
//! empty "state" room it goes to. `store_append` submits these records through the
//! store and `redb_ceiling` measures their row size, so both write the same bytes.

use roomd::kind::{Changes, Ctx, Limits, RoomKind, StateKind};
use roomd::store::EventRecord;
use roomd::value::Value;

/// The room clock of event 1, in ms.
const START_MS: i64 = 1_750_000_000_000;

/// Event `seq` of an ingest room: a `set` of `k<seq mod 1000>` (ingest's default of
/// 1,000 keys per room) to its default 16-byte value.
pub fn set_event(seq: u64) -> EventRecord {
    let key = format!("k{}", seq % 1_000);
    let value = Value::Str("v".repeat(16));
    EventRecord {
        seq,
        user: "w0".to_owned(),
        ts_ms: START_MS + seq as i64,
        op: Value::map([
            ("type", Value::Str("set".to_owned())),
            ("key", Value::Str(key.clone())),
            ("value", value.clone()),
        ]),
        changes: Changes {
            public: vec![(key, Some(value))],
            private: vec![],
        },
        op_id: Some(format!("w0.{seq}")),
    }
}

/// The creation event (seq 1) of an empty "state" room.
pub fn create_event() -> EventRecord {
    let ctx = Ctx {
        user: "w0",
        now_ms: START_MS,
        seq: 1,
    };
    let changes = StateKind
        .init(&Value::Null, &ctx, &Limits::default())
        .expect("an empty state room is a valid init");
    EventRecord {
        seq: 1,
        user: "w0".to_owned(),
        ts_ms: START_MS,
        op: Value::Null,
        changes,
        op_id: Some("c0".to_owned()),
    }
}
