//! Crash loop: the real binary runs under a pipelined write load from four connections
//! (two speaking literal JSON, two speaking rkyv through the published `ClientMsg` types)
//! and is SIGKILLed at a random moment, then restarted on the same data directory, again
//! and again. After every restart the rooms must hold every acked op exactly once, seq must
//! be gapless, re-sent unacked ops must apply once, and every client's mirror, resumed
//! with `since` under the same epoch, must equal `GET /api/rooms/{room}` and a replay of
//! the acks this test collected.
//!
//! Environment:
//! - `ROOMD_CRASH_CYCLES=N` runs N kill/restart cycles instead of the default
//!   [`DEFAULT_CYCLES`]. A cycle takes about half a second in a debug build on two cores,
//!   and longer as the rooms' logs grow (100 cycles: about two minutes).
//! - `ROOMD_CRASH_OPS=N` has each writer pipeline N new ops per cycle instead of
//!   [`OPS_PER_CYCLE`] (the server then runs with its op rate and burst raised past
//!   what the writers send). About 1,400 ops per
//!   room (N = 1024) fill a room batch while another commits, so the room hands the
//!   writer two batches at once (`room::live::PIPELINE_DEPTH`) and kills land there.
//! - `ROOMD_CRASH_SEED=S` replays the op mix and kill delays of a run; every run prints
//!   its seed, and a failing one repeats it next to the failure. Kill timing still
//!   depends on the machine, so a seed narrows a failure down rather than replaying it.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures_util::stream::{SplitSink, SplitStream};
use futures_util::{SinkExt, StreamExt};
use roomd::protocol::binary;
use roomd::protocol::message::{ClientMsg, ServerMsg, WireEntry, WireSince, WireValue};
use roomd::protocol::{SUBPROTOCOL_JSON, SUBPROTOCOL_RKYV};
use roomd::value::Value as RoomValue;
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

use crate::support::{assert_entries, Mirror, Server, TIMEOUT};

/// Kill/restart cycles when `ROOMD_CRASH_CYCLES` is not set.
const DEFAULT_CYCLES: usize = 10;

/// New ops each writer pipelines per cycle, back to back without waiting for replies,
/// when `ROOMD_CRASH_OPS` is not set.
const OPS_PER_CYCLE: usize = 32;

/// `ROOMD_CRASH_OPS`, or [`OPS_PER_CYCLE`].
fn ops_per_cycle() -> usize {
    std::env::var("ROOMD_CRASH_OPS")
        .ok()
        .map(|n| n.parse::<usize>().expect("ROOMD_CRASH_OPS is a number"))
        .unwrap_or(OPS_PER_CYCLE)
}

/// Writers `w0`, `w1` speak JSON; `w2`, `w3` speak rkyv.
const WRITERS: usize = 4;

/// The rooms under load: two `state` rooms (per-writer `incr` counters and one `set` key
/// per op id) and a `chat` room (one post per op id, the id as its text).
const ROOMS: [(&str, &str); 3] = [
    ("state:crash-a", "state"),
    ("state:crash-b", "state"),
    ("chat:crash", "chat"),
];

/// The chat room keeps every post up to this many, so the model trims like the server.
const CHAT_HISTORY: usize = 10_000;

/// The kill lands uniformly within a window after the load starts, sized to
/// `KILL_WINDOW_PER_LOAD` times how long the loads take (a running estimate), so that most kills
/// land while ops are in flight and some after every op was acked, on a fast idle machine
/// as on a slow busy one. The window starts at `FIRST_KILL_WINDOW` and stays within
/// `KILL_WINDOW_RANGE`.
const FIRST_KILL_WINDOW: Duration = Duration::from_millis(60);
const KILL_WINDOW_PER_LOAD: f64 = 1.25;
const KILL_WINDOW_RANGE: (Duration, Duration) =
    (Duration::from_millis(2), Duration::from_millis(500));

/// How long a writer may wait for its connection to end once the load started: the kill
/// comes within the window, and a killed server's sockets close at once.
const LOAD_DEADLINE: Duration = Duration::from_secs(10);

/// Acked ops each writer re-sends after a restart, on top of its unacked ones, to check
/// that a re-sent acked id is answered with its original seq.
const ACKED_RESENDS: usize = 2;

