//! Request framing as the client wrote it, followed on the raw bytes of an
//! HTTP/1 connection.
//!
//! A request carrying both `Content-Length` and `Transfer-Encoding` is the
//! classic request-smuggling shape: a server behind the gateway that trusts
//! the length would see a different request boundary than one that trusts
//! the chunks. hyper frames such a request by its chunks (RFC 9112), drops
//! the `Content-Length` header before the request reaches the gateway's
//! service, and closes the connection afterwards. That is safe, but nginx,
//! and therefore APISIX, refuses the request outright with 400, and so does
//! ferrogate: a [`FramingScan`] sees the bytes hyper reads (fed by
//! [`crate::park::ClientIo`]), follows heads and
//! bodies (by length or by chunks) and records which request of the
//! connection had both headers, or `Content-Length` twice (hyper keeps one
//! of two equal lengths, nginx refuses the duplicate line);
//! [`crate::server`] answers that request 400 without reading its body.
//!
//! The scan costs one pass over each request head; bodies are skipped by
//! count. It gives up (and flags nothing more) at anything hyper itself
//! refuses or that ends HTTP/1 framing: the HTTP/2 preface, a line longer
//! than [`MAX_HEAD`], an unparsable length or chunk size, a transfer coding
//! other than `chunked`. A connection that is upgraded is never read by hyper
//! again, so whatever the scan makes of the tunnelled bytes has no effect.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::limits::MAX_HEAD;

/// What the scan found, shared with the connection's service.
#[derive(Debug, Default)]
pub struct Verdict {
    /// 1-based index of the first request on the connection that carried
    /// both `Content-Length` and `Transfer-Encoding`, or `Content-Length`
    /// twice; 0 while there is none.
    ambiguous: AtomicU64,
}

impl Verdict {
    /// Whether the `index`-th request (1-based) of the connection carried
    /// both `Content-Length` and `Transfer-Encoding`.
    pub fn is_ambiguous(&self, index: u64) -> bool {
        self.first_ambiguous() == Some(index)
    }

