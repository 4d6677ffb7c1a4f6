#![allow(clippy::unwrap_used)]
//! Bounded soak: rounds of requests with failures mixed in (refused node,
//! upstream 500s, blocked clients, unknown routes, timeouts); file
//! descriptors and memory must not grow from one round to the next.

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

async fn round(gw: &Gateway, n: usize) {
    let mut conn = Conn::open(gw.data, None).await.unwrap();
    for i in 0..n {
        let path = match i % 12 {
            0 | 5 | 6 | 7 | 8 => "/ok",
            1 | 9 => "/retry",
            2 => "/ok?status=500",
            3 => "/blocked",
            4 | 10 => "/nowhere",
            _ => "/slow?sleep_ms=100",
        };
        let r = conn.send("GET", path, &[], String::new()).await;
        assert!(r.status.as_u16() < 600);
        if i % 500 == 499 {
            // Fresh client connections too, not only one kept alive.
            conn = Conn::open(gw.data, None).await.unwrap();
        }
    }
}

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

    round(&gw, 2400).await;
    let (fds1, rss1) = (open_fds(), rss_kib());
    round(&gw, 2400).await;
    round(&gw, 2400).await;
    let (fds2, rss2) = (open_fds(), rss_kib());
    assert!(fds2 <= fds1 + 16, "file descriptors grew: {fds1} -> {fds2}");
    assert!(
        rss2 <= rss1 + 16 * 1024,
        "memory grew: {rss1} KiB -> {rss2} KiB"
    );
    gw.stop().await;
}
