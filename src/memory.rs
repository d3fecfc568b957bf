//! Handing freed memory back to the OS once the server goes quiet.
//!
//! The binary's global allocator is mimalloc (`main.rs`), which keeps freed pages per
//! thread and purges them only when that thread next allocates or frees; a thread that
//! went quiet (a room thread whose rooms stopped, the store writer between bursts) would
//! keep them for good. Each such thread calls [`release_thread_memory`] when it goes
//! quiet, and [`release_free_memory`] also trims glibc's heap (what C code and the
//! library's tests allocate from). Both are cheap no-ops where nothing is free.

/// Returns the calling thread's free mimalloc pages (and abandoned ones) to the OS.
pub fn release_thread_memory() {
    // SAFETY: mi_collect only touches the calling thread's heap and, forced, abandoned
    // segments; it is thread-safe and harmless when mimalloc is not the allocator.
    unsafe {
        libmimalloc_sys::mi_collect(true);
    }
}

/// [`release_thread_memory`] plus glibc's `malloc_trim`.
pub fn release_free_memory() {
    release_thread_memory();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only walks the allocator's own free lists; it is thread-safe.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// The long-lived threads that hand their freed memory back when the server goes quiet:
/// the room threads and the HTTP workers, which register themselves. mimalloc keeps
/// freed pages with the thread that allocated them, so each must collect on its own.
#[derive(Default)]
pub struct QuietThreads {
    arbiters: parking_lot::Mutex<Vec<actix::ArbiterHandle>>,
}

impl QuietThreads {
    /// Registers the calling thread's arbiter, if it runs one (call once per thread, on
    /// that thread).
    pub fn register_current(&self) {
        if let Some(arbiter) = actix_rt::Arbiter::try_current() {
            self.register(arbiter);
        }
    }

    pub fn register(&self, arbiter: actix::ArbiterHandle) {
        self.arbiters.lock().push(arbiter);
    }

    /// Has every registered thread run [`release_thread_memory`]; forgets threads that
    /// have stopped.
    pub fn release_all(&self) {
        self.arbiters
            .lock()
            .retain(|arbiter| arbiter.spawn_fn(release_thread_memory));
    }
}
