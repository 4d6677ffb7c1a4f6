//! The innermost service of every route: forwards the request to a node of
//! its upstream and streams the answer back.
//!
//! What the upstream sees, as under APISIX (nginx `proxy_pass`):
//! HTTP/1.1; `Host` by `pass_host`; `X-Real-IP` = the client address;
//! `X-Forwarded-For` = the client's own value + `, ` + the client address;
//! `X-Forwarded-Proto/Host/Port` set by the gateway (a client cannot forge
//! them); `Forwarded` and hop-by-hop headers (`Connection` and what it names,
//! `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//! `Proxy-Connection`) removed.
//!
//! Failures: a refused, reset or closed upstream is 502, a timeout is 504,
//! each with `X-APISIX-Upstream-Status`; with `retries` left, the next node
//! is tried instead (nginx's `proxy_next_upstream error timeout`; POST and
//! PATCH only when the connection could not be made). Retrying
//! needs the request body again, so bodies up to [`RETRY_BODY_LIMIT`] are
//! read before the first try; larger ones are streamed and not retried.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{Authority, PathAndQuery};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{BodyExt, Either, Full};
use hyper::body::Incoming;

use crate::body::{BodyFault, BodyState, ClientBody};

use plugins::ctx::UpstreamInfo;
use plugins::{full_body, ClientIp, ResponseBody};

use crate::connector::ConnectError;
use crate::h1_upstream::{Lease, Leased, SendFailure};
use crate::health::Outcome;
use crate::phases::{within_phases, PhaseTimeout, Progress, SendWatch};
use crate::upstream::{CompiledUpstream, HashKey, PassHost, Target, Timeouts, UpstreamClient};
use crate::vars::RequestVars;
use plugins::expr::Vars;
use std::borrow::Cow;

/// Request bodies up to this size are buffered so that a retry can resend
/// them; larger bodies stream straight through without retries.
pub const RETRY_BODY_LIMIT: u64 = 64 * 1024;

/// The body sent upstream: buffered (replayable) or streamed.
pub type ProxyBody = Either<Full<Bytes>, SendWatch<ClientBody>>;

/// Facts about the client connection, set by the listener.
pub use plugins::ConnInfo as ConnMeta;

/// Header names the proxy touches on every request, parsed once.
mod names {
    use http::header::{self, HeaderName};

    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
    pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
    pub const FORWARDED: HeaderName = header::FORWARDED;
    pub const X_APISIX_UPSTREAM_STATUS: HeaderName =
        HeaderName::from_static("x-apisix-upstream-status");
    pub const HOP_BY_HOP: [HeaderName; 8] = [
        header::CONNECTION,
        HeaderName::from_static("keep-alive"),
        HeaderName::from_static("proxy-connection"),
        header::TE,
        header::TRAILER,
        header::TRANSFER_ENCODING,
        header::UPGRADE,
        header::EXPECT,
    ];
}
use names::*;

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
        let this = self.0.clone();
        Box::pin(async move { Ok(this.forward(req).await) })
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

/// `502, 200`: every try's status, as nginx's `$upstream_status`.
fn status_list(statuses: &[u16]) -> Option<HeaderValue> {
    let text = statuses
        .iter()
        .map(u16::to_string)
        .collect::<Vec<_>>()
        .join(", ");
    HeaderValue::from_str(&text).ok()
}

enum RequestBody {
    Buffered(Bytes),
    Streaming(Option<ClientBody>),
}

