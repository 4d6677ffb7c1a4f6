#![allow(clippy::unwrap_used)]
//! HTTPS towards clients: ssl objects from the Admin API served by SNI,
//! wildcards, fallback_sni, ECDSA and RSA for one name, certificates
//! swapped under load, mutual TLS, HTTP/2 over TLS. Real handshakes with a
//! rustls client against the real listener.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use harness::serde_json::{json, Value};
use harness::{upstream, Gateway, Upstream};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

/// A test certificate authority.
struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    fn new(name: &str) -> Ca {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Ca {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// An ECDSA P-256 certificate for `names` (server) or a client
    /// certificate with subject CN `names[0]`; returns (cert, key) PEM.
    fn issue(&self, names: &[&str], client: bool) -> (String, String) {
        self.issue_with(names, client, KeyPair::generate().unwrap())
    }

    fn issue_with(&self, names: &[&str], client: bool, key: KeyPair) -> (String, String) {
        let sans: Vec<String> = if client {
            Vec::new()
        } else {
            names.iter().map(|s| s.to_string()).collect()
        };
        let mut params = CertificateParams::new(sans).unwrap();
        params.distinguished_name.push(DnType::CommonName, names[0]);
        params
            .distinguished_name
            .push(DnType::OrganizationName, "Ferro Test");
        params.extended_key_usages = vec![if client {
            ExtendedKeyUsagePurpose::ClientAuth
        } else {
            ExtendedKeyUsagePurpose::ServerAuth
        }];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

fn der(pem: &str) -> CertificateDer<'static> {
    CertificateDer::from_pem_slice(pem.as_bytes()).unwrap()
}

/// A client trusting `ca_pem`, offering ALPN `alpn`, presenting `identity`.
fn client(
    ca_pem: &str,
    identity: Option<&(String, String)>,
    alpn: &[&[u8]],
) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(ca_pem)).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some((cert, key)) => builder
            .with_client_auth_cert(
                vec![der(cert)],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Arc::new(config)
}

async fn handshake(
    addr: SocketAddr,
    name: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let server_name = ServerName::try_from(name.to_string()).unwrap();
    tokio::time::timeout(
        Duration::from_secs(5),
        tokio_rustls::TlsConnector::from(config).connect(server_name, tcp),
    )
    .await
    .unwrap_or_else(|_| Err(std::io::ErrorKind::TimedOut.into()))
}

fn peer_cert(s: &TlsStream<TcpStream>) -> CertificateDer<'static> {
    s.get_ref().1.peer_certificates().unwrap()[0].clone()
}

/// One HTTP/1.1 GET over an established TLS stream: (status, JSON body).
async fn get(
    s: TlsStream<TcpStream>,
    host: &str,
    path: &str,
) -> Result<(u16, Value), hyper::Error> {
    let (mut send, conn) = hyper::client::conn::http1::handshake(TokioIo::new(s)).await?;
    tokio::spawn(conn);
    let req = http::Request::get(path)
        .header("host", host)
        .body(Full::new(Bytes::new()))
        .unwrap();
    let resp = send.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((
        status,
        harness::serde_json::from_slice(&body).unwrap_or(Value::Null),
    ))
}

async fn put_ssl(gw: &Gateway, id: &str, body: Value) {
    let r = gw.put(&format!("/apisix/admin/ssls/{id}"), body).await;
    assert!(r.status.is_success(), "PUT ssl {id}: {}", r.text());
}

async fn route(gw: &Gateway, id: &str, uri: &str, up: &Upstream, extra: Value) {
    let mut body = json!({"uri": uri, "upstream": upstream(&[(&up.node(), 1)])});
    if let (Some(map), Value::Object(more)) = (body.as_object_mut(), extra) {
        map.extend(more);
    }
    let r = gw.put(&format!("/apisix/admin/routes/{id}"), body).await;
    assert!(r.status.is_success(), "PUT route: {}", r.text());
}

