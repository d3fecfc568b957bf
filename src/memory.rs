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