impl ProxyTarget {
    async fn forward(&self, req: Request<ClientBody>) -> Response<ResponseBody> {
        let Some(up) = self.upstream.clone() else {
            return error_page(StatusCode::BAD_GATEWAY, None);
        };
        let hash_key = up.hash_key.as_ref().map(|k| hash_key_of(k, &req));
        let (mut parts, body) = req.into_parts();
        let upgrade = if self.websocket && wants_websocket(&parts.headers) {
            parts.extensions.remove::<hyper::upgrade::OnUpgrade>()
        } else {
            None
        };
        let client_ip = parts.extensions.get::<ClientIp>().map(|c| c.0);
        let meta = parts
            .extensions
            .get::<ConnMeta>()
            .copied()
            .unwrap_or_else(ConnMeta::unknown);
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
        let mut headers = parts.headers;
        prepare_request_headers(&mut headers, client_ip, client_host.as_ref(), meta);
        if upgrade.is_some() {
            headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        }
        let path = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));

        // A body is kept for a retry only when a retry is possible.
        let retryable_body = up.max_tries > 1;
        let body_state = parts.extensions.get::<Arc<BodyState>>().cloned();
        let client_fault = |state: &Option<Arc<BodyState>>| {
            state.as_ref().and_then(|s| s.fault()).map(|f| match f {
                BodyFault::Broken => error_page(StatusCode::BAD_REQUEST, None),
                BodyFault::TimedOut => error_page(StatusCode::REQUEST_TIMEOUT, None),
            })
        };
        let mut body = match (body.buffered(), body.size_hint().exact()) {
            (Some(bytes), _) => RequestBody::Buffered(bytes),
            (None, Some(0)) => RequestBody::Buffered(Bytes::new()),
            (None, Some(n)) if retryable_body && n <= RETRY_BODY_LIMIT => {
                match body.collect().await {
                    Ok(collected) => RequestBody::Buffered(collected.to_bytes()),
                    Err(_) => {
                        return client_fault(&body_state)
                            .unwrap_or_else(|| error_page(StatusCode::BAD_REQUEST, None))
                    }
                }
            }
            _ => RequestBody::Streaming(Some(body)),
        };
        let tries = match body {
            RequestBody::Buffered(_) => up.max_tries,
            RequestBody::Streaming(_) => 1,
        };
        // nginx does not pass a non-idempotent request to the next node once
        // it may have reached one (proxy_next_upstream without non_idempotent).
        let idempotent = !matches!(parts.method, Method::POST | Method::PATCH)
            && parts.method.as_str() != "LOCK";
        let started = Instant::now();
        let mut tried: Vec<usize> = Vec::with_capacity(tries);
        let mut statuses: Vec<u16> = Vec::with_capacity(tries);
        for attempt in 0..tries {
            if attempt > 0
                && up
                    .retry_timeout
                    .is_some_and(|limit| started.elapsed() >= limit)
            {
                break;
            }
            // Unhealthy nodes are skipped like tried ones.
            let mut skip = up
                .health
                .as_ref()
                .map(|h| h.health.excluded())
                .unwrap_or_default();
            skip.extend_from_slice(&tried);
            let Some(i) = up.balancer.pick(hash_key.as_deref(), &skip) else {
                break;
            };
            tried.push(i);
            let target = &up.targets[i];
            let last = attempt + 1 == tries;
            let mut out_headers = if last {
                std::mem::take(&mut headers)
            } else {
                headers.clone()
            };
            let host = match &up.pass_host {
                PassHost::Pass => client_host.clone(),
                PassHost::Node => Some(target.host_header.clone()),
                PassHost::Rewrite(h) => Some(h.clone()),
            };
            // HTTP/2 carries the host as `:authority`, from the URI; HTTP/1.1
            // as `Host`, with the request target in origin form.
            let host = host.unwrap_or_else(|| target.host_header.clone());
            let uri = if up.http2 {
                out_headers.remove(header::HOST);
                let authority = host.to_str().ok().and_then(|h| h.parse::<Authority>().ok());
                let Some(authority) = authority else {
                    return error_page(StatusCode::BAD_REQUEST, None);
                };
                let uri = Uri::builder()
                    .scheme(up.scheme.clone())
                    .authority(authority)
                    .path_and_query(path.clone())
                    .build();
                let Ok(uri) = uri else {
                    return error_page(StatusCode::BAD_REQUEST, None);
                };
                uri
            } else {
                out_headers.insert(header::HOST, host);
                Uri::from(path.clone())
            };
            let (out_body, progress): (ProxyBody, _) = match &mut body {
                RequestBody::Buffered(b) => {
                    (Either::Left(Full::new(b.clone())), Progress::complete())
                }
                RequestBody::Streaming(s) => match s.take() {
                    Some(b) => {
                        let (watched, progress) = SendWatch::new(b);
                        (Either::Right(watched), progress)
                    }
                    None => break,
                },
            };
            if up.http2 && grpc {
                // gRPC servers require it; it is the one TE value HTTP/2 allows.
                out_headers.insert(header::TE, HeaderValue::from_static("trailers"));
            }
            let mut out = Request::new(out_body);
            *out.method_mut() = parts.method.clone();
            *out.uri_mut() = uri;
            *out.version_mut() = if up.http2 {
                Version::HTTP_2
            } else {
                Version::HTTP_11
            };
            *out.headers_mut() = out_headers;

            let sent = Instant::now();
            up.balancer.started(i);
            let result = self.send(out, &progress, &up, target).await;
            up.balancer.finished(i, sent.elapsed());
            if let Some(checked) = &up.health {
                checked.health.observe_passive(
                    i,
                    match &result {
                        Ok(Ok((resp, _))) => Outcome::Status(resp.status().as_u16()),
                        Ok(Err(e)) if e.timed_out => Outcome::Timeout,
                        Ok(Err(_)) => Outcome::TcpFailure,
                        Err(_) => Outcome::Timeout,
                    },
                );
            }
            let failure = match result {
                Ok(Ok((mut resp, lease))) => {
                    statuses.push(resp.status().as_u16());
                    if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
                        return match upgrade {
                            Some(client_side) => splice(client_side, &mut resp),
                            // An upgrade nobody asked for cannot be honoured.
                            None => error_page(StatusCode::BAD_GATEWAY, Some(&statuses)),
                        };
                    }
                    let mut resp = self.finish(resp, &statuses, lease);
                    resp.extensions_mut().insert(UpstreamInfo {
                        addr: Some(target.authority.clone()),
                        status: statuses.last().copied(),
                        header_time: Some(Instant::now()),
                    });
                    return resp;
                }
                Ok(Err(e)) => {
                    // A client body that broke or stalled is the client's
                    // fault: no retry, and no blame on the upstream.
                    if let Some(resp) = client_fault(&body_state) {
                        return with_close(resp);
                    }
                    tracing::warn!(upstream = %target.authority, error = %e.error, "upstream request failed");
                    let kind = if e.timed_out {
                        Failure::Timeout
                    } else {
                        Failure::Broken
                    };
                    (kind, e.connect)
                }
                Err(_) => {
                    tracing::warn!(upstream = %target.authority, timeouts = ?self.timeouts, "upstream timed out");
                    (Failure::Timeout, false)
                }
            };
            statuses.push(failure.0.status().as_u16());
            if !idempotent && !failure.1 {
                break;
            }
        }
        match statuses.last() {
            Some(&code) => {
                let mut resp = error_page(
                    StatusCode::from_u16(code).unwrap_or(StatusCode::BAD_GATEWAY),
                    Some(&statuses),
                );
                let last = tried.last().and_then(|i| up.targets.get(*i));
                resp.extensions_mut().insert(UpstreamInfo {
                    addr: last.map(|t| t.authority.clone()),
                    status: Some(code),
                    header_time: None,
                });
                resp
            }
            // No node could be picked: the gateway's own 502, no upstream status.
            None => error_page(StatusCode::BAD_GATEWAY, None),
        }
    }

    /// One try: `out` to the node `target`, within the timeout phases.
    async fn send(
        &self,
        out: Request<ProxyBody>,
        progress: &Progress,
        up: &CompiledUpstream,
        target: &Target,
    ) -> Result<Result<(Response<Incoming>, Option<Lease>), SendError>, PhaseTimeout> {
        match &self.client {
            UpstreamClient::Http1(pool) => {
                let exchange = pool.send(
                    &target.pool_key,
                    up.keepalive_pool.requests,
                    out,
                    |connected| progress.mark_connected(connected),
                );
                within_phases(exchange, std::future::pending(), progress, &self.timeouts)
                    .await
                    .map(|r| {
                        r.map(|(resp, lease)| (resp, Some(lease)))
                            .map_err(SendError::from_failure)
                    })
            }
            UpstreamClient::Http2(pool) => {
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
                    .map(|r| r.map(|resp| (resp, None)).map_err(SendError::from_hyper))
            }
        }
    }

    fn finish(
        &self,
        resp: Response<Incoming>,
        statuses: &[u16],
        lease: Option<Lease>,
    ) -> Response<ResponseBody> {
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
        let body = crate::body::IdleTimeout::new(body, self.timeouts.read);
        // The connection goes back to its pool once the answer has been
        // read to the end.
        let body = match lease {
            Some(lease) if body.is_end_stream() => {
                lease.release();
                body.boxed_unsync()
            }
            Some(lease) => Leased::new(body, lease).boxed_unsync(),
            None => body.boxed_unsync(),
        };
        Response::from_parts(parts, body)
    }
}

