//! The floor under the gateway's request path: hyper's HTTP/1 server and
//! client and nothing else, on the same single-threaded runtime and
//! allocator as one gateway worker. `bench/compare.py --floor` runs it beside
//! ferrogate and nginx with the same load, so that the CPU per request hyper
//! and tokio take by themselves can be told from what the gateway adds
//! (routing, plugins, the access log, timeouts, the upstream pool).
//!
//! ```sh
//! cargo build --release --example hyper_floor
//! target/release/examples/hyper_floor 127.0.0.1:9081 127.0.0.1:1980   # proxy
//! target/release/examples/hyper_floor 127.0.0.1:9081                  # answers "ok\n" itself
//! ```
//!
//! As a proxy, each client connection gets one upstream connection of its
//! own, opened at the accept and used for that client's requests one after
//! the other: no pool, no balancer, no header rewriting, no timeouts. It is a
//! measuring stick, not a gateway.

use std::convert::Infallible;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

#[global_allocator]
static ALLOCATOR: gateway::alloc::Mimalloc = gateway::alloc::Mimalloc;

type Body = UnsyncBoxBody<Bytes, hyper::Error>;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let listen: SocketAddr = args
        .next()
        .ok_or("usage: hyper_floor LISTEN_ADDR [UPSTREAM_ADDR]")?
        .parse()?;
    let upstream: Option<SocketAddr> = args.next().map(|a| a.parse()).transpose()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let listener = TcpListener::bind(listen).await?;
        loop {
            let (client, _) = listener.accept().await?;
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(client, upstream).await {
                    eprintln!("connection: {e}");
                }
            });
        }
    })
}

async fn serve(
    client: TcpStream,
    upstream: Option<SocketAddr>,
) -> Result<(), Box<dyn std::error::Error>> {
    client.set_nodelay(true)?;
    let server = hyper::server::conn::http1::Builder::new();
    let Some(upstream) = upstream else {
        let answer = hyper::service::service_fn(|_: Request<Incoming>| async {
            let body: Body = Full::new(Bytes::from_static(b"ok\n"))
                .map_err(|never| match never {})
                .boxed_unsync();
            Ok::<_, Infallible>(Response::new(body))
        });
        server
            .serve_connection(TokioIo::new(client), answer)
            .await?;
        return Ok(());
    };
    let node = TcpStream::connect(upstream).await?;
    node.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(node)).await?;
    tokio::task::spawn_local(connection);
    // hyper's server asks for one answer at a time on a connection, so the
    // sender is only ever borrowed for a moment, never across a wait.
    let sender = std::rc::Rc::new(std::cell::RefCell::new(sender));
    let proxy = hyper::service::service_fn(move |request: Request<Incoming>| {
        let sender = sender.clone();
        async move {
            let ready = std::future::poll_fn(|cx| sender.borrow_mut().poll_ready(cx)).await;
            let sent = match ready {
                Ok(()) => {
                    let sending = sender.borrow_mut().send_request(request);
                    sending.await
                }
                Err(e) => Err(e),
            };
            let answer = match sent {
                Ok(answer) => answer.map(BodyExt::boxed_unsync),
                Err(_) => {
                    let mut bad = Response::new(
                        Full::new(Bytes::new())
                            .map_err(|never| match never {})
                            .boxed_unsync(),
                    );
                    *bad.status_mut() = hyper::StatusCode::BAD_GATEWAY;
                    bad
                }
            };
            Ok::<_, Infallible>(answer)
        }
    });
    server.serve_connection(TokioIo::new(client), proxy).await?;
    Ok(())
}
