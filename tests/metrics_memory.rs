//! The metrics recorder's memory stays bounded on a server nobody scrapes.
//!
//! The exporter buffers every histogram sample until something folds it into its buckets;
//! before the recorder's upkeep ran, only a scrape did, so an unscraped server kept every
//! commit's sample forever. This test installs the recorder exactly as the server does
//! (`roomd::metrics::hot()`: the recorder, its buckets and its upkeep thread), records
//! 100,000 commit times through the store writer's handle and scrapes nothing, then waits
//! for the process's live heap to come back near where it started.
//!
//! It runs in its own test binary because it counts the whole process's heap through a
//! counting global allocator: no other test may allocate beside it.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// The system allocator, counting the bytes live and the bytes ever allocated.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters are
// only arithmetic on the sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            LIVE.fetch_add(layout.size(), Ordering::Relaxed);
            ALLOCATED.fetch_add(layout.size(), Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            LIVE.fetch_add(new_size, Ordering::Relaxed);
            ALLOCATED.fetch_add(new_size, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

const COMMITS: usize = 100_000;

/// How far above its starting point the live heap may stay once the upkeep has run:
/// under a tenth of what the 100,000 buffered samples take (16 bytes each, a value and a
/// timestamp, in blocks of 64: about 1.6 MB).
const BOUND: usize = 128 * 1024;

#[test]
fn unscraped_histograms_stay_bounded_over_100_000_commits() {
    let hot = roomd::metrics::hot();
    // One sample first, so the histogram's bucket entry exists before the baseline.
    hot.store_commit_seconds.record(0.001);
    let live_before = LIVE.load(Ordering::Relaxed);
    let allocated_before = ALLOCATED.load(Ordering::Relaxed);

    for i in 0..COMMITS {
        // Commit times from 100 µs to about 10 ms, as the writer records them.
        hot.store_commit_seconds
            .record(0.0001 * (1 + i % 100) as f64);
    }
    let buffered = ALLOCATED.load(Ordering::Relaxed) - allocated_before;
    // The samples are really buffered (16 bytes each): a recorder that dropped them
    // would make the bound below meaningless.
    assert!(
        buffered >= COMMITS * 12,
        "recording {COMMITS} samples allocated only {buffered} bytes"
    );

    // Nothing scrapes. The upkeep runs every 5 s; on a loaded machine it may run late,
    // so wait up to six intervals for the heap to come back.
    let deadline = Instant::now() + roomd::metrics::UPKEEP_INTERVAL * 6;
    loop {
        let retained = LIVE.load(Ordering::Relaxed).saturating_sub(live_before);
        if retained <= BOUND {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{retained} bytes still held {:?} after {COMMITS} unscraped commits \
             ({buffered} bytes buffered); the bound is {BOUND}",
            roomd::metrics::UPKEEP_INTERVAL * 6
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