/// Why one try failed before an answer came.
#[derive(Debug)]
struct SendError {
    /// The node could not be reached (a POST may still be retried).
    connect: bool,
    timed_out: bool,
    error: plugins::BoxError,
}

impl SendError {
    fn from_failure(f: SendFailure) -> Self {
        match f {
            SendFailure::Connect(e) => SendError {
                connect: true,
                timed_out: matches!(e, ConnectError::TimedOut(_)),
                error: e.into(),
            },
            SendFailure::Request(e) => SendError::from_hyper(e),
        }
    }

    fn from_hyper(e: hyper::Error) -> Self {
        SendError {
            connect: false,
            timed_out: e.is_timeout(),
            error: e.into(),
        }
    }
}

/// `Upgrade: websocket` with `Connection: upgrade`.
fn wants_websocket(headers: &HeaderMap) -> bool {
    let has_token = |name: header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has_token(header::UPGRADE, "websocket") && has_token(header::CONNECTION, "upgrade")
}

/// Answers 101 to the client and copies bytes both ways between the two
/// upgraded connections until either side closes.
fn splice(
    client_side: hyper::upgrade::OnUpgrade,
    resp: &mut Response<Incoming>,
) -> Response<ResponseBody> {
    let upstream_side = hyper::upgrade::on(&mut *resp);
    tokio::spawn(async move {
        match tokio::try_join!(client_side, upstream_side) {
            Ok((client, upstream)) => {
                let mut client = hyper_util::rt::TokioIo::new(client);
                let mut upstream = hyper_util::rt::TokioIo::new(upstream);
                if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut upstream).await {
                    tracing::debug!(error = %e, "websocket connection ended");
                }
            }
            Err(e) => tracing::warn!(error = %e, "websocket upgrade failed"),
        }
    });
    let mut out = Response::new(full_body(Bytes::new()));
    *out.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    for (name, value) in resp.headers() {
        if name != header::CONTENT_LENGTH && name != header::TRANSFER_ENCODING {
            out.headers_mut().append(name.clone(), value.clone());
        }
    }
    out
}

