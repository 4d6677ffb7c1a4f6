//! The innermost service of every route: forwards the request to a node of
//! its upstream and streams the answer back.
//!
//! The request is prepared once (header policy in [`crate::headers`], a
//! WebSocket upgrade in [`crate::websocket`]); then nodes are tried in turn,
//! each try one exchange within the timeout phases of [`crate::phases`],
//! and the first answer is passed on. `Host` follows `pass_host`; the
//! upstream is spoken to in HTTP/1.1, or HTTP/2 for `grpc`/`grpcs`.
//!
//! Failures: a refused, reset or closed upstream is 502, a timeout is 504,
//! each with `X-APISIX-Upstream-Status`; with `retries` left, the next node
//! is tried instead (nginx's `proxy_next_upstream error timeout`; POST and
//! PATCH only when the connection could not be made). Retrying
//! needs the request body again, so bodies up to [`RETRY_BODY_LIMIT`] are
//! read before the first try; larger ones are streamed and not retried.

use std::convert::Infallible;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;
use hyper::upgrade::OnUpgrade;
use plugins::traffic_split::UpstreamPick;
use smallvec::SmallVec;

use plugins::ctx::{RequestBodyCapture, UpstreamInfo};
use plugins::{ClientIp, ConnInfo, ResponseBody};

use crate::body::{BodyFault, BodyState, ClientBody, IdleTimeout, ProxyBody};
use crate::connector::ConnectError;
use crate::error_page::{error_page, status_list, with_close, X_APISIX_UPSTREAM_STATUS};
use crate::h1_upstream::{H1Body, H1Request, SendFailure};
use crate::h2_upstream::H2Pool;
use crate::headers::{prepare_request_headers, strip_hop_by_hop, Forwarded};
use crate::health::Outcome;
use crate::never_fails::NeverFails;
use crate::phases::{within_phases, PhaseTimeout, Progress, SendWatch, TryProgress, WithinPhases};
use crate::upstream::{hash_key_of, CompiledUpstream, PassHost, Target, Timeouts, UpstreamClient};
use crate::websocket;

/// Request bodies up to this size are buffered so that a retry can resend
/// them; larger bodies stream straight through without retries.
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// Data-plane options that are the same for every route.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProxyOptions {
    /// `apisix.show_upstream_status_in_response_header`.
    pub always_show_upstream_status: bool,
}

/// Forwards to one upstream. Cloned per request, so it is one `Arc`.
#[derive(Clone)]
pub struct ProxyService(Arc<ProxyTarget>);

/// What a route forwards to.
pub struct ProxyTarget {
    pub upstream: Option<Arc<CompiledUpstream>>,
    pub timeouts: Timeouts,
    pub client: UpstreamClient,
    pub options: ProxyOptions,
    /// `enable_websocket`: pass `Upgrade: websocket` through and splice the
    /// two connections once the upstream agrees (101).
    pub websocket: bool,
    /// The upstreams traffic-split may send a request to instead, by the
    /// index it puts in the request ([`UpstreamPick`]).
    pub split: Vec<Arc<ProxyTarget>>,
}

impl ProxyService {
    pub fn new(target: ProxyTarget) -> Self {
        ProxyService(Arc::new(target))
    }
}

impl tower::Service<Request<ClientBody>> for ProxyService {
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<ClientBody>) -> Self::Future {
        let this = match req.extensions().get::<UpstreamPick>() {
            Some(pick) => self.0.split.get(pick.0).unwrap_or(&self.0).clone(),
            None => self.0.clone(),
        };
        Box::pin(NeverFails::new(this.forward(req)))
    }
}

/// Why a try failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Failure {
    /// Refused, reset, closed: 502.
    Broken,
    /// No answer within the timeout: 504.
    Timeout,
}

impl Failure {
    fn status(self) -> StatusCode {
        match self {
            Failure::Timeout => StatusCode::GATEWAY_TIMEOUT,
            Failure::Broken => StatusCode::BAD_GATEWAY,
        }
    }
}

/// What a failed try means for the rest of the request.
#[derive(Debug, Clone, Copy)]
struct TryFailure {
    kind: Failure,
    /// The node could not be reached, so even a POST may go to the next.
    connect: bool,
}

/// The outcome of one try: an answer (with its pooled connection, for
/// HTTP/1.1), a failure before any answer, or a timeout phase that ran out.
type TryResult = Result<Result<Response<UpstreamBody>, SendError>, PhaseTimeout>;

