//! Request header policy: what the upstream sees, as under APISIX (nginx
//! `proxy_pass`).
//!
//! `X-Real-IP` = the client address; `X-Forwarded-For` = the client's own
//! value + `, ` + the client address; `X-Forwarded-Proto/Host/Port` set by
//! the gateway (a client cannot forge them, a trusted proxy's are kept);
//! `Forwarded` and hop-by-hop headers (`Connection` and what it names,
//! `Keep-Alive`, `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`,
//! `Proxy-Connection`, `Expect`) removed. `Host` is the proxy's business
//! (`pass_host`), not this module's.

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use plugins::ConnInfo;

/// Header names the proxy touches on every request, parsed once.
mod names {
    use http::header::{self, HeaderName};

    pub const X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
    pub const X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
    pub const X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
    pub const X_FORWARDED_PORT: HeaderName = HeaderName::from_static("x-forwarded-port");
    pub const X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");
    pub const FORWARDED: HeaderName = header::FORWARDED;
    // A `static`, not a `const`: a `const` array of names would be built
    // and dropped anew at every use, in a loop over each header present.
    pub static HOP_BY_HOP: [HeaderName; 8] = [
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

/// Where the (lowercase) header name `name` is in [`HOP_BY_HOP`]: a match on
/// the text, which the compiler turns into a switch on the length and one
/// comparison, where comparing against each `HeaderName` in turn costs a
/// call per name.
fn hop_by_hop_index(name: &str) -> Option<usize> {
    Some(match name {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "expect" => 7,
        _ => return None,
    })
}

/// Removes hop-by-hop headers, including those the `Connection` header names.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let _ = strip_noted(headers, scan(headers));
}

/// Bits of [`scan`]'s answer past the hop-by-hop ones.
const HAS_FORWARDED: u16 = 1 << 8;
const HAS_X_FORWARDED_FOR: u16 = 1 << 9;
const HAS_X_REAL_IP: u16 = 1 << 10;
const HAS_X_FORWARDED_PROTO: u16 = 1 << 11;
const HAS_X_FORWARDED_HOST: u16 = 1 << 12;
const HAS_X_FORWARDED_PORT: u16 = 1 << 13;

/// One pass over the handful of names present notes which hop-by-hop names
/// occur (bit `i` for `HOP_BY_HOP[i]`; most requests carry none, most
/// upstream answers `Connection`) and whether `Forwarded` and
/// `X-Forwarded-For` do, so that only those are hashed to be looked up.
fn scan(headers: &HeaderMap) -> u16 {
    let mut present = 0u16;
    for name in headers.keys() {
        let name = name.as_str();
        if let Some(i) = hop_by_hop_index(name) {
            present |= 1 << i;
        } else {
            present |= match name {
                "forwarded" => HAS_FORWARDED,
                "x-forwarded-for" => HAS_X_FORWARDED_FOR,
                "x-real-ip" => HAS_X_REAL_IP,
                "x-forwarded-proto" => HAS_X_FORWARDED_PROTO,
                "x-forwarded-host" => HAS_X_FORWARDED_HOST,
                "x-forwarded-port" => HAS_X_FORWARDED_PORT,
                _ => 0,
            };
        }
    }
    present
}

/// Whether a whole `Connection` value is `close` or `keep-alive`.
fn names_no_header(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"close") || value.eq_ignore_ascii_case(b"keep-alive")
}