#[tokio::test]
async fn sni_selects_the_certificate_and_requests_are_https() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let up = Upstream::start("u1").await;
    let ca = Ca::new("Test CA");
    let (a_cert, a_key) = ca.issue(&["a.test"], false);
    let (b_cert, b_key) = ca.issue(&["b.test"], false);
    put_ssl(
        &gw,
        "a",
        json!({"cert": a_cert, "key": a_key, "snis": ["a.test"]}),
    )
    .await;
    put_ssl(
        &gw,
        "b",
        json!({"cert": b_cert, "key": b_key, "sni": "B.test"}),
    )
    .await;
    route(
        &gw,
        "r",
        "/hello",
        &up,
        json!({"plugins": {"proxy-rewrite": {"headers": {"set": {
            "x-sni": "$ssl_server_name", "x-scheme": "$scheme"}}}}}),
    )
    .await;
    let cfg = client(&ca.pem(), None, &[b"http/1.1"]);
    let s = handshake(tls, "a.test", cfg.clone()).await.unwrap();
    assert_eq!(peer_cert(&s), der(&a_cert));
    let (status, body) = get(s, "a.test", "/hello").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["headers"]["x-forwarded-proto"], "https");
    assert_eq!(body["headers"]["x-sni"], "a.test");
    assert_eq!(body["headers"]["x-scheme"], "https");
    assert_eq!(body["headers"]["x-forwarded-port"], tls.port().to_string());
    // `sni` is matched case-insensitively.
    let s = handshake(tls, "b.test", cfg.clone()).await.unwrap();
    assert_eq!(peer_cert(&s), der(&b_cert));
    // No object for the name: the handshake fails.
    assert!(handshake(tls, "c.test", cfg.clone()).await.is_err());
    // A disabled object is not served; deleting one takes it away.
    put_ssl(
        &gw,
        "b",
        json!({"cert": b_cert, "key": b_key, "sni": "b.test", "status": 0}),
    )
    .await;
    assert!(handshake(tls, "b.test", cfg.clone()).await.is_err());
    assert_eq!(
        gw.admin("DELETE", "/apisix/admin/ssls/a", None)
            .await
            .status,
        200
    );
    assert!(handshake(tls, "a.test", cfg).await.is_err());
    gw.stop().await;
}

#[tokio::test]
async fn wildcard_covers_exactly_one_label() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let ca = Ca::new("Test CA");
    let (wc_cert, wc_key) = ca.issue(&["*.w.test"], false);
    let (ex_cert, ex_key) = ca.issue(&["api.w.test"], false);
    put_ssl(
        &gw,
        "wc",
        json!({"cert": wc_cert, "key": wc_key, "snis": ["*.w.test"]}),
    )
    .await;
    put_ssl(
        &gw,
        "ex",
        json!({"cert": ex_cert, "key": ex_key, "snis": ["api.w.test"]}),
    )
    .await;
    let cfg = client(&ca.pem(), None, &[]);
    let s = handshake(tls, "x.w.test", cfg.clone()).await.unwrap();
    assert_eq!(peer_cert(&s), der(&wc_cert));
    let s = handshake(tls, "api.w.test", cfg.clone()).await.unwrap();
    assert_eq!(
        peer_cert(&s),
        der(&ex_cert),
        "an exact name beats the wildcard"
    );
    assert!(handshake(tls, "y.x.w.test", cfg.clone()).await.is_err());
    assert!(handshake(tls, "w.test", cfg).await.is_err());
    gw.stop().await;
}

#[tokio::test]
async fn no_sni_gets_fallback_sni_or_nothing() {
    let ca = Ca::new("Test CA");
    let (fb_cert, fb_key) = ca.issue(&["fb.test", "127.0.0.1"], false);
    let cfg = client(&ca.pem(), None, &[]);
    // An IP address as server name: the client sends no SNI.
    let gw = Gateway::start_tls("    fallback_sni: fb.test\n").await;
    put_ssl(
        &gw,
        "fb",
        json!({"cert": fb_cert, "key": fb_key, "sni": "fb.test"}),
    )
    .await;
    let s = handshake(gw.tls.unwrap(), "127.0.0.1", cfg.clone())
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), der(&fb_cert));
    gw.stop().await;

    let gw = Gateway::start_tls("").await;
    put_ssl(
        &gw,
        "fb",
        json!({"cert": fb_cert, "key": fb_key, "sni": "fb.test"}),
    )
    .await;
    assert!(handshake(gw.tls.unwrap(), "127.0.0.1", cfg).await.is_err());
    gw.stop().await;
}

/// An RSA key made by the openssl command (ring cannot generate RSA keys);
/// `None` when openssl is not installed.
fn rsa_key() -> Option<KeyPair> {
    let out = std::process::Command::new("openssl")
        .args([
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
        ])
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    KeyPair::from_pem(std::str::from_utf8(&out.stdout).ok()?).ok()
}

