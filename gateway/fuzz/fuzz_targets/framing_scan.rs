//! Any bytes as what a client sends on an HTTP/1 connection, fed to the
//! framing scan whole and cut into reads at fuzzer-chosen points: nothing
//! may panic, and where the reads are cut must not change the verdict.

#![no_main]

use std::sync::Arc;

use gateway::framing::{FramingScan, Verdict};
use libfuzzer_sys::fuzz_target;

fn verdict(data: &[u8], cuts: &[usize]) -> Option<u64> {
    let verdict = Arc::new(Verdict::default());
    let mut scan = FramingScan::new(verdict.clone());
    let mut start = 0;
    for &cut in cuts {
        let cut = cut.clamp(start, data.len());
        scan.feed(&data[start..cut]);
        start = cut;
    }
    scan.feed(&data[start..]);
    verdict.first_ambiguous()
}

fuzz_target!(|input: (Vec<u8>, Vec<u16>)| {
    let (data, cuts) = input;
    let mut cuts: Vec<usize> = cuts.into_iter().map(usize::from).collect();
    cuts.sort_unstable();
    assert_eq!(verdict(&data, &[]), verdict(&data, &cuts));
});