/// The `chash` key of a request.
fn hash_key_of(key: &HashKey, req: &Request<ClientBody>) -> String {
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(crate::router::normalize_host);
    let vars = RequestVars {
        req,
        host: host.as_deref(),
        path: req.uri().path(),
    };
    let value = match key {
        HashKey::Var(name) => vars.var(name),
        HashKey::Header(name) => req
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(Cow::Borrowed),
        HashKey::Cookie(name) => vars.var(&format!("cookie_{name}")),
        HashKey::Combination(template) => Some(Cow::Owned(vars.expand(template))),
        HashKey::Consumer => req
            .extensions()
            .get::<plugins::ctx::ConsumerName>()
            .map(|c| Cow::Owned(c.0.to_string())),
    };
    // A request without the key still needs a node: hash its address.
    value
        .map(Cow::into_owned)
        .or_else(|| vars.var("remote_addr").map(Cow::into_owned))
        .unwrap_or_default()
}

/// Marks a response as the last on its connection (nginx closes after 400,
/// 408, 413, 414 and 501).
pub fn with_close(mut resp: Response<ResponseBody>) -> Response<ResponseBody> {
    resp.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    resp
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    if headers.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for name in named {
            headers.remove(name);
        }
    }
    for name in &HOP_BY_HOP {
        if headers.contains_key(name) {
            headers.remove(name);
        }
    }
}

/// Sets the forwarding headers APISIX's nginx template sets.
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    client_ip: Option<std::net::IpAddr>,
    client_host: Option<&HeaderValue>,
    meta: ConnMeta,
) {
    strip_hop_by_hop(headers);
    if headers.contains_key(FORWARDED) {
        headers.remove(FORWARDED);
    }
    if let Some(ip) = client_ip {
        let ip_text = ip.to_string();
        let xff = if headers.contains_key(X_FORWARDED_FOR) {
            let previous: Vec<&str> = headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            format!("{}, {ip_text}", previous.join(", "))
        } else {
            ip_text.clone()
        };
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(xff)) {
            headers.insert(X_FORWARDED_FOR, v);
        }
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(ip_text)) {
            headers.insert(X_REAL_IP, v);
        }
    }
    // A trusted proxy's own X-Forwarded-* describe the original client and
    // are passed on; anybody else's are replaced.
    let keep = |headers: &HeaderMap, name: &HeaderName| {
        meta.forwarded_trusted && headers.contains_key(name)
    };
    if !keep(headers, &X_FORWARDED_PROTO) {
        headers.insert(X_FORWARDED_PROTO, HeaderValue::from_static(meta.scheme));
    }
    if !keep(headers, &X_FORWARDED_HOST) {
        match client_host {
            Some(h) => {
                headers.insert(X_FORWARDED_HOST, h.clone());
            }
            None => {
                headers.remove(X_FORWARDED_HOST);
            }
        }
    }
    if !keep(headers, &X_FORWARDED_PORT) {
        let host_port = client_host.and_then(|h| h.to_str().ok()).and_then(|h| {
            let (_, port) = h.rsplit_once(':')?;
            (!h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty())
                .then(|| port.to_string())
        });
        let port = host_port.unwrap_or_else(|| meta.local.port().to_string());
        if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(port)) {
            headers.insert(X_FORWARDED_PORT, v);
        }
    }
}

