//! The per-request context every phase sees.
//!
//! It carries what APISIX keeps in `ngx.ctx.api_ctx`: the client address (a
//! `real-ip` plugin may replace it for later phases), the connection facts,
//! the matched route and service, the consumer once an auth plugin has
//! identified it, the upstream node and status once known, timings, and
//! typed per-request data plugins share ([`Ctx::data`]).

use std::any::Any;
use std::borrow::Cow;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{request, response, HeaderMap, Method, StatusCode, Uri};

use crate::consumer::{ConsumerIndex, Credential};
use crate::vars::{header_var, ConnInfo, ReqRef};

/// What the upstream side reported about the response (set by the proxy in
/// the response extensions, read into [`Ctx`] before `header_filter`).
#[derive(Debug, Clone, Default)]
pub struct UpstreamInfo {
    /// The node that answered last (`host:port`).
    pub addr: Option<http::uri::Authority>,
    /// Its status (`$upstream_status`).
    pub status: Option<u16>,
    /// When the upstream's response head arrived.
    pub header_time: Option<Instant>,
    /// When the first try at an upstream began (`$upstream_response_time`
    /// counts from here).
    pub started: Option<Instant>,
    /// The upstream's scheme (`$upstream_scheme`: `http`, `https`, `grpc`).
    pub scheme: Option<&'static str>,
}

impl UpstreamInfo {
    /// Who answered, as APISIX's `response_source`: `upstream` when its
    /// response head arrived, `nginx` for the gateway's own error after
    /// trying an upstream, `apisix` for a plugin's or the router's answer.
    pub fn response_source(&self) -> &'static str {
        if self.header_time.is_some() {
            "upstream"
        } else if self.started.is_some() {
            "nginx"
        } else {
            "apisix"
        }
    }
}

/// The first bytes of the request body, copied as the body streams to the
/// upstream, for loggers' `include_req_body`. Made by the chain when a
/// `log` hook asks for it ([`crate::plugin::Plugin::request_body_bytes`]),
/// put in the request extensions for the proxy to fill, and in
/// [`Ctx::data`] for the loggers to read. Empty when the request never
/// reached the proxy (a plugin answered it).
#[derive(Debug)]
pub struct RequestBodyCapture {
    limit: usize,
    kept: std::sync::Mutex<Vec<u8>>,
}