    /// The 1-based index of the first request that carried both headers.
    pub fn first_ambiguous(&self) -> Option<u64> {
        match self.ambiguous.load(Ordering::Relaxed) {
            0 => None,
            n => Some(n),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Reading a request head, line by line.
    Head,
    /// Skipping a body of known length: bytes left.
    Fixed(u64),
    /// Reading a chunk-size line.
    ChunkSize,
    /// Skipping chunk data: bytes left.
    ChunkData(u64),
    /// Expecting the empty line that ends a chunk's data.
    ChunkEnd,
    /// Reading trailer fields up to the empty line; `mid_field`: inside a
    /// field whose CRLF has not come yet (a bare LF is data there, as in
    /// hyper).
    Trailers { mid_field: bool },
    /// Not following the stream any more.
    Stopped,
}

/// What one request head said about its body.
#[derive(Debug, Default)]
struct HeadFacts {
    /// The request line has been read.
    started: bool,
    content_length_seen: bool,
    content_length: Option<u64>,
    /// A length hyper would refuse: not a number, or two that differ.
    content_length_invalid: bool,
    /// `Content-Length` came more than once. hyper keeps one of equal
    /// values; nginx refuses the duplicate line.
    content_length_repeated: bool,
    transfer_encoding: bool,
    /// The last transfer coding named was `chunked`.
    chunked_last: bool,
}

/// The framing state machine; fed every byte read from the client, in order.
#[derive(Debug)]
pub struct FramingScan {
    state: State,
    head: HeadFacts,
    /// The start of a line that was split across reads.
    partial: Vec<u8>,
    heads: u64,
    verdict: Arc<Verdict>,
}

impl Default for FramingScan {
    fn default() -> Self {
        FramingScan::new(Arc::default())
    }
}

impl FramingScan {
    pub fn new(verdict: Arc<Verdict>) -> Self {
        FramingScan {
            state: State::Head,
            head: HeadFacts::default(),
            partial: Vec::new(),
            heads: 0,
            verdict,
        }
    }

    /// Follows `data`, the next bytes the client sent.
    pub fn feed(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            match self.state {
                State::Stopped => return,
                State::Fixed(left) | State::ChunkData(left) => {
                    let take = left.min(data.len() as u64);
                    data = &data[take as usize..];
                    let left = left - take;
                    self.state = match (self.state, left) {
                        (State::Fixed(_), 0) => State::Head,
                        (State::Fixed(_), n) => State::Fixed(n),
                        (_, 0) => State::ChunkEnd,
                        (_, n) => State::ChunkData(n),
                    };
                }
                State::Head | State::ChunkSize | State::ChunkEnd | State::Trailers { .. } => {
                    let Some(end) = memchr::memchr(b'\n', data) else {
                        if self.partial.len() + data.len() > MAX_HEAD {
                            self.stop();
                        } else {
                            self.partial.extend_from_slice(data);
                        }
                        return;
                    };
                    let (line, rest) = (&data[..end], &data[end + 1..]);
                    data = rest;
                    if self.partial.is_empty() {
                        self.line(line);
                    } else {
                        let mut joined = std::mem::take(&mut self.partial);
                        joined.extend_from_slice(line);
                        self.line(&joined);
                        joined.clear();
                        self.partial = joined;
                    }
                }
            }
        }
    }

    fn stop(&mut self) {
        self.state = State::Stopped;
        self.partial = Vec::new();
    }

    /// One line, as split at LF (the LF not included). Heads accept bare
    /// LF line ends, as httparse does; chunked framing is CRLF only in
    /// hyper, so anything else there ends the connection and the scan.
    fn line(&mut self, raw: &[u8]) {
        match self.state {
            State::Head => self.head_line(raw.strip_suffix(b"\r").unwrap_or(raw)),
            State::ChunkSize => match raw.strip_suffix(b"\r").and_then(chunk_size) {
                Some(0) => self.state = State::Trailers { mid_field: false },
                Some(n) => self.state = State::ChunkData(n),
                None => self.stop(),
            },
            State::ChunkEnd if raw == b"\r" => self.state = State::ChunkSize,
            State::ChunkEnd => self.stop(),
            State::Trailers { mid_field } => match memchr::memchr(b'\r', raw) {
                // A bare LF: the field goes on.
                None => self.state = State::Trailers { mid_field: true },
                // CRLF at the start of a line ends the trailers; anywhere
                // else it ends a field.
                Some(0) if raw.len() == 1 && !mid_field => self.state = State::Head,
                Some(cr) if cr + 1 == raw.len() => {
                    self.state = State::Trailers { mid_field: false }
                }
                // A CR without its LF: hyper refuses the body.
                Some(_) => self.stop(),
            },
            State::Fixed(_) | State::ChunkData(_) | State::Stopped => {}
        }
    }

    fn head_line(&mut self, line: &[u8]) {
        if !self.head.started {
            // Empty lines before a request line are skipped, as hyper does.
            if line.is_empty() {
                return;
            }
            if line.starts_with(b"PRI * HTTP/2.0") {
                return self.stop();
            }
            self.head.started = true;
            return;
        }
        if line.is_empty() {
            return self.end_of_head();
        }
        let Some(colon) = memchr::memchr(b':', line) else {
            return;
        };
        let (name, value) = (&line[..colon], line[colon + 1..].trim_ascii());
        if name.eq_ignore_ascii_case(b"content-length") {
            self.head.content_length_repeated |= self.head.content_length_seen;
            self.head.content_length_seen = true;
            match content_length(value) {
                Some(n) if self.head.content_length.is_none_or(|prev| prev == n) => {
                    self.head.content_length = Some(n);
                }
                _ => self.head.content_length_invalid = true,
            }
        } else if name.eq_ignore_ascii_case(b"transfer-encoding") {
            self.head.transfer_encoding = true;
            self.head.chunked_last = value
                .rsplit(|&b| b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
    }

    fn end_of_head(&mut self) {
        self.heads += 1;
        let head = std::mem::take(&mut self.head);
        if (head.content_length_seen && head.transfer_encoding) || head.content_length_repeated {
            // The connection ends with this request: nothing after it counts.
            let _ = self.verdict.ambiguous.compare_exchange(
                0,
                self.heads,
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
            return self.stop();
        }
        self.state = if head.transfer_encoding {
            if head.chunked_last {
                State::ChunkSize
            } else {
                State::Stopped
            }
        } else if head.content_length_invalid {
            State::Stopped
        } else {
            match head.content_length {
                None | Some(0) => State::Head,
                Some(n) => State::Fixed(n),
            }
        };
    }
}

/// A `Content-Length` value as hyper reads it: decimal digits only, no
/// overflow. (A comma-separated list is refused; repeated headers are
/// flagged, see `head_line`.)
fn content_length(value: &[u8]) -> Option<u64> {
    if value.is_empty() {
        return None;
    }
    value.iter().try_fold(0u64, |n, &b| {
        let digit = (b as char).to_digit(10)?;
        n.checked_mul(10)?.checked_add(u64::from(digit))
    })
}

/// The size on a chunk-size line (its CR removed) as hyper reads it: hex
/// digits (leading zeros allowed, no overflow), optional spaces or tabs,
/// then nothing or `;` extensions without a CR.
fn chunk_size(line: &[u8]) -> Option<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return None;
    }
    let size = line[..digits].iter().try_fold(0u64, |n, &b| {
        let digit = (b as char).to_digit(16)?;
        n.checked_mul(16)?.checked_add(u64::from(digit))
    })?;
    let rest = &line[digits..];
    let spaces = rest
        .iter()
        .take_while(|&&b| b == b' ' || b == b'\t')
        .count();
    let rest = &rest[spaces..];
    let well_formed = (rest.is_empty() || rest[0] == b';') && memchr::memchr(b'\r', rest).is_none();
    well_formed.then_some(size)
}

#[cfg(test)]
mod tests;