#[tokio::test]
async fn crash_loop_loses_no_acked_op_and_applies_resent_ops_once() {
    let cycles = std::env::var("ROOMD_CRASH_CYCLES")
        .ok()
        .map(|n| n.parse::<usize>().expect("ROOMD_CRASH_CYCLES is a number"))
        .unwrap_or(DEFAULT_CYCLES);
    let seed = std::env::var("ROOMD_CRASH_SEED")
        .ok()
        .map(|s| s.parse::<u64>().expect("ROOMD_CRASH_SEED is a number"))
        .unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .expect("the clock is after 1970")
                .as_nanos() as u64
        });
    let started = Instant::now();
    let mut guard = SeedGuard { seed, cycle: 0 };
    eprintln!("crash test: seed {seed} (ROOMD_CRASH_SEED={seed}), {cycles} cycles");
    let mut rng = Rng(seed);

    // More ops than the default burst per connection: none of them is rate limited.
    let raised = ["--op-rate", "1000000", "--op-burst", "1000000"];
    let args: &[&str] = if ops_per_cycle() > OPS_PER_CYCLE {
        &raised
    } else {
        &[]
    };
    let mut server = Server::start(args).await;
    let mut model = Model::create_rooms(&server).await;
    let mut writers: Vec<Writer> = (0..WRITERS).map(|i| Writer::new(i, i >= 2)).collect();
    let mut stats = Stats::default();
    let mut kill_window = FIRST_KILL_WINDOW;

    for cycle in 0..=cycles {
        guard.cycle = cycle;
        // Reconnect (resuming every subscription), re-send what was not acked, check.
        let heads = model.heads_after_restart(&server, &writers).await;
        for writer in &mut writers {
            writer.connect(&server, &model).await;
        }
        let resends: Vec<Vec<Op>> = writers
            .iter()
            .map(|w| w.pick_acked_resends(&mut rng))
            .collect();
        let phases = futures_util::future::join_all(
            writers
                .iter_mut()
                .zip(resends)
                .map(|(w, acked)| w.resend(acked)),
        )
        .await;
        for (writer, acks) in writers.iter_mut().zip(phases) {
            for (op, seq) in acks {
                if seq <= heads[op.room] {
                    stats.applied_before_kill += 1;
                } else {
                    stats.applied_on_resend += 1;
                }
                model.record(&writer.user, op, seq);
            }
        }
        model.verify(&server, &mut writers).await;
        if cycle == cycles {
            break;
        }

        // Load, and kill the server somewhere in the middle of it.
        let window = kill_window;
        let delay = Duration::from_micros(rng.below(window.as_micros() as u64 + 1));
        let batches: Vec<Vec<Op>> = writers.iter_mut().map(|w| w.new_ops(&mut rng)).collect();
        let loads = writers
            .iter_mut()
            .zip(batches)
            .map(|(w, ops)| w.load(ops))
            .collect::<Vec<_>>();
        let kill = async {
            tokio::time::sleep(delay).await;
            server.kill9().await;
        };
        let load_started = Instant::now();
        let (phases, ()) = tokio::join!(futures_util::future::join_all(loads), kill);
        // How long the whole load takes sizes the next window: measured when every op was
        // answered before the kill, else extrapolated from the share acked by then.
        let finished: Option<Vec<Instant>> = phases.iter().map(|(_, done)| *done).collect();
        let n_acked: usize = phases.iter().map(|(acks, _)| acks.len()).sum();
        let load = match finished.and_then(|done| done.into_iter().max()) {
            Some(done) => done.duration_since(load_started),
            None if n_acked * 10 >= WRITERS * ops_per_cycle() => {
                delay.mul_f64((WRITERS * ops_per_cycle()) as f64 / n_acked as f64)
            }
            None => window * 2,
        };
        kill_window = ((kill_window + load.mul_f64(KILL_WINDOW_PER_LOAD)) / 2)
            .clamp(KILL_WINDOW_RANGE.0, KILL_WINDOW_RANGE.1);
        for (writer, (acks, _)) in writers.iter_mut().zip(phases) {
            stats.acked_before_kill += acks.len();
            writer.last_acks.clone_from(&acks);
            for (op, seq) in acks {
                model.record(&writer.user, op, seq);
            }
            stats.unacked_at_kill += writer.pending.len();
        }
        stats.kills += 1;
        let restarting = Instant::now();
        server.restart().await;
        eprintln!(
            "cycle {cycle}: killed after {delay:?} (window {window:?}), restart took {:?}, \
             at {:?}",
            restarting.elapsed(),
            started.elapsed()
        );
    }
    eprintln!(
        "crash test: {} kills in {:?}; {} ops acked before a kill, {} unacked at a kill \
         ({} had been applied, {} applied on re-send)",
        stats.kills,
        started.elapsed(),
        stats.acked_before_kill,
        stats.unacked_at_kill,
        stats.applied_before_kill,
        stats.applied_on_resend,
    );
}

/// Repeats the seed next to a failure (the harness shows stderr of failing tests only).
struct SeedGuard {
    seed: u64,
    cycle: usize,
}

impl Drop for SeedGuard {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "crash test failed in cycle {}: rerun with ROOMD_CRASH_SEED={}",
                self.cycle, self.seed
            );
        }
    }
}

