//! roomd: durable, authoritative real-time rooms over WebSocket.
//!
//! CODEMAP (TO BE EXPANDED)

pub mod auth;
pub mod bench;
pub mod client;
pub mod config;
pub mod http;
pub mod log_tool;
pub mod protocol;
pub mod room;
pub mod server;
pub mod session;
pub mod store;
pub mod value;
