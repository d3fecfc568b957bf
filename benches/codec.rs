//! The cost of the wire codecs, rkyv (`roomd.v1.rkyv`) against JSON (`roomd.v1.json`),
//! on the messages that carry the most data:
//!
//! - `snapshot_encode` / `snapshot_decode`: the `snapshot` of a "state" room of 1,000
//!   keys holding small maps, and of a chat room of 500 messages.
//! - `diff_encode` / `diff_decode`: a `diff` of 1, 16 and 256 changed small-map entries.
//! - `op_decode`: one client `op` frame (a `set` of a small map, a chat `post`), JSON
//!   text against an rkyv frame, through the server's decoders up to the `Inbound`
//!   request with its domain `Value`.
//!
//! Encoding is the server's path (`protocol::json::encode`, `protocol::binary::encode`):
//! `ServerMsg` to frame bytes. Decoding a server message is the client's path
//! (`client::decode_server`, `protocol::binary::decode_server`, validation
//! included): frame bytes to `ServerMsg`. Throughput is in entries (or ops) per second;
//! the frame sizes are printed first.
//!
//! Run: `cargo bench --bench codec` (add `-- --quick` for a shorter run).

// Each bench uses part of the shared rooms.
#[allow(dead_code)]
mod rooms;

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use roomd::client;
use roomd::kind::Slot;
use roomd::protocol::message::{ClientMsg, ServerMsg, WireEntry, WireValue};
use roomd::protocol::{binary, json};
use roomd::room::wire_entry;
use roomd::value::Value;

use rooms::{chat_room, object_key, post_op, set_op, small_map, state_room, Room};

const EPOCH: u64 = 0x9f3c_51a2_0b7e_d4c8;

/// The `snapshot` a subscriber of `room` receives: every slot, tombstones included.
fn snapshot(name: &str, kind: &str, room: &Room) -> ServerMsg {
    ServerMsg::Snapshot {
        room: name.to_owned(),
        kind: kind.to_owned(),
        epoch: EPOCH,
        seq: room.head,
        entries: room
            .state
            .all_slots()
            .map(|(key, slot)| wire_entry(key, slot))
            .collect(),
        recovered: false,
    }
}

/// A `diff` of `n_changed` small-map entries of a 1,000-key state room, as one batch
/// that wrote them all would send it.
fn diff(n_changed: u64) -> ServerMsg {
    let from = 1_002;
    let to = from + n_changed - 1;
    let changes: Vec<WireEntry> = (0..n_changed)
        .map(|i| {
            let slot = Slot::new(Some(small_map(i * 3, 1)), from + i);
            wire_entry(&object_key(i * 3), &slot)
        })
        .collect();
    ServerMsg::Diff {
        room: "state:lobby".to_owned(),
        epoch: EPOCH,
        from,
        to,
        changes,
    }
}

/// A server message in both encodings.
struct Frames {
    name: String,
    msg: ServerMsg,
    n_entries: u64,
    json: String,
    rkyv: Vec<u8>,
}

impl Frames {
    fn new(name: impl Into<String>, msg: ServerMsg) -> Frames {
        let name = name.into();
        let n_entries = match &msg {
            ServerMsg::Snapshot { entries, .. } => entries.len(),
            ServerMsg::Diff { changes, .. } => changes.len(),
            _ => 1,
        } as u64;
        let json = json::encode(&msg);
        let rkyv = binary::encode(&msg).to_vec();
        println!(
            "frame {:<16} {:>5} entries: json {:>7} B, rkyv {:>7} B",
            name,
            n_entries,
            json.len(),
            rkyv.len()
        );
        Frames {
            name,
            msg,
            n_entries,
            json,
            rkyv,
        }
    }

