//! The `calico-kube-controllers` binary: a counting allocator, then argument parsing and dispatch
//! (see `cli.rs`). `anyhow` lives only at this edge.
#![deny(unsafe_code)]

mod cli;

/// Counts live heap bytes so `simulate` and the controller can report real memory use.
/// The only unsafe code in the project: a thin pass-through to the system allocator, which is
/// what `GlobalAlloc` requires (the bookkeeping is two relaxed atomics), and one call into
/// glibc's allocator, measured where it is defined.
#[allow(unsafe_code)]
mod counting_alloc {
    use std::alloc::{GlobalAlloc, Layout, System};

    use calico_kube_controllers::memstat;

    pub struct Counting;

    unsafe impl GlobalAlloc for Counting {
        unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
            // SAFETY: forwarded unchanged to the system allocator with the caller's layout.
            let p = unsafe { System.alloc(layout) };
            if !p.is_null() {
                memstat::record_alloc(layout.size());
            }
            p
        }
        unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
            memstat::record_dealloc(layout.size());
            // SAFETY: `ptr` came from `alloc`/`realloc` above with this layout.
            unsafe { System.dealloc(ptr, layout) }
        }
        unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
            // SAFETY: same contract as GlobalAlloc::realloc, forwarded to the system allocator.
            let p = unsafe { System.realloc(ptr, layout, new_size) };
            if !p.is_null() {
                memstat::record_dealloc(layout.size());
                memstat::record_alloc(new_size);
            }
            p
        }
    }

    #[global_allocator]
    static GLOBAL: Counting = Counting;

    /// Hands glibc's cached free memory back after a bulk drop (a decoded listing of the whole
    /// cluster). Without it, the hundreds of thousands of small chunks such a drop leaves are
    /// sorted a few thousand per later `malloc` call: simulate measured the first dirty passes
    /// after a 5,000-node build at 100 ms, then 40 more at 1.8 ms, where the rest take 5 us.
    /// Other C libraries (musl in the static image) are left alone.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn give_back() {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointers and only reorganises the allocator's own free
        // lists; it is safe to call from any thread at any time.
        unsafe {
            malloc_trim(0);
        }
    }

    /// Fixes glibc's mmap and trim thresholds. By default both grow with the largest block freed
    /// (up to 32 MiB): after the first list pages are dropped, page-sized buffers come from the
    /// heap and leave it fragmented and resident. Fixed, a buffer of 256 KiB or more is mapped and
    /// unmapped on its own, and free memory above 1 MiB at the heap's top is given back.
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    pub fn fixed_thresholds() {
        const M_TRIM_THRESHOLD: std::ffi::c_int = -1;
        const M_MMAP_THRESHOLD: std::ffi::c_int = -3;
        unsafe extern "C" {
            fn mallopt(param: std::ffi::c_int, value: std::ffi::c_int) -> std::ffi::c_int;
        }
        // SAFETY: mallopt takes two integers and only changes the allocator's tuning; it is called
        // once, before any thread is started.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 256 << 10);
            mallopt(M_TRIM_THRESHOLD, 1 << 20);
        }
    }
}

fn main() {
    calico_kube_controllers::memstat::enable();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        counting_alloc::fixed_thresholds();
        calico_kube_controllers::memstat::set_give_back(counting_alloc::give_back);
    }
    std::process::exit(cli::main());
}

#[cfg(test)]
mod tests {
    /// Tidying the allocator after a bulk drop leaves every live allocation intact and the heap
    /// usable, from any thread, as often as it is called.
    #[test]
    fn giving_memory_back_after_a_bulk_drop_keeps_what_is_live() {
        let mut boxes: Vec<Box<[u8; 48]>> = (0..200_000u32).map(|i| Box::new([(i % 251) as u8; 48])).collect();
        let kept: Vec<Box<[u8; 48]>> = boxes.iter().step_by(7).cloned().collect();
        boxes.clear();
        boxes.shrink_to_fit();
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        {
            super::counting_alloc::give_back();
            std::thread::spawn(super::counting_alloc::give_back).join().unwrap();
        }
        for (n, b) in kept.iter().enumerate() {
            assert!(b.iter().all(|x| *x == ((n * 7) % 251) as u8), "box {n} changed");
        }
        let fresh: Vec<u64> = (0..100_000).collect();
        assert_eq!(fresh.iter().sum::<u64>(), 4_999_950_000);
    }
}

