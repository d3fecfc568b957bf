//! A node's part in moving rooms (`rebalance` has the steps and why they are safe):
//! answering the tool's [`Step`]s on `{cluster}.node.{id}.move`, freezing rooms that
//! leave, exporting them to their new owner, pulling and importing the rooms that
//! arrive, and committing or aborting the new member list.
//!
//! Steps are handled one at a time, in arrival order: a move is a sequence the tool
//! drives, and one node has at most one move pending. The exception is `Export`,
//! asked by another node while this node may be busy pulling; it is answered on a
//! subscription of its own, so two nodes pulling from each other never wait on each
//! other.
//!
//! Memory is bounded by one batch: an export is held encoded only from its first piece
//! to its last, and a pull holds one room at a time.
//!
//! The pending move (its lists, the rooms frozen and imported here) is kept in
//! `DIR/CLUSTER.move` from Begin until the commit or the abort, written before each
//! step is answered. A node restarted in the middle of a move comes back with the same
//! rooms frozen and the move pending, so it never serves a room whose copy another node
//! may be about to serve; the tool's commit or abort then finishes it.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use futures_util::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::membership::Members;
use super::rebalance::{self, Answer, Step};
use super::{Cluster, ClusterError};
use crate::protocol::ids::RoomId;
use crate::room::moving::{Freeze, Holds};
use crate::room::registry::Registry;
use crate::store::{RoomExport, Store};

/// How long a freeze waits for a room's in-flight commits before it gives up.
const FREEZE_TIMEOUT: Duration = Duration::from_secs(20);

/// The file in the data dir that keeps the pending move.
pub const MOVE_FILE: &str = "CLUSTER.move";

/// The pending move as kept in [`MOVE_FILE`].
#[derive(Debug, Serialize, Deserialize)]
struct KeptMove {
    move_id: u64,
    from: Members,
    to: Members,
    frozen: Vec<String>,
    imported: Vec<String>,
}

/// The move this node takes part in.
struct Pending {
    move_id: u64,
    from: Members,
    to: Members,
    /// Rooms leaving this node that are frozen here.
    frozen: HashSet<String>,
    /// Rooms copied here (frozen here too until the commit).
    imported: HashSet<String>,
    /// Encoded exports being sent, by room: from the first piece to the last.
    exports: HashMap<String, Arc<Vec<u8>>>,
}

/// This node's side of moves.
pub struct Mover {
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
    store: Store,
    pending: Mutex<Option<Pending>>,
    /// The last move committed here, so a retried commit is answered as done.
    committed: Mutex<Option<u64>>,
}

/// Starts answering steps (`{cluster}.node.{id}.move`) for as long as the connection
/// lives.
pub async fn serve(
    cluster: Arc<Cluster>,
    registry: Arc<Registry>,
    store: Store,
) -> Result<(), ClusterError> {
    let subject = rebalance::subject(&cluster.settings().name, cluster.node_id());
    // Exports are asked on a subject of their own (see the module docs).
    let export_subject = format!("{subject}.export");
    let mut steps = cluster.client().subscribe(subject).await?;
    let mut exports = cluster.client().subscribe(export_subject).await?;
    cluster.client().flush().await?;
    let mover = Arc::new(Mover {
        cluster,
        registry,
        store,
        pending: Mutex::new(None),
        committed: Mutex::new(None),
    });
    mover.restore();
    let serving = mover.clone();
    actix_rt::spawn(async move {
        while let Some(message) = steps.next().await {
            let answer = match serde_json::from_slice::<Step>(&message.payload) {
                Ok(step) => serving.step(step).await,
                Err(e) => refused(format!("unreadable step: {e}")),
            };
            serving.reply(message.reply, &answer).await;
        }
    });
    actix_rt::spawn(async move {
        while let Some(message) = exports.next().await {
            let answer = match serde_json::from_slice::<Step>(&message.payload) {
                Ok(Step::Export {
                    move_id,
                    room,
                    offset,
                }) => mover.export(move_id, &room, offset).await,
                Ok(_) => refused("only exports are asked here".into()),
                Err(e) => refused(format!("unreadable step: {e}")),
            };
            mover.reply(message.reply, &answer).await;
        }
    });
    Ok(())
}

fn refused(msg: String) -> Answer {
    Answer::Refused { msg }
}

