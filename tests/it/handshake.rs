//! The WebSocket upgrade and the first frame: welcome fields, subprotocol selection,
//! Origin checks and identities without auth.

use serde_json::json;

use crate::support::{Connect, Event, Server, TIMEOUT};

#[tokio::test]
async fn welcome_carries_protocol_session_user_and_default_limits() {
    let server = Server::start(&[]).await;
    let client = server.client("alice").await;
    let welcome = &client.welcome;
    assert_eq!(welcome["t"], "welcome");
    assert_eq!(welcome["proto"], 1);
    assert_eq!(welcome["user"], "alice");
    assert_eq!(welcome["heartbeat_ms"], 15000);
    assert_eq!(welcome["max_frame"], 65536);
    let session = welcome["session"].as_str().expect("session is a string");
    assert!(!session.is_empty(), "session id must not be empty");
}

#[tokio::test]
async fn welcome_reports_configured_heartbeat_and_max_frame() {
    let server = Server::start(&["--heartbeat", "2s", "--max-frame", "4096"]).await;
    let client = server.client("bob").await;
    assert_eq!(client.welcome["heartbeat_ms"], 2000);
    assert_eq!(client.welcome["max_frame"], 4096);
}

#[tokio::test]
async fn every_connection_gets_its_own_session_id() {
    let server = Server::start(&[]).await;
    let first = server.client("alice").await;
    let second = server.client("alice").await;
    assert_eq!(first.welcome["user"], second.welcome["user"]);
    assert_ne!(first.welcome["session"], second.welcome["session"]);
}

#[tokio::test]
async fn connection_without_user_gets_a_distinct_generated_guest_id() {
    let server = Server::start(&[]).await;
    let first = Connect::new().connect(&server).await;
    let second = Connect::new().connect(&server).await;
    let first_user = first.welcome["user"].as_str().expect("guest user id");
    let second_user = second.welcome["user"].as_str().expect("guest user id");
    assert!(!first_user.is_empty());
    assert_ne!(
        first_user, second_user,
        "two guests must not share an identity"
    );
}

#[tokio::test]
async fn no_subprotocol_offered_means_json_text_frames() {
    let server = Server::start(&[]).await;
    let mut client = Connect::new().user("alice").connect(&server).await;
    assert_eq!(
        client.subprotocol, None,
        "no subprotocol may be selected when none is offered"
    );
    // The welcome already parsed as JSON text; a request is answered in JSON too.
    client.create_ok("json-default", "chat", json!({})).await;
}

#[tokio::test]
async fn offering_the_json_subprotocol_selects_it() {
    let server = Server::start(&[]).await;
    let client = Connect::new()
        .user("alice")
        .subprotocols("roomd.v1.json")
        .connect(&server)
        .await;
    assert_eq!(client.subprotocol.as_deref(), Some("roomd.v1.json"));
    assert_eq!(client.welcome["user"], "alice");
}

#[tokio::test]
async fn json_is_selected_from_a_list_that_also_offers_foreign_protocols() {
    let server = Server::start(&[]).await;
    let client = Connect::new()
        .user("alice")
        .subprotocols("chat.example, roomd.v1.json")
        .connect(&server)
        .await;
    assert_eq!(client.subprotocol.as_deref(), Some("roomd.v1.json"));
}

#[tokio::test]
async fn offering_the_rkyv_subprotocol_gets_binary_frames() {
    let server = Server::start(&[]).await;
    let mut client = Connect::new()
        .user("alice")
        .subprotocols("roomd.v1.rkyv")
        .handshake(&server)
        .await
        .expect("the rkyv subprotocol is accepted");
    assert_eq!(client.subprotocol.as_deref(), Some("roomd.v1.rkyv"));
    match client.next_event(TIMEOUT).await {
        Event::Binary(bytes) => assert!(!bytes.is_empty(), "the welcome archive is not empty"),
        other => panic!("rkyv sessions speak binary frames, got {other:?}"),
    }
}

