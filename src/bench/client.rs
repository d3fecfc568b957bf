//! WebSocket connections of the generator: plain TCP (loopback or `--url`), optionally
//! from a chosen source address, upgraded with tokio-tungstenite.
//!
//! Buffers are sized for thousands of connections: tungstenite's default read buffer
//! (128 KiB, allocated up front) would cost the generator gigabytes at 50,000
//! connections, so each connection asks for what its scenario needs.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};
use tokio_tungstenite::WebSocketStream;

use super::BenchError;

pub type Ws = WebSocketStream<TcpStream>;

/// How long one setup step (connect, upgrade, one reply) may take.
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(30);

/// Connection options: buffer sizes and the source address.
#[derive(Clone, Copy, Debug)]
pub struct ConnectOptions {
    /// Initial read buffer; grows when a frame needs more.
    pub read_buffer: usize,
    /// Bytes buffered by `feed` before they are written; 0 writes every frame at once.
    pub write_buffer: usize,
    /// Local address to bind before connecting (None: the kernel picks).
    pub source: Option<IpAddr>,
    /// The `Sec-WebSocket-Protocol` offered (None: none, which the server takes as JSON).
    pub subprotocol: Option<&'static str>,
}

impl ConnectOptions {
    /// Small buffers for connections that mostly receive short frames.
    pub fn receiver() -> ConnectOptions {
        ConnectOptions {
            read_buffer: 8 * 1024,
            write_buffer: 0,
            source: None,
            subprotocol: None,
        }
    }

    /// Large buffers for a connection that pipelines many frames each way.
    pub fn sender() -> ConnectOptions {
        ConnectOptions {
            read_buffer: 64 * 1024,
            write_buffer: 64 * 1024,
            source: None,
            subprotocol: None,
        }
    }
}

/// Connects to `addr` and upgrades with `url` (which names the same server).
pub async fn connect(
    addr: SocketAddr,
    url: &str,
    options: ConnectOptions,
) -> Result<Ws, BenchError> {
    let attempt = async {
        let socket = match addr {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| e.to_string())?;
        if let Some(source) = options.source {
            defer_port_choice(&socket);
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| format!("binding source address {source}: {e}"))?;
        }
        let stream = socket.connect(addr).await.map_err(|e| e.to_string())?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let config = WebSocketConfig::default()
            .read_buffer_size(options.read_buffer)
            .write_buffer_size(options.write_buffer);
        let mut request = url.into_client_request().map_err(|e| e.to_string())?;
        if let Some(subprotocol) = options.subprotocol {
            request.headers_mut().insert(
                "Sec-WebSocket-Protocol",
                subprotocol
                    .parse()
                    .map_err(|_| "bad subprotocol".to_string())?,
            );
        }
        let (ws, _response) =
            tokio_tungstenite::client_async_with_config(request, stream, Some(config))
                .await
                .map_err(|e| e.to_string())?;
        Ok::<Ws, String>(ws)
    };
    match tokio::time::timeout(SETUP_TIMEOUT, attempt).await {
        Ok(Ok(ws)) => Ok(ws),
        Ok(Err(reason)) => Err(BenchError::Connect {
            url: url.to_string(),
            reason,
        }),
        Err(_) => Err(BenchError::Timeout(
            SETUP_TIMEOUT,
            format!("connecting {url}"),
        )),
    }
}

/// Lets the kernel pick the source port at `connect` (with the whole 4-tuple in hand)
/// instead of at `bind`. Without this, every `bind(ip, 0)` scans the ports already bound
/// on that address: measured at ~600 µs of generator CPU per connection by 19,500
/// connections (`inet_bhash2_conflict` on top of `perf`), more than the server spent.
fn defer_port_choice(socket: &TcpSocket) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from `on`, which outlives the
    // call; the fd belongs to `socket`. Failure (an old kernel) only costs speed.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The next text frame during setup, skipping control and binary frames.
pub async fn next_text(ws: &mut Ws, waiting_for: &str) -> Result<Utf8Bytes, BenchError> {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Text(text))) => return Ok(text),
                Some(Ok(Message::Close(frame))) => {
                    return Err(BenchError::Protocol(format!(
                        "the server closed the connection ({}) while the bench waited for {waiting_for}",
                        close_reason(frame.as_ref())
                    )))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(BenchError::Protocol(format!(
                        "connection failed while waiting for {waiting_for}: {e}"
                    )))
                }
                None => {
                    return Err(BenchError::Protocol(format!(
                        "connection ended while waiting for {waiting_for}"
                    )))
                }
            }
        }
    };
    tokio::time::timeout(SETUP_TIMEOUT, read)
        .await
        .map_err(|_| BenchError::Timeout(SETUP_TIMEOUT, format!("waiting for {waiting_for}")))?
}

/// The next binary frame during setup, decoded as a server message (`roomd.v1.rkyv`),
/// skipping control and text frames.
pub async fn next_binary(
    ws: &mut Ws,
    waiting_for: &str,
) -> Result<crate::protocol::message::ServerMsg, BenchError> {
    let read = async {
        loop {
            match ws.next().await {
                Some(Ok(Message::Binary(bytes))) => {
                    return crate::protocol::binary::decode_server(&bytes).map_err(|e| {
                        BenchError::Protocol(format!("{waiting_for}: {}", e.0))
                    })
                }
                Some(Ok(Message::Close(frame))) => {
                    return Err(BenchError::Protocol(format!(
                        "the server closed the connection ({}) while the bench waited for {waiting_for}",
                        close_reason(frame.as_ref())
                    )))
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => {
                    return Err(BenchError::Protocol(format!(
                        "connection failed while waiting for {waiting_for}: {e}"
                    )))
                }
                None => {
                    return Err(BenchError::Protocol(format!(
                        "connection ended while waiting for {waiting_for}"
                    )))
                }
            }
        }
    };
    tokio::time::timeout(SETUP_TIMEOUT, read)
        .await
        .map_err(|_| BenchError::Timeout(SETUP_TIMEOUT, format!("waiting for {waiting_for}")))?
}

/// Sends one text frame during setup.
pub async fn send_text(ws: &mut Ws, text: String, what: &'static str) -> Result<(), BenchError> {
    ws.send(Message::text(text))
        .await
        .map_err(|e| BenchError::Send {
            what,
            reason: e.to_string(),
        })
}

/// `code reason` of a close frame, for messages.
pub fn close_reason(
    frame: Option<&tokio_tungstenite::tungstenite::protocol::CloseFrame>,
) -> String {
    match frame {
        Some(frame) => format!("close {} {}", u16::from(frame.code), frame.reason),
        None => "close without a code".to_string(),
    }
}

/// The source address of connection `index` when each address carries at most
/// `per_source` connections: 127.0.0.2, 127.0.0.3, … (all of 127/8 is loopback on Linux,
/// and each address has its own range of ~28,000 ephemeral ports).
pub fn loopback_source(index: usize, per_source: usize) -> IpAddr {
    let n = 2 + (index / per_source.max(1)) as u32;
    let [_, b, c, d] = n.to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, b, c, d))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_step_through_loopback() {
        assert_eq!(loopback_source(0, 20_000).to_string(), "127.0.0.2");
        assert_eq!(loopback_source(19_999, 20_000).to_string(), "127.0.0.2");
        assert_eq!(loopback_source(20_000, 20_000).to_string(), "127.0.0.3");
        assert_eq!(loopback_source(254, 1).to_string(), "127.0.1.0");
    }
}
