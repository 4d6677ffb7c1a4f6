//! Loopback ports for the processes a test starts.
//!
//! Shared by this crate and the gateway crate's own binary tests
//! (`gateway/tests/binary.rs` includes this file): std only.

use std::net::TcpListener;
use std::sync::atomic::{AtomicU32, Ordering};

/// A loopback port nobody listens on right now, for a process that binds it
/// soon after.
///
/// Ports come from just below the kernel's ephemeral range
/// (`net.ipv4.ip_local_port_range`, 32768-60999 by default): a port picked
/// by binding port 0 lies inside that range, and an outgoing connection of
/// any test could take it before the child binds it. Below the range only
/// listeners bind, and each call of this process takes the next port.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let low = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u32>().ok())
        .unwrap_or(32768);
    const SPAN: u32 = 10_000;
    if low <= SPAN + 1024 {
        return TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
    }
    // Test binaries run one after another, but two checkouts may test at
    // once: each process starts at its own offset.
    let start = std::process::id() % SPAN;
    for _ in 0..SPAN {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = (low - SPAN + (start + n) % SPAN) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port below {low}");
}