#[tokio::test]
async fn offering_only_foreign_subprotocols_is_refused_with_400() {
    let server = Server::start(&[]).await;
    let result = Connect::new()
        .user("alice")
        .subprotocols("chat.example, mqtt")
        .handshake(&server)
        .await;
    assert_eq!(result.err(), Some(400));
}

#[tokio::test]
async fn upgrade_from_a_foreign_origin_is_refused_with_403() {
    let server = Server::start(&[]).await;
    let result = Connect::new()
        .user("alice")
        .origin("http://evil.example")
        .handshake(&server)
        .await;
    assert_eq!(result.err(), Some(403));
}

#[tokio::test]
async fn upgrade_from_an_origin_matching_the_host_is_allowed() {
    let server = Server::start(&[]).await;
    let origin = format!("http://{}", server.host());
    let client = Connect::new()
        .user("alice")
        .origin(&origin)
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], "alice");
}

#[tokio::test]
async fn upgrade_from_a_listed_origin_is_allowed_and_others_still_refused() {
    let server = Server::start(&[
        "--allowed-origins",
        "https://app.example,https://admin.example",
    ])
    .await;
    let client = Connect::new()
        .user("alice")
        .origin("https://admin.example")
        .connect(&server)
        .await;
    assert_eq!(client.welcome["user"], "alice");
    let refused = Connect::new()
        .user("alice")
        .origin("https://other.example")
        .handshake(&server)
        .await;
    assert_eq!(refused.err(), Some(403));
}

#[tokio::test]
async fn upgrade_without_origin_is_allowed_even_with_an_allow_list() {
    let server = Server::start(&["--allowed-origins", "https://app.example"]).await;
    let client = Connect::new().user("carol").connect(&server).await;
    assert_eq!(client.welcome["user"], "carol");
}

/// The server's end of the client's connection, duplicated into this process with
/// pidfd_getfd (the test runs as root or as the server's user, which ptrace allows).
fn server_socket_of(server: &Server, client_addr: std::net::SocketAddr) -> std::os::fd::OwnedFd {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: plain syscalls; every returned fd is owned exactly once below.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, server.pid(), 0) };
    assert!(
        pidfd >= 0,
        "pidfd_open: {}",
        std::io::Error::last_os_error()
    );
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd as i32) };
    let fds = std::fs::read_dir(format!("/proc/{}/fd", server.pid())).expect("/proc/PID/fd");
    for entry in fds {
        let Ok(n) = entry
            .expect("a /proc fd entry")
            .file_name()
            .to_string_lossy()
            .parse::<i32>()
        else {
            continue;
        };
        use std::os::fd::AsRawFd;
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), n, 0) };
        if fd < 0 {
            let err = std::io::Error::last_os_error();
            // The fd closed meanwhile (EBADF); anything else means we cannot look.
            assert_eq!(err.raw_os_error(), Some(libc::EBADF), "pidfd_getfd: {err}");
            continue;
        }
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        let peer = socket2::SockRef::from(&fd)
            .peer_addr()
            .ok()
            .and_then(|a| a.as_socket());
        if peer == Some(client_addr) {
            return fd;
        }
    }
    panic!("no socket of the server is connected to {client_addr}");
}

/// Diffs are small frames: with Nagle's algorithm on, one sent while the previous is
/// unacknowledged waits for the client's delayed ACK (about 40 ms on Linux), which put
/// the fan-out p90 at 37 ms with 100 subscribers. Every WebSocket socket has it off.
#[tokio::test]
async fn server_sockets_send_without_nagle_delay() {
    let server = Server::start(&[]).await;
    let client = server.client("alice").await;
    let socket = server_socket_of(&server, client.local_addr());
    let nodelay = socket2::SockRef::from(&socket)
        .tcp_nodelay()
        .expect("TCP_NODELAY is readable");
    assert!(nodelay, "the server's socket has Nagle's algorithm on");
}
