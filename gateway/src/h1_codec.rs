//! HTTP/1.1 on the wire towards upstream nodes: request heads written,
//! answer heads parsed, answer bodies framed (RFC 9112).
//!
//! Pure functions over byte buffers; [`crate::h1_upstream`] does the I/O.
//!
//! - Request framing: a body already in memory goes with its exact
//!   `Content-Length` (none for an empty GET-like request); a streamed body
//!   keeps the client's `Content-Length` when it has one, else is chunked.
//! - Answer heads: at most [`MAX_ANSWER_HEAD`] bytes and [`MAX_HEADERS`]
//!   header lines, or the answer is invalid (the proxy answers 502, as nginx
//!   does for a head larger than `proxy_buffer_size`).
//! - Answer bodies: none for HEAD, 1xx, 204 and 304; chunked when the last
//!   transfer coding is `chunked`; otherwise `Content-Length` (every copy
//!   must agree); otherwise until the node closes. A connection is kept for
//!   another request only when both sides framed the answer unambiguously
//!   and the node did not ask to close.

use std::mem::MaybeUninit;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode, Version};

/// Largest answer head read from a node.
pub const MAX_ANSWER_HEAD: usize = 64 * 1024;
/// Most header lines an answer head (or its trailers) may have.
pub const MAX_HEADERS: usize = 128;
/// Answer header lines whose places are noted on the stack while the head
/// is parsed; more take an allocation.
const INLINE_SPANS: usize = 32;
/// Longest chunk-size line (with extensions) accepted.
const MAX_CHUNK_LINE: usize = 4 * 1024;

/// Why a node's answer cannot be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("invalid answer head")]
    Head,
    #[error("answer head larger than {MAX_ANSWER_HEAD} bytes or {MAX_HEADERS} lines")]
    HeadTooLarge,
    #[error("invalid Content-Length")]
    ContentLength,
    #[error("invalid chunked body")]
    Chunk,
}

/// How a request's body is delimited on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFraming {
    /// No body and no length header.
    None,
    Length(u64),
    Chunked,
}

/// The framing of a request whose body is `exact` bytes long when known
/// (in memory), or streamed (`None`).
pub fn request_framing(method: &Method, headers: &HeaderMap, exact: Option<u64>) -> RequestFraming {
    match exact {
        Some(0) if !expects_length(method, headers) => RequestFraming::None,
        Some(n) => RequestFraming::Length(n),
        None => match content_length(headers) {
            Ok(Some(n)) => RequestFraming::Length(n),
            _ => RequestFraming::Chunked,
        },
    }
}

/// An empty body is announced (`Content-Length: 0`) for the methods that
/// define one, or when the client announced it itself.
fn expects_length(method: &Method, headers: &HeaderMap) -> bool {
    *method == Method::POST
        || *method == Method::PUT
        || *method == Method::PATCH
        || headers.contains_key(header::CONTENT_LENGTH)
}

/// Appends the request line and headers to `buf`: `headers`, then `extra`
/// (headers kept beside the map). Framing headers in either are replaced by
/// those of `framing`.
pub fn encode_request_head<'a>(
    buf: &mut Vec<u8>,
    method: &Method,
    target: &str,
    headers: &'a HeaderMap,
    extra: impl Iterator<Item = (&'a HeaderName, &'a HeaderValue)>,
    framing: RequestFraming,
) {
    buf.extend_from_slice(method.as_str().as_bytes());
    buf.push(b' ');
    buf.extend_from_slice(if target.is_empty() { "/" } else { target }.as_bytes());
    buf.extend_from_slice(b" HTTP/1.1\r\n");
    for (name, value) in headers.iter().chain(extra) {
        if name == header::CONTENT_LENGTH || name == header::TRANSFER_ENCODING {
            continue;
        }
        buf.extend_from_slice(name.as_str().as_bytes());
        buf.extend_from_slice(b": ");
        buf.extend_from_slice(value.as_bytes());
        buf.extend_from_slice(b"\r\n");
    }
    match framing {
        RequestFraming::None => {}
        RequestFraming::Length(n) => {
            buf.extend_from_slice(b"content-length: ");
            crate::access_log::push_u64(buf, n);
            buf.extend_from_slice(b"\r\n");
        }
        RequestFraming::Chunked => buf.extend_from_slice(b"transfer-encoding: chunked\r\n"),
    }
    buf.extend_from_slice(b"\r\n");
}