#[tokio::test]
async fn ecdsa_and_rsa_for_one_name() {
    let Some(rsa) = rsa_key() else {
        eprintln!("skipped: the openssl command is needed to make an RSA key");
        return;
    };
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let ca = Ca::new("Test CA");
    let (ec_cert, ec_key) = ca.issue(&["dual.test"], false);
    let (rsa_cert, rsa_key) = ca.issue_with(&["dual.test"], false, rsa);
    put_ssl(
        &gw,
        "dual",
        json!({"cert": ec_cert, "key": ec_key, "certs": [rsa_cert], "keys": [rsa_key],
               "snis": ["dual.test"]}),
    )
    .await;
    let s = handshake(tls, "dual.test", client(&ca.pem(), None, &[]))
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), der(&ec_cert), "a modern client gets ECDSA");
    // A TLS 1.2 client that offers only RSA key exchange suites.
    let mut provider = rustls::crypto::ring::default_provider();
    provider.cipher_suites =
        vec![rustls::crypto::ring::cipher_suite::TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256];
    let mut roots = rustls::RootCertStore::empty();
    roots.add(der(&ca.pem())).unwrap();
    let rsa_only = rustls::ClientConfig::builder_with_provider(Arc::new(provider))
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let s = handshake(tls, "dual.test", Arc::new(rsa_only))
        .await
        .unwrap();
    assert_eq!(peer_cert(&s), der(&rsa_cert), "an RSA-only client gets RSA");
    gw.stop().await;
}

#[tokio::test]
async fn certificate_swap_under_load_fails_no_handshake() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let ca = Ca::new("Test CA");
    let (c1, k1) = ca.issue(&["swap.test"], false);
    put_ssl(
        &gw,
        "swap",
        json!({"cert": c1, "key": k1, "sni": "swap.test"}),
    )
    .await;
    let cfg = client(&ca.pem(), None, &[]);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let ok = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let mut clients = Vec::new();
    for _ in 0..4 {
        let (cfg, stop, ok, failed) = (cfg.clone(), stop.clone(), ok.clone(), failed.clone());
        clients.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match handshake(tls, "swap.test", cfg.clone()).await {
                    Ok(_) => ok.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let mut last = c1.clone();
    for _ in 0..10 {
        let (c, k) = ca.issue(&["swap.test"], false);
        put_ssl(
            &gw,
            "swap",
            json!({"cert": c, "key": k, "sni": "swap.test"}),
        )
        .await;
        last = c;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    // The next handshake after the last PUT gets the last certificate.
    let s = handshake(tls, "swap.test", cfg).await.unwrap();
    assert_eq!(peer_cert(&s), der(&last));
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.await.unwrap();
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "failed handshakes");
    assert!(ok.load(Ordering::Relaxed) > 10);
    gw.stop().await;
}

#[tokio::test]
async fn mutual_tls_accepts_and_refuses() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let up = Upstream::start("u1").await;
    let ca = Ca::new("Server CA");
    let client_ca = Ca::new("Client CA");
    let other_ca = Ca::new("Other CA");
    let (cert, key) = ca.issue(&["m.test"], false);
    put_ssl(
        &gw,
        "m",
        json!({"cert": cert, "key": key, "sni": "m.test",
               "client": {"ca": client_ca.pem(), "depth": 1}}),
    )
    .await;
    route(
        &gw,
        "r",
        "/who",
        &up,
        json!({"plugins": {"proxy-rewrite": {"headers": {"set": {
            "x-verify": "$ssl_client_verify", "x-dn": "$ssl_client_s_dn",
            "x-serial": "$ssl_client_serial"}}}}}),
    )
    .await;
    let good = client_ca.issue(&["client-1"], true);
    let s = handshake(tls, "m.test", client(&ca.pem(), Some(&good), &[]))
        .await
        .unwrap();
    let (status, body) = get(s, "m.test", "/who").await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body["headers"]["x-verify"], "SUCCESS");
    assert_eq!(body["headers"]["x-dn"], "O=Ferro Test,CN=client-1");
    assert!(!body["headers"]["x-serial"].as_str().unwrap().is_empty());
    // No certificate, or one from another CA: refused (in TLS 1.3 the
    // refusal reaches the client with its first read).
    for identity in [None, Some(other_ca.issue(&["intruder"], true))] {
        let refused =
            match handshake(tls, "m.test", client(&ca.pem(), identity.as_ref(), &[])).await {
                Err(_) => true,
                Ok(s) => get(s, "m.test", "/who").await.is_err(),
            };
        assert!(refused, "client {:?} must be refused", identity.is_some());
    }
    gw.stop().await;
}

