//! CIDR set lookups: the cost must not grow with the list length.

use std::hint::black_box;
use std::net::{IpAddr, Ipv4Addr};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use plugins::cidr::IpSet;

/// `n` distinct /24s spread over 10.0.0.0/8 and 172.16.0.0/12.
fn entries(n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let (a, b, c) = if i % 2 == 0 {
                (10, (i / 256) % 256, i % 256)
            } else {
                (172, 16 + (i / 256) % 16, i % 256)
            };
            format!("{a}.{b}.{c}.0/24")
        })
        .collect()
}

fn lookups(c: &mut Criterion) {
    let mut group = c.benchmark_group("cidr_contains");
    // 1 and 4: a list scanned in order; 100 and 10,000: prefix tries.
    for n in [1usize, 4, 100, 10_000] {
        let set = IpSet::from_entries(&entries(n)).expect("valid CIDRs");
        let miss = IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1));
        let hit = IpAddr::V4(Ipv4Addr::new(10, 0, 0, 7));
        group.bench_with_input(BenchmarkId::new("miss", n), &set, |b, s| {
            b.iter(|| s.contains(black_box(miss)))
        });
        group.bench_with_input(BenchmarkId::new("hit", n), &set, |b, s| {
            b.iter(|| s.contains(black_box(hit)))
        });
    }
    group.finish();
    c.bench_function("cidr_build_10k", |b| {
        let list = entries(10_000);
        b.iter(|| IpSet::from_entries(black_box(&list)).map(|s| s.len()))
    });
}

criterion_group!(benches, lookups);
criterion_main!(benches);