#[derive(Default)]
struct Stats {
    kills: usize,
    acked_before_kill: usize,
    unacked_at_kill: usize,
    applied_before_kill: usize,
    applied_on_resend: usize,
}

/// splitmix64: small, seedable, good enough to pick ops and delays.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What an op does; its entries are derived from it in [`Model::expected_entries`].
#[derive(Clone, Debug)]
enum Change {
    /// `incr` of the writer's counter `ctr/<user>` by this much.
    Incr(i64),
    /// `set` of the key `op/<id>` to the id: present once iff the op applied.
    Set,
    /// A chat `post` whose text is the id.
    Post,
}

#[derive(Clone, Debug)]
struct Op {
    id: String,
    /// Index into [`ROOMS`].
    room: usize,
    change: Change,
}

impl Op {
    fn json_op(&self, user: &str) -> Value {
        match self.change {
            Change::Incr(by) => json!({"type": "incr", "key": format!("ctr/{user}"), "by": by}),
            Change::Set => {
                json!({"type": "set", "key": format!("op/{}", self.id), "value": self.id})
            }
            Change::Post => json!({"type": "post", "text": self.id}),
        }
    }

    fn room_value(&self, user: &str) -> RoomValue {
        let s = |text: &str| RoomValue::Str(text.to_string());
        match self.change {
            Change::Incr(by) => RoomValue::map([
                ("type", s("incr")),
                ("key", s(&format!("ctr/{user}"))),
                ("by", RoomValue::Int(by)),
            ]),
            Change::Set => RoomValue::map([
                ("type", s("set")),
                ("key", s(&format!("op/{}", self.id))),
                ("value", s(&self.id)),
            ]),
            Change::Post => RoomValue::map([("type", s("post")), ("text", s(&self.id))]),
        }
    }
}

/// Everything acked so far, per room: the trivially correct replay the server must match.
struct Model {
    rooms: Vec<RoomModel>,
}

struct RoomModel {
    name: &'static str,
    kind: &'static str,
    epoch: String,
    /// The entries right after creation (seq 1).
    initial: BTreeMap<String, Value>,
    /// Every acked op: (user, op, ack seq).
    acked: Vec<(String, Op, u64)>,
}

impl Model {
    async fn create_rooms(server: &Server) -> Model {
        let mut rooms = Vec::new();
        for (name, kind) in ROOMS {
            let init = if kind == "chat" {
                json!({"history": CHAT_HISTORY})
            } else {
                json!({})
            };
            let response = server
                .post(
                    "/api/rooms",
                    &json!({"room": name, "kind": kind, "init": init}),
                )
                .await;
            assert_eq!(response.status, 201, "create {name}: {}", response.text);
            assert_eq!(response.body["seq"], 1, "{}", response.text);
            let state = server.room_state(name).await;
            assert_eq!(state["epoch"], response.body["epoch"], "{state}");
            rooms.push(RoomModel {
                name,
                kind,
                epoch: state["epoch"].as_str().expect("epoch").to_string(),
                initial: assert_entries(&state["entries"], 1, 1),
                acked: Vec::new(),
            });
        }
        Model { rooms }
    }

    fn room_index(name: &str) -> usize {
        ROOMS
            .iter()
            .position(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("a frame for a room this test never made: {name}"))
    }

    fn record(&mut self, user: &str, op: Op, seq: u64) {
        self.rooms[op.room].acked.push((user.to_string(), op, seq));
    }

    /// The heads right after a restart, checked against what clients saw before the kill:
    /// an ack or a diff leaves the server only once durable, so nothing seen is missing.
    async fn heads_after_restart(&self, server: &Server, writers: &[Writer]) -> Vec<u64> {
        let mut heads = Vec::new();
        for room in &self.rooms {
            let state = server.room_state(room.name).await;
            assert_eq!(
                state["epoch"], room.epoch,
                "{}: the epoch changed across a kill under --durability immediate",
                room.name
            );
            let head = state["seq"].as_u64().expect("room seq");
            let max_acked = room.acked.iter().map(|(_, _, s)| *s).max().unwrap_or(1);
            assert!(
                head >= max_acked,
                "{}: head {head} after restart, but seq {max_acked} was acked before the kill",
                room.name
            );
            for writer in writers {
                if let Some(mirror) = writer.mirrors.get(room.name) {
                    assert!(
                        mirror.seq <= head,
                        "{}: {} saw a diff up to seq {} before the kill, the restarted \
                         server's head is {head}",
                        room.name,
                        writer.user,
                        mirror.seq
                    );
                }
            }
            heads.push(head);
        }
        heads
    }

