//! `--trusted-proxies`: `X-Forwarded-For` / `Forwarded` name the client for the per-IP
//! caps only when the TCP peer is a trusted proxy; from anyone else they are ignored.
//! Every connection here comes from 127.0.0.1; the headers play the proxy's part.

use crate::support::{Connect, Server};

/// Opens `(header, value)` connections in order and returns each one's close code, if
/// it was refused (4429) instead of welcomed.
async fn outcomes(server: &Server, headers: &[(&str, &str)]) -> Vec<Option<u16>> {
    let mut open = Vec::new();
    let mut codes = Vec::new();
    for (name, value) in headers {
        let mut client = Connect::new()
            .user("u")
            .header(name, value)
            .handshake(server)
            .await
            .expect("the upgrade itself succeeds");
        let first = client.next_event(crate::support::TIMEOUT).await;
        match first {
            crate::support::Event::Json(v) if v["t"] == "welcome" => codes.push(None),
            crate::support::Event::Close(code) => codes.push(code),
            other => panic!("expected welcome or close, got {other:?}"),
        }
        open.push(client);
    }
    codes
}

#[tokio::test]
async fn forwarded_addresses_count_per_client_behind_a_trusted_proxy() {
    let server = Server::start(&[
        "--max-conns-per-ip",
        "1",
        "--trusted-proxies",
        "10.0.0.0/8,127.0.0.1",
    ])
    .await;
    let codes = outcomes(
        &server,
        &[
            ("X-Forwarded-For", "203.0.113.1"),
            ("X-Forwarded-For", "203.0.113.2"),
            ("Forwarded", "for=\"[2001:db8::7]:443\""),
            // A client-forged address left of a real one does not help it.
            ("X-Forwarded-For", "198.51.100.1, 203.0.113.1"),
        ],
    )
    .await;
    assert_eq!(codes, vec![None, None, None, Some(4429)]);
}

#[tokio::test]
async fn forwarding_headers_from_an_untrusted_peer_are_ignored() {
    let server = Server::start(&["--max-conns-per-ip", "1"]).await;
    let codes = outcomes(
        &server,
        &[
            ("X-Forwarded-For", "203.0.113.1"),
            ("X-Forwarded-For", "203.0.113.2"),
        ],
    )
    .await;
    assert_eq!(codes, vec![None, Some(4429)], "both count as 127.0.0.1");
}