/// One try's request to a node: for HTTP/1.1 with the prepared headers
/// borrowed (they stay for the next try), for HTTP/2 a request of its own.
enum OutRequest<'a> {
    H1(H1Request<'a>),
    /// Boxed: this is the rare case, and the request would otherwise size
    /// every try's future.
    H2(Box<Request<ProxyBody>>),
}

/// An HTTP/1.1 exchange, boxed (see [`ProxyTarget::send`]).
type H1Exchange<'a> =
    Pin<Box<dyn Future<Output = Result<Response<H1Body>, SendFailure>> + Send + 'a>>;

pin_project_lite::pin_project! {
    /// One try's future (see [`ProxyTarget::send`]): the HTTP/1.1 exchange
    /// within its timeout phases, or anything else boxed whole.
    #[project = SendingProj]
    enum Sending<'a> {
        H1 { #[pin] within: WithinPhases<'a, H1Exchange<'a>, std::future::Pending<bool>> },
        Other { boxed: Pin<Box<dyn Future<Output = TryResult> + Send + 'a>> },
    }
}

impl Future for Sending<'_> {
    type Output = TryResult;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<TryResult> {
        match self.project() {
            SendingProj::H1 { within } => within.poll(cx).map(|r| {
                r.map(|answer| {
                    answer
                        .map(|resp| resp.map(UpstreamBody::H1))
                        .map_err(SendError::from_failure)
                })
            }),
            SendingProj::Other { boxed } => boxed.as_mut().poll(cx),
        }
    }
}

/// One try's request, and the progress its timeouts watch.
type Try<'a> = (OutRequest<'a>, TryProgress);

/// The host `pass_host` chose is no valid HTTP/2 authority: the client's
/// request is at fault (400).
#[derive(Debug)]
struct BadAuthority;

/// The request as every try sends it, prepared once.
struct Prepared {
    method: Method,
    /// The request target; the host goes separately, by `pass_host`.
    path: PathAndQuery,
    /// After the header policy; `Host` is set per try.
    headers: HeaderMap,
    /// The forwarding headers, which go out after `headers`.
    forwarded: Forwarded,
    /// The client's `Host`, or the authority of an absolute-form target.
    client_host: Option<HeaderValue>,
    grpc: bool,
    /// The client side of a WebSocket upgrade being passed through.
    upgrade: Option<OnUpgrade>,
    /// Present when the client body is streamed: tells a broken client
    /// body from a broken upstream.
    body_state: Option<Arc<BodyState>>,
    /// The TCP peer's address (`tproxy.source: client`).
    peer_ip: IpAddr,
    /// The connection's destination, and whether it came through a
    /// transparent listener (`discovery_type: original_dst`).
    destination: SocketAddr,
    transparent: bool,
    /// The request's extension map, emptied: the answer's extensions
    /// (see [`UpstreamInfo`]) move into it rather than allocate a map of
    /// their own.
    spare_extensions: http::Extensions,
}

