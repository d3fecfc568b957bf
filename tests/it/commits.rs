//! When an op commits: a room whose batches are small sends its next op to the store
//! writer at once, behind the batch being committed, so the op joins the next commit
//! instead of waiting for the room to hear of the one running (README, "Where the
//! contract is silent", "Commit pipeline").
//!
//! Every group commit is held `D` (the test hook `ROOMD_TEST_COMMIT_DELAY_MS`), which
//! makes the order of commits visible in the acks' arrival times: acks of one commit
//! arrive together, acks of consecutive commits `D` apart.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::support::{Client, Server};

const D: Duration = Duration::from_millis(400);

/// Room `a` takes op `a1` (a commit starts: group 1 holds `a1`), then room `b` takes
/// `b1` and room `a` takes `a2` while `a1` is still being committed. `b1` is queued for
/// the next commit; `a2` must join it (group 2), not wait for `a1`'s answer and then for
/// a third commit.
#[tokio::test]
async fn a_quiet_rooms_next_op_joins_the_next_commit_behind_the_one_running() {
    let delay = D.as_millis().to_string();
    let server =
        Server::start_with_env(&[], &[("ROOMD_TEST_COMMIT_DELAY_MS", delay.as_str())]).await;
    let mut alice = server.client("alice").await;
    let mut bob = server.client("bob").await;
    alice.create_ok("state:pipe-a", "state", json!({})).await;
    bob.create_ok("state:pipe-b", "state", json!({})).await;

    let set = |v: u64| json!({"type": "set", "key": "k", "value": v});
    alice.send_op("a1", "state:pipe-a", set(1)).await;
    tokio::time::sleep(D / 4).await;
    bob.send_op("b1", "state:pipe-b", set(1)).await;
    tokio::time::sleep(D / 8).await;
    alice.send_op("a2", "state:pipe-a", set(2)).await;

    let a1 = acked_at(&mut alice, "a1", 2).await;
    let (b1, a2) = tokio::join!(acked_at(&mut bob, "b1", 2), acked_at(&mut alice, "a2", 3));
    assert!(
        b1 >= a1 + D / 2,
        "b1 commits after a1's commit: a1 at {a1:?}, b1 at {b1:?}"
    );
    let apart = if a2 > b1 { a2 - b1 } else { b1 - a2 };
    assert!(
        apart < D / 2,
        "a2 commits with b1 (acks {apart:?} apart), not one commit later: \
         a1 at {a1:?}, b1 at {b1:?}, a2 at {a2:?}"
    );
}

/// Waits for `id`'s ack, which must carry `seq`; when it arrived.
async fn acked_at(client: &mut Client, id: &str, seq: u64) -> Instant {
    let reply = client.reply(id).await;
    let at = Instant::now();
    assert_eq!(reply["t"], "ack", "{id}: {reply}");
    assert_eq!(reply["seq"], seq, "{id}: {reply}");
    at
}
