//! nginx's access log, as APISIX configures it (`nginx_config.http`):
//!
//! ```yaml
//! nginx_config:
//!   http:
//!     enable_access_log: true
//!     access_log: logs/access.log          # under the prefix unless absolute
//!     access_log_buffer: 16384
//!     access_log_format: "$remote_addr - $remote_user [$time_local] ..."
//!     access_log_format_escape: default    # default | json | none
//! ```
//!
//! Every data-plane request gets one line, written when its response has
//! ended (or the client went away), for routed, unrouted (404) and
//! refused requests alike. The line is formatted on the request's thread
//! into a shared buffer; a writer thread takes the buffer when it holds
//! `access_log_buffer` bytes, and at least every second, so no request ever
//! waits on the disk. If the disk cannot keep up, whole buffers are dropped
//! and counted (at most 64 wait) rather than memory growing. `SIGUSR1`
//! reopens the file, as nginx does for logrotate.
//!
//! Variables are nginx's: `$remote_addr`, `$remote_port`, `$remote_user`,
//! `$time_local`, `$time_iso8601`, `$msec`, `$request`, `$request_method`,
//! `$request_uri`, `$uri`, `$args`, `$server_protocol`, `$status`,
//! `$body_bytes_sent`, `$bytes_sent`, `$request_length`, `$request_time`,
//! `$http_NAME`, `$sent_http_NAME`, `$upstream_addr`, `$upstream_status`,
//! `$upstream_response_time`, `$upstream_header_time`, APISIX's
//! `$upstream_scheme`, `$upstream_host`, `$upstream_uri`, and every request
//! variable the plugins know (`$route_id`, `$consumer_name`, `$server_addr`,
//! ...). An empty or unknown value is written as `-`. Times are in UTC.

use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::{request, HeaderName, HeaderValue, Method, Uri, Version};

use plugins::chain::{Entry, PluginSet};
use plugins::{ctx::Finished, Ctx, Flow, Phases, Plugin};

/// APISIX's default `access_log_format`.
pub const DEFAULT_FORMAT: &str = "$remote_addr - $remote_user [$time_local] $http_host \"$request\" $status $body_bytes_sent $request_time \"$http_referer\" \"$http_user_agent\" $upstream_addr $upstream_status $upstream_response_time \"$upstream_scheme://$upstream_host$upstream_uri\"";
/// `access_log_buffer` default.
pub const DEFAULT_BUFFER: usize = 16384;
/// How often buffered lines are written at the latest.
pub const FLUSH_EVERY: Duration = Duration::from_secs(1);
/// Buffers waiting for the writer before new ones are dropped.
const QUEUED_BUFFERS: usize = 64;

/// `access_log_format_escape`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Escape {
    /// `"`, `\` and bytes below 0x20 or above 0x7e as `\xHH`.
    Default,
    /// As inside a JSON string.
    Json,
    None,
}

impl Escape {
    pub fn parse(s: &str) -> Option<Escape> {
        match s {
            "default" => Some(Escape::Default),
            "json" => Some(Escape::Json),
            "none" => Some(Escape::None),
            _ => None,
        }
    }
}

/// The access log settings of config.yaml.
#[derive(Debug, Clone, PartialEq)]
pub struct AccessLogConf {
    pub enabled: bool,
    pub path: PathBuf,
    pub format: String,
    pub escape: Escape,
    pub buffer: usize,
}

impl AccessLogConf {
    /// APISIX's defaults, the file under `prefix`.
    pub fn defaults(prefix: &Path) -> AccessLogConf {
        AccessLogConf {
            enabled: true,
            path: prefix.join("logs").join("access.log"),
            format: DEFAULT_FORMAT.into(),
            escape: Escape::Default,
            buffer: DEFAULT_BUFFER,
        }
    }
}