    /// The entries a replay of the acked ops produces, with the `ver` each must carry.
    fn expected_entries(room: &RoomModel) -> BTreeMap<String, Value> {
        let mut entries = room.initial.clone();
        let mut counters: BTreeMap<&str, (i64, u64)> = BTreeMap::new();
        let mut posts: Vec<(u64, &str, &str)> = Vec::new();
        for (user, op, seq) in &room.acked {
            match op.change {
                Change::Incr(by) => {
                    let counter = counters.entry(user).or_insert((0, 0));
                    counter.0 += by;
                    counter.1 = counter.1.max(*seq);
                }
                Change::Set => {
                    let key = format!("op/{}", op.id);
                    entries.insert(key.clone(), json!({"k": key, "v": op.id, "ver": seq}));
                }
                Change::Post => posts.push((*seq, user, &op.id)),
            }
        }
        for (user, (sum, ver)) in counters {
            let key = format!("ctr/{user}");
            entries.insert(key.clone(), json!({"k": key, "v": sum, "ver": ver}));
        }
        posts.sort();
        let kept = posts.len().saturating_sub(CHAT_HISTORY);
        for (seq, user, text) in &posts[kept..] {
            let key = format!("msg/{seq}");
            // `ts` is the server's clock: any integer matches (see `entries_match`).
            entries.insert(
                key.clone(),
                json!({"k": key, "v": {"user": user, "text": text, "ts": null}, "ver": seq}),
            );
        }
        entries
    }

    /// Checks every room against the model, then every writer's mirror against the room.
    async fn verify(&self, server: &Server, writers: &mut [Writer]) {
        let mut states = Vec::new();
        for room in &self.rooms {
            let state = server.room_state(room.name).await;
            assert_eq!(state["room"], room.name, "{state}");
            assert_eq!(state["kind"], room.kind, "{state}");
            assert_eq!(state["epoch"], room.epoch, "{}: epoch changed", room.name);
            let head = state["seq"].as_u64().expect("room seq");

            // Each acked op is exactly one event, and the events are 1 (create), 2, … head.
            let mut seqs: Vec<u64> = room.acked.iter().map(|(_, _, s)| *s).collect();
            seqs.sort_unstable();
            let twice: Vec<u64> = seqs
                .windows(2)
                .filter(|pair| pair[0] == pair[1])
                .map(|pair| pair[0])
                .collect();
            let duplicates: Vec<&(String, Op, u64)> = room
                .acked
                .iter()
                .filter(|(_, _, s)| twice.contains(s))
                .collect();
            assert!(
                duplicates.is_empty(),
                "{}: several ops acked with the same seq: {duplicates:?}",
                room.name
            );
            let expected: Vec<u64> = (2..=head).collect();
            if seqs != expected {
                let missing: Vec<u64> = expected
                    .iter()
                    .filter(|s| seqs.binary_search(s).is_err())
                    .copied()
                    .collect();
                let beyond: Vec<u64> = seqs.iter().filter(|s| **s > head).copied().collect();
                panic!(
                    "{}: head {head}, {} acked ops: events {missing:?} belong to no acked op \
                     (an op applied twice, or an event nobody sent), acked seqs {beyond:?} \
                     are beyond the head (lost)",
                    room.name,
                    seqs.len()
                );
            }

            let entries = assert_entries(&state["entries"], 1, head);
            let want = Self::expected_entries(room);
            entries_match(
                room.name,
                "GET /api/rooms",
                &entries,
                "the acked ops",
                &want,
            );
            states.push((head, entries));
        }

        // Every client's mirror catches up to the head and then equals the room.
        for writer in writers.iter_mut() {
            writer.catch_up(&states).await;
            for (room, (_, entries)) in self.rooms.iter().zip(&states) {
                let mirror = &writer.mirrors[room.name];
                entries_match(
                    room.name,
                    &format!("{}'s mirror", writer.user),
                    &mirror.entries,
                    "GET /api/rooms",
                    entries,
                );
            }
        }
    }
}

/// Compares two entry maps; a chat `ts` of null on the right side matches any integer.
fn entries_match(
    room: &str,
    left_name: &str,
    left: &BTreeMap<String, Value>,
    right_name: &str,
    right: &BTreeMap<String, Value>,
) {
    let same = |l: &Value, r: &Value| -> bool {
        if r["v"]["ts"].is_null() && r["v"].is_object() {
            let mut l = l.clone();
            let ts_ok = l["v"]["ts"].is_i64();
            if let Some(v) = l["v"].as_object_mut() {
                v.insert("ts".into(), Value::Null);
            }
            ts_ok && l == *r
        } else {
            l == r
        }
    };
    let mut problems = Vec::new();
    for (key, r) in right {
        match left.get(key) {
            None => problems.push(format!("missing {r}")),
            Some(l) if !same(l, r) => problems.push(format!("{l} where {r} was due")),
            Some(_) => {}
        }
    }
    for (key, l) in left {
        if !right.contains_key(key) {
            problems.push(format!("extra {l}"));
        }
    }
    if !problems.is_empty() {
        let shown = problems.len().min(20);
        panic!(
            "{room}: {left_name} differs from {right_name} in {} entries:\n{}",
            problems.len(),
            problems[..shown].join("\n")
        );
    }
}