/// The size line that starts a chunk of `len` bytes.
pub fn chunk_size_line(len: usize, out: &mut [u8; 18]) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = len;
    out[16] = b'\r';
    out[17] = b'\n';
    loop {
        i -= 1;
        out[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    &out[i..]
}

/// The end of a chunked body (no trailers).
pub const LAST_CHUNK: &[u8] = b"0\r\n\r\n";

/// A parsed answer head.
///
/// Its hop-by-hop headers (`Connection`, `Keep-Alive`, `Transfer-Encoding`,
/// `TE`, `Trailer`, `Upgrade`, `Proxy-Connection`) are read into
/// [`FramingFacts`] while it is parsed and left out of `headers`, as the client must
/// not see them anyway; a 101 answer keeps them all, for the upgrade, and a
/// `Connection` that names other headers stays for the proxy to remove
/// those too.
#[derive(Debug)]
pub struct AnswerHead {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    /// The reason phrase, when it is not the status code's usual one.
    pub reason: Option<Bytes>,
    framing: FramingFacts,
}

/// What the head said about its body and its connection.
#[derive(Debug, Default)]
struct FramingFacts {
    /// `Connection: close`.
    close: bool,
    /// `Connection: keep-alive`.
    keep_alive: bool,
    /// `Transfer-Encoding` was present; whether its last coding is `chunked`.
    transfer_encoding: Option<bool>,
    /// `Content-Length` was present.
    has_length: bool,
    /// Its value: every copy and list element the same number.
    length: Option<u64>,
    length_invalid: bool,
}

/// A hop-by-hop header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Hop {
    Connection,
    TransferEncoding,
    Other,
}

/// `input` equals `lower` (lowercase letters and `-` only) in any case.
///
/// Folds case with one OR per byte and looks at every byte, so that short
/// names compare in a few instructions. Exact for any input without CR
/// (only `-` and CR fold onto `-`; only a letter and its capital onto the
/// letter): parsed header names are tokens, and parsed values hold no CR.
fn same_name(input: &[u8], lower: &[u8]) -> bool {
    debug_assert!(lower.iter().all(|&b| b.is_ascii_lowercase() || b == b'-'));
    input.len() == lower.len()
        && input
            .iter()
            .zip(lower)
            .fold(0u8, |differ, (&i, &l)| differ | ((i | 0x20) ^ l))
            == 0
}

/// The hop-by-hop header `name` (in any case) is, if it is one: the names
/// of `headers::HOP_BY_HOP` but `Expect` (a request's), compared in any
/// case: these come straight from the wire, not from a `HeaderName`.
fn hop_by_hop(name: &[u8]) -> Option<Hop> {
    // A match on the length first: most names are ruled out by it.
    let candidates: &[(&[u8], Hop)] = match name.len() {
        2 => &[(b"te", Hop::Other)],
        7 => &[(b"trailer", Hop::Other), (b"upgrade", Hop::Other)],
        10 => &[
            (b"connection", Hop::Connection),
            (b"keep-alive", Hop::Other),
        ],
        16 => &[(b"proxy-connection", Hop::Other)],
        17 => &[(b"transfer-encoding", Hop::TransferEncoding)],
        _ => return None,
    };
    candidates
        .iter()
        .find(|(text, _)| same_name(name, text))
        .map(|&(_, hop)| hop)
}

/// What an answer header's name is.
enum AnswerName {
    Hop(Hop),
    ContentLength,
    /// A name answers commonly carry, as its constant: no parse, no copy.
    Known(HeaderName),
    Other,
}

