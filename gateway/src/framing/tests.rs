use super::*;
use proptest::prelude::*;

/// Feeds `bytes` whole and returns the ambiguous request's index (0: none).
fn scan(bytes: &[u8]) -> u64 {
    scan_split(bytes, &[])
}

/// Feeds `bytes` cut at `cuts`, as separate reads.
fn scan_split(bytes: &[u8], cuts: &[usize]) -> u64 {
    let verdict = Arc::new(Verdict::default());
    let mut scan = FramingScan::new(verdict.clone());
    let mut start = 0;
    let mut cuts: Vec<usize> = cuts.iter().map(|&c| c.min(bytes.len())).collect();
    cuts.sort_unstable();
    for cut in cuts {
        scan.feed(&bytes[start..cut]);
        start = cut;
    }
    scan.feed(&bytes[start..]);
    verdict.ambiguous.load(Ordering::Relaxed)
}

const PLAIN: &[u8] = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n";
const BOTH: &[u8] =
    b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
const BOTH_REVERSED: &[u8] =
    b"POST / HTTP/1.1\r\nHost: a\r\ntransfer-encoding: chunked\r\nCONTENT-LENGTH: 5\r\n\r\n0\r\n\r\n";

#[test]
fn both_headers_flag_the_request_in_either_order() {
    assert_eq!(scan(BOTH), 1);
    assert_eq!(scan(BOTH_REVERSED), 1);
    assert_eq!(scan(PLAIN), 0);
}

#[test]
fn later_requests_are_counted_through_their_bodies() {
    let mut stream = Vec::new();
    stream.extend_from_slice(PLAIN);
    // A body that looks like a smuggling attempt is only data.
    let body = b"GET /x HTTP/1.1\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
    stream.extend_from_slice(
        format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    stream.extend_from_slice(body);
    stream.extend_from_slice(
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n19\r\nContent-Length: 1\r\n\r\nxxxx\r\n0\r\nTrailer: t\r\n\r\n",
    );
    assert_eq!(scan(&stream), 0);
    stream.extend_from_slice(BOTH);
    assert_eq!(scan(&stream), 4, "the fourth request is the ambiguous one");
}

#[test]
fn leading_empty_lines_and_bare_newlines() {
    assert_eq!(
        scan(b"\r\n\nPOST / HTTP/1.1\nHost: a\nContent-Length: 1\nTransfer-Encoding: chunked\n\n"),
        1
    );
}

#[test]
fn stops_where_hyper_refuses_or_framing_ends() {
    // HTTP/2 prior knowledge: not HTTP/1 framing at all.
    let mut h2 = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    h2.extend_from_slice(BOTH);
    assert_eq!(scan(&h2), 0);
    // A bad chunk size ends the connection in hyper; nothing later counts.
    let mut bad = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n".to_vec();
    bad.extend_from_slice(BOTH);
    assert_eq!(scan(&bad), 0);
    let mut lengths = b"POST / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n".to_vec();
    lengths.extend_from_slice(BOTH);
    assert_eq!(scan(&lengths), 1);
    // Equal repeated lengths too: hyper would keep one, nginx refuses the
    // duplicate line. A list in one header is refused by hyper.
    let mut equal = b"POST / HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab".to_vec();
    equal.extend_from_slice(BOTH);
    assert_eq!(scan(&equal), 1);
    let mut list = b"POST / HTTP/1.1\r\nContent-Length: 2, 2\r\n\r\nab".to_vec();
    list.extend_from_slice(BOTH);
    assert_eq!(scan(&list), 0);
}

#[test]
fn an_endless_line_is_not_buffered() {
    let verdict = Arc::new(Verdict::default());
    let mut scan = FramingScan::new(verdict);
    let junk = vec![b'a'; 4096];
    for _ in 0..64 {
        scan.feed(&junk);
    }
    assert_eq!(scan.state, State::Stopped);
    assert!(scan.partial.capacity() == 0);
}

#[test]
fn value_parsers() {
    assert_eq!(content_length(b"12"), Some(12));
    assert_eq!(content_length(b"3, 3"), None);
    assert_eq!(content_length(b"99999999999999999999999"), None);
    assert_eq!(content_length(b"+3"), None);
    assert_eq!(content_length(b""), None);
    assert_eq!(chunk_size(b"1A;name=v"), Some(26));
    assert_eq!(chunk_size(b"0"), Some(0));
    assert_eq!(chunk_size(b"x"), None);
    assert_eq!(chunk_size(b"00000000000000000005"), Some(5));
    assert_eq!(chunk_size(b"5 \t;a=b"), Some(5));
    assert_eq!(chunk_size(b"5 x"), None);
    assert_eq!(chunk_size(b"11111111111111111"), None, "overflow");
}

#[test]
fn verdict_names_one_request() {
    let verdict = Verdict::default();
    verdict.ambiguous.store(2, Ordering::Relaxed);
    assert!(!verdict.is_ambiguous(0));
    assert!(!verdict.is_ambiguous(1));
    assert!(verdict.is_ambiguous(2));
}

proptest! {
    /// However the reads split the stream, the verdict is the same.
    #[test]
    fn read_boundaries_do_not_matter(cuts in proptest::collection::vec(0usize..400, 0..12)) {
        let mut stream = Vec::new();
        stream.extend_from_slice(PLAIN);
        stream.extend_from_slice(
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
        );
        stream.extend_from_slice(b"PUT / HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n\r\nwxyz");
        stream.extend_from_slice(BOTH_REVERSED);
        prop_assert_eq!(scan_split(&stream, &cuts), 4);
    }
}

/// Where hyper's chunked reader and the scan could part ways, they must
/// not: a later ambiguous request is still the one flagged.
#[test]
fn chunked_edge_cases_keep_the_count_in_step_with_hyper() {
    // A bare LF in the trailers is field data for hyper, not a line end:
    // "GET /x" below is part of a trailer, not a request.
    let mut trailer = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\nGET /x HTTP/1.1\r\n\r\n".to_vec();
    trailer.extend_from_slice(BOTH);
    assert_eq!(scan(&trailer), 2);
    // Chunk sizes with leading zeros are accepted by hyper.
    let mut zeros = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n00000000000000000005\r\nhello\r\n0\r\n\r\n".to_vec();
    zeros.extend_from_slice(BOTH);
    assert_eq!(scan(&zeros), 2);
    // Trailer fields, then the end.
    let mut fields = b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\nX-A: 1\r\nX-B: 2\r\n\r\n".to_vec();
    fields.extend_from_slice(BOTH);
    assert_eq!(scan(&fields), 2);
    // Bare LF after chunk data or a size: hyper refuses, the scan stops.
    let mut bare =
        b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\n0\r\n\r\n".to_vec();
    bare.extend_from_slice(BOTH);
    assert_eq!(scan(&bare), 0);
}