/// Removes the hop-by-hop headers `present` notes and those `Connection`
/// names; answers whether it named (and so removed) any other header, so
/// that `present` is out of date.
fn strip_noted(headers: &mut HeaderMap, present: u16) -> bool {
    let mut named_others = false;
    if present & 0xff == 0 {
        return named_others;
    }
    if present & 1 != 0 {
        // `HOP_BY_HOP[0]` is `Connection`. The options it lists that name a
        // hop-by-hop header are removed below anyway, and `close` names
        // none; anything else is looked up.
        let mut named: Vec<HeaderName> = Vec::new();
        let options = headers
            .get_all(header::CONNECTION)
            .iter()
            // What clients send nearly always: one option naming no header.
            .filter(|v| !names_no_header(v.as_bytes()))
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .map(str::trim);
        for option in options {
            let known = option.eq_ignore_ascii_case("close")
                || HOP_BY_HOP
                    .iter()
                    .any(|hop| hop.as_str().eq_ignore_ascii_case(option));
            // Compared as text first: a name outside http's standard set
            // (`keep-alive` among them) costs an allocation to build.
            if known {
                continue;
            }
            if let Ok(name) = HeaderName::from_bytes(option.as_bytes()) {
                named.push(name);
            }
        }
        for name in named {
            named_others |= headers.remove(name).is_some();
        }
    }
    for (i, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << i) != 0 {
            headers.remove(name);
        }
    }
    named_others
}

/// Gives the header values their own bytes: one block holding all of
/// them, each value a slice of it.
///
/// An HTTP/2 connection's HPACK encoder keeps the values it indexes for as
/// long as they stay in its table. Values parsed from an upstream's answer
/// are slices of that upstream connection's 8 KiB read buffer, so without
/// this every idle HTTP/2 client would keep a whole read buffer alive (and
/// one per indexed answer, up to the table's 4 KiB of entries) where the
/// values themselves are a few dozen bytes.
pub fn own_values(headers: &mut HeaderMap) {
    let total: usize = headers.values().map(HeaderValue::len).sum();
    if total == 0 {
        return;
    }
    let mut block = bytes::BytesMut::with_capacity(total);
    for value in headers.values() {
        block.extend_from_slice(value.as_bytes());
    }
    let mut block = block.freeze();
    for value in headers.values_mut() {
        let own = block.split_to(value.len());
        // The bytes were a valid value a moment ago; a failure cannot
        // happen, and would only keep the shared value.
        if let Ok(mut copy) = HeaderValue::from_maybe_shared(own) {
            copy.set_sensitive(value.is_sensitive());
            *value = copy;
        }
    }
}

/// The values of `X-Real-IP`/`X-Forwarded-For` and `X-Forwarded-Port` that
/// this thread made last, kept for the next request: a client's requests
/// come one after another on its connection, and a listener has one port,
/// so most requests reuse a value (one reference count) instead of
/// formatting and allocating it anew.
mod cached {
    use std::cell::RefCell;
    use std::net::IpAddr;

    use bytes::Bytes;
    use http::HeaderValue;

    struct Last {
        ip: Option<(IpAddr, HeaderValue)>,
        /// The port's digits as written (at most five), and their value.
        port: Option<([u8; 5], usize, HeaderValue)>,
    }

    thread_local! {
        static LAST: RefCell<Last> = const { RefCell::new(Last { ip: None, port: None }) };
    }

    /// `ip` as text, as a header value.
    pub fn ip(ip: IpAddr) -> HeaderValue {
        LAST.with_borrow_mut(|last| {
            if let Some((cached, value)) = &last.ip {
                if *cached == ip {
                    return value.clone();
                }
            }
            let text = Bytes::from(plugins::vars::ip_string(ip));
            // An address's text is always a valid value; the fallback is
            // never taken.
            let value = HeaderValue::from_maybe_shared(text)
                .unwrap_or_else(|_| HeaderValue::from_static(""));
            last.ip = Some((ip, value.clone()));
            value
        })
    }

    /// A port given as digits, kept exactly as written.
    pub fn port_text(digits: &str) -> Option<HeaderValue> {
        LAST.with_borrow_mut(|last| {
            if let Some((text, len, value)) = &last.port {
                if text.get(..*len) == Some(digits.as_bytes()) {
                    return Some(value.clone());
                }
            }
            let value =
                HeaderValue::from_maybe_shared(Bytes::copy_from_slice(digits.as_bytes())).ok()?;
            let mut text = [0u8; 5];
            if let Some(room) = text.get_mut(..digits.len()) {
                room.copy_from_slice(digits.as_bytes());
                last.port = Some((text, digits.len(), value.clone()));
            }
            Some(value)
        })
    }

