//! The `roomd` binary: flags -> `Config` -> `server::run`. The only place for anyhow.

use std::io::Write;

use anyhow::Context;
use clap::{Parser, Subcommand};

use roomd::config::ServeArgs;

/// roomd: durable, authoritative real-time rooms over WebSocket.
///
/// `roomd` with no arguments serves on 127.0.0.1:8080 with its data in ./data (auth off,
/// loopback only). `roomd serve [FLAGS]` is the full form; the flags below work with or
/// without `serve`. Every flag can also come from the ROOMD_* environment variable named
/// next to it; a flag on the command line wins.
#[derive(Parser)]
#[command(
    name = "roomd",
    version,
    about,
    long_about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,

    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand)]
#[allow(clippy::large_enum_variant)] // Parsed once at startup: its size costs nothing.
enum Command {
    /// Serve rooms over WebSocket and HTTP (what `roomd` alone does).
    Serve(ServeArgs),
    /// Load generator: starts its own server (or measures `--url`) and reports
    /// throughput, latency and the server's cost (`roomd bench fanout --help`).
    Bench(roomd::bench::BenchArgs),
    /// Inspect and maintain the data dir of a stopped server: rooms, show, verify, compact.
    Log(roomd::log_tool::LogArgs),
    /// Mint a development token from the server's key:
    /// `roomd token --sub alice --read 'chat:*' --write chat:general --ttl 1h`.
    Token(roomd::token_tool::TokenArgs),
}

/// Binds with a listen backlog of 4096: `std::net::TcpListener::bind` listens with 128,
/// which overflowed (1 s SYN retries) in a connect storm of 19,500 clients.
fn listen(addr: std::net::SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket.into())
}

fn main() {
    if let Err(e) = serve() {
        eprintln!("roomd: error: {e:#}");
        std::process::exit(1);
    }
}

fn serve() -> anyhow::Result<()> {
    // A `--config` file becomes ROOMD_* variables for the settings the environment does
    // not set, so clap ranks them: flag > environment > file > default. Done first, while
    // the process has one thread (setting variables is not thread-safe).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(path) = roomd::config::config_file_named(&argv) {
        for (name, value) in roomd::config::config_file_env(&path)? {
            std::env::set_var(name, value);
        }
    }
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Bench(args)) => return Ok(roomd::bench::run(args)?),
        Some(Command::Log(args)) => return Ok(roomd::log_tool::run(args)?),
        Some(Command::Token(args)) => return Ok(roomd::token_tool::run(args)?),
        None => cli.serve,
    };
    {
        use tracing_subscriber::layer::SubscriberExt;
        use tracing_subscriber::util::SubscriberInitExt;
        use tracing_subscriber::Layer;
        let filter = tracing_subscriber::EnvFilter::try_new(&args.log)
            .with_context(|| format!("bad --log filter `{}`", args.log))?;
        // actix-http logs every request it could not parse at ERROR; those go to a
        // once-a-minute summary instead (see `roomd::peer_errors`).
        let output = match args.log_format {
            roomd::config::LogFormat::Text => tracing_subscriber::fmt::layer()
                .with_writer(std::io::stderr)
                .boxed(),
            roomd::config::LogFormat::Json => tracing_subscriber::fmt::layer()
                .json()
                .with_writer(std::io::stderr)
                .boxed(),
        }
        .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
            !roomd::peer_errors::is_peer_error(meta)
        }))
        .with_filter(filter);
        tracing_subscriber::registry()
            .with(output)
            .with(
                roomd::peer_errors::PeerErrors::default().with_filter(
                    // Only those events: the layer adds no cost to any other callsite.
                    tracing_subscriber::filter::Targets::new()
                        .with_target(roomd::peer_errors::DISPATCHER_TARGET, tracing::Level::ERROR),
                ),
            )
            .init();
    }
    let config = args.into_config()?;
    let listener = listen(config.bind).with_context(|| format!("cannot bind {}", config.bind))?;
    let bound = listener.local_addr().context("bound address")?;
    let config = roomd::config::Config {
        bind: bound,
        ..config
    };

    let system = actix_rt::System::new();
    system.block_on(async move {
        // Installed before the server starts, so a signal at any moment gets the
        // orderly shutdown.
        let signal = roomd::server::shutdown_signal().context("cannot handle signals")?;
        roomd::server::run(config, listener, async move {
            // The line tests and scripts wait for; printed once the server is set up.
            println!("roomd listening on {bound}");
            let _ = std::io::stdout().flush();
            signal.await;
        })
        .await?;
        anyhow::Ok(())
    })?;
    Ok(())
}

/// mimalloc instead of glibc malloc: the server allocates and frees small objects on
/// every op on several threads, and glibc's malloc was a fifth of the connection and
/// room threads' CPU. Measured with `roomd bench ingest --window 256` (100 rooms,
/// 8 writers, 8 s, same session): 82k acked ops/s with glibc, 91k with jemalloc,
/// 101-109k with mimalloc. Its arenas are committed lazily (`.cargo/config.toml`), which
/// keeps an idle connection at 14.6 KiB of RSS, as with glibc (14.5).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
