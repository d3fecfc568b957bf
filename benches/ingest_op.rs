//! The server's CPU path of one ingested op, piece by piece, so a change that doubles
//! any piece shows up in `cargo bench` (issue 14's regression guard):
//!
//! - `decode`: the `set` frame `roomd bench ingest` sends, JSON text and rkyv binary,
//!   through the server's decoders up to the `Inbound` request with its domain `Value`.
//! - `reduce_apply`: that `set` reduced and applied in a 1,000-key `state` room.
//! - `encode_event_row`: its log record encoded as the store writes it (a log row of
//!   one event; a room batch's row holds its events alike).
//! - `encode_ack`: its `ack`, as a whole WebSocket frame in each encoding.
//! - `backlog_slot`: the op's place in its room's backlog (`room/backlog.rs`), taken
//!   on the connection thread and given back with the answer; uncontended here.
//! - `per_op`: the four in a row (JSON, the slot not included), what one op costs
//!   outside the mailboxes, the store and the socket.
//!
//! Run: `cargo bench --bench ingest_op` (add `-- --quick` for a shorter run).

// Each bench uses part of the shared rooms.
#[allow(dead_code)]
mod rooms;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use roomd::kind::Limits;
use roomd::outbound::encode;
use roomd::protocol::message::{ClientMsg, Node, ServerMsg, WireValue};
use roomd::protocol::{binary, json, Encoding, Inbound};
use roomd::store::{encode_log_row, EventRecord};
use roomd::value::Value;

use rooms::{ctx, state_room, user};

/// The JSON frame of op `n`, as `roomd bench ingest` writes it (16-byte value).
fn json_frame(n: u64) -> String {
    format!(
        r#"{{"t":"op","id":"w3.{n}","room":"state:ingest-1-{}","op":{{"type":"set","key":"k{}","value":"vvvvvvvvvvvvvvvv"}}}}"#,
        n % 100,
        n % 1_000
    )
}

/// The same op as an rkyv frame.
fn rkyv_frame(n: u64) -> Vec<u8> {
    let op = WireValue {
        nodes: vec![
            Node::Map(3),
            Node::Str("key".into()),
            Node::Str(format!("k{}", n % 1_000)),
            Node::Str("type".into()),
            Node::Str("set".into()),
            Node::Str("value".into()),
            Node::Str("vvvvvvvvvvvvvvvv".into()),
        ],
    };
    binary::encode_client(&ClientMsg::Op {
        id: format!("w3.{n}"),
        room: format!("state:ingest-1-{}", n % 100),
        op,
    })
    .to_vec()
}

fn op_of(inbound: Inbound) -> Value {
    match inbound {
        Inbound::Op { op: Ok(op), .. } => op,
        other => panic!("the bench frames are valid ops, got {other:?}"),
    }
}

const N_FRAMES: u64 = 1_000;

fn pieces(c: &mut Criterion) {
    let json_frames: Vec<String> = (0..N_FRAMES).map(json_frame).collect();
    let rkyv_frames: Vec<Vec<u8>> = (0..N_FRAMES).map(rkyv_frame).collect();
    let ops: Vec<Value> = json_frames
        .iter()
        .map(|f| op_of(json::decode(f).expect("a valid frame")))
        .collect();
    let limits = Limits::default();
    let author = user(3);

    let mut group = c.benchmark_group("ingest_op");
    group.throughput(Throughput::Elements(1));
    let mut n = 0usize;
    group.bench_function("decode/json", |b| {
        b.iter(|| {
            n = (n + 1) % json_frames.len();
            json::decode(black_box(&json_frames[n]))
        })
    });
    group.bench_function("decode/rkyv", |b| {
        b.iter(|| {
            n = (n + 1) % rkyv_frames.len();
            binary::decode(black_box(&rkyv_frames[n]))
        })
    });

    let mut room = state_room(1_000);
    group.bench_function("reduce_apply/state_set", |b| {
        b.iter(|| {
            n = (n + 1) % ops.len();
            let seq = room.head + 1;
            let changes = room
                .kind
                .reduce(&room.state, black_box(&ops[n]), &ctx(&author, seq), &limits)
                .expect("a set is accepted");
            let undo = room.state.apply(seq, &changes);
            room.head = seq;
            undo
        })
    });

    let mut room = state_room(1_000);
    let records: Vec<EventRecord> = ops
        .iter()
        .map(|op| {
            let seq = room.head + 1;
            let changes = room
                .kind
                .reduce(&room.state, op, &ctx(&author, seq), &limits)
                .expect("a set is accepted");
            room.head = seq;
            EventRecord {
                seq,
                user: author.clone(),
                ts_ms: 1_700_000_000_000,
                op: op.clone(),
                changes,
                op_id: Some(format!("w3.{seq}")),
            }
        })
        .collect();
    group.bench_function("encode_event_row", |b| {
        b.iter(|| {
            n = (n + 1) % records.len();
            encode_log_row(std::slice::from_ref(black_box(&records[n])))
                .expect("the record encodes")
        })
    });

    for (name, encoding) in [("json", Encoding::Json), ("rkyv", Encoding::Rkyv)] {
        group.bench_function(format!("encode_ack/{name}"), |b| {
            b.iter(|| {
                n += 1;
                let ack = ServerMsg::Ack {
                    id: format!("w3.{n}"),
                    seq: n as u64,
                };
                encode(black_box(&ack), encoding)
            })
        });
    }

    let backlog = roomd::room::backlog::Backlog::default();
    group.bench_function("backlog_slot", |b| {
        b.iter(|| {
            drop(black_box(
                backlog.try_take().expect("an empty backlog has room"),
            ))
        })
    });

    let mut room = state_room(1_000);
    group.bench_function("per_op/json", |b| {
        b.iter(|| {
            n = (n + 1) % json_frames.len();
            let (id, op) = match json::decode(black_box(&json_frames[n])) {
                Ok(Inbound::Op { id, op: Ok(op), .. }) => (id, op),
                _ => unreachable!("the bench frames are valid ops"),
            };
            let seq = room.head + 1;
            let changes = room
                .kind
                .reduce(&room.state, &op, &ctx(&author, seq), &limits)
                .expect("a set is accepted");
            let undo = room.state.apply(seq, &changes);
            room.head = seq;
            let record = EventRecord {
                seq,
                user: author.clone(),
                ts_ms: 1_700_000_000_000,
                op,
                changes,
                op_id: Some(id.clone()),
            };
            let row = encode_log_row(std::slice::from_ref(&record)).expect("the record encodes");
            let ack = encode(&ServerMsg::Ack { id, seq }, Encoding::Json);
            (undo, row, ack)
        })
    });
    group.finish();
}

criterion_group! {
    name = ingest_op;
    // Short defaults for a 2-core dev machine; command-line flags still override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(300))
        .measurement_time(Duration::from_secs(1));
    targets = pieces
}
criterion_main!(ingest_op);