    /// Checks that both decoders read back the message, so the benches time real work.
    fn check(&self) {
        let from_json = client::decode_server(&self.json).expect("server JSON decodes");
        let from_rkyv = binary::decode_server(&self.rkyv).expect("server rkyv decodes");
        assert_eq!(from_json, self.msg, "{}: JSON round trip", self.name);
        assert_eq!(from_rkyv, self.msg, "{}: rkyv round trip", self.name);
    }
}

fn encode_group(c: &mut Criterion, group_name: &str, frames: &[Frames]) {
    let mut group = c.benchmark_group(group_name);
    for f in frames {
        group.throughput(Throughput::Elements(f.n_entries));
        group.bench_with_input(BenchmarkId::new("rkyv", &f.name), &f.msg, |b, msg| {
            b.iter(|| binary::encode(black_box(msg)))
        });
        group.bench_with_input(BenchmarkId::new("json", &f.name), &f.msg, |b, msg| {
            b.iter(|| json::encode(black_box(msg)))
        });
    }
    group.finish();
}

fn decode_group(c: &mut Criterion, group_name: &str, frames: &[Frames]) {
    let mut group = c.benchmark_group(group_name);
    for f in frames {
        f.check();
        group.throughput(Throughput::Elements(f.n_entries));
        group.bench_with_input(BenchmarkId::new("rkyv", &f.name), &f.rkyv, |b, frame| {
            b.iter(|| binary::decode_server(black_box(frame)))
        });
        group.bench_with_input(BenchmarkId::new("json", &f.name), &f.json, |b, text| {
            b.iter(|| client::decode_server(black_box(text)))
        });
    }
    group.finish();
}

fn snapshots(c: &mut Criterion) {
    let frames = [
        Frames::new(
            "state_1000",
            snapshot("state:lobby", "state", &state_room(1_000)),
        ),
        Frames::new(
            "chat_500",
            snapshot("chat:general", "chat", &chat_room(500)),
        ),
    ];
    encode_group(c, "snapshot_encode", &frames);
    decode_group(c, "snapshot_decode", &frames);
}

fn diffs(c: &mut Criterion) {
    let frames: Vec<Frames> = [1, 16, 256]
        .into_iter()
        .map(|n| Frames::new(format!("changed_{n}"), diff(n)))
        .collect();
    encode_group(c, "diff_encode", &frames);
    decode_group(c, "diff_decode", &frames);
}

/// One client `op` in both encodings, as a client library would send it.
fn op_frames(name: &str, room: &str, op: &Value) -> (String, Vec<u8>) {
    let msg = ClientMsg::Op {
        id: "c1042".to_owned(),
        room: room.to_owned(),
        op: WireValue::from_value(op),
    };
    let text = client::encode_client(&msg);
    let frame = binary::encode_client(&msg).to_vec();
    println!(
        "op    {name:<16}        : json {:>7} B, rkyv {:>7} B",
        text.len(),
        frame.len()
    );
    assert_eq!(json::decode(&text), binary::decode(&frame), "{name}");
    (text, frame)
}

fn ops(c: &mut Criterion) {
    let ops = [
        (
            "state_set",
            op_frames(
                "state_set",
                "state:lobby",
                &set_op(&object_key(17), small_map(17, 2)),
            ),
        ),
        (
            "chat_post",
            op_frames(
                "chat_post",
                "chat:general",
                &post_op(rooms::message_text(9)),
            ),
        ),
    ];
    let mut group = c.benchmark_group("op_decode");
    group.throughput(Throughput::Elements(1));
    for (name, (text, frame)) in &ops {
        group.bench_with_input(BenchmarkId::new("rkyv", name), frame, |b, frame| {
            b.iter(|| binary::decode(black_box(frame)))
        });
        group.bench_with_input(BenchmarkId::new("json", name), text, |b, text| {
            b.iter(|| json::decode(black_box(text)))
        });
    }
    group.finish();
}

criterion_group! {
    name = codec;
    // Short defaults for a 2-core dev machine; command-line flags still override them.
    config = Criterion::default()
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(2));
    targets = snapshots, diffs, ops
}
criterion_main!(codec);
