//! What following the client's HTTP/1 framing costs per request: a typical
//! browser-sized head, and a keep-alive stream of heads with bodies.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use gateway::framing::FramingScan;

const HEAD: &[u8] = b"GET /api/v1/orders?page=2 HTTP/1.1\r\n\
Host: api.example.com\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko)\r\n\
Accept: application/json, text/plain, */*\r\n\
Accept-Language: en-US,en;q=0.9\r\n\
Accept-Encoding: gzip, deflate, br\r\n\
Authorization: Bearer eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.e30.signature\r\n\
Cookie: session=0123456789abcdef; theme=dark\r\n\
Connection: keep-alive\r\n\r\n";

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("framing_scan");
    group.throughput(Throughput::Bytes(HEAD.len() as u64));
    group.bench_function("one_head", |b| {
        let mut scan = FramingScan::default();
        b.iter(|| scan.feed(black_box(HEAD)));
    });
    let post = {
        let body = vec![b'x'; 4096];
        let mut req = format!(
            "POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .into_bytes();
        req.extend_from_slice(&body);
        req
    };
    group.throughput(Throughput::Bytes(post.len() as u64));
    group.bench_function("head_and_4k_body", |b| {
        let mut scan = FramingScan::default();
        b.iter(|| scan.feed(black_box(&post)));
    });
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