type Socket = WebSocketStream<TcpStream>;

/// One writing client: its identity and encoding, the ops it has not had acked yet, and
/// its mirror of every room, all of which outlive its connections.
struct Writer {
    user: String,
    rkyv: bool,
    next_op: u64,
    /// Ops made but not acked, in the order they were made; re-sent after a restart.
    pending: Vec<Op>,
    /// The ops acked during the last load, with their seqs (candidates for re-sending).
    last_acks: Vec<(Op, u64)>,
    mirrors: BTreeMap<String, Mirror>,
    sink: Option<SplitSink<Socket, Message>>,
    stream: Option<SplitStream<Socket>>,
}

/// What a writer still expects to hear during one phase.
#[derive(Default)]
struct InFlight {
    /// Per room, the ids awaiting a reply, in send order (replies come in that order).
    queues: BTreeMap<usize, VecDeque<String>>,
    /// The seq a re-sent, already acked id must be answered with.
    expected: HashMap<String, u64>,
    /// Per room, the seq of the latest fresh ack: one connection's ops to one room apply
    /// in send order, so these rise.
    last_seq: BTreeMap<usize, u64>,
    outstanding: usize,
    /// Fresh acks of this phase.
    acked: Vec<(Op, u64)>,
    /// When the last reply came (None while some op is unanswered).
    answered_at: Option<Instant>,
}

/// What the next read produced.
enum Incoming {
    Frame(Value),
    Ended,
}

impl Writer {
    fn new(index: usize, rkyv: bool) -> Writer {
        Writer {
            user: format!("w{index}"),
            rkyv,
            next_op: 0,
            pending: Vec::new(),
            last_acks: Vec::new(),
            mirrors: BTreeMap::new(),
            sink: None,
            stream: None,
        }
    }