impl Prepared {
    fn new(mut parts: Parts, websocket: bool) -> Self {
        let upgrade =
            websocket::take_client_upgrade(websocket, &parts.headers, &mut parts.extensions);
        let client_ip = parts.extensions.get::<ClientIp>().map(|c| c.0);
        let meta = parts
            .extensions
            .get::<ConnInfo>()
            .cloned()
            .unwrap_or_else(ConnInfo::unknown);
        let client_host = parts.headers.get(header::HOST).cloned().or_else(|| {
            parts
                .uri
                .authority()
                .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        });
        let grpc = parts
            .headers
            .get(header::CONTENT_TYPE)
            .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
        let peer_ip = plugins::vars::canonical(meta.peer.ip());
        let (destination, transparent) = (meta.local, meta.transparent);
        let mut headers = parts.headers;
        // X-Forwarded-Host names what the client asked for, even when a
        // plugin changed the Host sent upstream.
        let forwarded_host = parts
            .extensions
            .get::<plugins::ctx::OriginalHost>()
            .map(|h| &h.0)
            .or(client_host.as_ref());
        let forwarded = prepare_request_headers(&mut headers, client_ip, forwarded_host, meta);
        if upgrade.is_some() {
            websocket::request_upgrade(&mut headers);
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let body_state = parts.extensions.get::<Arc<BodyState>>().cloned();
        let mut spare_extensions = parts.extensions;
        spare_extensions.clear();
        Prepared {
            method: parts.method,
            path,
            headers,
            forwarded,
            client_host,
            grpc,
            upgrade,
            body_state,
            peer_ip,
            destination,
            transparent,
            spare_extensions,
        }
    }

    /// The one target of an `original_dst` upstream: where the client was
    /// connecting to. `None` for a connection that did not come through a
    /// transparent listener: its destination is the gateway itself, and
    /// proxying there would loop.
    fn original_dst(&self, up: &CompiledUpstream) -> Option<Target> {
        if !self.transparent {
            tracing::warn!(
                destination = %self.destination,
                "discovery_type original_dst needs a connection from a transparent listener"
            );
            return None;
        }
        up.original_dst(self.destination)
    }

    /// nginx does not pass a non-idempotent request to the next node once
    /// it may have reached one (proxy_next_upstream without non_idempotent).
    fn idempotent(&self) -> bool {
        !matches!(self.method, Method::POST | Method::PATCH) && self.method.as_str() != "LOCK"
    }

    /// The request of one try at `target`, with `Host` by `pass_host`. An
    /// HTTP/1.1 try (`h1`) borrows the headers; an HTTP/2 one clones them,
    /// or moves them on the `last` try.
    ///
    /// `Ok(None)` once a streamed body has gone out with an earlier try.
    fn for_node(
        &mut self,
        up: &CompiledUpstream,
        target: &Target,
        body: &mut RequestBody,
        last: bool,
        h1: bool,
    ) -> Result<Option<Try<'_>>, BadAuthority> {
        let host = match &up.pass_host {
            PassHost::Pass => self.client_host.clone(),
            PassHost::Node => Some(target.host_header.clone()),
            PassHost::Rewrite(h) => Some(h.clone()),
        };
        // HTTP/2 carries the host as `:authority`, from the URI; HTTP/1.1
        // as `Host`, with the request target in origin form.
        let host = host.unwrap_or_else(|| target.host_header.clone());
        if h1 {
            let Some((out_body, progress)) = body.next() else {
                return Ok(None);
            };
            self.headers.insert(header::HOST, host);
            let out = H1Request {
                method: self.method.clone(),
                target: self.path.clone(),
                headers: &mut self.headers,
                forwarded: &self.forwarded,
                body: out_body,
            };
            return Ok(Some((OutRequest::H1(out), progress)));
        }
        let mut headers = if last {
            std::mem::take(&mut self.headers)
        } else {
            self.headers.clone()
        };
        self.forwarded.insert_into(&mut headers);
        let uri = if up.http2 {
            headers.remove(header::HOST);
            let authority = host.to_str().ok().and_then(|h| h.parse::<Authority>().ok());
            let Some(authority) = authority else {
                return Err(BadAuthority);
            };
            let uri = Uri::builder()
                .scheme(up.scheme.clone())
                .authority(authority)
                .path_and_query(self.path.clone())
                .build();
            let Ok(uri) = uri else {
                return Err(BadAuthority);
            };
            uri
        } else {
            headers.insert(header::HOST, host);
            Uri::from(self.path.clone())
        };
        let Some((out_body, progress)) = body.next() else {
            return Ok(None);
        };
        if up.http2 && self.grpc {
            // gRPC servers require it; it is the one TE value HTTP/2 allows.
            headers.insert(header::TE, HeaderValue::from_static("trailers"));
        }
        let mut out = Request::new(out_body);
        *out.method_mut() = self.method.clone();
        *out.uri_mut() = uri;
        *out.version_mut() = if up.http2 {
            Version::HTTP_2
        } else {
            Version::HTTP_11
        };
        *out.headers_mut() = headers;
        Ok(Some((OutRequest::H2(Box::new(out)), progress)))
    }
}

/// 400 for a client body that broke, 408 for one that stalled; `None` while
/// the client body is fine (or was never streamed).
fn client_fault(state: Option<&BodyState>) -> Option<Response<ResponseBody>> {
    state.and_then(BodyState::fault).map(|f| match f {
        BodyFault::Broken => error_page(StatusCode::BAD_REQUEST, None),
        BodyFault::TimedOut => error_page(StatusCode::REQUEST_TIMEOUT, None),
    })
}

enum RequestBody {
    Buffered(Bytes),
    /// Taken by the first try.
    Streaming(Option<ClientBody>),
}

