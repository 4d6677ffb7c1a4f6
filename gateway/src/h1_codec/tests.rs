use super::*;

fn head(text: &str) -> AnswerHead {
    let mut buf = BytesMut::from(text);
    parse_answer_head(&mut buf, &mut HeaderMap::new())
        .unwrap()
        .unwrap()
}

#[test]
fn request_heads_carry_the_framing_of_their_body() {
    let mut headers = HeaderMap::new();
    headers.insert(header::HOST, HeaderValue::from_static("example.com"));
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("99"));
    headers.insert(
        header::TRANSFER_ENCODING,
        HeaderValue::from_static("chunked"),
    );
    let mut buf = Vec::new();
    let framing = request_framing(&Method::POST, &headers, Some(5));
    encode_request_head(
        &mut buf,
        &Method::POST,
        "/a?b=1",
        &headers,
        std::iter::empty(),
        framing,
    );
    assert_eq!(
        String::from_utf8(buf).unwrap(),
        "POST /a?b=1 HTTP/1.1\r\nhost: example.com\r\ncontent-length: 5\r\n\r\n"
    );

    let get = HeaderMap::new();
    assert_eq!(
        request_framing(&Method::GET, &get, Some(0)),
        RequestFraming::None
    );
    assert_eq!(
        request_framing(&Method::POST, &get, Some(0)),
        RequestFraming::Length(0)
    );
    assert_eq!(
        request_framing(&Method::POST, &get, None),
        RequestFraming::Chunked
    );
    assert_eq!(
        request_framing(&Method::PUT, &headers, None),
        RequestFraming::Length(99)
    );
}

#[test]
fn chunk_size_lines_are_hex() {
    assert_eq!(chunk_size_line(0, &mut [0; 18]), b"0\r\n");
    assert_eq!(chunk_size_line(255, &mut [0; 18]), b"ff\r\n");
    assert_eq!(chunk_size_line(4096, &mut [0; 18]), b"1000\r\n");
}

#[test]
fn lengths_are_written_in_decimal() {
    for n in [0, 9, 10, 99, 100, 12345, u64::MAX] {
        let mut buf = Vec::new();
        let framing = RequestFraming::Length(n);
        encode_request_head(
            &mut buf,
            &Method::PUT,
            "/",
            &HeaderMap::new(),
            std::iter::empty(),
            framing,
        );
        let text = String::from_utf8(buf).unwrap();
        assert!(
            text.ends_with(&format!("content-length: {n}\r\n\r\n")),
            "{text}"
        );
    }
}

#[test]
fn answer_heads_are_parsed_and_removed_from_the_buffer() {
    let mut buf =
        BytesMut::from("HTTP/1.1 200 Fine\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n\r\nabc");
    let h = parse_answer_head(&mut buf, &mut HeaderMap::new())
        .unwrap()
        .unwrap();
    assert_eq!(h.status, StatusCode::OK);
    assert_eq!(h.reason.as_deref(), Some(&b"Fine"[..]));
    assert_eq!(h.headers.get_all("x-a").iter().count(), 2);
    assert_eq!(&buf[..], b"abc");
    assert_eq!(
        answer_framing(false, &h),
        Ok((AnswerFraming::Length(3), true))
    );
    assert_eq!(answer_framing(true, &h), Ok((AnswerFraming::Empty, true)));

    let mut partial = BytesMut::from("HTTP/1.1 200 OK\r\nX-A: 1\r\n");
    assert!(parse_answer_head(&mut partial, &mut HeaderMap::new())
        .unwrap()
        .is_none());
    assert_eq!(partial.len(), 25, "nothing taken from an incomplete head");
    assert_eq!(head("HTTP/1.1 404 Not Found\r\n\r\n").reason, None);
}