    /// A port number.
    pub fn port(port: u16) -> Option<HeaderValue> {
        let mut digits = [0u8; 5];
        let mut at = digits.len();
        let mut rest = port;
        loop {
            at -= 1;
            digits[at] = b'0' + (rest % 10) as u8;
            rest /= 10;
            if rest == 0 {
                break;
            }
        }
        std::str::from_utf8(&digits[at..]).ok().and_then(port_text)
    }
}

/// The forwarding headers a request carries to its node, kept beside its
/// header map instead of inserted into it: an HTTP/1.1 try writes them
/// straight into the request head (five names hashed into the map only to
/// be read back out cost more than the rest of the header work), an HTTP/2
/// try inserts them ([`Forwarded::insert_into`]).
#[derive(Debug, Clone, Default)]
pub struct Forwarded {
    /// By [`FORWARDED_NAMES`].
    values: [Option<HeaderValue>; 5],
}

static FORWARDED_NAMES: [HeaderName; 5] = [
    X_FORWARDED_FOR,
    X_REAL_IP,
    X_FORWARDED_PROTO,
    X_FORWARDED_HOST,
    X_FORWARDED_PORT,
];

impl Forwarded {
    /// The headers, in a fixed order.
    pub fn iter(&self) -> impl Iterator<Item = (&HeaderName, &HeaderValue)> {
        FORWARDED_NAMES
            .iter()
            .zip(&self.values)
            .filter_map(|(name, value)| Some((name, value.as_ref()?)))
    }

    /// Puts the headers into `headers`, replacing any of the same names.
    pub fn insert_into(&self, headers: &mut HeaderMap) {
        for (name, value) in self.iter() {
            headers.insert(name.clone(), value.clone());
        }
    }
}