impl RequestBodyCapture {
    /// Keeps at most `limit` bytes.
    pub fn new(limit: usize) -> Self {
        RequestBodyCapture {
            limit,
            kept: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// Adds a chunk of the body, as far as the limit allows.
    pub fn push(&self, chunk: &[u8]) {
        let mut kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.limit.saturating_sub(kept.len());
        kept.extend_from_slice(&chunk[..chunk.len().min(room)]);
    }

    /// Whether more would be kept.
    pub fn wants_more(&self) -> bool {
        self.kept.lock().is_ok_and(|k| k.len() < self.limit)
    }

    /// Up to `max` of the bytes kept.
    pub fn bytes(&self, max: usize) -> Vec<u8> {
        let kept = self.kept.lock().unwrap_or_else(|e| e.into_inner());
        kept[..kept.len().min(max)].to_vec()
    }
}

/// Variables a plugin sets for later phases and the access log
/// (`$opentelemetry_trace_id`), as APISIX plugins set `ngx.var`. Looked up
/// after every built-in variable.
#[derive(Default)]
pub struct PluginVars(Vec<(&'static str, Box<str>)>);

impl PluginVars {
    /// Sets `name`, replacing an earlier value.
    pub fn set(&mut self, name: &'static str, value: impl Into<Box<str>>) {
        let value = value.into();
        match self.0.iter_mut().find(|(n, _)| *n == name) {
            Some(slot) => slot.1 = value,
            None => self.0.push((name, value)),
        }
    }

    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| *n == name).map(|(_, v)| &**v)
    }
}

/// What the matched route was configured with, beyond its id: for metric
/// labels and logs. Built once per compiled route.
#[derive(Debug, Default)]
pub struct RouteInfo {
    /// The route's `name`.
    pub name: Option<Box<str>>,
    /// The `name` of the route's service.
    pub service_name: Option<Box<str>>,
    /// The route's `uri`/`uris`, as configured (`/foo/*`).
    pub uris: Box<[Box<str>]>,
    /// The route's hosts (its own, else its service's).
    pub hosts: Box<[Box<str>]>,
}

impl RouteInfo {
    /// The configured host pattern `host` matched (`*.example.com`), or
    /// "" when the route has no hosts.
    pub fn matched_host(&self, host: Option<&str>) -> &str {
        let Some(host) = host else { return "" };
        self.hosts
            .iter()
            .find(|h| match h.strip_prefix('*') {
                Some(suffix) => host.ends_with(suffix) && host.len() > suffix.len(),
                None => h.eq_ignore_ascii_case(host),
            })
            .map_or("", |h| h)
    }
}

/// The consumer's username, put in the request extensions for the proxy
/// (`chash` with `hash_on: consumer`).
#[derive(Debug, Clone)]
pub struct ConsumerName(pub Arc<str>);

/// The client's `Host`, put in the request extensions when a plugin
/// replaced it (proxy-rewrite `host`): `X-Forwarded-Host` still names the
/// host the client asked for, as APISIX's does.
#[derive(Debug, Clone)]
pub struct OriginalHost(pub http::HeaderValue);

/// The request as it was when it reached the gateway, kept for response
/// phases only when a plugin there reads request variables.
pub struct RequestHead {
    pub method: Method,
    pub uri: Uri,
    pub headers: HeaderMap,
}

/// Per-request context.
pub struct Ctx {
    /// The address the gateway judges the client by (`$remote_addr`).
    pub client_ip: IpAddr,
    /// The client port real-ip set along with `client_ip`, if any.
    pub client_port: Option<u16>,
    pub conn: ConnInfo,
    /// The normalised path (`$uri`) when it differs from the request's.
    pub path: Option<Box<str>>,
    /// Lower-cased `Host` without port (`$host`).
    pub host: Option<Box<str>>,
    pub route_id: Option<Arc<str>>,
    pub service_id: Option<Arc<str>>,
    /// The matched route's name, uris and hosts.
    pub route: Option<Arc<RouteInfo>>,
    /// Which of `route.uris` the request matched.
    pub matched_uri: u16,
    /// Bytes of the request as received, head and body (`$request_length`);
    /// counted only when some plugin has a `log` hook.
    pub request_length: u64,
    /// Bytes of the response head, as the plugins left it; with
    /// [`Ctx::body_bytes_sent`], `$bytes_sent`. Counted only when some
    /// plugin has a `log` hook.
    pub header_bytes_sent: u64,
    /// Set by the auth plugin that identified the client.
    pub credential: Option<Arc<Credential>>,
    /// Every consumer credential of this snapshot, for auth plugins.
    pub consumers: Arc<ConsumerIndex>,
    /// The response status, once there is a response.
    pub status: Option<StatusCode>,
    pub upstream: UpstreamInfo,
    pub started: Instant,
    /// When the response ended and how long it took: set once, just before
    /// the `log` phase, so every logger reads the same values (and the clock
    /// is read and subtracted once). `None` before that;
    /// [`Ctx::finished`] measures then.
    pub finished: Option<Finished>,
    /// Bytes of response body sent so far.
    pub body_bytes_sent: u64,
    /// Kept for response phases when needed (see [`RequestHead`]).
    pub request: Option<Box<RequestHead>>,
    /// Response headers, for `sent_http_*` in the log phase.
    pub response_headers: Option<Box<HeaderMap>>,
    /// Typed data plugins share (a request id for loggers, ...).
    pub data: Data,
}

/// The end of a request, for the log phase.
#[derive(Debug, Clone, Copy)]
pub struct Finished {
    pub at: Instant,
    /// From the request's arrival (`$request_time`).
    pub request: Duration,
    /// From the last try's start at the upstream (`$upstream_response_time`),
    /// when there was one.
    pub upstream: Option<Duration>,
}

impl Finished {
    /// The durations of `ctx` ending `at`.
    pub fn at(ctx: &Ctx, at: Instant) -> Finished {
        Finished {
            at,
            request: at.saturating_duration_since(ctx.started),
            upstream: ctx
                .upstream
                .started
                .map(|s| at.saturating_duration_since(s)),
        }
    }

    /// `(latency, upstream_latency, apisix_latency)` in milliseconds, as
    /// APISIX's loggers and metrics report them.
    pub fn latencies_ms(&self) -> (f64, Option<f64>, f64) {
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        let total = ms(self.request);
        let upstream = self.upstream.map(ms);
        (total, upstream, (total - upstream.unwrap_or(0.0)).max(0.0))
    }
}

/// Values by type, one of each, for the plugins of one request.
///
/// A request holds a handful at most, so a short list searched by type
/// beats a hash map: no table to allocate and no hashing, where
/// `http::Extensions` costs both on the first insert of every request. The
/// first value sits in place, so the usual request (one value: the access
/// log's, or none) allocates no list.
#[derive(Default)]
pub struct Data {
    first: Option<Box<dyn Any + Send + Sync>>,
    rest: Vec<Box<dyn Any + Send + Sync>>,
}

impl Data {
    fn slots(&self) -> impl Iterator<Item = &Box<dyn Any + Send + Sync>> {
        self.first.iter().chain(self.rest.iter())
    }

    /// Puts `value` in, returning the one of its type it replaces.
    pub fn insert<T: Any + Send + Sync>(&mut self, value: T) -> Option<T> {
        if let Some(slot) = self.slot_mut::<T>() {
            let old = std::mem::replace(slot, Box::new(value));
            return old.downcast::<T>().ok().map(|b| *b);
        }
        match self.first {
            None => self.first = Some(Box::new(value)),
            Some(_) => self.rest.push(Box::new(value)),
        }
        None
    }

    fn slot_mut<T: Any>(&mut self) -> Option<&mut Box<dyn Any + Send + Sync>> {
        self.first
            .iter_mut()
            .chain(self.rest.iter_mut())
            .find(|v| (***v).is::<T>())
    }

    pub fn get<T: Any>(&self) -> Option<&T> {
        self.slots().find_map(|v| v.downcast_ref::<T>())
    }

    pub fn get_mut<T: Any>(&mut self) -> Option<&mut T> {
        self.slot_mut::<T>().and_then(|v| v.downcast_mut::<T>())
    }

    pub fn remove<T: Any>(&mut self) -> Option<T> {
        if self.first.as_ref().is_some_and(|v| (**v).is::<T>()) {
            let value = self.first.take()?;
            if !self.rest.is_empty() {
                self.first = Some(self.rest.swap_remove(0));
            }
            return value.downcast::<T>().ok().map(|b| *b);
        }
        let at = self.rest.iter().position(|v| (**v).is::<T>())?;
        self.rest.swap_remove(at).downcast::<T>().ok().map(|b| *b)
    }

    /// The value of type `T`, put in first as `T::default()` if missing.
    pub fn get_or_insert_default<T: Any + Send + Sync + Default>(&mut self) -> &mut T {
        if self.get::<T>().is_none() {
            self.insert(T::default());
        }
        match self.get_mut::<T>() {
            Some(v) => v,
            // Just inserted.
            None => unreachable!("data slot holds another type"),
        }
    }
}

impl Ctx {
    pub fn new(client_ip: IpAddr, conn: ConnInfo, consumers: Arc<ConsumerIndex>) -> Self {
        Ctx {
            client_ip,
            client_port: None,
            conn,
            path: None,
            host: None,
            route_id: None,
            service_id: None,
            route: None,
            matched_uri: 0,
            request_length: 0,
            header_bytes_sent: 0,
            credential: None,
            consumers,
            status: None,
            upstream: UpstreamInfo::default(),
            started: crate::clock::std_now(),
            finished: None,
            body_bytes_sent: 0,
            request: None,
            response_headers: None,
            data: Data::default(),
        }
    }

    /// The route pattern the request matched (`$matched_uri` of APISIX's
    /// `curr_req_matched`), or "".
    pub fn matched_uri(&self) -> &str {
        self.route
            .as_ref()
            .and_then(|r| r.uris.get(self.matched_uri as usize))
            .map_or("", |u| u)
    }

    /// When the response ended and its durations ([`Ctx::finished`]), or
    /// measured now when it has not ended.
    pub fn finished(&self) -> Finished {
        self.finished
            .unwrap_or_else(|| Finished::at(self, crate::clock::std_now()))
    }

    /// The authenticated consumer's username.
    pub fn consumer_name(&self) -> Option<&str> {
        self.credential.as_ref().map(|c| &*c.consumer.username)
    }

    /// Request variables read from `req` (the live request in request
    /// phases, [`Ctx::request`] later).
    pub fn req_ref<'a>(
        &'a self,
        method: &'a Method,
        uri: &'a Uri,
        headers: &'a HeaderMap,
    ) -> ReqRef<'a> {
        ReqRef {
            method,
            uri,
            headers,
            path: self.path.as_deref().unwrap_or_else(|| uri.path()),
            host: self.host.as_deref(),
            client_ip: Some(self.client_ip),
            client_port: self.client_port,
            conn: Some(&self.conn),
        }
    }

