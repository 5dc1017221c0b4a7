//! The `calico-kube-controllers` binary: a counting allocator, then argument parsing and dispatch
//! (see `cli.rs`). `anyhow` lives only at this edge.
#![deny(unsafe_code)]

mod cli;

/// Counts live heap bytes so `simulate` and the controller can report real memory use.
/// The only unsafe code in the project: a thin pass-through to the system allocator, which is
/// what `GlobalAlloc` requires; the bookkeeping is two relaxed atomics.
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
}

fn main() {
    calico_kube_controllers::memstat::enable();
    std::process::exit(cli::main());
}
