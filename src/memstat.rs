//! Heap accounting: bytes currently allocated and the peak, fed by the binary's counting
//! allocator (`src/main.rs`). Library code only reads it; without that allocator it reports None.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

static ENABLED: AtomicBool = AtomicBool::new(false);
static CURRENT: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

/// Called once by the binary's allocator set-up.
pub fn enable() {
    ENABLED.store(true, Ordering::Relaxed);
}

pub fn record_alloc(bytes: usize) {
    let now = CURRENT.fetch_add(bytes, Ordering::Relaxed) + bytes;
    PEAK.fetch_max(now, Ordering::Relaxed);
}

pub fn record_dealloc(bytes: usize) {
    CURRENT.fetch_sub(bytes, Ordering::Relaxed);
}

/// Live heap bytes, if the counting allocator is installed.
pub fn current_bytes() -> Option<usize> {
    ENABLED.load(Ordering::Relaxed).then(|| CURRENT.load(Ordering::Relaxed))
}

/// Peak heap bytes since start or the last [`reset_peak`].
pub fn peak_bytes() -> Option<usize> {
    ENABLED.load(Ordering::Relaxed).then(|| PEAK.load(Ordering::Relaxed))
}

pub fn reset_peak() {
    PEAK.store(CURRENT.load(Ordering::Relaxed), Ordering::Relaxed);
}
