//! The process's allocator: mimalloc, called through the cheapest of its
//! entry points that satisfies each layout.
//!
//! Rust asks for an alignment with every allocation. mimalloc's aligned entry
//! points only find a free block on their fast path when the size is at most
//! 1 KiB; anything larger (a connection's 8 KiB read buffer, a boxed request
//! future) goes through its generic aligned path, several times the work of a
//! plain allocation, about five times per proxied request. mimalloc states
//! that a plain allocation is already aligned to any power of two up to 16
//! that does not exceed the size, and Rust's layouts are ordinary alignments
//! of at most 16 in practice, so those go to `mi_malloc` and only the rest
//! to `mi_malloc_aligned`.

#![allow(unsafe_code)] // A `GlobalAlloc` cannot be written without `unsafe`.

use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

use libmimalloc_sys as mi;

/// The largest alignment every mimalloc block of at least that size has
/// (`MI_MAX_ALIGN_SIZE`).
const NATURAL_ALIGN: usize = 16;

/// mimalloc as the global allocator (`#[global_allocator]` in the binary).
pub struct Mimalloc;

/// Whether a plain allocation of `size` bytes is aligned to `align`.
#[inline]
fn natural(align: usize, size: usize) -> bool {
    align <= NATURAL_ALIGN && align <= size
}

// SAFETY: every pointer handed out comes from mimalloc with at least the
// layout's size and alignment (see `natural`), and is given back to
// mimalloc's `mi_free` or `mi_realloc*`, which accept blocks from any of its
// allocation entry points.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        let block = if natural(align, size) {
            mi::mi_malloc(size)
        } else {
            mi::mi_malloc_aligned(size, align)
        };
        block.cast()
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        let (size, align) = (layout.size(), layout.align());
        let block = if natural(align, size) {
            mi::mi_zalloc(size)
        } else {
            mi::mi_zalloc_aligned(size, align)
        };
        block.cast()
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        mi::mi_free(ptr.cast::<c_void>());
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let align = layout.align();
        let block = if natural(align, new_size) {
            mi::mi_realloc(ptr.cast::<c_void>(), new_size)
        } else {
            mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, align)
        };
        block.cast()
    }
}

/// How often a thread that serves requests hands its allocator's empty
/// pages back to the system (see [`return_free_pages`]).
pub const TIDY_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// Hands the calling thread's empty allocator pages back to the system now.
///
/// mimalloc keeps the pages a burst of connections emptied (read buffers,
/// header maps, request futures) mapped for a while, and only gives them
/// back when the same thread frees more memory later: a gateway that went
/// quiet after a load kept 1.5 to 2 MiB of them resident for good. Giving
/// them back at once on every free instead (`MIMALLOC_PURGE_DELAY=0`) costs
/// a system call and page faults per request, about 1 µs of kernel CPU.
pub fn return_free_pages() {
    // SAFETY: `mi_collect` only walks the calling thread's own mimalloc
    // heap and the process's arenas, under mimalloc's own synchronisation;
    // no block in use is touched.
    unsafe { mi::mi_collect(true) }
}

/// Calls [`return_free_pages`] every [`TIDY_PERIOD`] on the thread of the
/// (single-threaded) runtime it runs on, forever. Once a second costs a
/// few microseconds.
pub async fn return_free_pages_periodically() {
    let mut tick = tokio::time::interval(TIDY_PERIOD);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        return_free_pages();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn layouts() -> impl Iterator<Item = Layout> {
        let sizes = [
            1,
            3,
            8,
            15,
            16,
            24,
            40,
            100,
            1000,
            1024,
            1025,
            4096,
            8192,
            70_000,
            5 << 20,
        ];
        let aligns = [1, 2, 4, 8, 16, 32, 64, 4096];
        sizes.into_iter().flat_map(move |size| {
            aligns
                .into_iter()
                .filter_map(move |align| Layout::from_size_align(size, align).ok())
        })
    }

    #[test]
    fn every_block_has_its_layouts_alignment() {
        for layout in layouts() {
            // SAFETY: the layouts have a non-zero size; each block is freed
            // once, with its own layout.
            unsafe {
                let block = Mimalloc.alloc(layout);
                assert!(!block.is_null(), "{layout:?}");
                assert_eq!(block as usize % layout.align(), 0, "{layout:?}");
                block.write_bytes(0xa5, layout.size());
                Mimalloc.dealloc(block, layout);

                let zeroed = Mimalloc.alloc_zeroed(layout);
                assert_eq!(zeroed as usize % layout.align(), 0, "{layout:?}");
                let bytes = std::slice::from_raw_parts(zeroed, layout.size());
                assert!(bytes.iter().all(|&b| b == 0), "{layout:?}");
                Mimalloc.dealloc(zeroed, layout);
            }
        }
    }

    #[test]
    fn realloc_keeps_the_contents_and_the_alignment() {
        for layout in layouts() {
            for new_size in [layout.size() / 2 + 1, layout.size() * 3] {
                // SAFETY: as above; the grown or shrunk block is freed with
                // the layout of its new size.
                unsafe {
                    let block = Mimalloc.alloc(layout);
                    for i in 0..layout.size() {
                        *block.add(i) = i as u8;
                    }
                    let moved = Mimalloc.realloc(block, layout, new_size);
                    assert!(!moved.is_null());
                    assert_eq!(
                        moved as usize % layout.align(),
                        0,
                        "{layout:?} -> {new_size}"
                    );
                    for i in 0..layout.size().min(new_size) {
                        assert_eq!(*moved.add(i), i as u8, "{layout:?} -> {new_size}");
                    }
                    let grown = Layout::from_size_align(new_size, layout.align()).unwrap();
                    Mimalloc.dealloc(moved, grown);
                }
            }
        }
    }
}
