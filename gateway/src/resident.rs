//! Gives back the pages of the program's code that only start-up ran.
//!
//! The binary's machine code is mapped from the file, and each page the
//! process touches stays mapped, with its neighbours (the kernel maps up to
//! 64 KiB around each fault from the page cache). Reading the configuration,
//! opening the store and building the first snapshot run most of a 14 MiB
//! text segment once, which left about 8 MiB of it (and 1.5 MiB of constants
//! and unwind tables) counted in the process's
//! PSS for good, more than the heap of an idle gateway. Dropping those
//! mappings once start-up is over (`MADV_DONTNEED` on the executable segment)
//! leaves the pages in the page cache; the code that serves requests maps
//! itself back at its first use, a minor fault per 64 KiB.
//!
//! Only mappings of the program's own file whose pages are never written are
//! touched (the executable segment, and the read-only one at the file's
//! start: headers, constants, unwind tables), so the file holds exactly what
//! they held. Relocated data (`.data.rel.ro`, the GOT) is written at load
//! time and is left alone.

#![allow(unsafe_code)] // madvise: see `release_startup_code`.

use std::ffi::c_void;
use std::path::PathBuf;

/// Unmaps the resident pages of the program's executable segment; returns
/// the bytes of address space covered. Failures (no `/proc`, a binary
/// replaced on disk while running) leave everything as it was.
pub fn release_startup_code() -> std::io::Result<usize> {
    let exe: PathBuf = std::fs::read_link("/proc/self/exe")?;
    let maps = std::fs::read_to_string("/proc/self/maps")?;
    let mut released = 0;
    for (start, end) in code_segments(&maps, &exe.to_string_lossy()) {
        let len = end - start;
        // SAFETY: the range is a whole mapping of the running program's
        // file that was mapped read-only (`r-xp`, or `r--p` from offset 0,
        // which the loader never writes): its pages cannot have been
        // written, so MADV_DONTNEED only drops page-table entries, and any
        // later access faults the same bytes back in from the file. No
        // mutable Rust object lives in it.
        unsafe {
            rustix::mm::madvise(start as *mut c_void, len, rustix::mm::Advice::LinuxDontNeed)?;
        }
        released += len;
    }
    Ok(released)
}

/// The mappings of the file `exe` in a `/proc/self/maps` text that hold
/// its bytes unchanged (see below), as address ranges.
fn code_segments<'a>(maps: &'a str, exe: &'a str) -> impl Iterator<Item = (usize, usize)> + 'a {
    maps.lines().filter_map(move |line| {
        let mut fields = line.split_ascii_whitespace();
        let range = fields.next()?;
        let perms = fields.next()?;
        let offset = fields.next()?;
        // device, inode, then the path (which may hold spaces).
        let path = fields.nth(2)?;
        let rest: Vec<&str> = fields.collect();
        let path = if rest.is_empty() {
            path.to_string()
        } else {
            format!("{path} {}", rest.join(" "))
        };
        // The code, and the read-only segment at the start of the file
        // (headers, constants, unwind tables). Not the other read-only
        // mapping, the relocated data, which the loader wrote before
        // making it read-only: its pages differ from the file's.
        let from_file =
            perms == "r-xp" || (perms == "r--p" && u64::from_str_radix(offset, 16) == Ok(0));
        if !from_file || path != exe {
            return None;
        }
        let (start, end) = range.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        (end > start).then_some((start, end))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPS: &str = "\
55d0c0000000-55d0c0487000 r--p 00000000 08:01 42 /usr/bin/ferrogate
55d0c0487000-55d0c120a000 r-xp 00487000 08:01 42 /usr/bin/ferrogate
55d0c120a000-55d0c12a5000 r--p 01208000 08:01 42 /usr/bin/ferrogate
55d0c12a5000-55d0c12ae000 rw-p 012a2000 08:01 42 /usr/bin/ferrogate
7f00aa000000-7f00aa100000 r-xp 00000000 08:01 77 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00ab000000-7f00ab100000 r-xp 00000000 08:01 43 /opt/my gateway/ferrogate
7f00ac000000-7f00ac100000 rw-p 00000000 00:00 0
";

    #[test]
    fn only_the_programs_own_code_is_chosen() {
        let found: Vec<_> = code_segments(MAPS, "/usr/bin/ferrogate").collect();
        assert_eq!(
            found,
            [
                (0x55d0c0000000, 0x55d0c0487000),
                (0x55d0c0487000, 0x55d0c120a000)
            ]
        );
        let spaced: Vec<_> = code_segments(MAPS, "/opt/my gateway/ferrogate").collect();
        assert_eq!(spaced, [(0x7f00ab000000, 0x7f00ab100000)]);
        // A binary replaced on disk shows as "(deleted)": not matched.
        assert_eq!(code_segments(MAPS, "/usr/bin/other").count(), 0);
    }

    #[test]
    fn the_running_test_binary_keeps_working_after_its_code_is_released() {
        let released = release_startup_code().unwrap();
        assert!(released > 0);
        // Code runs again from the page cache.
        let v: Vec<u64> = (0..1000).map(|i| i * i).collect();
        assert_eq!(v[999], 998_001);
        assert!(format!("{v:?}").len() > 1000);
    }
}