impl RequestBody {
    /// Buffers a body of up to [`RETRY_BODY_LIMIT`] when a retry may need
    /// it again (`retryable`); streams anything else. Fails with 400/408
    /// when the client body breaks while being read.
    async fn read(
        body: ClientBody,
        retryable: bool,
        state: Option<&BodyState>,
    ) -> Result<Self, Response<ResponseBody>> {
        Ok(match (body.buffered(), body.size_hint().exact()) {
            (Some(bytes), _) => RequestBody::Buffered(bytes),
            (None, Some(0)) => RequestBody::Buffered(Bytes::new()),
            // Copied as it comes (see `read_whole`): the frames themselves
            // may hold far more than their data.
            (None, Some(n)) if retryable && n <= RETRY_BODY_LIMIT => {
                match crate::body::read_whole(body, usize::try_from(n).unwrap_or(usize::MAX)).await
                {
                    Ok(bytes) => RequestBody::Buffered(bytes),
                    Err(_) => {
                        return Err(client_fault(state)
                            .unwrap_or_else(|| error_page(StatusCode::BAD_REQUEST, None)))
                    }
                }
            }
            _ => RequestBody::Streaming(Some(body)),
        })
    }

    /// Tries in all: a streamed body can be sent only once.
    fn tries(&self, max_tries: usize) -> usize {
        match self {
            RequestBody::Buffered(_) => max_tries,
            RequestBody::Streaming(_) => 1,
        }
    }

    /// The body of the next try and the progress its timeouts watch;
    /// `None` once a streamed body has been taken.
    fn next(&mut self) -> Option<(ProxyBody, TryProgress)> {
        match self {
            RequestBody::Buffered(b) => {
                let progress = TryProgress::Own(Progress::complete());
                Some((Either::Left(Full::new(b.clone())), progress))
            }
            RequestBody::Streaming(s) => s.take().map(|b| {
                let (watched, progress) = SendWatch::new(b);
                (Either::Right(watched), TryProgress::Shared(progress))
            }),
        }
    }
}

/// The next node for this request: the balancer's pick among the nodes not
/// tried yet and, with health checks, not unhealthy; `None` when none is left.
fn pick_node(up: &CompiledUpstream, hash_key: Option<&str>, tried: &[usize]) -> Option<usize> {
    let mut skip = up
        .health
        .as_ref()
        .map(|h| h.health.excluded())
        .unwrap_or_default();
    skip.extend_from_slice(tried);
    up.balancer.pick(hash_key, &skip)
}

/// What a try tells the passive health check.
fn outcome_of(result: &TryResult) -> Outcome {
    match result {
        Ok(Ok(resp)) => Outcome::Status(resp.status().as_u16()),
        Ok(Err(e)) if e.timed_out => Outcome::Timeout,
        Ok(Err(_)) => Outcome::TcpFailure,
        Err(_) => Outcome::Timeout,
    }
}

/// What [`ProxyService::respond`] reports of the try that got an answer.
struct Answered<'a> {
    /// Every try's status, the answering one last.
    statuses: &'a [u16],
    target: &'a Target,
    scheme: &'static str,
    /// When the first try began.
    started: Instant,
}

/// The answer when no try got one: the last try's 502/504 with every try
/// listed, or the gateway's own 502 (no upstream status) when no node could
/// be picked at all.
fn exhausted(
    up: &CompiledUpstream,
    last: Option<Authority>,
    statuses: &[u16],
    started: Instant,
) -> Response<ResponseBody> {
    match statuses.last() {
        Some(&code) => {
            let mut resp = error_page(
                StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                Some(statuses),
            );
            resp.extensions_mut().insert(UpstreamInfo {
                addr: last,
                status: Some(code),
                header_time: None,
                started: Some(started),
                scheme: Some(up.scheme_name()),
            });
            resp
        }
        None => error_page(StatusCode::BAD_GATEWAY, None),
    }
}

