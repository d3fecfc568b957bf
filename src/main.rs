//! The `roomd` binary: the [`roomd::Server`] builder with the three built-in kinds.

fn main() {
    roomd::Server::new().main();
}

/// mimalloc instead of glibc malloc: the server allocates and frees small objects on
/// every op on several threads, and glibc's malloc was a fifth of the connection and
/// room threads' CPU. Measured with `roomd bench ingest --window 256` (100 rooms,
/// 8 writers, 8 s, same session): 82k acked ops/s with glibc, 91k with jemalloc,
/// 101-109k with mimalloc. Its arenas are committed lazily (`.cargo/config.toml`), which
/// keeps an idle connection at 14.6 KiB of RSS, as with glibc (14.5).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
