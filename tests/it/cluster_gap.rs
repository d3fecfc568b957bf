//! A node that misses a room's batch on NATS (at-most-once) catches up from the owner
//! before it delivers more: a proxy between one node and nats-server drops a chosen
//! message of the room's subject (`{cluster}.room.{hex id}`), as a lossy network or a
//! slow consumer would, and the subscribers on that node must still see every seq once,
//! in order.
//!
//! The proxy speaks just enough of the NATS client protocol (text control lines, `MSG`
//! and `HMSG` with a byte count) to cut one delivered message out of the server's stream;
//! everything else passes through byte for byte.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::cluster::{owner_of, start_node, Nats};
use crate::support::{Mirror, Server};

/// A TCP proxy to nats-server that drops the next `armed` messages delivered on
/// subjects starting with `prefix`.
struct DroppingProxy {
    addr: SocketAddr,
    armed: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
}

impl DroppingProxy {
    async fn start(upstream: SocketAddr, prefix: &'static str) -> DroppingProxy {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("a loopback port");
        let addr = listener.local_addr().expect("bound");
        let armed = Arc::new(AtomicUsize::new(0));
        let dropped = Arc::new(AtomicUsize::new(0));
        let (a, d) = (armed.clone(), dropped.clone());
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(server) = TcpStream::connect(upstream).await else {
                    continue;
                };
                let (mut client_rx, client_tx) = client.into_split();
                let (server_rx, mut server_tx) = server.into_split();
                tokio::spawn(async move {
                    let _ = tokio::io::copy(&mut client_rx, &mut server_tx).await;
                });
                tokio::spawn(filter(server_rx, client_tx, prefix, a.clone(), d.clone()));
            }
        });
        DroppingProxy {
            addr,
            armed,
            dropped,
        }
    }

    fn url(&self) -> String {
        format!("nats://{}", self.addr)
    }
}

/// Copies the server's stream to the client, cutting out armed messages.
async fn filter(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    prefix: &str,
    armed: Arc<AtomicUsize>,
    dropped: Arc<AtomicUsize>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = match from.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut out = Vec::new();
        // Whole units only: a control line, or a message line with its payload.
        while let Some(eol) = buf.windows(2).position(|w| w == b"\r\n") {
            let line = String::from_utf8_lossy(&buf[..eol]).into_owned();
            let words: Vec<&str> = line.split_whitespace().collect();
            let payload = match words.first().copied() {
                // MSG subject sid [reply] bytes; HMSG subject sid [reply] hdr total.
                Some("MSG") | Some("HMSG") => words
                    .last()
                    .and_then(|n| n.parse::<usize>().ok())
                    .expect("a message line ends with its byte count"),
                _ => {
                    out.extend(buf.drain(..eol + 2));
                    continue;
                }
            };
            let unit = eol + 2 + payload + 2;
            if buf.len() < unit {
                break;
            }
            let drop = words.get(1).is_some_and(|s| s.starts_with(prefix))
                && armed
                    .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                    .is_ok();
            if drop {
                dropped.fetch_add(1, Ordering::SeqCst);
                buf.drain(..unit);
            } else {
                out.extend(buf.drain(..unit));
            }
        }
        if to.write_all(&out).await.is_err() {
            return;
        }
    }
}

fn set(key: &str, value: u64) -> serde_json::Value {
    json!({"type": "set", "key": key, "value": value})
}

#[tokio::test]
async fn a_batch_lost_on_nats_is_caught_up_from_the_owner_before_later_ones() {
    let nats = Nats::start().await;
    let a = start_node(&nats, "a", "a,b").await;
    let proxy = DroppingProxy::start(nats.addr(), "test.room.").await;
    let args = [
        "--cluster-nats",
        &proxy.url(),
        "--node-id",
        "b",
        "--cluster-nodes",
        "a,b",
        "--cluster-name",
        "test",
    ];
    let b = Server::start(&args).await;
    // A room a owns, read by subscribers on b through the room's feed.
    let room = (0..)
        .map(|i| format!("state:lossy-{i}"))
        .find(|room| owner_of(2, room) == 0)
        .expect("some room is a's");
    let mut writer = a.client("writer").await;
    writer.create_ok(&room, "state", json!({})).await;
    let mut watchers = Vec::new();
    for i in 0..3 {
        let mut watcher = b.client(&format!("watcher{i}")).await;
        let mirror = Mirror::from_snapshot(&watcher.sub(&room).await);
        assert_eq!(mirror.seq, 1);
        watchers.push((watcher, mirror));
    }
    // The feed works: seq 2 reaches every watcher.
    writer.ack("one", &room, set("k1", 1)).await;
    for (watcher, mirror) in &mut watchers {
        for diff in watcher.diffs_until(&room, 2).await {
            mirror.apply(&diff);
        }
        assert_eq!(mirror.seq, 2);
    }

    // Seq 3's message is lost on the way to b; seq 4's arrives and shows the gap.
    proxy.armed.store(1, Ordering::SeqCst);
    assert_eq!(writer.ack("two", &room, set("k2", 2)).await, 3);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while proxy.dropped.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy dropped nothing"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(writer.ack("three", &room, set("k3", 3)).await, 4);
    for (watcher, mirror) in &mut watchers {
        // Mirror::apply checks each diff continues the last (from = seq + 1).
        for diff in watcher.diffs_until(&room, 4).await {
            assert_eq!(diff["from"], mirror.seq + 1, "a gap: {diff}");
            mirror.apply(&diff);
        }
        assert_eq!(mirror.seq, 4);
        assert_eq!(mirror.value("k2"), Some(&json!(2)));
        assert_eq!(mirror.value("k3"), Some(&json!(3)));
    }
    assert_eq!(proxy.dropped.load(Ordering::SeqCst), 1);
    // One catch-up on b, for the one room (not one per watcher).
    assert_eq!(b.metric("roomd_cluster_catchups_total").await, 1.0);
    // And the feed goes on after the catch-up.
    assert_eq!(writer.ack("four", &room, set("k4", 4)).await, 5);
    for (watcher, mirror) in &mut watchers {
        for diff in watcher.diffs_until(&room, 5).await {
            mirror.apply(&diff);
        }
        assert_eq!(mirror.value("k4"), Some(&json!(4)));
    }
}
