//! [`Server`]: the builder an application uses to be its own single-binary roomd with
//! its room kinds added. The `roomd` binary is this builder with the three built-ins.
//!
//! The builder owns what a binary does before the server runs: the command line (every
//! `serve` flag and `ROOMD_*` variable, `--config`, and the `bench`, `log`, `token` and
//! `cluster` subcommands), logging, the listening socket and the signals. The server itself is
//! [`crate::server::run_with_kinds`].

use std::io::Write;

use clap::{Parser, Subcommand};

use crate::config::{Config, ServeArgs};
use crate::kind::{KindError, Kinds, RoomKind};

/// roomd: durable, authoritative real-time rooms over WebSocket.
///
/// `roomd` with no arguments serves on 127.0.0.1:8080 with its data in ./data (auth off,
/// loopback only). `roomd serve [FLAGS]` is the full form; the flags below work with or
/// without `serve`. Every flag can also come from the ROOMD_* environment variable named
/// next to it, or from the --config TOML file; a flag on the command line wins over the
/// environment, which wins over the file.
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
    Bench(crate::bench::BenchArgs),
    /// Inspect and maintain the data dir of a stopped server: rooms, show, verify, compact.
    Log(crate::log_tool::LogArgs),
    /// Mint a development token from the server's key:
    /// `roomd token --sub alice --read 'chat:*' --write chat:general --ttl 1h`.
    Token(crate::token_tool::TokenArgs),
    /// Cluster operations: `roomd cluster rebalance --cluster-nats URL --to a,b,c` moves
    /// rooms to a new member list (see README "Running a cluster").
    Cluster(crate::cluster::rebalance_tool::ClusterArgs),
}