/// Sets the forwarding headers APISIX's nginx template sets: the ones the
/// gateway sets are removed from `headers` and returned, to go out with
/// the request; a trusted proxy's X-Forwarded-Proto, -Host and -Port stay
/// in `headers`. Hop-by-hop headers are removed.
pub fn prepare_request_headers(
    headers: &mut HeaderMap,
    client_ip: Option<std::net::IpAddr>,
    client_host: Option<&HeaderValue>,
    meta: ConnInfo,
) -> Forwarded {
    let mut present = scan(headers);
    // `Connection` may have named (and so removed) any of them; it
    // seldom names more than `close` or `keep-alive`. (The hop-by-hop bits
    // are not read past this point, gone or not.)
    if strip_noted(headers, present) {
        present = scan(headers);
    }
    let mut out = Forwarded::default();
    let [xff, real_ip, proto, host, port] = &mut out.values;
    // Each one the gateway sets replaces what the client sent.
    let drop_sent = |headers: &mut HeaderMap, bit: u16, name: HeaderName| {
        if present & bit != 0 {
            headers.remove(name);
        }
    };
    drop_sent(headers, HAS_FORWARDED, FORWARDED);
    if let Some(ip) = client_ip {
        let ip_text = cached::ip(ip);
        *xff = if present & HAS_X_FORWARDED_FOR != 0 {
            let previous: Vec<&str> = headers
                .get_all(X_FORWARDED_FOR)
                .iter()
                .filter_map(|v| v.to_str().ok())
                .collect();
            let joined = HeaderValue::from_maybe_shared(Bytes::from(format!(
                "{}, {}",
                previous.join(", "),
                String::from_utf8_lossy(ip_text.as_bytes())
            )))
            .ok();
            if joined.is_some() {
                headers.remove(X_FORWARDED_FOR);
            }
            joined
        } else {
            Some(ip_text.clone())
        };
        drop_sent(headers, HAS_X_REAL_IP, X_REAL_IP);
        *real_ip = Some(ip_text);
    }
    // A trusted proxy's own X-Forwarded-* describe the original client and
    // are passed on; anybody else's are replaced.
    let keep = |bit: u16| meta.forwarded_trusted && present & bit != 0;
    if !keep(HAS_X_FORWARDED_PROTO) {
        drop_sent(headers, HAS_X_FORWARDED_PROTO, X_FORWARDED_PROTO);
        *proto = Some(HeaderValue::from_static(meta.scheme));
    }
    if !keep(HAS_X_FORWARDED_HOST) {
        drop_sent(headers, HAS_X_FORWARDED_HOST, X_FORWARDED_HOST);
        *host = client_host.cloned();
    }
    if !keep(HAS_X_FORWARDED_PORT) {
        let host_port = client_host.and_then(|h| h.to_str().ok()).and_then(|h| {
            let (_, port) = h.rsplit_once(':')?;
            (!h.ends_with(']') && port.bytes().all(|b| b.is_ascii_digit()) && !port.is_empty())
                .then_some(port)
        });
        let value = match host_port {
            Some(text) => cached::port_text(text),
            None => cached::port(meta.local.port()),
        };
        if value.is_some() {
            drop_sent(headers, HAS_X_FORWARDED_PORT, X_FORWARDED_PORT);
        }
        *port = value;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `prepare_request_headers` with its forwarding headers put into `h`.
    fn prepare(
        h: &mut HeaderMap,
        ip: Option<std::net::IpAddr>,
        host: Option<&HeaderValue>,
        meta: ConnInfo,
    ) {
        prepare_request_headers(h, ip, host, meta).insert_into(h);
    }

    fn meta() -> ConnInfo {
        ConnInfo {
            peer: "10.0.0.9:40000".parse().unwrap(),
            local: "127.0.0.1:9080".parse().unwrap(),
            scheme: "http",
            forwarded_trusted: false,
            tls: None,
            transparent: false,
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
        prepare(
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
        let trusted = ConnInfo {
            forwarded_trusted: true,
            ..meta()
        };
        let host = HeaderValue::from_static("internal:9080");
        prepare(
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
    fn cached_values_follow_the_address_and_the_port() {
        for port in [0u16, 7, 80, 9080, 65535, 9080, 443] {
            assert_eq!(cached::port(port).unwrap(), port.to_string().as_str());
        }
        for text in ["08080", "8080", "99999", "8080", "123456"] {
            assert_eq!(cached::port_text(text).unwrap(), text);
        }
        let addrs: [std::net::IpAddr; 4] = [
            "10.0.0.1".parse().unwrap(),
            "10.0.0.1".parse().unwrap(),
            "::1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
        ];
        for ip in addrs {
            assert_eq!(cached::ip(ip), plugins::vars::ip_string(ip).as_str());
        }
        // Two clients one after another on one thread: each gets its own.
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("a.test:8443");
        prepare(
            &mut h,
            Some("10.9.9.9".parse().unwrap()),
            Some(&host),
            meta(),
        );
        let mut g = HeaderMap::new();
        let plain = HeaderValue::from_static("b.test");
        prepare(
            &mut g,
            Some("10.8.8.8".parse().unwrap()),
            Some(&plain),
            meta(),
        );
        let forwarded = |m: &HeaderMap| {
            ["x-real-ip", "x-forwarded-for", "x-forwarded-port"].map(|n| m[n].clone())
        };
        assert_eq!(forwarded(&h), ["10.9.9.9", "10.9.9.9", "8443"]);
        assert_eq!(forwarded(&g), ["10.8.8.8", "10.8.8.8", "9080"]);
    }

    #[test]
    fn forwarded_port_falls_back_to_listener() {
        let mut h = HeaderMap::new();
        let host = HeaderValue::from_static("fwd.test");
        prepare(&mut h, Some("::1".parse().unwrap()), Some(&host), meta());
        assert_eq!(h["x-forwarded-port"], "9080");
        assert_eq!(h["x-forwarded-for"], "::1");
    }

    #[test]
    fn hop_by_hop_index_agrees_with_the_list() {
        for (i, name) in HOP_BY_HOP.iter().enumerate() {
            assert_eq!(hop_by_hop_index(name.as_str()), Some(i));
        }
        assert_eq!(hop_by_hop_index("host"), None);
        assert_eq!(hop_by_hop_index("x-forwarded-for"), None);
    }

    #[test]
    fn a_forwarding_header_connection_names_is_gone_before_it_is_joined() {
        let ip = Some("10.0.0.9".parse().unwrap());
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.2.3"));
        h.insert("connection", HeaderValue::from_static("X-Forwarded-For"));
        prepare(&mut h, ip, None, meta());
        assert_eq!(h["x-forwarded-for"], "10.0.0.9");
        assert!(!h.contains_key("connection"));

        // `close` names no header: the client's list is kept and extended.
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("10.1.2.3"));
        h.insert("connection", HeaderValue::from_static("close"));
        prepare(&mut h, ip, None, meta());
        assert_eq!(h["x-forwarded-for"], "10.1.2.3, 10.0.0.9");
        assert!(!h.contains_key("connection"));
    }

    #[test]
    fn hop_by_hop_headers_and_the_ones_connection_names_are_removed() {
        let mut h = HeaderMap::new();
        h.append(
            "connection",
            HeaderValue::from_static("Keep-Alive, X-Secret"),
        );
        h.append(
            "connection",
            HeaderValue::from_static("close,upgrade , x-other"),
        );
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-other", HeaderValue::from_static("2"));
        h.insert("upgrade", HeaderValue::from_static("websocket"));
        h.insert("transfer-encoding", HeaderValue::from_static("chunked"));
        h.insert("proxy-connection", HeaderValue::from_static("keep-alive"));
        h.insert("expect", HeaderValue::from_static("100-continue"));
        h.insert("trailer", HeaderValue::from_static("x-sum"));
        h.insert("te", HeaderValue::from_static("trailers"));
        h.insert("x-kept", HeaderValue::from_static("3"));
        h.insert("close", HeaderValue::from_static("not an option's header"));
        strip_hop_by_hop(&mut h);
        let mut left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        left.sort_unstable();
        assert_eq!(left, ["close", "x-kept"]);

        // An upstream's usual answer: only `Connection: keep-alive`.
        let mut h = HeaderMap::new();
        h.insert("content-length", HeaderValue::from_static("2"));
        h.insert("connection", HeaderValue::from_static("keep-alive"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert!(h.contains_key("content-length"));

        // A client's `Connection: Close`, and a second `Connection` that
        // names a header: that one is still read.
        let mut h = HeaderMap::new();
        h.append("connection", HeaderValue::from_static("Close"));
        h.append("connection", HeaderValue::from_static("x-secret"));
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("x-kept", HeaderValue::from_static("2"));
        strip_hop_by_hop(&mut h);
        let left: Vec<_> = h.keys().map(HeaderName::as_str).collect();
        assert_eq!(left, ["x-kept"]);

        // Nothing to remove; a value that is not text is ignored.
        let mut h = HeaderMap::new();
        h.insert("x-a", HeaderValue::from_static("1"));
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        let mut h = HeaderMap::new();
        h.insert("connection", HeaderValue::from_bytes(b"\xff").unwrap());
        strip_hop_by_hop(&mut h);
        assert!(h.is_empty());
    }

    #[test]
    fn own_values_copies_into_one_block_and_keeps_everything_else() {
        let upstream_buffer = Bytes::from(vec![b'x'; 8192]);
        let mut headers = HeaderMap::new();
        let shared = HeaderValue::from_maybe_shared(upstream_buffer.slice(0..3)).unwrap();
        headers.insert("x-a", shared);
        headers.append("x-a", HeaderValue::from_static("second"));
        let mut secret = HeaderValue::from_static("s3cret");
        secret.set_sensitive(true);
        headers.insert(header::SET_COOKIE, secret);
        own_values(&mut headers);
        let a: Vec<_> = headers.get_all("x-a").iter().collect();
        assert_eq!(a, ["xxx", "second"]);
        assert_eq!(headers[header::SET_COOKIE], "s3cret");
        assert!(headers[header::SET_COOKIE].is_sensitive());
        // The upstream's buffer is no longer referenced by the map.
        assert!(upstream_buffer.is_unique());
        own_values(&mut HeaderMap::new());
    }
}
