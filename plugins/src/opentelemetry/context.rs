//! W3C Trace Context (`traceparent`): reading the client's, writing ours.
//!
//! `traceparent: 00-<32 hex trace id>-<16 hex parent span id>-<2 hex flags>`.
//! Parsing follows the W3C recommendation: lower-case hex only, no all-zero
//! ids, version `ff` is invalid, and a version above `00` may carry more
//! fields after a `-` (ignored). A header that does not parse is ignored:
//! the request starts a new trace.

/// A trace id: 16 bytes, never all zero.
pub type TraceId = [u8; 16];
/// A span id: 8 bytes, never all zero.
pub type SpanId = [u8; 8];

/// The `sampled` bit of the trace flags.
pub const SAMPLED: u8 = 0x01;

/// The span context a client sent in `traceparent`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Parent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub flags: u8,
}

impl Parent {
    pub fn sampled(&self) -> bool {
        self.flags & SAMPLED != 0
    }
}

fn hex_val(c: u8) -> Option<u8> {
    match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        _ => None,
    }
}

/// Decodes lower-case hex into `out`; `text` must be twice its length.
fn decode_hex(text: &[u8], out: &mut [u8]) -> Option<()> {
    if text.len() != out.len() * 2 {
        return None;
    }
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (hex_val(pair[0])? << 4) | hex_val(pair[1])?;
    }
    Some(())
}

/// Reads a `traceparent` value; `None` when it is not a valid one.
pub fn parse_traceparent(value: &[u8]) -> Option<Parent> {
    // version "-" trace-id "-" parent-id "-" flags: 2+1+32+1+16+1+2.
    const LEN: usize = 55;
    if value.len() < LEN {
        return None;
    }
    let mut version = [0u8; 1];
    decode_hex(&value[0..2], &mut version)?;
    match version[0] {
        0xff => return None,
        0 if value.len() != LEN => return None,
        // A later version may append fields, after a dash.
        _ if value.len() > LEN && value[LEN] != b'-' => return None,
        _ => {}
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let mut parent = Parent {
        trace_id: [0; 16],
        span_id: [0; 8],
        flags: 0,
    };
    decode_hex(&value[3..35], &mut parent.trace_id)?;
    decode_hex(&value[36..52], &mut parent.span_id)?;
    let mut flags = [0u8; 1];
    decode_hex(&value[53..55], &mut flags)?;
    parent.flags = flags[0];
    if parent.trace_id == [0; 16] || parent.span_id == [0; 8] {
        return None;
    }
    Some(parent)
}

/// A trace id from an `X-Request-Id` value, when that value is one: 32 hex
/// digits (either case), not all zero. A UUID or anything else is not.
pub fn trace_id_from_request_id(value: &[u8]) -> Option<TraceId> {
    let lower: Vec<u8> = value.iter().map(u8::to_ascii_lowercase).collect();
    let mut id = [0u8; 16];
    decode_hex(&lower, &mut id)?;
    (id != [0; 16]).then_some(id)
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn push_hex(out: &mut Vec<u8>, bytes: &[u8]) {
    for b in bytes {
        out.push(HEX[usize::from(b >> 4)]);
        out.push(HEX[usize::from(b & 0x0f)]);
    }
}

/// Lower-case hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = Vec::with_capacity(bytes.len() * 2);
    push_hex(&mut out, bytes);
    // Only ASCII hex digits were pushed.
    String::from_utf8(out).unwrap_or_default()
}

/// `00-<trace id>-<span id>-<flags>`.
pub fn traceparent(trace_id: &TraceId, span_id: &SpanId, flags: u8) -> Vec<u8> {
    let mut out = Vec::with_capacity(55);
    out.extend_from_slice(b"00-");
    push_hex(&mut out, trace_id);
    out.push(b'-');
    push_hex(&mut out, span_id);
    out.push(b'-');
    push_hex(&mut out, &[flags]);
    out
}

/// A random trace id (never all zero).
pub fn new_trace_id() -> TraceId {
    loop {
        let id: u128 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

/// A random span id (never all zero).
pub fn new_span_id() -> SpanId {
    loop {
        let id: u64 = rand::random();
        if id != 0 {
            return id.to_be_bytes();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &[u8] = b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn parses_the_w3c_example() {
        let p = parse_traceparent(GOOD).unwrap();
        assert_eq!(hex(&p.trace_id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(hex(&p.span_id), "00f067aa0ba902b7");
        assert!(p.sampled());
        let round = traceparent(&p.trace_id, &p.span_id, p.flags);
        assert_eq!(round, GOOD);
    }

    #[test]
    fn refuses_what_the_spec_refuses() {
        let bad: &[&[u8]] = &[
            b"",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            // Upper-case hex.
            b"00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            // All-zero ids.
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            // Version ff, and version 00 with extra fields.
            b"ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-xx",
            // Wrong separators, non-hex.
            b"00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            b"00-4bf92f3577b34da6a3ce929d0e0e473g-00f067aa0ba902b7-01",
        ];
        for b in bad {
            assert_eq!(parse_traceparent(b), None, "{}", String::from_utf8_lossy(b));
        }
    }

    #[test]
    fn later_versions_may_add_fields() {
        let p = parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-what");
        assert!(p.is_some_and(|p| !p.sampled()));
        assert_eq!(
            parse_traceparent(b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00x"),
            None
        );
    }

    #[test]
    fn request_ids_that_are_trace_ids() {
        let id = trace_id_from_request_id(b"4BF92F3577B34DA6A3CE929D0E0E4736").unwrap();
        assert_eq!(hex(&id), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(
            trace_id_from_request_id(b"3f2b5c1e-0d4a-4c1e-9a7b-2f8d6e5c4b3a"),
            None
        );
        assert_eq!(trace_id_from_request_id(&[b'0'; 32]), None);
        assert_ne!(new_trace_id(), new_trace_id());
        assert_ne!(new_span_id(), [0; 8]);
    }
}
