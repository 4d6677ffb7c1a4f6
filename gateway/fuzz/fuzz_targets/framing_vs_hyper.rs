//! The framing scan against hyper itself: a keep-alive stream of requests
//! built from fuzzer-chosen shapes (lengths, chunked bodies with odd sizes,
//! extensions and trailers, bare LFs, both headers in either order) goes
//! through the scan and through a real hyper HTTP/1 server. The scan must
//! name exactly the request hyper serves as the first one that carried both
//! `Content-Length` and `Transfer-Encoding`, and never another.

#![no_main]

use std::cell::RefCell;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arbitrary::Arbitrary;
use bytes::Bytes;
use gateway::framing::{FramingScan, Verdict};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use libfuzzer_sys::fuzz_target;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Arbitrary, Debug)]
struct Chunk {
    data: Vec<u8>,
    leading_zeros: u8,
    upper_hex: bool,
    extension: Option<Vec<u8>>,
    spaces: u8,
}

#[derive(Arbitrary, Debug)]
enum Body {
    None,
    Length { data: Vec<u8>, repeat_header: bool, as_list: bool },
    Chunked { chunks: Vec<Chunk>, trailers: Vec<Vec<u8>> },
    Both { te_first: bool, chunks: Vec<Chunk>, claimed: u16 },
}

#[derive(Arbitrary, Debug)]
struct Req {
    body: Body,
    bare_lf_head: bool,
    lower_case_names: bool,
}

fn line(out: &mut Vec<u8>, text: &[u8], bare_lf: bool) {
    out.extend_from_slice(text);
    out.extend_from_slice(if bare_lf { b"\n" } else { b"\r\n" });
}

fn chunked(out: &mut Vec<u8>, chunks: &[Chunk], trailers: &[Vec<u8>]) {
    for c in chunks.iter().filter(|c| !c.data.is_empty()).take(8) {
        let mut size = "0".repeat(usize::from(c.leading_zeros % 24));
        size.push_str(&if c.upper_hex {
            format!("{:X}", c.data.len())
        } else {
            format!("{:x}", c.data.len())
        });
        size.push_str(&" ".repeat(usize::from(c.spaces % 3)));
        let mut l = size.into_bytes();
        if let Some(ext) = &c.extension {
            l.push(b';');
            l.extend(ext.iter().take(64));
        }
        line(out, &l, false);
        out.extend_from_slice(&c.data);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n");
    for t in trailers.iter().take(4) {
        // Raw trailer bytes: a bare LF or CR inside is the interesting case.
        line(out, &t[..t.len().min(128)], false);
    }
    out.extend_from_slice(b"\r\n");
}

/// The stream, and for each request (by the index in its path) whether it
/// was built with both headers.
fn build(reqs: &[Req]) -> (Vec<u8>, Vec<bool>) {
    let mut out = Vec::new();
    let mut both = Vec::new();
    for (k, r) in reqs.iter().take(6).enumerate() {
        let lf = r.bare_lf_head;
        let name = |n: &str| if r.lower_case_names { n.to_lowercase() } else { n.to_string() };
        line(&mut out, format!("POST /r{k} HTTP/1.1").as_bytes(), lf);
        line(&mut out, b"Host: fuzz", lf);
        both.push(matches!(r.body, Body::Both { .. }));
        match &r.body {
            Body::None => line(&mut out, b"", lf),
            Body::Length { data, repeat_header, as_list } => {
                let n = data.len();
                let value = if *as_list { format!("{n}, {n}") } else { n.to_string() };
                line(&mut out, format!("{}: {value}", name("Content-Length")).as_bytes(), lf);
                if *repeat_header {
                    line(&mut out, format!("{}: {n}", name("Content-Length")).as_bytes(), lf);
                }
                line(&mut out, b"", lf);
                out.extend_from_slice(data);
            }
            Body::Chunked { chunks, trailers } => {
                line(&mut out, format!("{}: chunked", name("Transfer-Encoding")).as_bytes(), lf);
                line(&mut out, b"", lf);
                chunked(&mut out, chunks, trailers);
            }
            Body::Both { te_first, chunks, claimed } => {
                let cl = format!("{}: {claimed}", name("Content-Length"));
                let te = format!("{}: chunked", name("Transfer-Encoding"));
                let (a, b) = if *te_first { (te, cl) } else { (cl, te) };
                line(&mut out, a.as_bytes(), lf);
                line(&mut out, b.as_bytes(), lf);
                line(&mut out, b"", lf);
                chunked(&mut out, chunks, &[]);
            }
        }
    }
    (out, both)
}

/// Paths of the requests hyper served, in order.
async fn hyper_serves(bytes: Vec<u8>) -> Vec<String> {
    let (client, server) = tokio::io::duplex(1 << 16);
    let served = Arc::new(Mutex::new(Vec::new()));
    let seen = served.clone();
    let svc = hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
        seen.lock().unwrap().push(req.uri().path().to_string());
        async move {
            let _ = req.into_body().collect().await;
            Ok::<_, std::convert::Infallible>(http::Response::new(Full::new(Bytes::new())))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(server), svc);
    let (mut rd, mut wr) = tokio::io::split(client);
    let writer = async move {
        let _ = wr.write_all(&bytes).await;
        let _ = wr.shutdown().await;
    };
    let reader = async move {
        let mut sink = Vec::new();
        let _ = rd.read_to_end(&mut sink).await;
    };
    let _ = tokio::time::timeout(Duration::from_secs(2), async {
        tokio::join!(conn, writer, reader)
    })
    .await;
    let out = served.lock().unwrap().clone();
    out
}

thread_local! {
    static RT: RefCell<tokio::runtime::Runtime> = RefCell::new(
        tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap()
    );
}

fuzz_target!(|reqs: Vec<Req>| {
    let (bytes, both) = build(&reqs);
    let verdict = Arc::new(Verdict::default());
    FramingScan::new(verdict.clone()).feed(&bytes);
    let served = RT.with(|rt| rt.borrow().block_on(hyper_serves(bytes)));
    // Map what hyper served back to the requests built; a path that is not
    // the next one built means hyper framed the stream differently.
    let mut expected = None;
    for (i, path) in served.iter().enumerate() {
        let k: usize = path.trim_start_matches("/r").parse().unwrap_or(usize::MAX);
        assert_eq!(k, i, "hyper served {path} as request {}", i + 1);
        if both[k] {
            expected = Some(i as u64 + 1);
            break;
        }
    }
    match (expected, verdict.first_ambiguous()) {
        (Some(e), got) => assert_eq!(got, Some(e), "served: {served:?}"),
        // Flagged, but hyper never served it: it closed before (an error in
        // an earlier request), so the verdict is never consulted.
        (None, Some(n)) => assert!(n as usize > served.len(), "flagged {n}, served {served:?}"),
        (None, None) => {}
    }
});
