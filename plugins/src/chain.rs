//! Running plugins in APISIX's order.
//!
//! A [`PluginSet`] is the compiled plugin list of one object (a route with
//! its service and plugin config merged in, a global rule, a consumer),
//! sorted by priority. [`Chain`] is the tower service that runs a request
//! through the global rules and the route's set around an inner service
//! (the proxy), phase by phase as `apisix/init.lua` does:
//!
//! 1. each global rule: `rewrite`, then `access`;
//! 2. the route: `rewrite`; once an auth plugin has identified a consumer,
//!    the consumer's (and its group's) plugins are merged in and their
//!    `rewrite` runs; then `access` and `before_proxy` over the merged set;
//! 3. the inner service, unless a plugin answered already;
//! 4. `header_filter`, then `body_filter` per chunk and `log` once the body
//!    is done, over the global rules and then the route set, for an early
//!    answer as much as for the upstream's.
//!
//! Costs: a set records which phases any of its plugins has, so a phase no
//! plugin has costs one bit test; plugins are called through one `Arc`
//! each, with no allocation per plugin per request. The body is wrapped only
//! when some plugin has a `body_filter` or `log` hook.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::{request, HeaderValue, Request, Response, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use serde_json::Value;
use tower::{Service, ServiceExt};

use crate::consumer::ConsumerIndex;
use crate::ctx::{ConsumerName, Ctx, RequestHead, UpstreamInfo};
use crate::expr::Expr;
use crate::plugin::{Flow, Phases, Plugin};
use crate::vars::ConnInfo;
use crate::{full_body, BoxError, ClientIp, ResponseBody};

/// `_meta.error_response`: replaces the body of a 4xx/5xx a plugin returns.
#[derive(Debug, Clone)]
pub enum ErrorResponse {
    Text(Bytes),
    Json(Bytes),
}

impl ErrorResponse {
    pub fn from_value(v: &Value) -> Option<ErrorResponse> {
        match v {
            Value::String(s) => Some(ErrorResponse::Text(Bytes::from(s.clone()))),
            Value::Object(_) => {
                let mut text = v.to_string();
                text.push('\n');
                Some(ErrorResponse::Json(Bytes::from(text)))
            }
            _ => None,
        }
    }
}

/// One compiled plugin in a set.
#[derive(Clone)]
pub struct Entry {
    pub name: &'static str,
    /// The effective priority (`_meta.priority` when set).
    pub priority: i32,
    pub plugin: Arc<dyn Plugin>,
    pub phases: Phases,
    /// `_meta.filter`: run only for requests that match.
    pub filter: Option<Arc<Expr>>,
    pub error_response: Option<ErrorResponse>,
    /// Merged in from the consumer (or its group) after authentication.
    pub from_consumer: bool,
}

impl Entry {
    pub fn new(name: &'static str, priority: i32, plugin: Arc<dyn Plugin>) -> Self {
        let phases = plugin.phases();
        Entry {
            name,
            priority,
            plugin,
            phases,
            filter: None,
            error_response: None,
            from_consumer: false,
        }
    }
}

/// The plugins of one object, highest priority first.
#[derive(Clone, Default)]
pub struct PluginSet {
    entries: Vec<Entry>,
    phases: Phases,
    /// Some plugin filters by request variables in a response phase: the
    /// request head is kept for it.
    keep_request: bool,
    /// Some `log` hook reads the response headers: they are kept for it.
    keep_response: bool,
    /// Some `log` hook reads the exchange's sizes: they are measured.
    sizes: bool,
    /// Bytes of the request body some `log` hook reads.
    request_body: usize,
}

impl std::fmt::Debug for PluginSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(self.entries.iter().map(|e| (e.name, e.priority)))
            .finish()
    }
}

impl PluginSet {
    pub fn new(mut entries: Vec<Entry>) -> Self {
        // Equal priorities run in name order, so the order never depends on
        // how the configuration was written.
        entries.sort_by(|a, b| b.priority.cmp(&a.priority).then(a.name.cmp(b.name)));
        let mut phases = Phases::NONE;
        let mut keep_request = false;
        let mut keep_response = false;
        let mut sizes = false;
        let mut request_body = 0;
        for e in &entries {
            phases |= e.phases;
            keep_request |= e.filter.is_some() && e.phases.has(Phases::RESPONSE);
            keep_request |= e.phases.has(Phases::LOG) && e.plugin.reads_request();
            keep_response |= e.phases.has(Phases::LOG)
                && (e.filter.is_some() || e.plugin.reads_response_headers());
            sizes |= e.phases.has(Phases::LOG) && e.plugin.reads_sizes();
            if e.phases.has(Phases::LOG) {
                request_body = request_body.max(e.plugin.request_body_bytes());
            }
        }
        PluginSet {
            entries,
            phases,
            keep_request,
            keep_response,
            sizes,
            request_body,
        }
    }

