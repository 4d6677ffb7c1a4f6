#![allow(clippy::unwrap_used)]
//! Soak: 100,000 requests over concurrent keep-alive and fresh connections,
//! with failures mixed in (refused node, upstream 500s, blocked clients,
//! unknown routes, timeouts, upstreams that reset or break off mid-body);
//! file descriptors and memory must stay where they were after the first
//! 20,000.

use harness::serde_json::json;
use harness::{refused_addr, upstream, Conn, Gateway, Upstream};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib() -> usize {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// What one request of the mix asks for.
fn pick(i: usize) -> (&'static str, &'static str) {
    match i % 16 {
        0 | 5 | 6 | 7 | 8 | 12 => ("GET", "/ok"),
        13 => ("POST", "/ok"),
        1 | 9 => ("GET", "/retry"),
        2 => ("GET", "/ok?status=500"),
        3 => ("GET", "/blocked"),
        4 | 10 => ("GET", "/nowhere"),
        14 => ("GET", "/truncated"),
        15 => ("GET", "/reset"),
        _ => ("GET", "/slow?sleep_ms=100"),
    }
}

/// `n` requests over `clients` concurrent keep-alive connections, each
/// taking the next request of the mix when it is free; a client whose
/// connection was aborted (truncated answer) opens a new one.
async fn round(gw: &Gateway, n: usize, clients: usize) {
    let next = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..clients {
        let data = gw.data;
        let next = next.clone();
        tasks.spawn(async move {
            let mut conn = Conn::open(data, None).await.unwrap();
            loop {
                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if i >= n {
                    break;
                }
                let (method, path) = pick(i);
                let body = if method == "POST" {
                    "x".repeat(2048)
                } else {
                    String::new()
                };
                match conn.try_send(method, path, &[], body).await {
                    Ok(r) => assert!(r.status.as_u16() < 600),
                    Err(_) => conn = Conn::open(data, None).await.unwrap(),
                }
                if i % 1000 == 999 {
                    // Fresh client connections too, not only kept-alive ones.
                    conn = Conn::open(data, None).await.unwrap();
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done.unwrap();
    }
}

/// An upstream that promises 100 bytes, sends 10 and closes, or (`reset`)
/// closes at once without answering.
async fn broken_upstream(reset: bool) -> std::net::SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                if !reset {
                    let _ = s
                        .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
                        .await;
                }
            });
        }
    });
    addr
}

/// Concurrent client connections.
const CLIENTS: usize = 8;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_growth_across_rounds_with_failures() {
    let gw = Gateway::start().await;
    let u1 = Upstream::start("u1").await;
    let down = refused_addr().to_string();
    gw.put(
        "routes/ok",
        json!({"uri": "/ok", "upstream": upstream(&[(&u1.node(), 1)])}),
    )
    .await;
    gw.put(
        "routes/retry",
        json!({"uri": "/retry", "upstream": upstream(&[(&down, 1), (&u1.node(), 1)])}),
    )
    .await;
    gw.put(
        "routes/blocked",
        json!({"uri": "/blocked", "upstream": upstream(&[(&u1.node(), 1)]), "plugins": {"ip-restriction": {"blacklist": ["127.0.0.0/8"]}}}),
    )
    .await;
    let mut slow = upstream(&[(&u1.node(), 1)]);
    slow["timeout"] = json!({"connect": 0.005, "send": 0.005, "read": 0.005});
    gw.put("routes/slow", json!({"uri": "/slow", "upstream": slow}))
        .await;

    let truncated = broken_upstream(false).await.to_string();
    gw.put(
        "routes/truncated",
        json!({"uri": "/truncated", "upstream": upstream(&[(&truncated, 1)])}),
    )
    .await;
    let reset = broken_upstream(true).await.to_string();
    gw.put(
        "routes/reset",
        json!({"uri": "/reset", "upstream": upstream(&[(&reset, 1)])}),
    )
    .await;

    // 20k requests to warm pools and allocator, then 80k more: what is
    // open and resident after the first batch is what must stay.
    let started = std::time::Instant::now();
    round(&gw, 20_000, CLIENTS).await;
    let (fds1, rss1) = (open_fds(), rss_kib());
    for _ in 0..4 {
        round(&gw, 20_000, CLIENTS).await;
    }
    let (fds2, rss2) = (open_fds(), rss_kib());
    eprintln!(
        "soak: 100000 requests in {:?}; fds {fds1} -> {fds2}; RSS {rss1} -> {rss2} KiB",
        started.elapsed()
    );
    assert!(
        fds2 <= fds1 + 2 * CLIENTS,
        "file descriptors grew: {fds1} -> {fds2}"
    );
    assert!(
        rss2 <= rss1 + 16 * 1024,
        "memory grew: {rss1} KiB -> {rss2} KiB"
    );
    gw.stop().await;
}