/// The gateway's own error page for `status` (nginx-style HTML, which is what
/// APISIX clients see for 502/504), with `X-APISIX-Upstream-Status` listing
/// the tries when upstreams were contacted.
pub fn error_page(status: StatusCode, upstream_statuses: Option<&[u16]>) -> Response<ResponseBody> {
    let line = format!(
        "{} {}",
        status.as_u16(),
        status.canonical_reason().unwrap_or("Error")
    );
    // nginx spells 504's reason "Gateway Time-out"; clients grep for it.
    let line = if status == StatusCode::GATEWAY_TIMEOUT {
        "504 Gateway Time-out".to_string()
    } else {
        line
    };
    let html = format!(
        "<html>\r\n<head><title>{line}</title></head>\r\n<body>\r\n<center><h1>{line}</h1></center>\r\n<hr><center>ferrogate</center>\r\n</body>\r\n</html>\r\n"
    );
    let mut resp = Response::new(full_body(html));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
    if let Some(v) = upstream_statuses.and_then(status_list) {
        resp.headers_mut().insert(X_APISIX_UPSTREAM_STATUS, v);
    }
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> ConnMeta {
        ConnMeta {
            peer: "10.0.0.9:40000".parse().unwrap(),
            local: "127.0.0.1:9080".parse().unwrap(),
            scheme: "http",
            forwarded_trusted: false,
        }
    }

    #[test]
    fn forwarding_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.2.3"));
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert(
            "connection",
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("forwarded", HeaderValue::from_static("for=1.1.1.1"));
        let host = HeaderValue::from_static("fwd.test:8443");
        prepare_request_headers(
            &mut h,
            Some("127.0.0.1".parse().unwrap()),
            Some(&host),
            meta(),
        );
        assert_eq!(h["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
        assert_eq!(h["x-real-ip"], "127.0.0.1");
        assert_eq!(
            h["x-forwarded-proto"], "http",
            "clients cannot forge the scheme"
        );
        assert_eq!(h["x-forwarded-host"], "fwd.test:8443");
        assert_eq!(h["x-forwarded-port"], "8443");
        for gone in ["connection", "x-secret", "te", "forwarded"] {
            assert!(!h.contains_key(gone), "{gone} must be removed");
        }
    }

    #[test]
    fn trusted_peers_keep_their_forwarded_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-proto", HeaderValue::from_static("https"));
        h.insert(
            "x-forwarded-host",
            HeaderValue::from_static("public.example"),
        );
        h.insert("x-forwarded-port", HeaderValue::from_static("443"));
        let trusted = ConnMeta {
            forwarded_trusted: true,
            ..meta()
        };
        let host = HeaderValue::from_static("internal:9080");
        prepare_request_headers(
            &mut h,
            Some("10.0.0.9".parse().unwrap()),
            Some(&host),
            trusted,
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "public.example");
        assert_eq!(h["x-forwarded-port"], "443");
        assert_eq!(
            h["x-real-ip"], "10.0.0.9",
            "the address headers are still the gateway's"
        );
    }

    #[test]
    fn forwarded_port_falls_back_to_listener() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("fwd.test");
        prepare_request_headers(&mut h, Some("::1".parse().unwrap()), Some(&host), meta());
        assert_eq!(h["x-forwarded-port"], "9080");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn error_pages() {
        let r = error_page(StatusCode::GATEWAY_TIMEOUT, Some(&[504]));
        assert_eq!(r.status(), 504);
        assert_eq!(r.headers()["x-apisix-upstream-status"], "504");
        let r = error_page(StatusCode::BAD_GATEWAY, Some(&[502, 502]));
        assert_eq!(r.headers()["x-apisix-upstream-status"], "502, 502");
        let r = error_page(StatusCode::BAD_GATEWAY, None);
        assert!(!r.headers().contains_key("x-apisix-upstream-status"));
    }
}