impl ProxyTarget {
    /// The proxied request, from its body to the upstream's answer.
    ///
    /// This and the steps below it are functions returning `async move`
    /// blocks: an `async fn` keeps a second copy of its arguments in its
    /// future, and these futures nest, so every copy is carried (and moved)
    /// by each level above.
    ///
    /// What needs no waiting (the request's parts taken apart, its forwarding
    /// headers) is done before the future is made, so that the future holds
    /// only what lives across its waits, not the request besides.
    fn forward(
        self: Arc<Self>,
        req: Request<ClientBody>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'static {
        let prepared = self.upstream.clone().map(|up| {
            let hash_key = up.hash_key.as_ref().map(|k| hash_key_of(k, &req));
            let (parts, mut body) = req.into_parts();
            if let Some(capture) = parts.extensions.get::<Arc<RequestBodyCapture>>() {
                body.tap(capture.clone());
            }
            (up, hash_key, Prepared::new(parts, self.websocket), body)
        });
        let mut prepared = prepared;
        async move {
            // Borrowed where it lies: moved out, the prepared request would
            // be held twice in this future.
            let Some((up, hash_key, request, body)) = &mut prepared else {
                return error_page(StatusCode::BAD_GATEWAY, None);
            };
            // A body is kept for a retry only when a retry is possible.
            let retryable = up.max_tries > 1;
            let body = std::mem::replace(body, ClientBody::empty());
            let body = match RequestBody::read(body, retryable, request.body_state.as_deref()).await
            {
                Ok(body) => body,
                Err(refusal) => return refusal,
            };
            self.try_nodes(up, request, body, hash_key.as_deref()).await
        }
    }

    /// Tries nodes until one answers, within `retries` and `retry_timeout`;
    /// a non-idempotent request moves on only when its node was unreachable.
    #[allow(clippy::manual_async_fn)] // see ProxyTarget::forward
    fn try_nodes<'a>(
        &'a self,
        up: &'a CompiledUpstream,
        request: &'a mut Prepared,
        mut body: RequestBody,
        hash_key: Option<&'a str>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send + 'a {
        async move {
            let tries = body.tries(up.max_tries);
            let idempotent = request.idempotent();
            let started = plugins::clock::std_now();
            // Boxed, as `sourced` below: rare, and a target is large.
            let own = if up.original_dst {
                match request.original_dst(up) {
                    Some(target) => Some(Box::new(target)),
                    None => return error_page(StatusCode::BAD_GATEWAY, None),
                }
            } else {
                None
            };
            // On the stack for up to four tries: two allocations per request
            // otherwise, for lists that are nearly always one entry long.
            let mut tried: SmallVec<[usize; 4]> = SmallVec::new();
            let mut statuses: SmallVec<[u16; 4]> = SmallVec::new();
            let mut last_addr = None;
            for attempt in 0..tries {
                if attempt > 0
                    && up
                        .retry_timeout
                        .is_some_and(|limit| started.elapsed() >= limit)
                {
                    break;
                }
                let (node, picked) = match &own {
                    Some(target) => (None, &**target),
                    None => {
                        let Some(i) = pick_node(up, hash_key, &tried) else {
                            break;
                        };
                        tried.push(i);
                        (Some(i), &up.targets[i])
                    }
                };
                let sourced;
                let target = if up.source_client {
                    sourced = Box::new(picked.from_source(request.peer_ip));
                    &sourced
                } else {
                    picked
                };
                let last = attempt + 1 == tries;
                let h1 = matches!(self.client, UpstreamClient::Http1(_));
                let (out, progress) = match request.for_node(up, target, &mut body, last, h1) {
                    Ok(Some(ready)) => ready,
                    Ok(None) => break,
                    Err(BadAuthority) => return error_page(StatusCode::BAD_REQUEST, None),
                };
                // The node answered, but unusably: its answer took the place
                // of the request's headers, and nginx would not try the
                // next node for an invalid answer either.
                let mut answered = false;
                let failure = match self.send_one(up, node, target, out, &progress).await {
                    Ok(Ok(resp)) => {
                        statuses.push(resp.status().as_u16());
                        let upgrade = request.upgrade.take();
                        let answered = Answered {
                            statuses: &statuses,
                            target,
                            scheme: up.scheme_name(),
                            started,
                        };
                        return self.respond(
                            resp,
                            answered,
                            upgrade,
                            &mut request.spare_extensions,
                        );
                    }
                    Ok(Err(e)) => {
                        // A client body that broke or stalled is the client's
                        // fault: no retry, and no blame on the upstream.
                        if let Some(resp) = client_fault(request.body_state.as_deref()) {
                            return with_close(resp);
                        }
                        tracing::warn!(upstream = %target.authority, error = %e.error, "upstream request failed");
                        answered = e.answered;
                        e.failure()
                    }
                    Err(PhaseTimeout) => {
                        tracing::warn!(upstream = %target.authority, timeouts = ?self.timeouts, "upstream timed out");
                        TryFailure {
                            kind: Failure::Timeout,
                            connect: false,
                        }
                    }
                };
                last_addr = Some(target.authority.clone());
                statuses.push(failure.kind.status().as_u16());
                if answered || (!idempotent && !failure.connect) {
                    break;
                }
            }
            exhausted(up, last_addr, &statuses, started)
        }
    }