    /// Looks a variable up: context variables first (`status`,
    /// `upstream_status`, `upstream_addr`, `route_id`, `service_id`,
    /// `consumer_name`, `sent_http_*`, `request_time`), then the request.
    pub fn var<'a>(&'a self, req: Option<&'a request::Parts>, name: &str) -> Option<Cow<'a, str>> {
        match name {
            "status" => return self.status.map(|s| Cow::Owned(s.as_u16().to_string())),
            "upstream_status" => return self.upstream.status.map(|s| Cow::Owned(s.to_string())),
            "upstream_addr" => {
                return self
                    .upstream
                    .addr
                    .as_ref()
                    .map(|a| Cow::Borrowed(a.as_str()))
            }
            "route_id" => return self.route_id.as_deref().map(Cow::Borrowed),
            "service_id" => return self.service_id.as_deref().map(Cow::Borrowed),
            "consumer_name" => return self.consumer_name().map(Cow::Borrowed),
            "request_time" => {
                return Some(Cow::Owned(format!(
                    "{:.3}",
                    self.started.elapsed().as_secs_f64()
                )))
            }
            "body_bytes_sent" => return Some(Cow::Owned(self.body_bytes_sent.to_string())),
            _ => {}
        }
        if let Some(h) = name.strip_prefix("sent_http_") {
            return header_var(self.response_headers.as_ref()?, h);
        }
        let found = match (req, &self.request) {
            (Some(p), _) => self.req_ref(&p.method, &p.uri, &p.headers).var(name),
            (None, Some(h)) => self.req_ref(&h.method, &h.uri, &h.headers).var(name),
            (None, None) => match name {
                "remote_addr" => Some(Cow::Owned(crate::vars::ip_string(self.client_ip))),
                "host" => self.host.as_deref().map(Cow::Borrowed),
                _ => None,
            },
        };
        found.or_else(|| {
            self.data
                .get::<PluginVars>()
                .and_then(|v| v.get(name))
                .map(Cow::Borrowed)
        })
    }