    pub fn empty() -> Arc<PluginSet> {
        static EMPTY: std::sync::OnceLock<Arc<PluginSet>> = std::sync::OnceLock::new();
        EMPTY.get_or_init(|| Arc::new(PluginSet::default())).clone()
    }

    pub fn entries(&self) -> &[Entry] {
        &self.entries
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    pub fn phases(&self) -> Phases {
        self.phases
    }

    /// Whether a plugin of this name is in the set.
    pub fn contains(&self, name: &str) -> bool {
        self.entries.iter().any(|e| e.name == name)
    }

    /// `overlay`'s plugins replace same-name plugins of `self`; the rest of
    /// `self` stays (APISIX's `merge_consumer_route`, route over service).
    pub fn overlay(&self, overlay: &PluginSet, mark_from_consumer: bool) -> PluginSet {
        let mut entries: Vec<Entry> = self
            .entries
            .iter()
            .filter(|e| !overlay.contains(e.name))
            .cloned()
            .collect();
        entries.extend(overlay.entries.iter().cloned().map(|mut e| {
            e.from_consumer |= mark_from_consumer;
            e
        }));
        PluginSet::new(entries)
    }
}

/// The global rules of a snapshot, in id order.
#[derive(Clone, Default)]
pub struct GlobalRules {
    pub rules: Vec<Arc<PluginSet>>,
    phases: Phases,
    keep_request: bool,
    sizes: bool,
    request_body: usize,
}

impl GlobalRules {
    pub fn new(rules: Vec<Arc<PluginSet>>) -> Self {
        let phases = rules.iter().fold(Phases::NONE, |p, r| p | r.phases);
        let keep_request = rules.iter().any(|r| r.keep_request);
        let sizes = rules.iter().any(|r| r.sizes);
        let request_body = rules.iter().map(|r| r.request_body).max().unwrap_or(0);
        GlobalRules {
            rules,
            phases,
            keep_request,
            sizes,
            request_body,
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Rewrite,
    /// `rewrite` of the plugins merged in from the consumer.
    RewriteInConsumer,
    Access,
    BeforeProxy,
}

impl Phase {
    fn bit(self) -> Phases {
        match self {
            Phase::Rewrite | Phase::RewriteInConsumer => Phases::REWRITE,
            Phase::Access => Phases::ACCESS,
            Phase::BeforeProxy => Phases::BEFORE_PROXY,
        }
    }
}

fn passes(entry: &Entry, ctx: &Ctx, req: Option<&request::Parts>) -> bool {
    entry.filter.as_ref().is_none_or(|f| f.eval(&ctx.vars(req)))
}

/// Where one request-side phase of a set stopped.
enum Step {
    /// Every plugin went on (`None`), or one answered.
    Done(Option<Response<ResponseBody>>),
    /// The plugin at this index waits on the future.
    Wait(usize, crate::plugin::BoxFuture<Flow>),
}

/// Runs one request-side phase of a set from plugin `from` on, without a
/// future: nearly every plugin decides at once, and a future per set and
/// phase would cost every request its state machine.
fn phase_step(
    set: &PluginSet,
    phase: Phase,
    ctx: &mut Ctx,
    req: &mut request::Parts,
    from: usize,
) -> Step {
    let bit = phase.bit();
    if !set.phases.has(bit) {
        return Step::Done(None);
    }
    for (i, entry) in set.entries.iter().enumerate().skip(from) {
        if !entry.phases.has(bit)
            || (phase == Phase::RewriteInConsumer && !entry.from_consumer)
            || !passes(entry, ctx, Some(req))
        {
            continue;
        }
        let flow = match phase {
            Phase::Rewrite | Phase::RewriteInConsumer => entry.plugin.rewrite(ctx, req),
            Phase::Access => entry.plugin.access(ctx, req),
            Phase::BeforeProxy => entry.plugin.before_proxy(ctx, req),
        };
        match flow {
            Flow::Continue => {}
            Flow::Respond(resp) => return Step::Done(Some(apply_error_response(entry, resp))),
            Flow::Wait(fut) => return Step::Wait(i, fut),
        }
    }
    Step::Done(None)
}

/// The rest of a phase once plugin `at` waits on `fut`.
async fn finish_phase(
    set: &PluginSet,
    phase: Phase,
    ctx: &mut Ctx,
    req: &mut request::Parts,
    mut at: usize,
    mut fut: crate::plugin::BoxFuture<Flow>,
) -> Option<Response<ResponseBody>> {
    loop {
        let mut flow = fut.await;
        loop {
            match flow {
                Flow::Continue => break,
                Flow::Wait(next) => flow = next.await,
                Flow::Respond(resp) => {
                    return Some(match set.entries.get(at) {
                        Some(entry) => apply_error_response(entry, resp),
                        None => resp,
                    })
                }
            }
        }
        match phase_step(set, phase, ctx, req, at + 1) {
            Step::Done(answer) => return answer,
            Step::Wait(next_at, next) => {
                at = next_at;
                fut = next;
            }
        }
    }
}

/// Runs a phase of a set inside [`request_phases`], returning from it
/// when a plugin answered; a future only when a plugin waits.
macro_rules! run_phase {
    ($set:expr, $phase:expr, $ctx:expr, $req:expr) => {
        match phase_step($set, $phase, $ctx, $req, 0) {
            Step::Done(Some(answer)) => return Some(answer),
            Step::Done(None) => {}
            Step::Wait(at, fut) => {
                if let Some(answer) = finish_phase($set, $phase, $ctx, $req, at, fut).await {
                    return Some(answer);
                }
            }
        }
    };
}

fn apply_error_response(entry: &Entry, resp: Response<ResponseBody>) -> Response<ResponseBody> {
    let Some(replacement) = &entry.error_response else {
        return resp;
    };
    if resp.status().as_u16() < 400 {
        return resp;
    }
    let (mut parts, _) = resp.into_parts();
    parts.headers.remove(http::header::CONTENT_LENGTH);
    let body = match replacement {
        ErrorResponse::Text(b) => {
            parts.headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("text/plain"),
            );
            b.clone()
        }
        ErrorResponse::Json(b) => {
            parts.headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            b.clone()
        }
    };
    Response::from_parts(parts, full_body(body))
}

/// The sets a response passes through: the global rules entered so far,
/// then the route's (consumer-merged) set.
struct Active {
    globals: Arc<GlobalRules>,
    globals_entered: usize,
    route: Option<Arc<PluginSet>>,
}

impl Active {
    fn sets(&self) -> impl Iterator<Item = &PluginSet> {
        self.globals.rules[..self.globals_entered]
            .iter()
            .map(|s| &**s)
            .chain(self.route.as_deref())
    }