impl Mover {
    /// Takes back a move left pending by the previous process (see the module docs).
    fn restore(&self) {
        let Some(dir) = self.cluster.members().data_dir() else {
            return;
        };
        let path = dir.join(MOVE_FILE);
        let kept = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<KeptMove>(&bytes) {
                Ok(kept) => kept,
                Err(e) => {
                    tracing::error!(path = %path.display(), error = %e, "cluster: unreadable pending move ignored");
                    return;
                }
            },
            Err(_) => return,
        };
        if self.cluster.members().members().nodes == kept.to.nodes {
            // The move was committed (this node started with its list): nothing is
            // pending. Copies of rooms that left stay on disk, never served, and are
            // deleted if one of them moves back here.
            if let Err(msg) = self.keep() {
                tracing::error!("cluster: {msg}");
            }
            return;
        }
        let moving = self.registry.moving();
        for room in kept.frozen.iter().chain(&kept.imported) {
            moving.freeze(room);
        }
        let node = self.node().to_owned();
        let (old, new) = (kept.from.nodes.clone(), kept.to.nodes.clone());
        moving.set_leaving(Some(Arc::new(move |room: &str| {
            rebalance::leaves(room, &node, &old, &new)
        })));
        tracing::warn!(
            node = %self.node(),
            move_id = format_args!("{:016x}", kept.move_id),
            frozen = kept.frozen.len(),
            imported = kept.imported.len(),
            "cluster: a rebalance was pending when this node stopped; its rooms stay frozen until the tool commits or aborts it (`roomd cluster rebalance --abort`)"
        );
        *self.pending.lock() = Some(Pending {
            move_id: kept.move_id,
            from: kept.from,
            to: kept.to,
            frozen: kept.frozen.into_iter().collect(),
            imported: kept.imported.into_iter().collect(),
            exports: HashMap::new(),
        });
    }

    /// Writes the pending move to the data dir (None: removes it). Err: the step must
    /// be refused.
    fn keep(&self) -> Result<(), String> {
        let Some(dir) = self.cluster.members().data_dir() else {
            return Ok(());
        };
        let bytes = self.pending.lock().as_ref().map(|p| {
            let kept = KeptMove {
                move_id: p.move_id,
                from: p.from.clone(),
                to: p.to.clone(),
                frozen: p.frozen.iter().cloned().collect(),
                imported: p.imported.iter().cloned().collect(),
            };
            // Integers and strings: always serializable.
            serde_json::to_vec(&kept).unwrap_or_default()
        });
        let written = match bytes {
            Some(bytes) => super::membership::write_durably(dir, MOVE_FILE, &bytes),
            None => match std::fs::remove_file(dir.join(MOVE_FILE)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        written.map_err(|e| format!("node {} cannot keep the pending move: {e}", self.node()))
    }

    async fn reply(&self, to: Option<async_nats::Subject>, answer: &Answer) {
        if let Some(to) = to {
            let payload = serde_json::to_vec(answer).unwrap_or_default();
            // A lost answer times out at the tool, which aborts the move.
            let _ = self.cluster.client().publish(to, payload.into()).await;
        }
    }

    fn node(&self) -> &str {
        self.cluster.node_id()
    }

    async fn step(&self, step: Step) -> Answer {
        match step {
            Step::Begin { move_id, from, to } => self.begin(move_id, from, to),
            Step::Plan { move_id, after } => self.plan(move_id, after).await,
            Step::Freeze { move_id, rooms } => self.freeze(move_id, rooms).await,
            Step::Export {
                move_id,
                room,
                offset,
            } => self.export(move_id, &room, offset).await,
            Step::Pull {
                move_id,
                from,
                rooms,
            } => self.pull(move_id, &from, rooms).await,
            Step::Verify { move_id } => self.verify(move_id).await,
            Step::Commit { move_id } => self.commit(move_id).await,
            Step::Abort { move_id } => self.abort(move_id).await,
        }
    }

    /// Checks the move's id against the pending one; Err is the refusal.
    fn check_id(&self, move_id: u64) -> Result<(), Answer> {
        match &*self.pending.lock() {
            Some(pending) if pending.move_id == move_id => Ok(()),
            Some(pending) => Err(refused(format!(
                "node {} is in move {:016x}, not {move_id:016x}",
                self.node(),
                pending.move_id
            ))),
            None => Err(refused(format!(
                "node {} has no move {move_id:016x} pending (aborted, or it restarted)",
                self.node()
            ))),
        }
    }

    fn begin(&self, move_id: u64, from: Members, to: Members) -> Answer {
        let mut pending = self.pending.lock();
        if let Some(current) = &*pending {
            if current.move_id == move_id {
                return Answer::Done;
            }
            return refused(format!(
                "node {} is already in move {:016x}; run `roomd cluster rebalance --abort` first",
                self.node(),
                current.move_id
            ));
        }
        let ours = self.cluster.members().members();
        if ours != from {
            return refused(format!(
                "node {} has the member list {} (generation {}), not {} (generation {})",
                self.node(),
                ours.nodes.join(","),
                ours.generation,
                from.nodes.join(","),
                from.generation
            ));
        }
        let node = self.node().to_owned();
        let (old, new) = (from.nodes.clone(), to.nodes.clone());
        self.registry
            .moving()
            .set_leaving(Some(Arc::new(move |room: &str| {
                rebalance::leaves(room, &node, &old, &new)
            })));
        tracing::info!(
            node = %self.node(),
            move_id = format_args!("{move_id:016x}"),
            from = %from.nodes.join(","),
            to = %to.nodes.join(","),
            "cluster: rebalance begins"
        );
        *pending = Some(Pending {
            move_id,
            from,
            to,
            frozen: HashSet::new(),
            imported: HashSet::new(),
            exports: HashMap::new(),
        });
        drop(pending);
        match self.keep() {
            Ok(()) => Answer::Done,
            Err(msg) => refused(msg),
        }
    }

    /// The (from, to) lists of the pending move.
    fn lists(&self, move_id: u64) -> Result<(Vec<String>, Vec<String>), Answer> {
        self.check_id(move_id)?;
        let pending = self.pending.lock();
        let pending = pending.as_ref().ok_or_else(|| refused("no move".into()))?;
        Ok((pending.from.nodes.clone(), pending.to.nodes.clone()))
    }

    /// A page of the rooms leaving this node that are not frozen yet: stored ones, and
    /// on the last page the ones only a running actor holds yet.
    async fn plan(&self, move_id: u64, after: Option<String>) -> Answer {
        let (from, to) = match self.lists(move_id) {
            Ok(lists) => lists,
            Err(refusal) => return refusal,
        };
        let read = self
            .store
            .read_blocking(move |store| {
                store.rooms_page("", after.as_deref(), rebalance::PLAN_PAGE)
            })
            .await;
        let (page, more) = match read {
            Ok(Ok(page)) => page,
            Ok(Err(e)) => return refused(format!("cannot list rooms: {e}")),
            Err(e) => return refused(format!("room list task failed: {e}")),
        };
        let node = self.node();
        let frozen = self
            .pending
            .lock()
            .as_ref()
            .map(|p| p.frozen.clone())
            .unwrap_or_default();
        let leaving =
            |room: &str| rebalance::leaves(room, node, &from, &to) && !frozen.contains(room);
        let mut rooms: Vec<(String, String)> = page
            .iter()
            .filter(|r| leaving(&r.room))
            .filter_map(|r| {
                rebalance::new_owner(&r.room, &to).map(|owner| (r.room.clone(), owner.to_owned()))
            })
            .collect();
        let next = more.then(|| page.last().map(|r| r.room.clone())).flatten();
        if next.is_none() {
            // The last page also names the running rooms that hold a room the store
            // may not list yet: one whose creation was accepted just before Begin and
            // is still being committed (its freeze waits for that commit). A room
            // listed on an earlier page too is named twice; the tool keeps it once.
            for room in self.held(&leaving).await {
                if rooms.iter().all(|(r, _)| *r != room) {
                    if let Some(owner) = rebalance::new_owner(&room, &to) {
                        rooms.push((room, owner.to_owned()));
                    }
                }
            }
        }
        Answer::Rooms { rooms, next }
    }

    /// The rooms whose running actor here holds the room (see [`Holds`]) among those
    /// that pass `leaving`.
    async fn held(&self, leaving: &impl Fn(&str) -> bool) -> Vec<String> {
        let live = self.registry.live_rooms(leaving);
        let asked = live.iter().map(|(_, addr)| addr.send(Holds));
        let answers = futures_util::future::join_all(asked).await;
        live.into_iter()
            .zip(answers)
            // A room stopped meanwhile had nothing in flight: the store has it (or
            // never will), and the next plan's store listing decides.
            .filter(|(_, held)| matches!(held, Ok(true)))
            .map(|((room, _), _)| room.to_string())
            .collect()
    }

    /// Freezes `rooms` here and waits until each actor has stopped.
    async fn freeze(&self, move_id: u64, rooms: Vec<String>) -> Answer {
        let (from, to) = match self.lists(move_id) {
            Ok(lists) => lists,
            Err(refusal) => return refusal,
        };
        if let Some(room) = rooms
            .iter()
            .find(|r| !rebalance::leaves(r, self.node(), &from, &to))
        {
            return refused(format!("room {room} does not leave node {}", self.node()));
        }
        for room in &rooms {
            self.registry.moving().freeze(room);
            if let Some(pending) = self.pending.lock().as_mut() {
                pending.frozen.insert(room.clone());
            }
        }
        if let Err(msg) = self.keep() {
            return refused(msg);
        }
        for room in &rooms {
            if let Err(msg) = self.stop_actor(room).await {
                return refused(msg);
            }
        }
        tracing::info!(node = %self.node(), rooms = rooms.len(), "cluster: rooms frozen and their actors stopped");
        Answer::Done
    }

    /// Stops `room`'s actor here, if one runs (the room must be frozen).
    async fn stop_actor(&self, room: &str) -> Result<(), String> {
        let deadline = Instant::now() + FREEZE_TIMEOUT;
        tracing::debug!(%room, live = self.registry.live(room).is_some(), "cluster: stopping a frozen room's actor");
        while let Some(addr) = self.registry.live(room) {
            if addr.send(Freeze).await.unwrap_or(true) {
                // Stopping: wait for the registry to let go of it.
                tokio::time::sleep(Duration::from_millis(5)).await;
                if self.registry.live(room).is_none() {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "room {room} on node {} still has commits in flight after {FREEZE_TIMEOUT:?}",
                    self.node()
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    }

    /// A piece of a frozen room's export.
    async fn export(&self, move_id: u64, room: &str, offset: u64) -> Answer {
        if let Err(refusal) = self.check_id(move_id) {
            return refusal;
        }
        let cached = {
            let pending = self.pending.lock();
            let Some(pending) = pending.as_ref() else {
                return refused("no move".into());
            };
            if !pending.frozen.contains(room) {
                return refused(format!("room {room} is not frozen on node {}", self.node()));
            }
            pending.exports.get(room).cloned()
        };
        let bytes = match cached {
            Some(bytes) => bytes,
            None => {
                let name = room.to_owned();
                let read = self
                    .store
                    .read_blocking(move |store| {
                        store
                            .export_room(&name)
                            .and_then(|export| export.map(|e| e.encode()).transpose())
                    })
                    .await;
                let bytes = match read {
                    Ok(Ok(Some(bytes))) => Arc::new(bytes),
                    // Gone meanwhile (never here): nothing to copy.
                    Ok(Ok(None)) => Arc::new(Vec::new()),
                    Ok(Err(e)) => return refused(format!("cannot export room {room}: {e}")),
                    Err(e) => return refused(format!("export task failed: {e}")),
                };
                if let Some(pending) = self.pending.lock().as_mut() {
                    pending.exports.insert(room.to_owned(), bytes.clone());
                }
                bytes
            }
        };
        let start = usize::try_from(offset)
            .unwrap_or(usize::MAX)
            .min(bytes.len());
        let end = (start + rebalance::PIECE_BYTES).min(bytes.len());
        if end == bytes.len() {
            // The last piece: a retry exports again (the room is frozen, so alike).
            if let Some(pending) = self.pending.lock().as_mut() {
                pending.exports.remove(room);
            }
        }
        Answer::Piece {
            total: bytes.len() as u64,
            bytes: BASE64.encode(&bytes[start..end]),
        }
    }

    /// Copies `rooms` from `from`, one at a time: all pieces, one checked import, and a
    /// read back.
    async fn pull(&self, move_id: u64, from: &str, rooms: Vec<String>) -> Answer {
        let (_, to) = match self.lists(move_id) {
            Ok(lists) => lists,
            Err(refusal) => return refusal,
        };
        for room in &rooms {
            if rebalance::new_owner(room, &to) != Some(self.node()) {
                return refused(format!("room {room} does not move to node {}", self.node()));
            }
            if RoomId::parse(room).is_err() {
                return refused(format!("room id {room:?} is not valid"));
            }
            // Nothing here may serve it before the commit.
            self.registry.moving().freeze(room);
            if let Some(pending) = self.pending.lock().as_mut() {
                pending.imported.insert(room.clone());
            }
            if let Err(msg) = self.keep() {
                return refused(msg);
            }
            if let Err(msg) = self.pull_one(move_id, from, room).await {
                return refused(msg);
            }
        }
        Answer::Done
    }

    async fn pull_one(&self, move_id: u64, from: &str, room: &str) -> Result<(), String> {
        let cluster = &self.cluster.settings().name;
        let subject = format!("{}.export", rebalance::subject(cluster, from));
        let mut bytes: Vec<u8> = Vec::new();
        loop {
            let step = Step::Export {
                move_id,
                room: room.to_owned(),
                offset: bytes.len() as u64,
            };
            let payload = serde_json::to_vec(&step).unwrap_or_default();
            let request = async_nats::Request::new()
                .payload(payload.into())
                .timeout(Some(rebalance::PIECE_TIMEOUT));
            let reply = self
                .cluster
                .client()
                .send_request(subject.clone(), request)
                .await
                .map_err(|e| format!("room {room}: no export piece from node {from}: {e}"))?;
            match serde_json::from_slice::<Answer>(&reply.payload) {
                Ok(Answer::Piece {
                    total,
                    bytes: piece,
                }) => {
                    if total > crate::store::MAX_EXPORT_BYTES as u64 {
                        return Err(format!("room {room}: an export of {total} bytes"));
                    }
                    let piece = BASE64
                        .decode(piece)
                        .map_err(|e| format!("room {room}: a bad export piece: {e}"))?;
                    if piece.is_empty() && (bytes.len() as u64) < total {
                        return Err(format!("room {room}: an empty piece before the end"));
                    }
                    bytes.extend_from_slice(&piece);
                    if bytes.len() as u64 >= total {
                        break;
                    }
                }
                Ok(Answer::Refused { msg }) => return Err(msg),
                Ok(other) => return Err(format!("room {room}: {other:?} for an export piece")),
                Err(e) => return Err(format!("room {room}: unreadable export piece: {e}")),
            }
        }
        if bytes.is_empty() {
            return Ok(());
        }
        let export = RoomExport::decode(&bytes).map_err(|e| format!("room {room}: {e}"))?;
        if export.room != room {
            return Err(format!("asked for room {room}, got {}", export.room));
        }
        let (head, meta) = (export.head, export.meta.clone());
        self.delete_stale_copy(room).await?;
        let written = match self.store.submit_import(export) {
            Ok(rx) => rx.await.unwrap_or_else(|_| {
                Err(crate::store::StoreError::ShutDown {
                    path: self.store.db_path().to_owned(),
                })
            }),
            Err(e) => return Err(format!("room {room}: cannot import now: {e}")),
        };
        written.map_err(|e| format!("node {}: {e}", self.node()))?;
        let name = room.to_owned();
        let loaded = self
            .store
            .read_blocking(move |store| store.load_room(&name))
            .await;
        match loaded {
            Ok(Ok(Some(loaded))) if loaded.head == head && loaded.meta == meta => Ok(()),
            Ok(Ok(_)) => Err(format!(
                "room {room} on node {} does not read back as imported",
                self.node()
            )),
            Ok(Err(e)) => Err(format!("room {room} does not read back: {e}")),
            Err(e) => Err(format!("read-back task failed: {e}")),
        }
    }

    /// Deletes this node's rows of `room`, if it has any. They are stale: this node
    /// does not own the room under the list in force (the room is arriving), so they are
    /// left from an earlier life here (moved away, or copied by a move that was rolled
    /// back while this node was unreachable), and nothing serves them.
    async fn delete_stale_copy(&self, room: &str) -> Result<(), String> {
        let name = room.to_owned();
        let listed = self
            .store
            .read_blocking(move |store| store.rooms_page(&name, None, 1))
            .await;
        let exists = match listed {
            Ok(Ok((rooms, _))) => rooms.first().is_some_and(|r| r.room == room),
            Ok(Err(e)) => return Err(format!("room {room}: cannot look for a stale copy: {e}")),
            Err(e) => return Err(format!("room {room}: lookup task failed: {e}")),
        };
        if !exists {
            return Ok(());
        }
        tracing::warn!(node = %self.node(), %room, "cluster: deleting a stale copy of an arriving room");
        match self.store.submit_delete(room) {
            Ok(rx) => match rx.await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("room {room}: cannot delete a stale copy: {e}")),
                Err(_) => Err(format!("room {room}: the store stopped")),
            },
            Err(e) => Err(format!("room {room}: cannot delete a stale copy now: {e}")),
        }
    }

    /// Checks that every room leaving this node (stored, or held by a running actor) is
    /// frozen.
    async fn verify(&self, move_id: u64) -> Answer {
        let mut after = None;
        loop {
            match self.plan(move_id, after).await {
                Answer::Rooms { rooms, .. } if !rooms.is_empty() => {
                    return refused(format!(
                        "node {} has rooms leaving it that were not moved: {}",
                        self.node(),
                        rooms
                            .iter()
                            .map(|(r, _)| r.as_str())
                            .collect::<Vec<_>>()
                            .join(",")
                    ))
                }
                Answer::Rooms {
                    next: Some(next), ..
                } => after = Some(next),
                Answer::Rooms { next: None, .. } => return Answer::Done,
                other => return other,
            }
        }
    }

    /// Puts the new list in force (kept in the data dir first), then lets go of the
    /// rooms that left (their copies here are deleted) and serves those that arrived.
    async fn commit(&self, move_id: u64) -> Answer {
        let to = {
            let pending = self.pending.lock();
            match &*pending {
                Some(p) if p.move_id == move_id => p.to.clone(),
                // Committed already (a retried commit): done.
                None if *self.committed.lock() == Some(move_id) => return Answer::Done,
                _ => return self.check_id(move_id).err().unwrap_or(Answer::Done),
            }
        };
        if let Err(e) = self.cluster.members().commit(to.clone()) {
            return refused(format!(
                "node {} cannot keep the new member list: {e}",
                self.node()
            ));
        }
        *self.committed.lock() = Some(move_id);
        let Some(pending) = self.pending.lock().take() else {
            return Answer::Done;
        };
        if let Err(msg) = self.keep() {
            // The list is committed; a leftover file is taken back as a pending move at
            // the next start, where the tool's --abort finds nothing to undo here.
            tracing::error!("cluster: {msg}");
        }
        self.registry.moving().set_leaving(None);
        tracing::info!(
            node = %self.node(),
            generation = to.generation,
            members = %to.nodes.join(","),
            left = pending.frozen.len(),
            arrived = pending.imported.len(),
            "cluster: rebalance committed; the new member list is in force"
        );
        for room in &pending.imported {
            // Nothing served it here, but an actor may have looked it up meanwhile.
            let _ = self.stop_actor(room).await;
            self.registry.moving().thaw(room);
        }
        let registry = self.registry.clone();
        let store = self.store.clone();
        let node = self.node().to_owned();
        let left: Vec<String> = pending.frozen.into_iter().collect();
        // The copies of the rooms that left are deleted in the background, one at a
        // time; they stay frozen here until theirs is gone.
        actix_rt::spawn(async move {
            for room in left {
                let deleted = match store.submit_delete(&room) {
                    Ok(rx) => matches!(rx.await, Ok(Ok(()))),
                    Err(_) => false,
                };
                if deleted {
                    registry.moving().thaw(&room);
                } else {
                    tracing::error!(%node, %room, "cluster: cannot delete the copy of a room that moved away; it stays frozen here");
                }
            }
        });
        Answer::Done
    }

    /// Forgets the pending move: rooms frozen here serve again, copies imported here
    /// are deleted.
    async fn abort(&self, move_id: Option<u64>) -> Answer {
        let pending = {
            let mut pending = self.pending.lock();
            match &*pending {
                Some(p) if move_id.is_none_or(|id| id == p.move_id) => pending.take(),
                _ => None,
            }
        };
        let Some(pending) = pending else {
            return Answer::Done;
        };
        if let Err(msg) = self.keep() {
            return refused(msg);
        }
        self.registry.moving().set_leaving(None);
        for room in &pending.frozen {
            self.registry.moving().thaw(room);
        }
        let mut failed = Vec::new();
        for room in &pending.imported {
            let _ = self.stop_actor(room).await;
            let deleted = match self.store.submit_delete(room) {
                Ok(rx) => matches!(rx.await, Ok(Ok(()))),
                Err(_) => false,
            };
            if deleted {
                self.registry.moving().thaw(room);
            } else {
                failed.push(room.clone());
            }
        }
        tracing::warn!(
            node = %self.node(),
            move_id = format_args!("{:016x}", pending.move_id),
            "cluster: rebalance aborted; the old member list stays in force"
        );
        if failed.is_empty() {
            Answer::Done
        } else {
            refused(format!(
                "node {} cannot delete its copies of {}; they stay frozen here",
                self.node(),
                failed.join(",")
            ))
        }
    }
}
