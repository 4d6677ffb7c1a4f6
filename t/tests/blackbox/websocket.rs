#![allow(clippy::unwrap_used)]
//! WebSocket upgrades through routes with `enable_websocket`.

use std::time::Duration;

use harness::serde_json::json;
use harness::{upstream, Gateway};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// An upstream that accepts any upgrade and then echoes bytes back.
async fn echo_upgrade_upstream() -> std::net::SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buf = [0u8; 4096];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                let text = String::from_utf8_lossy(&head).to_ascii_lowercase();
                if !text.contains("upgrade: websocket") {
                    let _ = s
                        .write_all(b"HTTP/1.1 426 Upgrade Required\r\nContent-Length: 0\r\n\r\n")
                        .await;
                    return;
                }
                let _ = s
                    .write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: test\r\n\r\n")
                    .await;
                loop {
                    let n = s.read(&mut buf).await.unwrap_or(0);
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

const UPGRADE: &[u8] = b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n";

async fn read_head(s: &mut TcpStream) -> String {
    let mut head = Vec::new();
    let mut buf = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert!(
            n > 0,
            "closed before the head ended: {:?}",
            String::from_utf8_lossy(&head)
        );
        head.push(buf[0]);
    }
    String::from_utf8_lossy(&head).into_owned()
}

#[tokio::test]
async fn upgrade_and_echo_when_enabled() {
    let gw = Gateway::start().await;
    let up = echo_upgrade_upstream().await;
    gw.put("routes/ws", json!({"uri": "/ws", "enable_websocket": true, "upstream": upstream(&[(&up.to_string(), 1)])})).await;
    let mut s = TcpStream::connect(gw.data).await.unwrap();
    s.write_all(UPGRADE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    assert!(head.to_ascii_lowercase().contains("upgrade: websocket"));
    for msg in [&b"ping"[..], b"second frame", &[0u8, 1, 2, 255]] {
        s.write_all(msg).await.unwrap();
        let mut back = vec![0u8; msg.len()];
        tokio::time::timeout(Duration::from_secs(3), s.read_exact(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, msg);
    }
    gw.stop().await;
}

#[tokio::test]
async fn no_upgrade_without_enable_websocket() {
    let gw = Gateway::start().await;
    let up = echo_upgrade_upstream().await;
    gw.put(
        "routes/ws",
        json!({"uri": "/ws", "upstream": upstream(&[(&up.to_string(), 1)])}),
    )
    .await;
    let mut s = TcpStream::connect(gw.data).await.unwrap();
    s.write_all(UPGRADE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(
        head.starts_with("HTTP/1.1 426"),
        "Upgrade is not passed on: {head}"
    );
    gw.stop().await;
}

/// An upstream that upgrades, says "bye" and closes its sending side at
/// once, then reports what the client still sent until the client closed.
async fn half_closing_upstream() -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Receiver<Vec<u8>>,
) {
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::oneshot::channel();
    tokio::spawn(async move {
        let (mut s, _) = l.accept().await.unwrap();
        let mut head = Vec::new();
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = s.read(&mut buf).await.unwrap();
            assert!(n > 0);
            head.extend_from_slice(&buf[..n]);
        }
        s.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\nbye")
            .await
            .unwrap();
        s.shutdown().await.unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest).await;
        let _ = tx.send(rest);
    });
    (addr, rx)
}

#[tokio::test]
async fn a_half_close_crosses_the_tunnel_while_the_other_way_goes_on() {
    let gw = Gateway::start().await;
    let (up, sent_after) = half_closing_upstream().await;
    gw.put("routes/ws", json!({"uri": "/ws", "enable_websocket": true, "upstream": upstream(&[(&up.to_string(), 1)])})).await;
    let mut s = TcpStream::connect(gw.data).await.unwrap();
    s.write_all(UPGRADE).await.unwrap();
    let head = read_head(&mut s).await;
    assert!(head.starts_with("HTTP/1.1 101"), "{head}");
    // The upstream's end of sending reaches the client as an end of file
    // while the client's side of the tunnel is still open.
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(3), s.read_to_end(&mut got))
        .await
        .expect("the upstream's half-close reaches the client")
        .unwrap();
    assert_eq!(got, b"bye");
    s.write_all(b"still here").await.unwrap();
    s.shutdown().await.unwrap();
    let rest = tokio::time::timeout(Duration::from_secs(3), sent_after)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(rest, b"still here");
    gw.stop().await;
}

/// A WebSocket on which nothing goes either way for the upstream's `read`
/// timeout is closed, as nginx's `proxy_read_timeout` closes it; one in use
/// stays open past it.
#[tokio::test]
async fn quiet_websockets_are_closed_after_the_read_timeout() {
    let gw = Gateway::start().await;
    let up = echo_upgrade_upstream().await;
    let mut up_conf = upstream(&[(&up.to_string(), 1)]);
    up_conf["timeout"] = json!({"connect": 1, "send": 1, "read": 1});
    gw.put(
        "routes/ws",
        json!({"uri": "/ws", "enable_websocket": true, "upstream": up_conf}),
    )
    .await;

    let mut busy = TcpStream::connect(gw.data).await.unwrap();
    busy.write_all(UPGRADE).await.unwrap();
    assert!(read_head(&mut busy).await.starts_with("HTTP/1.1 101"));
    let mut quiet = TcpStream::connect(gw.data).await.unwrap();
    quiet.write_all(UPGRADE).await.unwrap();
    assert!(read_head(&mut quiet).await.starts_with("HTTP/1.1 101"));
    let opened = std::time::Instant::now();

    // The busy one sends a frame every half second for 3 s.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(500)).await;
        busy.write_all(b"ping").await.unwrap();
        let mut got = [0u8; 4];
        tokio::time::timeout(Duration::from_secs(2), busy.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&got, b"ping");
    }

    // By now the quiet one has been closed (after one to two seconds).
    let mut buf = [0u8; 16];
    let read = tokio::time::timeout(Duration::from_secs(1), quiet.read(&mut buf)).await;
    assert!(
        matches!(read, Ok(Ok(0)) | Ok(Err(_))),
        "quiet websocket still open after {:?}",
        opened.elapsed()
    );
    gw.stop().await;
}