/// Sorts an answer header's name (in any case), by its length first.
fn answer_name(name: &[u8]) -> AnswerName {
    let is = |text: &[u8]| same_name(name, text);
    let known = match name.len() {
        4 if is(b"date") => header::DATE,
        4 if is(b"etag") => header::ETAG,
        4 if is(b"vary") => header::VARY,
        6 if is(b"server") => header::SERVER,
        7 if is(b"expires") => header::EXPIRES,
        8 if is(b"location") => header::LOCATION,
        10 if is(b"set-cookie") => header::SET_COOKIE,
        12 if is(b"content-type") => header::CONTENT_TYPE,
        13 if is(b"cache-control") => header::CACHE_CONTROL,
        13 if is(b"last-modified") => header::LAST_MODIFIED,
        13 if is(b"accept-ranges") => header::ACCEPT_RANGES,
        14 if is(b"content-length") => return AnswerName::ContentLength,
        16 if is(b"content-encoding") => header::CONTENT_ENCODING,
        _ => {
            return match hop_by_hop(name) {
                Some(hop) => AnswerName::Hop(hop),
                None => AnswerName::Other,
            }
        }
    };
    AnswerName::Known(known)
}

impl FramingFacts {
    /// Notes one hop-by-hop header; true when it must stay in the map
    /// (a `Connection` that names headers other than hop-by-hop ones).
    fn note_hop(&mut self, hop: Hop, value: &[u8]) -> bool {
        match hop {
            Hop::Connection => {
                let mut names_others = false;
                for token in value.split(|&b| b == b',').map(<[u8]>::trim_ascii) {
                    if same_name(token, b"close") {
                        self.close = true;
                    } else if same_name(token, b"keep-alive") {
                        self.keep_alive = true;
                    } else if !token.is_empty() && hop_by_hop(token).is_none() {
                        names_others = true;
                    }
                }
                names_others
            }
            Hop::TransferEncoding => {
                // The last header's last coding decides.
                let last = value.rsplit(|&b| b == b',').next().unwrap_or_default();
                self.transfer_encoding = Some(last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
                false
            }
            Hop::Other => false,
        }
    }

    fn note_length(&mut self, value: &[u8]) {
        self.has_length = true;
        for part in value.split(|&b| b == b',') {
            match parse_decimal(part.trim_ascii()) {
                Some(n) if self.length.is_none_or(|l| l == n) => self.length = Some(n),
                _ => self.length_invalid = true,
            }
        }
    }

    /// HTTP/1.1 keeps the connection unless `Connection: close`; HTTP/1.0
    /// only with `Connection: keep-alive`.
    fn keeps_alive(&self, version: Version) -> bool {
        if version == Version::HTTP_10 {
            self.keep_alive
        } else {
            !self.close
        }
    }
}

/// Parses an answer head from the front of `buf`, removing it; `Ok(None)`
/// while it is incomplete.
///
/// The answer's headers go into `spare`'s allocation (cleared first), which
/// is left empty: the proxy hands in the map of the request it has just
/// written, and hyper keeps the answer's map, once written to the client,
/// for the next request on that connection, so that one map serves a
/// keep-alive connection's requests and answers without being allocated or
/// grown again.
pub fn parse_answer_head(
    buf: &mut BytesMut,
    spare: &mut HeaderMap,
) -> Result<Option<AnswerHead>, Invalid> {
    let mut slots = [const { MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let base = buf.as_ptr() as usize;
    let parsed = httparse::ParserConfig::default()
        .parse_response_with_uninit_headers(&mut resp, buf, &mut slots);
    let len = match parsed {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() > MAX_ANSWER_HEAD => {
            return Err(Invalid::HeadTooLarge)
        }
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(Invalid::HeadTooLarge),
        Err(_) => return Err(Invalid::Head),
    };
    if len > MAX_ANSWER_HEAD {
        return Err(Invalid::HeadTooLarge);
    }
    let status = resp
        .code
        .and_then(|c| StatusCode::from_u16(c).ok())
        .ok_or(Invalid::Head)?;
    let version = if resp.version == Some(0) {
        Version::HTTP_10
    } else {
        Version::HTTP_11
    };
    let reason = resp
        .reason
        .filter(|r| Some(*r) != status.canonical_reason())
        .map(|r| Bytes::copy_from_slice(r.as_bytes()));
    // Header values are slices of the head, which is frozen once: no copy.
    // Their places are noted first, while the parser still borrows it (on
    // the stack for a usual head; offsets fit: the head is at most
    // MAX_ANSWER_HEAD bytes).
    let count = resp.headers.len();
    let mut inline = [[0u32; 4]; INLINE_SPANS];
    let mut spilled = Vec::new();
    let spans: &mut [[u32; 4]] = if count <= INLINE_SPANS {
        &mut inline[..count]
    } else {
        spilled.resize(count, [0; 4]);
        &mut spilled
    };
    for (span, h) in spans.iter_mut().zip(resp.headers.iter()) {
        let name = h.name.as_ptr() as usize - base;
        let value = h.value.as_ptr() as usize - base;
        *span = [name, h.name.len(), value, h.value.len()].map(|n| n as u32);
    }
    let head = buf.split_to(len).freeze();
    let keep_hops = status == StatusCode::SWITCHING_PROTOCOLS;
    let mut framing = FramingFacts::default();
    let mut headers = std::mem::take(spare);
    headers.clear();
    headers.reserve(count);
    for &[name, name_len, value, value_len] in spans.iter() {
        let (value, value_len) = (value as usize, value_len as usize);
        let name = &head[name as usize..(name + name_len) as usize];
        let value_bytes = &head[value..value + value_len];
        let name = match answer_name(name) {
            AnswerName::Known(known) => known,
            AnswerName::ContentLength => {
                framing.note_length(value_bytes);
                header::CONTENT_LENGTH
            }
            AnswerName::Hop(hop) => {
                if !(framing.note_hop(hop, value_bytes) || keep_hops) {
                    continue;
                }
                HeaderName::from_bytes(name).map_err(|_| Invalid::Head)?
            }
            AnswerName::Other => HeaderName::from_bytes(name).map_err(|_| Invalid::Head)?,
        };
        // httparse admits exactly the bytes a header value may hold
        // (visible ASCII, space, tab and obs-text), as `HeaderValue` does.
        let value = HeaderValue::from_maybe_shared(head.slice(value..value + value_len))
            .map_err(|_| Invalid::Head)?;
        headers.append(name, value);
    }
    Ok(Some(AnswerHead {
        status,
        version,
        headers,
        reason,
        framing,
    }))
}

/// How an answer's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnswerFraming {
    Empty,
    Length(u64),
    Chunked,
    /// Until the node closes the connection.
    UntilClose,
}

/// The framing of an answer to a request (`head_request`: a HEAD), and
/// whether its connection may carry another request afterwards.
pub fn answer_framing(
    head_request: bool,
    head: &AnswerHead,
) -> Result<(AnswerFraming, bool), Invalid> {
    let facts = &head.framing;
    let keep_alive = facts.keeps_alive(head.version);
    let status = head.status.as_u16();
    if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
        return Ok((AnswerFraming::Empty, keep_alive));
    }
    if let Some(ends_chunked) = facts.transfer_encoding {
        if !ends_chunked {
            return Ok((AnswerFraming::UntilClose, false));
        }
        // Both headers: the chunks frame it, and the connection is not
        // trusted with another request.
        return Ok((AnswerFraming::Chunked, keep_alive && !facts.has_length));
    }
    if facts.length_invalid {
        return Err(Invalid::ContentLength);
    }
    match facts.length {
        Some(0) => Ok((AnswerFraming::Empty, keep_alive)),
        Some(n) => Ok((AnswerFraming::Length(n), keep_alive)),
        None => Ok((AnswerFraming::UntilClose, false)),
    }
}

/// A request's `Content-Length`: every copy and list element must be the
/// same number.
fn content_length(headers: &HeaderMap) -> Result<Option<u64>, Invalid> {
    let mut facts = FramingFacts::default();
    for value in headers.get_all(header::CONTENT_LENGTH) {
        facts.note_length(value.as_bytes());
    }
    if facts.length_invalid {
        return Err(Invalid::ContentLength);
    }
    Ok(facts.length)
}

fn parse_decimal(digits: &[u8]) -> Option<u64> {
    if digits.is_empty() || digits.len() > 19 {
        return None;
    }
    digits.iter().try_fold(0u64, |n, &d| {
        d.is_ascii_digit().then(|| n * 10 + u64::from(d - b'0'))
    })
}

/// What [`ChunkedDecoder::decode`] found in the buffer.
#[derive(Debug, PartialEq)]
pub enum Decoded {
    Data(Bytes),
    /// The body ended with these trailers.
    Trailers(HeaderMap),
    /// The body ended without trailers.
    End,
    /// More bytes are needed.
    More,
}

/// Decodes a chunked body as its bytes arrive.
#[derive(Debug, Default)]
pub struct ChunkedDecoder {
    state: ChunkState,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Expecting a chunk-size line.
    #[default]
    Size,
    /// This many bytes of chunk data remain.
    Data(u64),
    /// The CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailer lines up to an empty line.
    Trailers,
    Done,
}

impl ChunkedDecoder {
    pub fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Takes what it can from the front of `buf`.
    pub fn decode(&mut self, buf: &mut BytesMut) -> Result<Decoded, Invalid> {
        loop {
            match self.state {
                ChunkState::Size => {
                    let Some(end) = memchr::memchr(b'\n', buf) else {
                        return if buf.len() > MAX_CHUNK_LINE {
                            Err(Invalid::Chunk)
                        } else {
                            Ok(Decoded::More)
                        };
                    };
                    let size = parse_chunk_size(&buf[..end])?;
                    buf.advance(end + 1);
                    self.state = if size == 0 {
                        ChunkState::Trailers
                    } else {
                        ChunkState::Data(size)
                    };
                }
                ChunkState::Data(left) => {
                    if buf.is_empty() {
                        return Ok(Decoded::More);
                    }
                    let take = usize::try_from(left).unwrap_or(usize::MAX).min(buf.len());
                    let data = buf.split_to(take).freeze();
                    let left = left - take as u64;
                    self.state = if left == 0 {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(left)
                    };
                    return Ok(Decoded::Data(data));
                }
                ChunkState::DataEnd => match buf.first() {
                    None => return Ok(Decoded::More),
                    Some(b'\n') => {
                        buf.advance(1);
                        self.state = ChunkState::Size;
                    }
                    Some(b'\r') if buf.len() < 2 => return Ok(Decoded::More),
                    Some(b'\r') if buf[1] == b'\n' => {
                        buf.advance(2);
                        self.state = ChunkState::Size;
                    }
                    Some(_) => return Err(Invalid::Chunk),
                },
                ChunkState::Trailers => return self.trailers(buf),
                ChunkState::Done => return Ok(Decoded::End),
            }
        }
    }