#[tokio::test]
async fn skip_mtls_uri_regex_exempts_paths() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let up = Upstream::start("u1").await;
    let ca = Ca::new("Server CA");
    let client_ca = Ca::new("Client CA");
    let (cert, key) = ca.issue(&["skip.test"], false);
    put_ssl(
        &gw,
        "s",
        json!({"cert": cert, "key": key, "sni": "skip.test",
               "client": {"ca": client_ca.pem(), "skip_mtls_uri_regex": ["^/public/.*"]}}),
    )
    .await;
    route(&gw, "r", "/*", &up, json!({})).await;
    let anonymous = client(&ca.pem(), None, &[]);
    let s = handshake(tls, "skip.test", anonymous.clone())
        .await
        .unwrap();
    assert_eq!(get(s, "skip.test", "/public/x").await.unwrap().0, 200);
    let s = handshake(tls, "skip.test", anonymous).await.unwrap();
    assert_eq!(get(s, "skip.test", "/private").await.unwrap().0, 400);
    let good = client_ca.issue(&["client-1"], true);
    let s = handshake(tls, "skip.test", client(&ca.pem(), Some(&good), &[]))
        .await
        .unwrap();
    assert_eq!(get(s, "skip.test", "/private").await.unwrap().0, 200);
    gw.stop().await;
}

#[tokio::test]
async fn host_of_an_mtls_server_needs_its_own_handshake() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let up = Upstream::start("u1").await;
    let ca = Ca::new("Server CA");
    let client_ca = Ca::new("Client CA");
    let (m_cert, m_key) = ca.issue(&["secure.test"], false);
    let (o_cert, o_key) = ca.issue(&["open.test"], false);
    put_ssl(
        &gw,
        "m",
        json!({"cert": m_cert, "key": m_key, "sni": "secure.test",
               "client": {"ca": client_ca.pem()}}),
    )
    .await;
    put_ssl(
        &gw,
        "o",
        json!({"cert": o_cert, "key": o_key, "sni": "open.test"}),
    )
    .await;
    route(&gw, "r", "/*", &up, json!({})).await;
    let cfg = client(&ca.pem(), None, &[]);
    let s = handshake(tls, "open.test", cfg.clone()).await.unwrap();
    assert_eq!(get(s, "open.test", "/x").await.unwrap().0, 200);
    // Handshake as open.test, then ask for secure.test: refused.
    let s = handshake(tls, "open.test", cfg).await.unwrap();
    assert_eq!(get(s, "secure.test", "/x").await.unwrap().0, 400);
    gw.stop().await;
}

#[tokio::test]
async fn http2_over_tls() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let up = Upstream::start("u1").await;
    let ca = Ca::new("Test CA");
    let (cert, key) = ca.issue(&["h2.test"], false);
    put_ssl(
        &gw,
        "h2",
        json!({"cert": cert, "key": key, "sni": "h2.test"}),
    )
    .await;
    route(&gw, "r", "/h2", &up, json!({})).await;
    let s = handshake(
        tls,
        "h2.test",
        client(&ca.pem(), None, &[b"h2", b"http/1.1"]),
    )
    .await
    .unwrap();
    assert_eq!(s.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (mut send, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(s))
            .await
            .unwrap();
    tokio::spawn(conn);
    for _ in 0..3 {
        let req = http::Request::get("https://h2.test/h2")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let resp = send.send_request(req).await.unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(resp.version(), http::Version::HTTP_2);
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        let doc: Value = harness::serde_json::from_slice(&body).unwrap();
        assert_eq!(doc["headers"]["x-forwarded-proto"], "https");
    }
    gw.stop().await;
}