    fn encoding(&self) -> &'static str {
        if self.rkyv {
            "rkyv"
        } else {
            "json"
        }
    }

    /// Connects, reads the welcome and subscribes to every room: `resumed` from the
    /// mirror's position when there is one (the epoch never changes here), else a
    /// snapshot.
    async fn connect(&mut self, server: &Server, model: &Model) {
        let protocol = if self.rkyv {
            SUBPROTOCOL_RKYV
        } else {
            SUBPROTOCOL_JSON
        };
        let mut request = server
            .ws_url(&format!("user={}", self.user))
            .into_client_request()
            .expect("a valid ws URL");
        request
            .headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static(protocol));
        let open = async {
            let stream = TcpStream::connect(server.addr).await.expect("TCP connect");
            tokio_tungstenite::client_async(request, stream).await
        };
        let (socket, response) = tokio::time::timeout(TIMEOUT, open)
            .await
            .unwrap_or_else(|_| panic!("{}: handshake took over {TIMEOUT:?}", self.user))
            .unwrap_or_else(|e| panic!("{}: handshake failed: {e}", self.user));
        assert_eq!(
            response.headers().get("Sec-WebSocket-Protocol"),
            Some(&HeaderValue::from_static(protocol)),
            "{}: subprotocol",
            self.user
        );
        let (sink, stream) = socket.split();
        self.sink = Some(sink);
        self.stream = Some(stream);

        let deadline = Instant::now() + TIMEOUT;
        let welcome = self.expect_frame(deadline).await;
        assert_eq!(welcome["t"], "welcome", "{}: {welcome}", self.user);
        assert_eq!(welcome["user"], self.user.as_str(), "{welcome}");

        for (name, _) in ROOMS {
            let since = self.mirrors.get(name).map(|m| (m.epoch.clone(), m.seq));
            let frame = self.sub_frame(name, since);
            self.send(frame).await;
        }
        let mut answered = 0;
        while answered < ROOMS.len() {
            let frame = self.expect_frame(deadline).await;
            let room = frame["room"].as_str().unwrap_or_default().to_string();
            match frame["t"].as_str() {
                Some("resumed") => {
                    let mirror = self.mirrors.get_mut(&room).unwrap_or_else(|| {
                        panic!("{}: resumed a room never subscribed: {frame}", self.user)
                    });
                    // Checks the epoch, and that the catch-up starts right after the mirror.
                    mirror.apply(&frame);
                    answered += 1;
                }
                Some("snapshot") => {
                    assert!(
                        !self.mirrors.contains_key(&room),
                        "{} ({}): resuming {room} after a kill under --durability immediate \
                         must answer resumed, got {frame}",
                        self.user,
                        self.encoding()
                    );
                    let mirror = Mirror::from_snapshot(&frame);
                    assert_eq!(
                        mirror.epoch,
                        model.rooms[Model::room_index(&room)].epoch,
                        "{frame}"
                    );
                    self.mirrors.insert(room, mirror);
                    answered += 1;
                }
                Some("diff") => self.apply_diff(&frame),
                _ => panic!("{}: unexpected frame while subscribing: {frame}", self.user),
            }
        }
    }

    /// A `sub` frame, with `since` when resuming.
    fn sub_frame(&self, room: &str, since: Option<(String, u64)>) -> Message {
        if self.rkyv {
            let since = since.map(|(epoch, seq)| WireSince {
                epoch: u64::from_str_radix(&epoch, 16).expect("a hex epoch"),
                seq,
            });
            let msg = ClientMsg::Sub {
                room: room.to_string(),
                presence: false,
                since,
            };
            Message::binary(binary::encode_client(&msg))
        } else {
            let mut msg = json!({"t": "sub", "room": room});
            if let Some((epoch, seq)) = since {
                msg["since"] = json!({"epoch": epoch, "seq": seq});
            }
            Message::text(msg.to_string())
        }
    }

    fn op_frame(&self, op: &Op) -> Message {
        let room = ROOMS[op.room].0;
        if self.rkyv {
            let msg = ClientMsg::Op {
                id: op.id.clone(),
                room: room.to_string(),
                op: WireValue::from_value(&op.room_value(&self.user)),
            };
            Message::binary(binary::encode_client(&msg))
        } else {
            let msg = json!({"t": "op", "id": op.id, "room": room, "op": op.json_op(&self.user)});
            Message::text(msg.to_string())
        }
    }

    async fn send(&mut self, message: Message) {
        let sink = self.sink.as_mut().expect("connected");
        tokio::time::timeout(TIMEOUT, sink.send(message))
            .await
            .unwrap_or_else(|_| panic!("{}: send took over {TIMEOUT:?}", self.user))
            .unwrap_or_else(|e| panic!("{}: send failed: {e}", self.user));
    }

    /// The next frame, which must come before `deadline` on a live connection.
    async fn expect_frame(&mut self, deadline: Instant) -> Value {
        let stream = self.stream.as_mut().expect("connected");
        match next_frame(stream, self.rkyv, deadline).await {
            Some(Incoming::Frame(frame)) => frame,
            Some(Incoming::Ended) => panic!("{}: the connection ended", self.user),
            None => panic!("{}: no frame before the deadline", self.user),
        }
    }

    fn apply_diff(&mut self, frame: &Value) {
        let room = frame["room"].as_str().unwrap_or_default();
        let mirror = self
            .mirrors
            .get_mut(room)
            .unwrap_or_else(|| panic!("{}: a diff before the sub answer: {frame}", self.user));
        // Checks the epoch and that the diff starts right after the previous one.
        mirror.apply(frame);
    }

    /// Up to `ACKED_RESENDS` ops acked during the last load, to send again.
    fn pick_acked_resends(&self, rng: &mut Rng) -> Vec<Op> {
        let mut picked: Vec<Op> = Vec::new();
        for _ in 0..ACKED_RESENDS.min(self.last_acks.len()) {
            let (op, _) = &self.last_acks[rng.below(self.last_acks.len() as u64) as usize];
            if picked.iter().all(|p| p.id != op.id) {
                picked.push(op.clone());
            }
        }
        picked
    }

    /// Re-sends `acked` (which must be answered with their original seqs) and then every
    /// pending op; returns the fresh acks once every one is answered.
    async fn resend(&mut self, acked: Vec<Op>) -> Vec<(Op, u64)> {
        let mut in_flight = InFlight::default();
        for op in &acked {
            let seq = self
                .last_acks
                .iter()
                .find(|(o, _)| o.id == op.id)
                .map(|(_, s)| *s)
                .expect("picked from the last acks");
            in_flight.expected.insert(op.id.clone(), seq);
        }
        let ops: Vec<Op> = acked.into_iter().chain(self.pending.clone()).collect();
        self.pipeline(ops, in_flight, false).await.acked
    }

    /// [`ops_per_cycle`] new ops, pending until acked.
    fn new_ops(&mut self, rng: &mut Rng) -> Vec<Op> {
        let mut ops = Vec::new();
        for _ in 0..ops_per_cycle() {
            self.next_op += 1;
            let room = rng.below(ROOMS.len() as u64) as usize;
            let change = match (ROOMS[room].1, rng.below(2)) {
                ("chat", _) => Change::Post,
                (_, 0) => Change::Incr(1 + rng.below(3) as i64),
                _ => Change::Set,
            };
            ops.push(Op {
                id: format!("{}-{}", self.user, self.next_op),
                room,
                change,
            });
        }
        self.pending.extend(ops.iter().cloned());
        ops
    }

    /// Pipelines `ops` while reading replies and diffs until the connection ends (the
    /// server is killed meanwhile); returns the acks, and when the last reply came if
    /// every op was answered before the kill.
    async fn load(&mut self, ops: Vec<Op>) -> (Vec<(Op, u64)>, Option<Instant>) {
        let in_flight = self.pipeline(ops, InFlight::default(), true).await;
        (in_flight.acked, in_flight.answered_at)
    }

    /// Sends `ops` back to back while reading. Without `until_end`, returns once every op
    /// is answered (the connection must stay up); with it, reads until the connection ends
    /// and then drops it.
    async fn pipeline(
        &mut self,
        ops: Vec<Op>,
        mut in_flight: InFlight,
        until_end: bool,
    ) -> InFlight {
        let frames: Vec<Message> = ops.iter().map(|op| self.op_frame(op)).collect();
        let mut by_id: HashMap<String, Op> = HashMap::new();
        for op in ops {
            in_flight
                .queues
                .entry(op.room)
                .or_default()
                .push_back(op.id.clone());
            in_flight.outstanding += 1;
            by_id.insert(op.id.clone(), op);
        }
        let mut sink = self.sink.take().expect("connected");
        let mut stream = self.stream.take().expect("connected");
        let rkyv = self.rkyv;

        let user = self.user.clone();
        let send = async {
            for frame in frames {
                if sink.send(frame).await.is_err() {
                    // The server is gone: the rest stay pending.
                    assert!(until_end, "{user}: the connection broke while sending");
                    break;
                }
            }
        };
        let receive = async {
            let deadline = Instant::now() + if until_end { LOAD_DEADLINE } else { TIMEOUT };
            loop {
                if !until_end && in_flight.outstanding == 0 {
                    return;
                }
                match next_frame(&mut stream, rkyv, deadline).await {
                    Some(Incoming::Frame(frame)) => {
                        self.on_reply_or_diff(&frame, &mut in_flight, &by_id)
                    }
                    Some(Incoming::Ended) if until_end => return,
                    Some(Incoming::Ended) => panic!(
                        "{user}: the connection ended with {} ops unanswered",
                        in_flight.outstanding
                    ),
                    None => panic!(
                        "{user}: {} ops unanswered after {:?} ({})",
                        in_flight.outstanding,
                        if until_end { LOAD_DEADLINE } else { TIMEOUT },
                        if until_end {
                            "the killed server's connection did not end"
                        } else {
                            "re-sent ops"
                        }
                    ),
                }
            }
        };
        tokio::join!(send, receive);
        if !until_end {
            self.sink = Some(sink);
            self.stream = Some(stream);
        }
        in_flight
    }

    fn on_reply_or_diff(
        &mut self,
        frame: &Value,
        in_flight: &mut InFlight,
        by_id: &HashMap<String, Op>,
    ) {
        let user = &self.user;
        match frame["t"].as_str() {
            Some("diff") => self.apply_diff(frame),
            Some("ack") => {
                let id = frame["id"].as_str().expect("ack id");
                let seq = frame["seq"].as_u64().expect("ack seq");
                let op = by_id
                    .get(id)
                    .unwrap_or_else(|| panic!("{user}: an ack for an id never sent: {frame}"));
                let queue = in_flight
                    .queues
                    .get_mut(&op.room)
                    .expect("a queue per room");
                assert_eq!(
                    queue.front().map(String::as_str),
                    Some(id),
                    "{user}: replies to one room must come in send order; waiting for \
                     {queue:?}, got {frame}"
                );
                queue.pop_front();
                in_flight.outstanding -= 1;
                if in_flight.outstanding == 0 {
                    in_flight.answered_at = Some(Instant::now());
                }
                if let Some(original) = in_flight.expected.get(id) {
                    assert_eq!(
                        seq, *original,
                        "{user}: a re-sent acked op must get its original ack: {frame}"
                    );
                    return;
                }
                let last = in_flight.last_seq.entry(op.room).or_insert(0);
                assert!(
                    seq > *last,
                    "{user}: ops to one room apply in send order, yet {id} got seq {seq} \
                     after seq {last}"
                );
                *last = seq;
                let at = self
                    .pending
                    .iter()
                    .position(|p| p.id == id)
                    .unwrap_or_else(|| panic!("{user}: {id} acked twice: {frame}"));
                self.pending.remove(at);
                in_flight.acked.push((op.clone(), seq));
            }
            Some("nack") => panic!("{user} ({}): an op was refused: {frame}", self.encoding()),
            _ => panic!("{user}: unexpected frame: {frame}"),
        }
    }

    /// Reads diffs until every mirror reaches its room's head (nothing else may arrive).
    async fn catch_up(&mut self, states: &[(u64, BTreeMap<String, Value>)]) {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let mut behind = false;
            for ((name, _), (head, _)) in ROOMS.iter().zip(states) {
                let seq = self.mirrors[*name].seq;
                assert!(
                    seq <= *head,
                    "{}: mirror of {name} at {seq}, beyond the head {head}",
                    self.user
                );
                behind |= seq < *head;
            }
            if !behind {
                return;
            }
            let frame = self.expect_frame(deadline).await;
            assert_eq!(frame["t"], "diff", "{}: {frame}", self.user);
            self.apply_diff(&frame);
        }
    }
}