/// Why [`Server::run`] could not start or ended with an error.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error(transparent)]
    Kind(#[from] KindError),
    #[error(transparent)]
    ConfigFile(#[from] crate::config::ConfigFileError),
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error("bad --log filter `{filter}`: {reason}")]
    LogFilter { filter: String, reason: String },
    #[error("cannot bind {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot handle signals: {0}")]
    Signals(std::io::Error),
    #[error(transparent)]
    Server(#[from] crate::server::ServerError),
    #[error(transparent)]
    Bench(#[from] crate::bench::BenchError),
    #[error(transparent)]
    Log(#[from] crate::log_tool::LogToolError),
    #[error(transparent)]
    Token(#[from] crate::token_tool::TokenError),
    #[error(transparent)]
    Rebalance(#[from] crate::cluster::rebalance_tool::RebalanceError),
}

/// A roomd server: configuration, room kinds, then [`Server::run`].
///
/// ```no_run
/// # use roomd::kind::StateKind;
/// // The `roomd` binary, plus a kind of the application's own.
/// # struct Game;
/// # impl roomd::kind::RoomKind for Game {
/// #     fn name(&self) -> &str { "game" }
/// #     fn init(&self, _: &roomd::value::Value, _: &roomd::kind::Ctx, _: &roomd::kind::Limits)
/// #         -> Result<roomd::kind::Changes, roomd::kind::Refusal> { Ok(Default::default()) }
/// #     fn reduce(&self, _: &roomd::kind::RoomState, _: &roomd::value::Value, _: &roomd::kind::Ctx,
/// #         _: &roomd::kind::Limits) -> Result<roomd::kind::Changes, roomd::kind::Refusal> {
/// #         Ok(Default::default()) }
/// # }
/// roomd::Server::new().kind(Game).main();
/// ```
pub struct Server {
    kinds: Kinds,
    /// Set by [`Server::config`]: the command line is then not read.
    config: Option<Config>,
    /// The first kind that could not be added, reported by `run`.
    error: Option<KindError>,
}

impl Default for Server {
    fn default() -> Self {
        Server::new()
    }
}

impl Server {
    /// A server with the three built-in kinds (`chat`, `poll`, `state`).
    pub fn new() -> Server {
        Server {
            kinds: Kinds::builtin(),
            config: None,
            error: None,
        }
    }

    /// A server with no kinds yet: only those added with [`Server::kind`].
    pub fn without_builtins() -> Server {
        Server {
            kinds: Kinds::empty(),
            ..Server::new()
        }
    }

    /// Serves rooms of `kind` too. A name already taken is an error from `run`.
    pub fn kind(mut self, kind: impl RoomKind) -> Server {
        if let Err(e) = self.kinds.add(std::sync::Arc::new(kind)) {
            self.error.get_or_insert(e);
        }
        self
    }

    /// Uses `config` instead of reading the command line and `ROOMD_*` variables (no
    /// subcommands then, and logging is the application's business).
    pub fn config(mut self, config: Config) -> Server {
        self.config = Some(config);
        self
    }

    /// Runs until SIGTERM or SIGINT (or a subcommand ends), then shuts down in order.
    pub fn run(self) -> Result<(), RunError> {
        if let Some(e) = self.error {
            return Err(e.into());
        }
        let config = match self.config {
            Some(config) => config,
            None => match command_line()? {
                Some(config) => config,
                // A subcommand ran.
                None => return Ok(()),
            },
        };
        serve(config, self.kinds)
    }

    /// [`Server::run`] as a binary's `main`: prints the error and exits 1 on failure.
    pub fn main(self) {
        if let Err(e) = self.run() {
            eprintln!("roomd: error: {e}");
            std::process::exit(1);
        }
    }
}

/// Reads the command line: the serve configuration (with logging set up), or `None`
/// once a subcommand has run.
fn command_line() -> Result<Option<Config>, RunError> {
    // A `--config` file becomes ROOMD_* variables for the settings the environment does
    // not set, so clap ranks them: flag > environment > file > default. Done first, while
    // the process has one thread (setting variables is not thread-safe).
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Some(path) = crate::config::config_file_named(&argv) {
        for (name, value) in crate::config::config_file_env(&path)? {
            std::env::set_var(name, value);
        }
    }
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        Some(Command::Bench(args)) => return Ok(crate::bench::run(args).map(|()| None)?),
        Some(Command::Log(args)) => return Ok(crate::log_tool::run(args).map(|()| None)?),
        Some(Command::Token(args)) => return Ok(crate::token_tool::run(args).map(|()| None)?),
        Some(Command::Cluster(args)) => {
            return Ok(crate::cluster::rebalance_tool::run(args).map(|()| None)?)
        }
        None => cli.serve,
    };
    init_logging(&args)?;
    Ok(Some(args.into_config()?))
}

fn init_logging(args: &ServeArgs) -> Result<(), RunError> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;
    let filter =
        tracing_subscriber::EnvFilter::try_new(&args.log).map_err(|e| RunError::LogFilter {
            filter: args.log.clone(),
            reason: e.to_string(),
        })?;
    // actix-http logs every request it could not parse at ERROR; those go to a
    // once-a-minute summary instead (see `crate::peer_errors`).
    let output = match args.log_format {
        // Colours only on a terminal: the journal and log files get plain text.
        crate::config::LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .boxed(),
        crate::config::LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(tracing_subscriber::filter::filter_fn(|meta| {
        !crate::peer_errors::is_peer_error(meta)
    }))
    .with_filter(filter);
    tracing_subscriber::registry()
        .with(output)
        .with(
            crate::peer_errors::PeerErrors::default().with_filter(
                // Only those events: the layer adds no cost to any other callsite.
                tracing_subscriber::filter::Targets::new()
                    .with_target(crate::peer_errors::DISPATCHER_TARGET, tracing::Level::ERROR),
            ),
        )
        .init();
    Ok(())
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

fn serve(config: Config, kinds: Kinds) -> Result<(), RunError> {
    let bind_error = |source| RunError::Bind {
        addr: config.bind,
        source,
    };
    let listener = listen(config.bind).map_err(bind_error)?;
    let bound = listener.local_addr().map_err(bind_error)?;
    let config = Config {
        bind: bound,
        ..config
    };
    let system = actix_rt::System::new();
    let served = system.block_on(async move {
        // Installed before the server starts, so a signal at any moment gets the
        // orderly shutdown.
        let signal = crate::server::shutdown_signal().map_err(RunError::Signals)?;
        crate::server::run_with_kinds(config, kinds, listener, async move {
            // The line tests and scripts wait for; printed once the server is set up.
            println!("roomd listening on {bound}");
            let _ = std::io::stdout().flush();
            signal.await;
        })
        .await?;
        Ok(())
    });
    // Tasks still pending when the server returns (in cluster mode, the readers of NATS
    // subscriptions) are dropped with actix's LocalSet, before its tokio runtime and
    // outside its context; async-nats unsubscribes in `Subscriber::drop` with
    // `tokio::spawn`, which then panics ("no reactor running"), once per subscription,
    // on every shutdown. Dropped inside the runtime's context, those unsubscribes are
    // queued instead (and dropped with the runtime: NATS sees the connection close).
    let runtime = system.runtime().tokio_runtime().handle().clone();
    let _context = runtime.enter();
    drop(system);
    served
}
