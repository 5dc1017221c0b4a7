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

static GIVE_BACK: std::sync::OnceLock<fn()> = std::sync::OnceLock::new();

/// The binary's way of returning the C allocator's cached free memory (see `src/main.rs`).
pub fn set_give_back(f: fn()) {
    let _ = GIVE_BACK.set(f);
}

/// Called after a bulk drop (a whole decoded listing): the allocator tidies its free lists now,
/// once, instead of a little in every later allocation, and returns free pages to the system.
/// Does nothing unless the binary installed a way to.
pub fn give_back() {
    let Some(f) = GIVE_BACK.get() else { return };
    f();
    // What the drop freed but could not merge waits in glibc's unsorted list, and every later
    // allocation that misses its size class sorts up to 10,000 of those chunks first. Sorting
    // them now costs the same once: allocate and free a mid-sized block until one allocation
    // finds nothing left to sort (or a bound is reached).
    for _ in 0..GIVE_BACK_ROUNDS {
        let started = std::time::Instant::now();
        drop(std::hint::black_box(Vec::<u8>::with_capacity(48 << 10)));
        if started.elapsed() < std::time::Duration::from_micros(20) {
            break;
        }
    }
}

/// Rounds of sorting after a bulk drop: 10,000 chunks each, so up to 20 million chunks.
const GIVE_BACK_ROUNDS: usize = 2_000;

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

/// The process's peak resident set in bytes (`VmHWM` of `/proc/self/status`), where Linux
/// reports it.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    parse_vm_hwm(&status)
}

fn parse_vm_hwm(status: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line["VmHWM:".len()..].trim().strip_suffix("kB")?.trim().parse().ok()?;
    Some(kb * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_peak_resident_set_is_read_from_vm_hwm() {
        assert_eq!(parse_vm_hwm("Name:\tx\nVmPeak:\t  9 kB\nVmHWM:\t  2048 kB\nVmRSS:\t 1 kB\n"), Some(2048 * 1024));
        assert_eq!(parse_vm_hwm("VmRSS:\t 1 kB\n"), None);
        assert_eq!(parse_vm_hwm("VmHWM:\t lots\n"), None);
        if cfg!(target_os = "linux") {
            assert!(peak_rss_bytes().is_some_and(|b| b > 0));
        }
    }
}