#[tokio::test]
async fn silent_tls_client_is_closed_after_client_header_timeout() {
    let gw = Gateway::start_full(
        "  ssl:\n    listen:\n      - ip: 127.0.0.1\n        port: 0\n",
        "nginx_config:\n  http:\n    client_header_timeout: 1s\n",
    )
    .await;
    let tls = gw.tls.unwrap();
    let mut s = TcpStream::connect(tls).await.unwrap();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(
        Duration::from_secs(5),
        tokio::io::AsyncReadExt::read(&mut s, &mut buf),
    )
    .await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "{closed:?}");
    gw.stop().await;
}

/// A session made before an ssl object asked for client certificates
/// cannot be resumed to skip the check.
#[tokio::test]
async fn resumption_does_not_skip_a_new_client_certificate_check() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let up = Upstream::start("u1").await;
    let ca = Ca::new("Server CA");
    let client_ca = Ca::new("Client CA");
    let (cert, key) = ca.issue(&["r.test"], false);
    put_ssl(&gw, "r", json!({"cert": cert, "key": key, "sni": "r.test"})).await;
    route(&gw, "r", "/*", &up, json!({})).await;
    // One client config: its session store carries sessions across
    // connections, as a browser's does.
    let cfg = client(&ca.pem(), None, &[]);
    for _ in 0..2 {
        let s = handshake(tls, "r.test", cfg.clone()).await.unwrap();
        assert_eq!(get(s, "r.test", "/x").await.unwrap().0, 200);
    }
    put_ssl(
        &gw,
        "r",
        json!({"cert": cert, "key": key, "sni": "r.test", "client": {"ca": client_ca.pem()}}),
    )
    .await;
    let refused = match handshake(tls, "r.test", cfg).await {
        Err(_) => true,
        Ok(s) => get(s, "r.test", "/x").await.is_err(),
    };
    assert!(
        refused,
        "a resumed session passed the new client certificate check"
    );
    gw.stop().await;
}

/// HTTPS connections count against `worker_connections`: over the cap a
/// connection is closed before any handshake work.
#[tokio::test]
async fn tls_connections_count_against_the_cap() {
    let gw = Gateway::start_full(
        "  ssl:\n    listen:\n      - ip: 127.0.0.1\n        port: 0\n",
        "nginx_config:\n  event:\n    worker_connections: 2\n",
    )
    .await;
    let tls = gw.tls.unwrap();
    let ca = Ca::new("Test CA");
    let (cert, key) = ca.issue(&["cap.test"], false);
    put_ssl(
        &gw,
        "cap",
        json!({"cert": cert, "key": key, "sni": "cap.test"}),
    )
    .await;
    let cfg = client(&ca.pem(), None, &[]);
    let held = [
        handshake(tls, "cap.test", cfg.clone()).await.unwrap(),
        handshake(tls, "cap.test", cfg.clone()).await.unwrap(),
    ];
    assert!(
        handshake(tls, "cap.test", cfg.clone()).await.is_err(),
        "third connection shed"
    );
    drop(held);
    // Slots come back when connections close.
    let mut ok = false;
    for _ in 0..50 {
        if handshake(tls, "cap.test", cfg.clone()).await.is_ok() {
            ok = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(ok, "a slot freed by a closed connection is reused");
    gw.stop().await;
}

/// hyper answers a malformed head over HTTPS itself (400) and ends the
/// connection with an error: a client still sending its body reads that
/// answer instead of a reset, because the connection lingers, as a plain
/// HTTP one does.
#[tokio::test]
async fn a_bad_head_answered_by_hyper_reaches_a_client_still_sending() {
    let gw = Gateway::start_tls("").await;
    let tls = gw.tls.unwrap();
    let ca = Ca::new("Test CA");
    let (cert, key) = ca.issue(&["a.test"], false);
    put_ssl(
        &gw,
        "a",
        json!({"cert": cert, "key": key, "snis": ["a.test"]}),
    )
    .await;
    let cfg = client(&ca.pem(), None, &[b"http/1.1"]);
    let s = handshake(tls, "a.test", cfg).await.unwrap();
    let len = 2 * 1024 * 1024;
    let head = format!(
        "POST /x HTTP/1.1\r\nHost: a.test\r\nno colon here\r\nContent-Length: {len}\r\n\r\n"
    );
    let (sent, text) = crate::limits::upload_and_read_over(s, head, len).await;
    assert!(sent, "the upload was cut off (read {text:?})");
    assert!(text.starts_with("HTTP/1.1 400"), "{text:?}");
    gw.stop().await;
}