    /// One try at `target`; for the balancer's node `i`, with the
    /// balancer's and the passive health check's bookkeeping around it.
    ///
    /// The try's future is made (boxed) before this one, so that this one
    /// holds a pointer to it rather than the request it was made from.
    #[allow(clippy::manual_async_fn)] // see ProxyTarget::forward
    fn send_one<'a>(
        &'a self,
        up: &'a CompiledUpstream,
        node: Option<usize>,
        target: &'a Target,
        out: OutRequest<'a>,
        progress: &'a Progress,
    ) -> impl Future<Output = TryResult> + Send + 'a {
        let sending = self.send(out, progress, up, target);
        async move {
            let Some(i) = node else {
                return sending.await;
            };
            let sent = up.balancer.measures_latency().then(plugins::clock::std_now);
            up.balancer.started(i);
            let result = sending.await;
            up.balancer
                .finished(i, sent.map_or(Duration::ZERO, |at| at.elapsed()));
            if let Some(checked) = &up.health {
                checked.health.observe_passive(i, outcome_of(&result));
            }
            result
        }
    }

    /// The client's answer to a try that got one: a 101 completes the
    /// WebSocket upgrade, anything else streams back.
    fn respond(
        &self,
        resp: Response<UpstreamBody>,
        answered: Answered<'_>,
        upgrade: Option<OnUpgrade>,
        spare_extensions: &mut http::Extensions,
    ) -> Response<ResponseBody> {
        let Answered {
            statuses,
            target,
            scheme,
            started,
        } = answered;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            let (parts, body) = resp.into_parts();
            let upstream_side = match body {
                UpstreamBody::H1(body) => body.into_upgraded(),
                UpstreamBody::H2(_) => None,
            };
            return match (upgrade, upstream_side) {
                (Some(client_side), Some(upstream_side)) => websocket::splice(
                    client_side,
                    upstream_side,
                    &parts.headers,
                    self.timeouts.read,
                ),
                // An upgrade nobody asked for cannot be honoured.
                _ => error_page(StatusCode::BAD_GATEWAY, Some(statuses)),
            };
        }
        let mut resp = self.finish(resp, statuses);
        if resp.extensions().is_empty() {
            *resp.extensions_mut() = std::mem::take(spare_extensions);
        }
        resp.extensions_mut().insert(UpstreamInfo {
            addr: Some(target.authority.clone()),
            status: statuses.last().copied(),
            header_time: Some(plugins::clock::std_now()),
            started: Some(started),
            scheme: Some(scheme),
        });
        resp
    }

    /// One try: `out` to the node `target`, within the timeout phases.
    ///
    /// The HTTP/1.1 exchange is boxed on its own: unboxed, its state (over a
    /// kilobyte) sized every future above it and was copied at each level it
    /// passed up through. Nothing runs before the future is first polled.
    fn send<'a>(
        &'a self,
        out: OutRequest<'a>,
        progress: &'a Progress,
        up: &'a CompiledUpstream,
        target: &'a Target,
    ) -> Sending<'a> {
        match (&self.client, out) {
            (UpstreamClient::Http1(pool), OutRequest::H1(out)) => {
                let exchange: H1Exchange<'a> = Box::pin(pool.send(
                    &target.pool_key,
                    up.keepalive_pool.requests,
                    out,
                    move |connected| progress.mark_connected(connected),
                ));
                Sending::H1 {
                    within: within_phases(
                        exchange,
                        std::future::pending(),
                        progress,
                        &self.timeouts,
                    ),
                }
            }
            (UpstreamClient::Http2(pool), OutRequest::H2(out)) => Sending::Other {
                boxed: Box::pin(self.send_h2(pool, *out, progress, up, target)),
            },
            // `try_nodes` builds each try for its client's protocol.
            (UpstreamClient::Http1(_), OutRequest::H2(_))
            | (UpstreamClient::Http2(_), OutRequest::H1(_)) => Sending::Other {
                boxed: Box::pin(std::future::ready(Ok(Err(SendError {
                    connect: false,
                    timed_out: false,
                    answered: false,
                    error: "a request built for the other protocol".into(),
                })))),
            },
        }
    }

    /// [`ProxyTarget::send`] over HTTP/2.
    async fn send_h2(
        &self,
        pool: &H2Pool,
        out: Request<ProxyBody>,
        progress: &Progress,
        up: &CompiledUpstream,
        target: &Target,
    ) -> TryResult {
        let server_name = target.tls_name.as_deref().unwrap_or_default();
        let sender = pool
            .sender(&target.authority, server_name, up.keepalive_pool.requests)
            .await;
        let mut sender = match sender {
            Ok(s) => s,
            Err(e) => {
                return Ok(Err(SendError {
                    timed_out: matches!(e, ConnectError::TimedOut(_)),
                    connect: true,
                    answered: false,
                    error: e.into(),
                }))
            }
        };
        let exchange = async move {
            sender.ready().await?;
            sender.send_request(out).await
        };
        within_phases(exchange, std::future::ready(true), progress, &self.timeouts)
            .await
            .map(|r| {
                r.map(|resp| resp.map(UpstreamBody::H2))
                    .map_err(SendError::from_hyper)
            })
    }

    /// Streams an upstream's answer back: hop-by-hop headers removed, the
    /// tries listed for a 5xx (or always, by `show_upstream_status`), the
    /// body cut off after `read` without data, the connection pooled again
    /// once the body has been read to the end.
    fn finish(&self, resp: Response<UpstreamBody>, statuses: &[u16]) -> Response<ResponseBody> {
        let (mut parts, body) = resp.into_parts();
        // The client gets the gateway's protocol, whatever the upstream spoke
        // (an HTTP/1.0 upstream must not turn the answer into HTTP/1.0).
        parts.version = Version::HTTP_11;
        strip_hop_by_hop(&mut parts.headers);
        if parts.status.is_server_error() || self.options.always_show_upstream_status {
            if let Some(v) = status_list(statuses) {
                parts.headers.insert(X_APISIX_UPSTREAM_STATUS, v);
            }
        }
        // An upstream that stops sending mid-body is cut off after the read
        // timeout; the client connection is then aborted, never left hanging.
        // The connection goes back to its pool once the answer has been
        // read to the end (see `H1Body`).
        let body = IdleTimeout::new(body, self.timeouts.read).boxed_unsync();
        Response::from_parts(parts, body)
    }
}