#[test]
fn hop_by_hop_headers_are_read_but_not_kept() {
    let h = head(
        "HTTP/1.1 200 OK\r\nServer: n\r\nCONNECTION: Keep-Alive\r\nKeep-Alive: timeout=5\r\n\
         Transfer-Encoding: chunked\r\nTE: trailers\r\nUpgrade: h2c\r\n\r\n",
    );
    let names: Vec<&str> = h.headers.keys().map(|n| n.as_str()).collect();
    assert_eq!(names, ["server"]);
    assert_eq!(
        answer_framing(false, &h),
        Ok((AnswerFraming::Chunked, true))
    );

    // A Connection that names another header stays, for the proxy to strip
    // that one too; Content-Length is end to end and stays.
    let h = head("HTTP/1.1 200 OK\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\nContent-Length: 2\r\n\r\n");
    assert!(h.headers.contains_key("connection"));
    assert_eq!(h.headers["content-length"], "2");
    assert_eq!(
        answer_framing(false, &h),
        Ok((AnswerFraming::Length(2), false))
    );

    // A 101 keeps them all: the upgrade needs them.
    let h = head(
        "HTTP/1.1 101 Switching Protocols\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    );
    assert_eq!(h.headers["upgrade"], "websocket");
    assert_eq!(h.headers["connection"], "Upgrade");
}

#[test]
fn common_names_in_any_case_and_long_heads_keep_every_header() {
    let mut text = String::from(
        "HTTP/1.1 200 OK\r\nDATE: today\r\nContent-TYPE: text/plain\r\nCONTENT-LENGTH: 2\r\n\
         Set-Cookie: a=1\r\nset-cookie: b=2\r\nX-Custom: yes\r\n",
    );
    // More lines than fit on the stack while the head is parsed.
    for i in 0..INLINE_SPANS + 8 {
        text.push_str(&format!("x-{i}: {i}\r\n"));
    }
    text.push_str("\r\n");
    let h = head(&text);
    assert_eq!(h.headers.len(), 6 + INLINE_SPANS + 8);
    assert_eq!(h.headers[header::DATE], "today");
    assert_eq!(h.headers[header::CONTENT_TYPE], "text/plain");
    assert_eq!(h.headers[header::CONTENT_LENGTH], "2");
    assert_eq!(h.headers.get_all(header::SET_COOKIE).iter().count(), 2);
    assert_eq!(h.headers["x-custom"], "yes");
    assert_eq!(
        h.headers[format!("x-{}", INLINE_SPANS + 7).as_str()],
        (INLINE_SPANS + 7).to_string().as_str()
    );
    assert_eq!(
        answer_framing(false, &h).unwrap(),
        (AnswerFraming::Length(2), true)
    );
}

#[test]
fn bad_and_oversized_heads_are_invalid() {
    let mut bad = BytesMut::from("HTTP/1.1 2000 OK\r\n\r\n");
    assert_eq!(
        parse_answer_head(&mut bad, &mut HeaderMap::new()).unwrap_err(),
        Invalid::Head
    );
    let mut garbage = BytesMut::from("hello\r\n\r\n");
    assert!(parse_answer_head(&mut garbage, &mut HeaderMap::new()).is_err());
    let mut many = String::from("HTTP/1.1 200 OK\r\n");
    for i in 0..=MAX_HEADERS {
        many.push_str(&format!("x-{i}: v\r\n"));
    }
    many.push_str("\r\n");
    let mut many = BytesMut::from(many.as_str());
    assert_eq!(
        parse_answer_head(&mut many, &mut HeaderMap::new()).unwrap_err(),
        Invalid::HeadTooLarge
    );
    let mut endless = BytesMut::from("HTTP/1.1 200 OK\r\nx: ");
    endless.extend_from_slice(&vec![b'v'; MAX_ANSWER_HEAD]);
    assert_eq!(
        parse_answer_head(&mut endless, &mut HeaderMap::new()).unwrap_err(),
        Invalid::HeadTooLarge
    );
}

#[test]
fn answer_framing_follows_rfc_9112() {
    let f = |text: &str| answer_framing(false, &head(text));
    assert_eq!(
        f("HTTP/1.1 204 No Content\r\nContent-Length: 5\r\n\r\n"),
        Ok((AnswerFraming::Empty, true))
    );
    assert_eq!(
        f("HTTP/1.1 304 Not Modified\r\n\r\n"),
        Ok((AnswerFraming::Empty, true))
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\n\r\n"),
        Ok((AnswerFraming::UntilClose, false))
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n"),
        Ok((AnswerFraming::Empty, true))
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n"),
        Ok((AnswerFraming::Chunked, true))
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n"),
        Ok((AnswerFraming::Chunked, false)),
        "both: chunks win, the connection is not reused"
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\n\r\n"),
        Ok((AnswerFraming::UntilClose, false))
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 4, 4\r\n\r\n"),
        Ok((AnswerFraming::Length(4), true))
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nContent-Length: 4\r\nContent-Length: 5\r\n\r\n"),
        Err(Invalid::ContentLength)
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n"),
        Err(Invalid::ContentLength)
    );
    assert_eq!(
        f("HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n"),
        Ok((AnswerFraming::Length(1), false))
    );
    assert_eq!(
        f("HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n"),
        Ok((AnswerFraming::Length(1), false))
    );
    assert_eq!(
        f("HTTP/1.0 200 OK\r\nConnection: Keep-Alive\r\nContent-Length: 1\r\n\r\n"),
        Ok((AnswerFraming::Length(1), true))
    );
}

#[test]
fn chunked_bodies_decode_across_any_split() {
    let wire: &[u8] = b"3;ext=1\r\nabc\r\n10\r\n0123456789abcdef\r\n0\r\nx-sum: 9\r\n\r\nNEXT";
    for split in 0..wire.len() {
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::from(&wire[..split]);
        let mut data = Vec::new();
        let mut trailers = None;
        let mut fed = false;
        loop {
            match dec.decode(&mut buf).unwrap() {
                Decoded::Data(d) => data.extend_from_slice(&d),
                Decoded::Trailers(t) => {
                    trailers = Some(t);
                    break;
                }
                Decoded::End => break,
                Decoded::More => {
                    assert!(!fed, "split {split}: stuck");
                    buf.extend_from_slice(&wire[split..]);
                    fed = true;
                }
            }
        }
        if !fed {
            buf.extend_from_slice(&wire[split..]);
        }
        assert_eq!(data, b"abc0123456789abcdef", "split {split}");
        assert_eq!(trailers.unwrap()["x-sum"], "9");
        assert_eq!(&buf[..], b"NEXT", "split {split}");
        assert!(dec.is_done());
    }
}

#[test]
fn chunked_bodies_without_trailers_end() {
    let mut dec = ChunkedDecoder::default();
    let mut buf = BytesMut::from("2\r\nhi\r\n0\r\n\r\n");
    assert_eq!(
        dec.decode(&mut buf),
        Ok(Decoded::Data(Bytes::from_static(b"hi")))
    );
    assert_eq!(dec.decode(&mut buf), Ok(Decoded::End));
    assert!(buf.is_empty());
}

#[test]
fn bad_chunks_are_invalid() {
    for wire in ["zz\r\n", "2\r\nhiX\r\n", "fffffffffffffffff\r\n", ";\r\n"] {
        let mut dec = ChunkedDecoder::default();
        let mut buf = BytesMut::from(wire);
        let mut out = dec.decode(&mut buf);
        while let Ok(Decoded::Data(_)) = out {
            out = dec.decode(&mut buf);
        }
        assert_eq!(out, Err(Invalid::Chunk), "{wire:?}");
    }
    let mut dec = ChunkedDecoder::default();
    let mut long = BytesMut::from(vec![b'1'; MAX_CHUNK_LINE + 1].as_slice());
    assert_eq!(dec.decode(&mut long), Err(Invalid::Chunk));
}

proptest::proptest! {
    /// Whatever a node sends, parsing neither panics nor takes more than
    /// the head it reports.
    #[test]
    fn any_bytes_parse_without_panic(bytes in proptest::collection::vec(proptest::num::u8::ANY, 0..512)) {
        let mut buf = BytesMut::from(bytes.as_slice());
        if let Ok(Some(head)) = parse_answer_head(&mut buf, &mut HeaderMap::new()) {
            let _ = answer_framing(false, &head);
        }
        let mut buf = BytesMut::from(bytes.as_slice());
        let mut dec = ChunkedDecoder::default();
        while let Ok(Decoded::Data(_)) = dec.decode(&mut buf) {}
    }

    /// Chunks written with `chunk_size_line` decode to the same bytes.
    #[test]
    fn chunks_round_trip(chunks in proptest::collection::vec(proptest::collection::vec(proptest::num::u8::ANY, 1..300), 0..8)) {
        let mut wire = BytesMut::new();
        for c in &chunks {
            wire.extend_from_slice(chunk_size_line(c.len(), &mut [0; 18]));
            wire.extend_from_slice(c);
            wire.extend_from_slice(b"\r\n");
        }
        wire.extend_from_slice(LAST_CHUNK);
        let mut dec = ChunkedDecoder::default();
        let mut out = Vec::new();
        loop {
            match dec.decode(&mut wire).unwrap() {
                Decoded::Data(d) => out.extend_from_slice(&d),
                Decoded::End => break,
                other => panic!("{other:?}"),
            }
        }
        proptest::prop_assert_eq!(out, chunks.concat());
        proptest::prop_assert!(wire.is_empty());
    }
}

#[test]
fn names_compare_in_any_case_and_nothing_else_matches() {
    for (input, lower) in [
        (&b"Content-Length"[..], &b"content-length"[..]),
        (b"CONNECTION", b"connection"),
        (b"keep-alive", b"keep-alive"),
        (b"Keep-Alive", b"keep-alive"),
    ] {
        assert!(same_name(input, lower), "{input:?}");
        assert_eq!(input.eq_ignore_ascii_case(lower), same_name(input, lower));
    }
    // Every other byte in any one place fails, as eq_ignore_ascii_case
    // would (CR, which no parsed name or value holds, aside).
    let lower = b"keep-alive";
    for at in 0..lower.len() {
        for b in 0..=255u8 {
            if b == b'\r' {
                continue;
            }
            let mut input = *lower;
            input[at] = b;
            assert_eq!(
                same_name(&input, lower),
                input.eq_ignore_ascii_case(lower),
                "byte {b:#x} at {at}"
            );
        }
    }
    assert!(!same_name(b"keep-aliv", lower));
    assert!(!same_name(b"keep-alivee", lower));
}