/// The format as written in config.yaml, made plain: a value wholly inside
/// double quotes (as APISIX's example writes it under `|`) loses them and
/// its `\"` escapes, as nginx reads its `log_format` string.
pub fn unquote(format: &str) -> String {
    let t = format.trim_end_matches(['\n', '\r']).trim();
    let inner = match t.strip_prefix('"').and_then(|r| r.strip_suffix('"')) {
        Some(inner) if !inner.ends_with('\\') => inner,
        _ => t,
    };
    let mut out = String::with_capacity(inner.len());
    let mut chars = inner.chars();
    while let Some(c) = chars.next() {
        if c == '\\' {
            match chars.next() {
                Some('"') => out.push('"'),
                Some('\'') => out.push('\''),
                Some('\\') => out.push('\\'),
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some(other) => {
                    out.push('\\');
                    out.push(other);
                }
                None => out.push('\\'),
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// A variable the log reads.
#[derive(Debug, Clone, PartialEq)]
enum Var {
    RemoteAddr,
    RemotePort,
    RemoteUser,
    TimeLocal,
    TimeIso8601,
    Msec,
    Request,
    RequestMethod,
    RequestUri,
    Uri,
    Args,
    ServerProtocol,
    Status,
    BodyBytesSent,
    BytesSent,
    RequestLength,
    RequestTime,
    UpstreamAddr,
    UpstreamStatus,
    UpstreamResponseTime,
    UpstreamHeaderTime,
    UpstreamScheme,
    UpstreamHost,
    UpstreamUri,
    /// A request header, by its index in [`Format::headers`].
    Header(usize),
    /// Anything else the context answers (`route_id`, `sent_http_*`, ...).
    Ctx(Box<str>),
}

#[derive(Debug, Clone, PartialEq)]
enum Part {
    /// Text of up to [`BLOCK`] bytes, zero-padded (most of a format's text
    /// is a space, a quote or a bracket).
    Short([u8; BLOCK], u8),
    Text(Box<str>),
    Var(Var),
}

/// Bytes a [`Part::Short`] holds.
const BLOCK: usize = 16;

impl Part {
    fn text(t: String) -> Part {
        let mut block = [0u8; BLOCK];
        match block.get_mut(..t.len()) {
            Some(head) => {
                head.copy_from_slice(t.as_bytes());
                Part::Short(block, t.len() as u8)
            }
            None => Part::Text(t.into()),
        }
    }
}

/// Appends the first `len` bytes of `block`. A copy whose size the
/// compiler knows is a move or two in place, where `extend_from_slice` of a
/// few bytes of unknown length is a call to `memcpy` and its dispatch; a
/// line makes a few dozen such copies.
fn push_block<const N: usize>(out: &mut Vec<u8>, block: &[u8; N], len: usize) {
    let end = out.len() + len.min(N);
    out.extend_from_slice(block);
    out.truncate(end);
}

/// A compiled `access_log_format`.
#[derive(Debug, Clone, PartialEq)]
pub struct Format {
    parts: Vec<Part>,
    /// Request headers some `$http_*` reads, captured when the request
    /// arrives.
    headers: Vec<HeaderName>,
    /// Some variable reads the response headers.
    response_headers: bool,
    /// `$remote_user`: where `Authorization` is in `headers`.
    authorization: Option<usize>,
}

impl Format {
    /// Compiles `text`; fails on a `$` not followed by a variable name.
    pub fn parse(text: &str) -> Result<Format, String> {
        let mut parts = Vec::new();
        let mut headers: Vec<HeaderName> = Vec::new();
        let mut response_headers = false;
        let mut authorization = None;
        let mut literal = String::new();
        let mut rest = text;
        while let Some(at) = rest.find('$') {
            literal.push_str(&rest[..at]);
            let after = &rest[at + 1..];
            let (name, next) = if let Some(braced) = after.strip_prefix('{') {
                let end = braced
                    .find('}')
                    .ok_or_else(|| format!("unclosed ${{ in access_log_format: {text}"))?;
                (&braced[..end], &braced[end + 1..])
            } else {
                let end = after
                    .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                    .unwrap_or(after.len());
                (&after[..end], &after[end..])
            };
            if name.is_empty() {
                return Err(format!(
                    "a $ without a variable name in access_log_format: {text}"
                ));
            }
            if !literal.is_empty() {
                parts.push(Part::text(std::mem::take(&mut literal)));
            }
            let var = match name {
                "remote_addr" => Var::RemoteAddr,
                "remote_port" => Var::RemotePort,
                "remote_user" => {
                    let at = headers
                        .iter()
                        .position(|h| *h == http::header::AUTHORIZATION)
                        .unwrap_or_else(|| {
                            headers.push(http::header::AUTHORIZATION);
                            headers.len() - 1
                        });
                    authorization = Some(at);
                    Var::RemoteUser
                }
                "time_local" => Var::TimeLocal,
                "time_iso8601" => Var::TimeIso8601,
                "msec" => Var::Msec,
                "request" => Var::Request,
                "request_method" => Var::RequestMethod,
                "request_uri" => Var::RequestUri,
                "uri" | "document_uri" => Var::Uri,
                "args" | "query_string" => Var::Args,
                "server_protocol" => Var::ServerProtocol,
                "status" => Var::Status,
                "body_bytes_sent" => Var::BodyBytesSent,
                "bytes_sent" => Var::BytesSent,
                "request_length" => Var::RequestLength,
                "request_time" => Var::RequestTime,
                "upstream_addr" => Var::UpstreamAddr,
                "upstream_status" => Var::UpstreamStatus,
                "upstream_response_time" => Var::UpstreamResponseTime,
                "upstream_header_time" => Var::UpstreamHeaderTime,
                "upstream_scheme" => Var::UpstreamScheme,
                "upstream_host" => Var::UpstreamHost,
                "upstream_uri" => Var::UpstreamUri,
                other => match other.strip_prefix("http_") {
                    Some(h) => {
                        let header = HeaderName::from_bytes(h.replace('_', "-").as_bytes())
                            .map_err(|_| format!("bad header variable ${other}"))?;
                        let index = match headers.iter().position(|x| *x == header) {
                            Some(i) => i,
                            None => {
                                headers.push(header);
                                headers.len() - 1
                            }
                        };
                        Var::Header(index)
                    }
                    None => {
                        response_headers |= other.starts_with("sent_http_");
                        Var::Ctx(other.into())
                    }
                },
            };
            parts.push(Part::Var(var));
            rest = next;
        }
        literal.push_str(rest);
        if !literal.is_empty() {
            parts.push(Part::text(literal));
        }
        Ok(Format {
            parts,
            headers,
            response_headers,
            authorization,
        })
    }
}

fn empty_headers() -> &'static http::HeaderMap {
    static EMPTY: std::sync::OnceLock<http::HeaderMap> = std::sync::OnceLock::new();
    EMPTY.get_or_init(http::HeaderMap::new)
}

/// The user name of `Authorization: Basic ...` (`$remote_user`).
fn basic_user(value: &str) -> Option<String> {
    use base64::Engine as _;
    let encoded = value.strip_prefix("Basic ")?.trim();
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded)
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(
        text.split_once(':')
            .map_or(text.as_str(), |(u, _)| u)
            .to_string(),
    )
}

/// What the request looked like when it arrived, and as it left for the
/// upstream; kept in the request's context.
///
/// The texts are copied into one buffer rather than kept as clones of the
/// request's parts: a clone is a reference count changed atomically twice
/// per value, and it keeps the connection's read buffer shared, where a few
/// dozen bytes copied once are cheaper.
struct Seen {
    method: Method,
    version: Version,
    /// The first [`SEEN_TEXT`] bytes of texts in place, the rest in `spill`:
    /// one allocation for the whole record in the usual case.
    text: [u8; SEEN_TEXT],
    text_len: usize,
    spill: Vec<u8>,
    /// The request target as it came (path and query).
    target: Span,
    /// The authority of an absolute-form target.
    authority: Span,
    /// The first [`INLINE_HEADERS`] of [`Format::headers`], in place: no
    /// allocation for the usual formats.
    headers: [Option<Span>; INLINE_HEADERS],
    more: Vec<Option<Span>>,
    /// The request reached `before_proxy`: it went to an upstream.
    routed: bool,
    /// The target sent upstream when it is not [`Seen::target`].
    upstream_target: Option<Span>,
    upstream_host: Option<Span>,
}

/// Where a text is among a [`Seen`]'s texts: start and end, counted over
/// `text` then `spill`.
type Span = (u32, u32);

/// Bytes of texts a [`Seen`] holds in place: a typical target and the
/// three headers of APISIX's default format fit.
const SEEN_TEXT: usize = 224;

/// The first `Host` header. Clients send it first, so a look at the first
/// few headers usually finds it without hashing the name.
fn host_header(headers: &http::HeaderMap) -> Option<&HeaderValue> {
    const LOOK: usize = 4;
    let found = headers
        .iter()
        .take(LOOK)
        .find_map(|(name, value)| (name == http::header::HOST).then_some(value));
    match found {
        Some(v) => Some(v),
        None if headers.len() <= LOOK => None,
        None => headers.get(http::header::HOST),
    }
}

/// Request headers a [`Seen`] holds without allocating (APISIX's default
/// format reads three).
const INLINE_HEADERS: usize = 4;

impl Seen {
    fn new(method: Method, version: Version) -> Seen {
        Seen {
            method,
            version,
            text: [0; SEEN_TEXT],
            text_len: 0,
            spill: Vec::new(),
            target: (0, 0),
            authority: (0, 0),
            headers: [None; INLINE_HEADERS],
            more: Vec::new(),
            routed: false,
            upstream_target: None,
            upstream_host: None,
        }
    }

    /// Copies `bytes` in.
    fn put(&mut self, bytes: &[u8]) -> Span {
        let start = self.text_len;
        if self.spill.is_empty() {
            if let Some(room) = self.text.get_mut(start..start + bytes.len()) {
                room.copy_from_slice(bytes);
                self.text_len += bytes.len();
                return (start as u32, self.text_len as u32);
            }
        }
        let start = SEEN_TEXT + self.spill.len();
        self.spill.extend_from_slice(bytes);
        (start as u32, (SEEN_TEXT + self.spill.len()) as u32)
    }

    fn get(&self, (start, end): Span) -> &[u8] {
        let (start, end) = (start as usize, end as usize);
        if end <= SEEN_TEXT {
            self.text.get(start..end).unwrap_or_default()
        } else {
            self.spill
                .get(start.saturating_sub(SEEN_TEXT)..end - SEEN_TEXT)
                .unwrap_or_default()
        }
    }

    fn header(&self, i: usize) -> Option<&[u8]> {
        let span = match self.headers.get(i) {
            Some(h) => *h,
            None => *self.more.get(i - INLINE_HEADERS)?,
        };
        span.map(|s| self.get(s))
    }

    fn target(&self) -> &[u8] {
        self.get(self.target)
    }

    fn path(&self) -> &[u8] {
        let target = self.target();
        match target.iter().position(|&b| b == b'?') {
            Some(q) => &target[..q],
            None => target,
        }
    }

    fn query(&self) -> &[u8] {
        let target = self.target();
        match target.iter().position(|&b| b == b'?') {
            Some(q) => &target[q + 1..],
            None => &[],
        }
    }
}

/// The time texts of one wall-clock second, cached per thread with the
/// span of monotonic time that second covers: the wall clock is read and
/// the calendar worked out once a second, and a line in the same second
/// costs two comparisons of instants.
struct Clock {
    second: u64,
    /// `[from, to)`: the monotonic instants of `second`.
    span: Option<(Instant, Instant)>,
    /// `$time_local` and `$time_iso8601` of `second`, and their lengths
    /// (26 and 25 bytes until the year 10000).
    local: ([u8; TIME_BLOCK], usize),
    iso: ([u8; TIME_BLOCK], usize),
}

/// The text of the last client address a thread wrote: a connection's
/// requests, and most requests of a busy client, repeat it.
struct LastAddr {
    ip: Option<std::net::IpAddr>,
    text: ([u8; ADDR_BLOCK], usize),
}

/// Longest address text (IPv6 with an embedded IPv4 address).
const ADDR_BLOCK: usize = 48;

/// What a thread keeps between the lines it formats.
struct Scratch {
    clock: Clock,
    addr: LastAddr,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Scratch> = const {
        std::cell::RefCell::new(Scratch {
            clock: Clock::new(),
            addr: LastAddr::new(),
        })
    };
}

impl LastAddr {
    const fn new() -> LastAddr {
        LastAddr {
            ip: None,
            text: ([0; ADDR_BLOCK], 0),
        }
    }

    fn push(&mut self, out: &mut Vec<u8>, ip: std::net::IpAddr) {
        if self.ip != Some(ip) {
            self.text.1 = ip_text(&mut self.text.0, ip);
            self.ip = Some(ip);
        }
        push_block(out, &self.text.0, self.text.1);
    }
}

const TIME_BLOCK: usize = 32;

/// Writes `args` into `block`, cut at its size; returns the length.
fn format_block(block: &mut [u8; TIME_BLOCK], args: std::fmt::Arguments<'_>) -> usize {
    let mut cursor = std::io::Cursor::new(&mut block[..]);
    let _ = cursor.write_fmt(args);
    cursor.position() as usize
}

const MONTHS: [&str; 12] = [
    "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
];

/// Days since 1970-01-01 to (year, month 1-12, day 1-31).
fn civil(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

impl Clock {
    const fn new() -> Clock {
        Clock {
            second: 0,
            span: None,
            local: ([0; TIME_BLOCK], 0),
            iso: ([0; TIME_BLOCK], 0),
        }
    }

    /// Makes the texts those of the second `now` falls in.
    fn follow(&mut self, now: Instant) {
        if let Some((from, to)) = self.span {
            if from <= now && now < to {
                return;
            }
        }
        // The wall clock at `now`, which may be a moment ago.
        let wall = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .saturating_sub(Instant::now().saturating_duration_since(now));
        let into = Duration::from_nanos(u64::from(wall.subsec_nanos()));
        let from = now.checked_sub(into).unwrap_or(now);
        let to = from.checked_add(Duration::from_secs(1)).unwrap_or(from);
        self.span = Some((from, to));
        self.at(wall.as_secs());
    }

    /// Wall-clock time since the epoch at `now`, after [`Clock::follow`].
    fn since_epoch(&self, now: Instant) -> Duration {
        let into = self.span.map_or(Duration::ZERO, |(from, _)| {
            now.saturating_duration_since(from)
        });
        Duration::from_secs(self.second) + into
    }

    fn at(&mut self, secs: u64) {
        self.second = secs;
        let days = (secs / 86_400) as i64;
        let rem = secs % 86_400;
        let (y, m, d) = civil(days);
        let (hh, mm, ss) = (rem / 3600, rem % 3600 / 60, rem % 60);
        self.local.1 = format_block(
            &mut self.local.0,
            format_args!(
                "{d:02}/{}/{y}:{hh:02}:{mm:02}:{ss:02} +0000",
                MONTHS[(m as usize).saturating_sub(1) % 12]
            ),
        );
        self.iso.1 = format_block(
            &mut self.iso.0,
            format_args!("{y}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}+00:00"),
        );
    }
}

const ONES: u64 = 0x0101_0101_0101_0101;
const HIGHS: u64 = 0x8080_8080_8080_8080;

/// Whether some byte of `w` is below `n` (`n` at most 128).
const fn any_below(w: u64, n: u8) -> bool {
    w.wrapping_sub(ONES * n as u64) & !w & HIGHS != 0
}

/// Whether some byte of `w` is `b`.
const fn any_equal(w: u64, b: u8) -> bool {
    any_below(w ^ (ONES * b as u64), 1)
}

/// Whether some byte of `w` is above `n` (`n` at most 127).
const fn any_above(w: u64, n: u8) -> bool {
    (w.wrapping_add(ONES * (127 - n) as u64) | w) & HIGHS != 0
}

/// Whether the eight bytes of `w` need no escaping.
const fn word_plain(w: u64, ascii: bool) -> bool {
    !(any_equal(w, b'"')
        || any_equal(w, b'\\')
        || any_below(w, 0x20)
        || (ascii && any_above(w, 0x7e)))
}

/// Whether `bytes` need no escaping: no `"`, no `\\`, no control byte and,
/// when `ascii`, nothing above `~`. Eight bytes at a time (the tail padded
/// with a plain byte): values are short, but every line has a dozen.
fn all_plain(bytes: &[u8], ascii: bool) -> bool {
    if bytes.len() < 8 {
        let table = if ascii { &PLAIN_ASCII } else { &PLAIN_ANY };
        return bytes.iter().all(|&b| table[usize::from(b)]);
    }
    let word = |chunk: &[u8]| {
        let mut word = [0u8; 8];
        word.copy_from_slice(chunk);
        word_plain(u64::from_le_bytes(word), ascii)
    };
    let mut words = bytes.chunks_exact(8);
    if !words.all(word) {
        return false;
    }
    // The last eight bytes, overlapping the words already checked: a
    // fixed-size read instead of copying a short tail into a padded word.
    words.remainder().is_empty() || word(&bytes[bytes.len() - 8..])
}

/// [`word_plain`] for one byte.
const fn byte_plain(b: u8, ascii: bool) -> bool {
    b != b'"' && b != b'\\' && b >= 0x20 && !(ascii && b > 0x7e)
}

/// [`byte_plain`] as tables: one load per byte of a short value.
const fn plain_table(ascii: bool) -> [bool; 256] {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        table[b] = byte_plain(b as u8, ascii);
        b += 1;
    }
    table
}
static PLAIN_ASCII: [bool; 256] = plain_table(true);
static PLAIN_ANY: [bool; 256] = plain_table(false);

/// Appends `value` escaped as `escape` says; `-` when empty. `default`
/// writes bytes outside printable ASCII, `"` and `\\` as `\\xHH`, as nginx
/// does; `json` escapes as JSON strings do (invalid UTF-8 replaced).
fn push_value(out: &mut Vec<u8>, value: &[u8], escape: Escape) {
    if value.is_empty() {
        out.push(b'-');
        return;
    }
    match escape {
        Escape::None => out.extend_from_slice(value),
        Escape::Default => {
            // Copied first and checked in place: the usual value needs no
            // escaping, and is then done.
            let start = out.len();
            out.extend_from_slice(value);
            if all_plain(&out[start..], true) {
                return;
            }
            out.truncate(start);
            for &b in value {
                if b != b'"' && b != b'\\' && (0x20..0x7f).contains(&b) {
                    out.push(b);
                } else {
                    const HEX: &[u8; 16] = b"0123456789ABCDEF";
                    out.extend_from_slice(&[
                        b'\\',
                        b'x',
                        HEX[usize::from(b >> 4)],
                        HEX[usize::from(b & 0xf)],
                    ]);
                }
            }
        }
        Escape::Json => {
            if all_plain(value, true) {
                out.extend_from_slice(value);
                return;
            }
            let mut buf = [0u8; 4];
            for c in String::from_utf8_lossy(value).chars() {
                match c {
                    '"' => out.extend_from_slice(b"\\\""),
                    '\\' => out.extend_from_slice(b"\\\\"),
                    '\n' => out.extend_from_slice(b"\\n"),
                    '\r' => out.extend_from_slice(b"\\r"),
                    '\t' => out.extend_from_slice(b"\\t"),
                    c if (c as u32) < 0x20 => {
                        let _ = write!(out, "\\u{:04x}", c as u32);
                    }
                    c => out.extend_from_slice(c.encode_utf8(&mut buf).as_bytes()),
                }
            }
        }
    }
}

/// Appends `n` in decimal, without the `fmt` machinery.
/// Appends `n` in decimal.
pub(crate) fn push_u64(out: &mut Vec<u8>, mut n: u64) {
    // Most numbers in a line (seconds, small bodies) have a digit or two.
    if n < 10 {
        out.push(b'0' + n as u8);
        return;
    }
    if n < 100 {
        out.push(b'0' + (n / 10) as u8);
        out.push(b'0' + (n % 10) as u8);
        return;
    }
    let mut digits = [0u8; 20];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    out.extend_from_slice(&digits[at..]);
}

/// Seconds with milliseconds (`0.004`), as nginx writes times.
fn push_secs(out: &mut Vec<u8>, d: Duration) {
    push_u64(out, d.as_secs());
    let ms = d.subsec_millis();
    out.extend_from_slice(&[
        b'.',
        b'0' + (ms / 100) as u8,
        b'0' + (ms / 10 % 10) as u8,
        b'0' + (ms % 10) as u8,
    ]);
}

/// Writes `ip` as `Display` does into `block`; returns the length. IPv4
/// digit by digit.
fn ip_text(block: &mut [u8; ADDR_BLOCK], ip: std::net::IpAddr) -> usize {
    let std::net::IpAddr::V4(v4) = ip else {
        let mut cursor = std::io::Cursor::new(&mut block[..]);
        let _ = write!(cursor, "{ip}");
        return cursor.position() as usize;
    };
    let mut len = 0;
    for (i, octet) in v4.octets().into_iter().enumerate() {
        if i > 0 {
            block[len] = b'.';
            len += 1;
        }
        if octet >= 100 {
            block[len] = b'0' + octet / 100;
            len += 1;
        }
        if octet >= 10 {
            block[len] = b'0' + octet / 10 % 10;
            len += 1;
        }
        block[len] = b'0' + octet % 10;
        len += 1;
    }
    len
}

fn version_text(v: Version) -> &'static [u8; 8] {
    match v {
        Version::HTTP_09 => b"HTTP/0.9",
        Version::HTTP_10 => b"HTTP/1.0",
        Version::HTTP_2 => b"HTTP/2.0",
        Version::HTTP_3 => b"HTTP/3.0",
        _ => b"HTTP/1.1",
    }
}

/// A status code's three digits.
fn status_digits(code: u16) -> [u8; 3] {
    let code = code % 1000;
    [
        b'0' + (code / 100) as u8,
        b'0' + (code / 10 % 10) as u8,
        b'0' + (code % 10) as u8,
    ]
}

/// The compiled access log: format plus where lines go. It runs as a
/// plugin with no name of its own, in a set that comes before every global
/// rule, so every request passes it.
pub struct AccessLog {
    format: Format,
    escape: Escape,
    sink: Arc<Sink>,
}

impl AccessLog {
    /// The plugin set to put before the global rules.
    pub fn plugin_set(self: &Arc<Self>) -> PluginSet {
        PluginSet::new(vec![Entry::new("access-log", i32::MAX, self.clone())])
    }

    fn header(seen: Option<&Seen>, i: usize) -> &str {
        seen.and_then(|s| s.header(i))
            .and_then(|v| std::str::from_utf8(v).ok())
            .unwrap_or("")
    }

    /// Formats the line of a finished request into `out`.
    fn line(&self, ctx: &Ctx, finished: Finished, scratch: &mut Scratch, out: &mut Vec<u8>) {
        let seen = ctx.data.get::<Seen>();
        let escape = self.escape;
        for part in &self.format.parts {
            let var = match part {
                Part::Short(block, len) => {
                    push_block(out, block, usize::from(*len));
                    continue;
                }
                Part::Text(t) => {
                    out.extend_from_slice(t.as_bytes());
                    continue;
                }
                Part::Var(v) => v,
            };
            match var {
                Var::RemoteAddr => scratch.addr.push(out, ctx.client_ip),
                Var::RemotePort => push_u64(
                    out,
                    u64::from(ctx.client_port.unwrap_or(ctx.conn.peer.port())),
                ),
                Var::RemoteUser => {
                    let user = self
                        .format
                        .authorization
                        .map(|i| Self::header(seen, i))
                        .and_then(basic_user)
                        .unwrap_or_default();
                    push_value(out, user.as_bytes(), escape);
                }
                Var::TimeLocal | Var::TimeIso8601 => {
                    let clock = &mut scratch.clock;
                    clock.follow(finished.at);
                    let (block, len) = if *var == Var::TimeLocal {
                        &clock.local
                    } else {
                        &clock.iso
                    };
                    push_block(out, block, *len);
                }
                Var::Msec => {
                    scratch.clock.follow(finished.at);
                    push_secs(out, scratch.clock.since_epoch(finished.at));
                }
                Var::Request => match seen {
                    Some(s) => {
                        let target = match s.target() {
                            b"" => b"/",
                            t => t,
                        };
                        push_value(out, s.method.as_str().as_bytes(), escape);
                        out.push(b' ');
                        push_value(out, target, escape);
                        out.push(b' ');
                        out.extend_from_slice(version_text(s.version));
                    }
                    None => out.push(b'-'),
                },
                Var::RequestMethod => match seen {
                    Some(s) => out.extend_from_slice(s.method.as_str().as_bytes()),
                    None => out.push(b'-'),
                },
                Var::RequestUri => push_value(out, seen.map_or(&[][..], |s| s.target()), escape),
                Var::Uri => {
                    let path = match ctx.path.as_deref() {
                        Some(p) => p.as_bytes(),
                        None => seen.map_or(&[][..], |s| s.path()),
                    };
                    push_value(out, path, escape)
                }
                Var::Args => push_value(out, seen.map_or(&[][..], |s| s.query()), escape),
                Var::ServerProtocol => match seen {
                    Some(s) => out.extend_from_slice(version_text(s.version)),
                    None => out.push(b'-'),
                },
                Var::Status => match ctx.status {
                    Some(s) => out.extend_from_slice(&status_digits(s.as_u16())),
                    None => out.push(b'-'),
                },
                Var::BodyBytesSent => push_u64(out, ctx.body_bytes_sent),
                Var::BytesSent => push_u64(out, ctx.header_bytes_sent + ctx.body_bytes_sent),
                Var::RequestLength => push_u64(out, ctx.request_length),
                Var::RequestTime => push_secs(out, finished.request),
                Var::UpstreamAddr => match &ctx.upstream.addr {
                    Some(a) => out.extend_from_slice(a.as_str().as_bytes()),
                    None => out.push(b'-'),
                },
                Var::UpstreamStatus => match ctx.upstream.status {
                    Some(s) if (100..1000).contains(&s) => out.extend_from_slice(&status_digits(s)),
                    Some(s) => push_u64(out, u64::from(s)),
                    None => out.push(b'-'),
                },
                Var::UpstreamResponseTime => match finished.upstream {
                    Some(d) => push_secs(out, d),
                    None => out.push(b'-'),
                },
                Var::UpstreamHeaderTime => match (ctx.upstream.started, ctx.upstream.header_time) {
                    (Some(at), Some(head)) => push_secs(out, head.saturating_duration_since(at)),
                    _ => out.push(b'-'),
                },
                Var::UpstreamScheme => match ctx.upstream.scheme.unwrap_or("http") {
                    "http" => out.extend_from_slice(b"http"),
                    "https" => out.extend_from_slice(b"https"),
                    other => out.extend_from_slice(other.as_bytes()),
                },
                Var::UpstreamHost => push_value(
                    out,
                    seen.and_then(|s| Some(s.get(s.upstream_host?)))
                        .unwrap_or_default(),
                    escape,
                ),
                Var::UpstreamUri => push_value(
                    out,
                    seen.filter(|s| s.routed)
                        .map_or(&[][..], |s| s.get(s.upstream_target.unwrap_or(s.target))),
                    escape,
                ),
                Var::Header(i) => {
                    let mut value = seen.and_then(|s| s.header(*i)).unwrap_or_default();
                    if value.is_empty() && self.format.headers[*i] == http::header::HOST {
                        value = seen.map_or(&[][..], |s| s.get(s.authority));
                    }
                    push_value(out, value, escape)
                }
                Var::Ctx(name) => {
                    let v = ctx.var(None, name).or_else(|| {
                        let s = seen?;
                        // Rare (a variable of no other kind): the target is
                        // parsed again only here.
                        let uri = Uri::try_from(s.target()).ok()?;
                        ctx.req_ref(&s.method, &uri, empty_headers())
                            .var(name)
                            .map(|v| std::borrow::Cow::Owned(v.into_owned()))
                    });
                    push_value(out, v.as_deref().unwrap_or("").as_bytes(), escape)
                }
            }
        }
        out.push(b'\n');
    }
}

impl Plugin for AccessLog {
    fn phases(&self) -> Phases {
        Phases::REWRITE | Phases::BEFORE_PROXY | Phases::LOG
    }

    fn rewrite(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        let wanted = &self.format.headers;
        let mut seen = Seen::new(req.method.clone(), req.version);
        seen.target = seen.put(
            req.uri
                .path_and_query()
                .map_or("", |p| p.as_str())
                .as_bytes(),
        );
        if let Some(a) = req.uri.authority() {
            seen.authority = seen.put(a.as_str().as_bytes());
        }
        if wanted.len() <= INLINE_HEADERS {
            // One pass over the request's few headers beats a hashed
            // look-up per wanted name; the first value of a name wins, as
            // with `get`.
            let mut missing = wanted.len();
            for (name, value) in &req.headers {
                if missing == 0 {
                    break;
                }
                if let Some(i) = wanted.iter().position(|w| w == name) {
                    if seen.headers[i].is_none() {
                        seen.headers[i] = Some(seen.put(value.as_bytes()));
                        missing -= 1;
                    }
                }
            }
        } else {
            for (i, name) in wanted.iter().enumerate() {
                let span = req.headers.get(name).map(|v| seen.put(v.as_bytes()));
                match seen.headers.get_mut(i) {
                    Some(slot) => *slot = span,
                    None => seen.more.push(span),
                }
            }
        }
        ctx.data.insert(seen);
        Flow::Continue
    }

    fn before_proxy(&self, ctx: &mut Ctx, req: &mut request::Parts) -> Flow {
        // Unrouted requests go nowhere: no upstream URI for them.
        if ctx.route_id.is_none() {
            return Flow::Continue;
        }
        if let Some(seen) = ctx.data.get_mut::<Seen>() {
            seen.routed = true;
            // The usual request leaves with the target it came with:
            // nothing more to keep.
            let target = req.uri.path_and_query().map_or("", |p| p.as_str());
            if target.as_bytes() != seen.target() {
                seen.upstream_target = Some(seen.put(target.as_bytes()));
            }
            if let Some(host) = host_header(&req.headers) {
                seen.upstream_host = Some(seen.put(host.as_bytes()));
            }
        }
        Flow::Continue
    }

    fn log(&self, ctx: &Ctx) {
        let finished = ctx.finished();
        SCRATCH.with(|scratch| {
            let mut scratch = scratch.borrow_mut();
            self.sink
                .write(|buf| self.line(ctx, finished, &mut scratch, buf));
        });
    }

    fn reads_response_headers(&self) -> bool {
        self.format.response_headers
    }

    fn reads_sizes(&self) -> bool {
        self.format
            .parts
            .iter()
            .any(|p| matches!(p, Part::Var(Var::RequestLength | Var::BytesSent)))
    }
}

enum Msg {
    Data(Vec<u8>),
    Reopen,
    /// Write everything and answer.
    Flush(mpsc::Sender<()>),
}

/// Lines on their way to the file.
pub struct Sink {
    buffer: Mutex<Vec<u8>>,
    /// Buffers the writer has emptied, for the next swap: reusing them keeps
    /// requests writing into memory already mapped and cached, rather than a
    /// fresh allocation every `access_log_buffer` bytes.
    spare: Mutex<Vec<Vec<u8>>>,
    limit: usize,
    tx: SyncSender<Msg>,
    dropped: AtomicU64,
    path: PathBuf,
}

impl Sink {
    /// Appends what `line` writes. It writes into the shared buffer, under
    /// its lock: formatting elsewhere first would copy every line once more.
    fn write(&self, line: impl FnOnce(&mut Vec<u8>)) {
        let full = {
            let mut buf = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
            line(&mut buf);
            if buf.len() < self.limit {
                return;
            }
            let fresh = self
                .spare
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .pop()
                .unwrap_or_else(|| Vec::with_capacity(self.limit + 512));
            std::mem::replace(&mut *buf, fresh)
        };
        self.send(Msg::Data(full));
    }

    fn send(&self, msg: Msg) {
        match self.tx.try_send(msg) {
            Ok(()) => {}
            Err(TrySendError::Full(Msg::Data(lost))) => {
                let before = self.dropped.fetch_add(lost.len() as u64, Ordering::Relaxed);
                if before == 0 {
                    tracing::warn!(path = %self.path.display(), "access log writer behind; lines dropped");
                }
            }
            Err(_) => {}
        }
    }

    /// Keeps an emptied buffer for reuse (two at most).
    fn recycle(&self, mut buf: Vec<u8>) {
        buf.clear();
        let mut spare = self.spare.lock().unwrap_or_else(|p| p.into_inner());
        if spare.len() < 2 && buf.capacity() <= self.limit + 512 {
            spare.push(buf);
        }
    }

    fn take(&self) -> Vec<u8> {
        let mut buf = self.buffer.lock().unwrap_or_else(|p| p.into_inner());
        std::mem::take(&mut *buf)
    }

    /// Reopens the file (after logrotate renamed it).
    pub fn reopen(&self) {
        self.send(Msg::Reopen);
    }

    /// Writes out everything buffered; waits up to `limit`.
    pub fn flush(&self, limit: Duration) {
        let (tx, rx) = mpsc::channel();
        if self.tx.send(Msg::Flush(tx)).is_ok() {
            let _ = rx.recv_timeout(limit);
        }
    }

    /// Bytes of lines dropped because the writer could not keep up.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

fn open(path: &Path) -> std::io::Result<File> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    OpenOptions::new().create(true).append(true).open(path)
}

/// The writer thread: owns the file; ends when the sink is gone.
fn writer(sink: Weak<Sink>, rx: mpsc::Receiver<Msg>, mut file: File, path: PathBuf) {
    let write = |file: &mut File, bytes: &[u8]| {
        if !bytes.is_empty() {
            if let Err(e) = file.write_all(bytes) {
                tracing::error!(path = %path.display(), error = %e, "access log write failed");
            }
        }
    };
    loop {
        match rx.recv_timeout(FLUSH_EVERY) {
            Ok(Msg::Data(bytes)) => {
                write(&mut file, &bytes);
                match sink.upgrade() {
                    Some(s) => s.recycle(bytes),
                    None => return,
                }
            }
            Ok(Msg::Reopen) => {
                if let Some(s) = sink.upgrade() {
                    write(&mut file, &s.take());
                }
                match open(&path) {
                    Ok(f) => {
                        file = f;
                        tracing::info!(path = %path.display(), "access log reopened");
                    }
                    Err(e) => {
                        tracing::error!(path = %path.display(), error = %e, "access log not reopened; writing on to the old file")
                    }
                }
            }
            Ok(Msg::Flush(done)) => {
                if let Some(s) = sink.upgrade() {
                    write(&mut file, &s.take());
                }
                let _ = done.send(());
            }
            Err(RecvTimeoutError::Timeout) => match sink.upgrade() {
                Some(s) => write(&mut file, &s.take()),
                None => return,
            },
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

/// Opens the log and starts its writer. Fails when the file cannot be
/// opened or the format does not parse.
pub fn start(conf: &AccessLogConf) -> Result<Arc<AccessLog>, String> {
    let format = Format::parse(&unquote(&conf.format))?;
    let file = open(&conf.path)
        .map_err(|e| format!("cannot open the access log {}: {e}", conf.path.display()))?;
    let (tx, rx) = mpsc::sync_channel(QUEUED_BUFFERS);
    let sink = Arc::new(Sink {
        buffer: Mutex::new(Vec::with_capacity(conf.buffer + 512)),
        spare: Mutex::new(Vec::new()),
        limit: conf.buffer.max(1),
        tx,
        dropped: AtomicU64::new(0),
        path: conf.path.clone(),
    });
    let weak = Arc::downgrade(&sink);
    let path = conf.path.clone();
    std::thread::Builder::new()
        .name("access-log".into())
        .spawn(move || writer(weak, rx, file, path))
        .map_err(|e| format!("cannot start the access log writer: {e}"))?;
    Ok(Arc::new(AccessLog {
        format,
        escape: conf.escape,
        sink,
    }))
}

impl AccessLog {
    pub fn sink(&self) -> &Arc<Sink> {
        &self.sink
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn word_checks_agree_with_bytes() {
        let oracle = |bytes: &[u8], ascii: bool| {
            bytes
                .iter()
                .all(|&b| b != b'"' && b != b'\\' && b >= 0x20 && (!ascii || b < 0x7f))
        };
        let mut samples: Vec<Vec<u8>> = vec![b"curl/8.5.0 (x86_64) plain text here".to_vec()];
        for b in 0..=255u8 {
            for at in [0, 3, 7, 8, 13] {
                let mut v = b"abcdefghijklmnopq".to_vec();
                v[at] = b;
                samples.push(v);
            }
        }
        // Every length, so the short path and the overlapping last word are
        // both checked.
        for s in &samples {
            for len in 0..=s.len() {
                let s = &s[..len];
                for ascii in [true, false] {
                    assert_eq!(all_plain(s, ascii), oracle(s, ascii), "{s:?} {ascii}");
                }
                let mut escaped = Vec::new();
                push_value(&mut escaped, s, Escape::Default);
                if oracle(s, true) && !s.is_empty() {
                    assert_eq!(escaped, s);
                } else if !s.is_empty() {
                    assert!(escaped.windows(2).any(|w| w == b"\\x"), "{s:?}");
                }
            }
        }
    }

    #[test]
    fn apisix_example_format_is_unquoted() {
        let yaml =
            "\"$remote_addr - $remote_user [$time_local] $http_host \\\"$request\\\" $status\"\n";
        assert_eq!(
            unquote(yaml),
            "$remote_addr - $remote_user [$time_local] $http_host \"$request\" $status"
        );
        assert_eq!(unquote(DEFAULT_FORMAT), DEFAULT_FORMAT);
    }

    #[test]
    fn parses_variables_and_text() {
        let f = Format::parse("$remote_addr [${status}] $http_user_agent $route_id x").unwrap();
        assert_eq!(
            f.parts,
            vec![
                Part::Var(Var::RemoteAddr),
                Part::text(" [".into()),
                Part::Var(Var::Status),
                Part::text("] ".into()),
                Part::Var(Var::Header(0)),
                Part::text(" ".into()),
                Part::Var(Var::Ctx("route_id".into())),
                Part::text(" x".into()),
            ]
        );
        assert_eq!(f.headers, vec![HeaderName::from_static("user-agent")]);
        assert!(Format::parse("a $ b").is_err());
        assert!(Format::parse("${x").is_err());
    }

    #[test]
    fn seen_texts_in_place_then_spilled() {
        let mut seen = Seen::new(Method::GET, Version::HTTP_11);
        seen.target = seen.put(b"/a/b?x=1&y");
        assert_eq!(seen.target(), b"/a/b?x=1&y");
        assert_eq!(seen.path(), b"/a/b");
        assert_eq!(seen.query(), b"x=1&y");
        let empty = seen.put(b"");
        let long = vec![b'u'; SEEN_TEXT];
        let spilled = seen.put(&long);
        let after = seen.put(b"after");
        let fits = seen.put(b"z");
        assert_eq!(seen.get(empty), b"");
        assert_eq!(seen.get(spilled), &long[..]);
        assert_eq!(seen.get(after), b"after");
        // Once spilled, later texts follow in the spill, in order.
        assert_eq!(seen.get(fits), b"z");
        assert_eq!(seen.get(seen.target), b"/a/b?x=1&y");
        assert_eq!(seen.get((0, u32::MAX)), b"");
    }

    #[test]
    fn remote_user_from_basic_auth() {
        assert_eq!(basic_user("Basic Zm9vOmJhcg==").as_deref(), Some("foo"));
        assert_eq!(basic_user("Bearer x"), None);
    }

    #[test]
    fn escapes_as_nginx() {
        let mut out = Vec::new();
        push_value(&mut out, "a\"b\\c\u{1}é".as_bytes(), Escape::Default);
        assert_eq!(out, b"a\\x22b\\x5Cc\\x01\\xC3\\xA9");
        out.clear();
        push_value(&mut out, b"a\"b\n\xff", Escape::Json);
        assert_eq!(String::from_utf8(out.clone()).unwrap(), "a\\\"b\\n\u{fffd}");
        out.clear();
        push_value(&mut out, b"", Escape::None);
        assert_eq!(out, b"-");
        out.clear();
        let mut addr = LastAddr::new();
        addr.push(&mut out, "10.20.3.255".parse().unwrap());
        out.push(b' ');
        addr.push(&mut out, "10.20.3.255".parse().unwrap());
        out.push(b' ');
        addr.push(&mut out, "2001:db8::1".parse().unwrap());
        out.push(b' ');
        addr.push(&mut out, "::ffff:255.255.255.255".parse().unwrap());
        out.push(b' ');
        push_secs(&mut out, Duration::from_millis(12_345));
        assert_eq!(
            out,
            b"10.20.3.255 10.20.3.255 2001:db8::1 ::ffff:255.255.255.255 12.345".to_vec()
        );
    }

    #[test]
    fn clock_formats_nginx_time() {
        let mut c = Clock::new();
        // 2026-12-03 18:30:05 UTC
        c.at(1_796_322_605);
        let text = |(block, len): &([u8; TIME_BLOCK], usize)| block[..*len].to_vec();
        assert_eq!(text(&c.local), b"03/Dec/2026:18:30:05 +0000");
        assert_eq!(text(&c.iso), b"2026-12-03T18:30:05+00:00");
        c.at(951_782_400); // 2000-02-29 00:00:00
        assert_eq!(text(&c.local), b"29/Feb/2000:00:00:00 +0000");
        let mut out = b"[".to_vec();
        push_block(&mut out, &c.local.0, c.local.1);
        out.push(b']');
        assert_eq!(out, b"[29/Feb/2000:00:00:00 +0000]");
    }

    #[test]
    fn clock_follows_the_wall_clock() {
        let mut c = Clock::new();
        let now = Instant::now();
        c.follow(now);
        let wall = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let seen = c.since_epoch(now);
        assert!(
            wall.saturating_sub(seen) < Duration::from_millis(200),
            "{wall:?} {seen:?}"
        );
        assert!(seen <= wall + Duration::from_millis(1));
        assert_eq!(c.second, seen.as_secs());
        let texts = (c.local, c.iso);
        c.follow(now);
        assert_eq!((c.local, c.iso), texts);
        // Two seconds earlier: a second two (or, across a boundary, one or
        // three) before.
        if let Some(before) = now.checked_sub(Duration::from_secs(2)) {
            let second = c.second;
            c.follow(before);
            assert!(
                (1..=3).contains(&(second - c.second)),
                "{second} {}",
                c.second
            );
        }
    }
}