/// An upstream answer's body, by the protocol it came over.
enum UpstreamBody {
    H1(H1Body),
    H2(Incoming),
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = plugins::BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        match self.get_mut() {
            UpstreamBody::H1(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            UpstreamBody::H2(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::H1(b) => b.is_end_stream(),
            UpstreamBody::H2(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> http_body::SizeHint {
        match self {
            UpstreamBody::H1(b) => b.size_hint(),
            UpstreamBody::H2(b) => b.size_hint(),
        }
    }
}

/// Why one try failed before a usable answer came.
#[derive(Debug)]
struct SendError {
    /// The node could not be reached (a POST may still be retried).
    connect: bool,
    timed_out: bool,
    /// An answer head came but could not be passed on: no further try.
    answered: bool,
    error: plugins::BoxError,
}

impl SendError {
    fn from_failure(f: SendFailure) -> Self {
        match f {
            SendFailure::Connect(e) => SendError {
                connect: true,
                timed_out: matches!(e, ConnectError::TimedOut(_)),
                answered: false,
                error: e.into(),
            },
            SendFailure::Request(e) => SendError {
                connect: false,
                timed_out: false,
                answered: false,
                error: e.into(),
            },
            SendFailure::Answer(e) => SendError {
                connect: false,
                timed_out: false,
                answered: true,
                error: e.into(),
            },
        }
    }

    fn failure(&self) -> TryFailure {
        TryFailure {
            kind: if self.timed_out {
                Failure::Timeout
            } else {
                Failure::Broken
            },
            connect: self.connect,
        }
    }

    fn from_hyper(e: hyper::Error) -> Self {
        SendError {
            connect: false,
            timed_out: e.is_timeout(),
            answered: false,
            error: e.into(),
        }
    }
}