    fn trailers(&mut self, buf: &mut BytesMut) -> Result<Decoded, Invalid> {
        if buf.starts_with(b"\r\n") || buf.starts_with(b"\n") {
            buf.advance(if buf[0] == b'\r' { 2 } else { 1 });
            self.state = ChunkState::Done;
            return Ok(Decoded::End);
        }
        let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let (used, trailers) = match httparse::parse_headers(buf, &mut slots) {
            Ok(httparse::Status::Complete((used, lines))) => {
                let mut trailers = HeaderMap::with_capacity(lines.len());
                for h in lines {
                    let name = HeaderName::from_bytes(h.name.as_bytes());
                    let value = HeaderValue::from_bytes(h.value);
                    if let (Ok(name), Ok(value)) = (name, value) {
                        trailers.append(name, value);
                    }
                }
                (used, trailers)
            }
            Ok(httparse::Status::Partial) if buf.len() <= MAX_ANSWER_HEAD => {
                return Ok(Decoded::More)
            }
            _ => return Err(Invalid::Chunk),
        };
        buf.advance(used);
        self.state = ChunkState::Done;
        Ok(Decoded::Trailers(trailers))
    }
}

/// The size in a chunk-size line (without its `\n`), extensions ignored.
fn parse_chunk_size(line: &[u8]) -> Result<u64, Invalid> {
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let digits = line
        .split(|&b| b == b';')
        .next()
        .map(<[u8]>::trim_ascii)
        .unwrap_or_default();
    if digits.is_empty() || digits.len() > 15 {
        return Err(Invalid::Chunk);
    }
    let mut n = 0u64;
    for &d in digits {
        let v = match d {
            b'0'..=b'9' => d - b'0',
            b'a'..=b'f' => d - b'a' + 10,
            b'A'..=b'F' => d - b'A' + 10,
            _ => return Err(Invalid::Chunk),
        };
        n = n << 4 | u64::from(v);
    }
    Ok(n)
}

#[cfg(test)]
mod tests;