    /// A [`crate::expr::Vars`] view for evaluating expressions.
    pub fn vars<'a>(&'a self, req: Option<&'a request::Parts>) -> CtxVars<'a> {
        CtxVars { ctx: self, req }
    }

    /// Response headers as seen in `header_filter`, for later phases.
    pub fn remember_response(&mut self, resp: &response::Parts) {
        self.response_headers = Some(Box::new(resp.headers.clone()));
    }
}

/// Context plus (optionally) the live request, as expression variables.
pub struct CtxVars<'a> {
    ctx: &'a Ctx,
    req: Option<&'a request::Parts>,
}

impl crate::expr::Vars for CtxVars<'_> {
    fn var(&self, name: &str) -> Option<Cow<'_, str>> {
        self.ctx.var(self.req, name)
    }
}

#[cfg(test)]
mod data_tests {
    use super::Data;

    #[test]
    fn values_by_type() {
        let mut d = Data::default();
        assert_eq!(d.insert(1u32), None);
        assert_eq!(d.insert("a"), None);
        assert_eq!(d.insert(2u64), None);
        assert_eq!(d.insert(3u32), Some(1));
        assert_eq!(d.get::<u32>(), Some(&3));
        *d.get_or_insert_default::<u64>() += 1;
        *d.get_or_insert_default::<i8>() += 5;
        assert_eq!(d.get::<u64>(), Some(&3));
        assert_eq!(d.remove::<u32>(), Some(3));
        assert_eq!(d.get::<u32>(), None);
        assert_eq!(d.get::<&str>(), Some(&"a"));
        assert_eq!(d.get::<i8>(), Some(&5));
        assert_eq!(d.remove::<&str>(), Some("a"));
        assert_eq!(d.remove::<u64>(), Some(3));
        assert_eq!(d.remove::<i8>(), Some(5));
        assert_eq!(d.get::<i8>(), None);
    }
}
