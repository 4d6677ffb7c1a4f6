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
//! As a proxy, it keeps the thread's idle upstream connections in a plain
//! list: a request takes one (or opens one), and the answer's body puts it
//! back at its end, so that a load with a new client connection per request
//! still reuses upstream connections, as the gateway and nginx do. It
//! removes the request's `Connection` header and touches no other: no
//! balancer, no other rewriting, no timeouts. It is a measuring stick, not a
//! gateway.

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http_body_util::{combinators::UnsyncBoxBody, BodyExt, Full};
use hyper::body::{Frame, Incoming};
use hyper::client::conn::http1::SendRequest;
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
        let pool = Pool::default();
        loop {
            let (client, _) = listener.accept().await?;
            let pool = pool.clone();
            tokio::task::spawn_local(async move {
                if let Err(e) = serve(client, upstream, pool).await {
                    eprintln!("connection: {e}");
                }
            });
        }
    })
}

async fn serve(
    client: TcpStream,
    upstream: Option<SocketAddr>,
    pool: Pool,
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
    let proxy = hyper::service::service_fn(move |mut request: Request<Incoming>| {
        let pool = pool.clone();
        // The one header rewrite a proxy cannot do without: a client's
        // `Connection: close` is about its own connection, not the pooled one.
        request.headers_mut().remove(hyper::header::CONNECTION);
        async move {
            let answer = match take(&pool, upstream).await {
                Ok(mut sender) => match sender.send_request(request).await {
                    Ok(answer) => answer.map(|body| Returning {
                        body: Some(body),
                        sender: Some(sender),
                        pool,
                    }),
                    Err(_) => bad_gateway(),
                },
                Err(_) => bad_gateway(),
            };
            Ok::<_, Infallible>(answer)
        }
    });
    server.serve_connection(TokioIo::new(client), proxy).await?;
    Ok(())
}

/// Idle upstream connections, shared by every client connection of the
/// (single) thread.
type Pool = Rc<RefCell<Vec<SendRequest<Incoming>>>>;

/// An idle connection from `pool`, or a new one.
async fn take(
    pool: &Pool,
    upstream: SocketAddr,
) -> Result<SendRequest<Incoming>, Box<dyn std::error::Error>> {
    loop {
        // Not borrowed across the wait below: the pool is the thread's.
        let idle = pool.borrow_mut().pop();
        let Some(mut sender) = idle else { break };
        // Returned at its answer's end: ready as soon as its task has seen
        // that end; an error means it closed meanwhile.
        if sender.ready().await.is_ok() {
            return Ok(sender);
        }
    }
    let node = TcpStream::connect(upstream).await?;
    node.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(node)).await?;
    tokio::task::spawn_local(connection);
    Ok(sender)
}

fn bad_gateway() -> Response<Returning> {
    let mut bad = Response::new(Returning {
        body: None,
        sender: None,
        pool: Pool::default(),
    });
    *bad.status_mut() = hyper::StatusCode::BAD_GATEWAY;
    bad
}

/// An answer's body that puts its upstream connection back into the pool
/// once the body has ended (a body dropped before its end takes the
/// connection with it). No body: an empty one.
struct Returning {
    body: Option<Incoming>,
    sender: Option<SendRequest<Incoming>>,
    pool: Pool,
}

impl hyper::body::Body for Returning {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = self.get_mut();
        let Some(body) = this.body.as_mut() else {
            return Poll::Ready(None);
        };
        let polled = Pin::new(&mut *body).poll_frame(cx);
        if matches!(polled, Poll::Ready(None)) || body.is_end_stream() {
            if let Some(sender) = this.sender.take() {
                this.pool.borrow_mut().push(sender);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.as_ref().is_none_or(Incoming::is_end_stream)
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        match &self.body {
            Some(body) => body.size_hint(),
            None => hyper::body::SizeHint::with_exact(0),
        }
    }
}