/// The next data frame as JSON (rkyv frames are decoded with the published types and
/// written in the JSON vocabulary); `Ended` when the connection is gone; None at the
/// deadline.
async fn next_frame(
    stream: &mut SplitStream<Socket>,
    rkyv: bool,
    deadline: Instant,
) -> Option<Incoming> {
    loop {
        let next = tokio::time::timeout_at(deadline.into(), stream.next())
            .await
            .ok()?;
        let message = match next {
            None | Some(Err(_)) => return Some(Incoming::Ended),
            Some(Ok(message)) => message,
        };
        match message {
            Message::Text(text) if !rkyv => {
                let frame = serde_json::from_str(text.as_str())
                    .unwrap_or_else(|e| panic!("non-JSON text frame {text:?}: {e}"));
                return Some(Incoming::Frame(frame));
            }
            Message::Binary(bytes) if rkyv => {
                let msg = binary::decode_server(&bytes)
                    .unwrap_or_else(|e| panic!("an invalid rkyv frame: {e}"));
                return Some(Incoming::Frame(server_msg_json(msg)));
            }
            Message::Close(_) => return Some(Incoming::Ended),
            Message::Ping(_) | Message::Pong(_) | Message::Frame(_) => continue,
            other => panic!("a frame of the wrong encoding (rkyv: {rkyv}): {other:?}"),
        }
    }
}