    fn phases(&self) -> Phases {
        self.sets().fold(Phases::NONE, |p, s| p | s.phases)
    }

    fn keep_response(&self) -> bool {
        self.sets().any(|s| s.keep_response)
    }

    fn sizes(&self) -> bool {
        self.sets().any(|s| s.sizes)
    }

    fn header_filter(&self, ctx: &mut Ctx, resp: &mut http::response::Parts) {
        for set in self.sets() {
            if !set.phases.has(Phases::HEADER_FILTER) {
                continue;
            }
            for e in &set.entries {
                if e.phases.has(Phases::HEADER_FILTER) && passes(e, ctx, None) {
                    e.plugin.header_filter(ctx, resp);
                }
            }
        }
    }

    fn body_filter(&self, ctx: &mut Ctx, chunk: &mut Bytes, end: bool) {
        for set in self.sets() {
            if !set.phases.has(Phases::BODY_FILTER) {
                continue;
            }
            for e in &set.entries {
                if e.phases.has(Phases::BODY_FILTER) && passes(e, ctx, None) {
                    e.plugin.body_filter(ctx, chunk, end);
                }
            }
        }
    }

    fn log(&self, ctx: &Ctx) {
        for set in self.sets() {
            if !set.phases.has(Phases::LOG) {
                continue;
            }
            for e in &set.entries {
                if e.phases.has(Phases::LOG) && passes(e, ctx, None) {
                    e.plugin.log(ctx);
                }
            }
        }
    }
}

/// The plugin chain around an inner service, as a tower service.
///
/// `call` builds the request's [`Ctx`] from the request extensions
/// ([`ClientIp`], [`ConnInfo`]); [`Chain::run`] takes a prepared one.
pub struct Chain<S> {
    pub globals: Arc<GlobalRules>,
    pub route: Arc<PluginSet>,
    pub consumers: Arc<ConsumerIndex>,
    pub inner: S,
}

impl<S: Clone> Clone for Chain<S> {
    fn clone(&self) -> Self {
        Chain {
            globals: self.globals.clone(),
            route: self.route.clone(),
            consumers: self.consumers.clone(),
            inner: self.inner.clone(),
        }
    }
}

impl<S> Chain<S> {
    /// A context for `req` from its extensions.
    pub fn ctx_for<B>(&self, req: &Request<B>) -> Box<Ctx> {
        let conn = req
            .extensions()
            .get::<ConnInfo>()
            .cloned()
            .unwrap_or_else(ConnInfo::unknown);
        let ip = req
            .extensions()
            .get::<ClientIp>()
            .map(|c| c.0)
            .unwrap_or_else(|| conn.peer.ip());
        Box::new(Ctx::new(ip, conn, self.consumers.clone()))
    }
}

impl<S> Chain<S> {
    /// Runs `req` with the prepared context `ctx`.
    ///
    /// A function returning an `async move` block rather than an `async fn`,
    /// which would keep the context and the request twice in the future.
    /// The context is boxed: the future, its wrappers and the response body
    /// that runs the log phase each move a pointer, not the context's 400
    /// bytes.
    #[allow(clippy::manual_async_fn)]
    pub fn run<B>(
        self,
        mut ctx: Box<Ctx>,
        req: Request<B>,
    ) -> impl Future<Output = Response<ResponseBody>> + Send
    where
        S: Service<Request<B>, Response = Response<ResponseBody>, Error = Infallible> + Send,
        S::Future: Send,
        B: Send,
    {
        async move {
            let Chain {
                globals,
                route,
                inner,
                ..
            } = self;
            let (mut parts, body) = req.into_parts();
            if globals.sizes || route.sizes {
                ctx.request_length = crate::wire::request_length(&parts);
            }
            if globals.keep_request || route.keep_request {
                ctx.request = Some(Box::new(RequestHead {
                    method: parts.method.clone(),
                    uri: parts.uri.clone(),
                    headers: parts.headers.clone(),
                }));
            }
            let body_bytes = globals.request_body.max(route.request_body);
            if body_bytes > 0 {
                let capture = Arc::new(crate::ctx::RequestBodyCapture::new(body_bytes));
                parts.extensions.insert(capture.clone());
                ctx.data.insert(capture);
            }
            let mut active = Active {
                globals,
                globals_entered: 0,
                route: None,
            };
            let early = request_phases(&mut active, route, &mut ctx, &mut parts).await;
            let resp = match early {
                Some(resp) => resp,
                None => {
                    // The proxy judges by the address the plugins settled on,
                    // and hashes on the consumer they identified.
                    if parts.extensions.get::<ClientIp>().map(|c| c.0) != Some(ctx.client_ip) {
                        parts.extensions.insert(ClientIp(ctx.client_ip));
                    }
                    if let Some(c) = &ctx.credential {
                        parts
                            .extensions
                            .insert(ConsumerName(c.consumer.username.clone()));
                    }
                    match inner.oneshot(Request::from_parts(parts, body)).await {
                        Ok(resp) => resp,
                        Err(never) => match never {},
                    }
                }
            };
            response_phases(active, ctx, resp)
        }
    }
}

async fn request_phases(
    active: &mut Active,
    route: Arc<PluginSet>,
    ctx: &mut Ctx,
    parts: &mut request::Parts,
) -> Option<Response<ResponseBody>> {
    let globals = active.globals.clone();
    for (i, set) in globals.rules.iter().enumerate() {
        active.globals_entered = i + 1;
        run_phase!(set, Phase::Rewrite, ctx, parts);
        run_phase!(set, Phase::Access, ctx, parts);
    }
    active.route = Some(route.clone());
    run_phase!(&route, Phase::Rewrite, ctx, parts);
    let mut set = route;
    if let Some(consumer) = ctx.credential.as_ref().map(|c| c.consumer.clone()) {
        if !consumer.plugins.is_empty() {
            set = Arc::new(set.overlay(&consumer.plugins, true));
            active.route = Some(set.clone());
            run_phase!(&set, Phase::RewriteInConsumer, ctx, parts);
        }
    }
    run_phase!(&set, Phase::Access, ctx, parts);
    if globals.phases.has(Phases::BEFORE_PROXY) {
        for g in &globals.rules {
            run_phase!(g, Phase::BeforeProxy, ctx, parts);
        }
    }
    run_phase!(&set, Phase::BeforeProxy, ctx, parts);
    None
}

fn response_phases(
    active: Active,
    mut ctx: Box<Ctx>,
    resp: Response<ResponseBody>,
) -> Response<ResponseBody> {
    let (mut parts, body) = resp.into_parts();
    if let Some(info) = parts.extensions.remove::<UpstreamInfo>() {
        ctx.upstream = info;
    }
    ctx.status = Some(parts.status);
    let phases = active.phases();
    if phases.has(Phases::HEADER_FILTER) {
        // Filters add headers (CORS, quotas): grow the map once, not by
        // one rehash after another.
        let _ = parts.headers.try_reserve(8);
        active.header_filter(&mut ctx, &mut parts);
        ctx.status = Some(parts.status);
    }
    if !phases.has(Phases::BODY_FILTER | Phases::LOG) {
        return Response::from_parts(parts, body);
    }
    if phases.has(Phases::LOG) {
        if active.sizes() {
            ctx.header_bytes_sent = crate::wire::response_head_length(&parts);
        }
        if active.keep_response() {
            ctx.remember_response(&parts);
        }
    }
    if phases.has(Phases::BODY_FILTER) {
        // Filters may change the length.
        parts.headers.remove(http::header::CONTENT_LENGTH);
    }
    let filtered = FilteredBody {
        inner: body,
        state: Some(BodyState { active, ctx }),
        filter: phases.has(Phases::BODY_FILTER),
        ended: false,
    };
    Response::from_parts(parts, filtered.boxed_unsync())
}

impl<S, B> Service<Request<B>> for Chain<S>
where
    S: Service<Request<B>, Response = Response<ResponseBody>, Error = Infallible>
        + Clone
        + Send
        + 'static,
    S::Future: Send,
    B: Send + 'static,
{
    type Response = Response<ResponseBody>;
    type Error = Infallible;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Infallible>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let ctx = self.ctx_for(&req);
        let chain = self.clone();
        Box::pin(async move { Ok(chain.run(ctx, req).await) })
    }
}

struct BodyState {
    active: Active,
    ctx: Box<Ctx>,
}

/// A response body passed through `body_filter` hooks; `log` hooks run when
/// it ends or is dropped (the client went away).
struct FilteredBody {
    inner: ResponseBody,
    state: Option<BodyState>,
    filter: bool,
    ended: bool,
}

impl FilteredBody {
    fn finish(&mut self) {
        if let Some(mut state) = self.state.take() {
            state.ctx.finished = Some(crate::ctx::Finished::at(
                &state.ctx,
                std::time::Instant::now(),
            ));
            state.active.log(&state.ctx);
        }
    }
}

impl Drop for FilteredBody {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Body for FilteredBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.ended {
            return Poll::Ready(None);
        }
        loop {
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => return Poll::Pending,
                Poll::Ready(Some(Err(e))) => {
                    this.ended = true;
                    this.finish();
                    return Poll::Ready(Some(Err(e)));
                }
                Poll::Ready(Some(Ok(frame))) => {
                    let frame = match frame.into_data() {
                        Ok(mut data) => {
                            if let Some(state) = this.state.as_mut() {
                                if this.filter {
                                    state.active.body_filter(&mut state.ctx, &mut data, false);
                                }
                                state.ctx.body_bytes_sent += data.len() as u64;
                            }
                            if data.is_empty() {
                                continue;
                            }
                            Frame::data(data)
                        }
                        // Trailers end the body: filters see the end first.
                        Err(trailers) => {
                            if this.filter {
                                if let Some(tail) = this.end_chunk() {
                                    // The tail goes out now, the trailers are
                                    // lost only if a filter added a tail and
                                    // the upstream sent trailers: rare enough
                                    // to keep this simple.
                                    return Poll::Ready(Some(Ok(Frame::data(tail))));
                                }
                            }
                            this.ended = true;
                            this.finish();
                            return Poll::Ready(Some(Ok(trailers)));
                        }
                    };
                    return Poll::Ready(Some(Ok(frame)));
                }
                Poll::Ready(None) => {
                    let tail = if this.filter { this.end_chunk() } else { None };
                    this.ended = true;
                    this.finish();
                    return Poll::Ready(tail.map(|t| Ok(Frame::data(t))));
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        // Without filters the end is the inner body's: said as soon as it is
        // known, the connection writes the last bytes and drops the body
        // (running the log phase) without polling it once more for nothing.
        self.ended || (!self.filter && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        if self.filter {
            SizeHint::default()
        } else {
            self.inner.size_hint()
        }
    }
}

impl FilteredBody {
    /// Runs the filters once with `end = true`; what they produce.
    fn end_chunk(&mut self) -> Option<Bytes> {
        let state = self.state.as_mut()?;
        let mut tail = Bytes::new();
        state.active.body_filter(&mut state.ctx, &mut tail, true);
        state.ctx.body_bytes_sent += tail.len() as u64;
        self.filter = false;
        (!tail.is_empty()).then_some(tail)
    }
}

/// Convenience for plugins that answer with a fixed status and JSON body.
pub fn reject(status: StatusCode, body: &Value) -> Flow {
    Flow::Respond(crate::json_response(status, body))
}

#[cfg(test)]
mod tests;