/// A decoded rkyv message in the JSON vocabulary, so one mirror and one set of checks
/// serve both encodings.
fn server_msg_json(msg: ServerMsg) -> Value {
    let epoch = |e: u64| format!("{e:016x}");
    match msg {
        ServerMsg::Welcome { user, .. } => json!({"t": "welcome", "user": user}),
        ServerMsg::Snapshot {
            room,
            kind,
            epoch: e,
            seq,
            entries,
            recovered,
        } => json!({"t": "snapshot", "room": room, "kind": kind, "epoch": epoch(e),
                    "seq": seq, "entries": entries_json(&entries), "recovered": recovered}),
        ServerMsg::Resumed {
            room,
            epoch: e,
            from,
            to,
            changes,
        } => json!({"t": "resumed", "room": room, "epoch": epoch(e), "from": from, "to": to,
                    "changes": entries_json(&changes)}),
        ServerMsg::Diff {
            room,
            epoch: e,
            from,
            to,
            changes,
        } => json!({"t": "diff", "room": room, "epoch": epoch(e), "from": from, "to": to,
                    "changes": entries_json(&changes)}),
        ServerMsg::Ack { id, seq } => json!({"t": "ack", "id": id, "seq": seq}),
        ServerMsg::Nack { id, code, msg } => {
            json!({"t": "nack", "id": id, "code": code.as_str(), "msg": msg})
        }
        ServerMsg::Error { code, room, msg } => {
            json!({"t": "error", "code": code.as_str(), "room": room, "msg": msg})
        }
        other => json!({"t": "unexpected", "msg": format!("{other:?}")}),
    }
}

fn entries_json(entries: &[WireEntry]) -> Value {
    entries
        .iter()
        .map(|e| match &e.v {
            Some(v) => {
                let v = v
                    .to_value()
                    .unwrap_or_else(|err| panic!("the server sent a malformed value: {err}"));
                json!({"k": e.k, "v": value_json(&v), "ver": e.ver})
            }
            None => json!({"k": e.k, "ver": e.ver, "del": true}),
        })
        .collect()
}

fn value_json(value: &RoomValue) -> Value {
    match value {
        RoomValue::Null => Value::Null,
        RoomValue::Bool(b) => json!(b),
        RoomValue::Int(n) => json!(n),
        RoomValue::Float(f) => json!(f),
        RoomValue::Str(s) => json!(s),
        RoomValue::Bytes(b) => json!({"$b64": BASE64.encode(b)}),
        RoomValue::List(items) => items.iter().map(value_json).collect(),
        RoomValue::Map(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), value_json(v)))
                .collect(),
        ),
    }
}
