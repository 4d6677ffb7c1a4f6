#![allow(clippy::unwrap_used)]
//! `scheme: https` upstreams: verified by default, `tls.verify: false`
//! honoured, extra CAs from `apisix.ssl.ssl_trusted_certificate`, the
//! rewritten host as server name; `grpcs` over HTTP/2.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use harness::serde_json::json;
use harness::{upstream, Gateway};
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio::net::TcpListener;

/// An HTTPS upstream with a fresh self-signed certificate for `localhost`;
/// returns its address and the certificate (PEM).
async fn https_upstream() -> (std::net::SocketAddr, String) {
    let (addr, pem, _) = tls_upstream(false).await;
    (addr, pem)
}

/// A gateway that trusts the CA certificate `pem`
/// (`apisix.ssl.ssl_trusted_certificate`); keep the returned dir alive.
async fn gateway_trusting(pem: &str) -> (Gateway, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let gw = Gateway::start_with_apisix(&format!(
        "  ssl:\n    enable: false\n    ssl_trusted_certificate: {}\n",
        ca.display()
    ))
    .await;
    (gw, dir)
}

/// Server names the upstream was asked for, one per connection.
type SeenNames = Arc<Mutex<Vec<Option<String>>>>;

/// A TLS upstream (certificate for `localhost`) answering
/// `{"upstream":"tls","version":...}`; `h2`: offers only ALPN `h2` and
/// speaks HTTP/2.
async fn tls_upstream(h2: bool) -> (std::net::SocketAddr, String, SeenNames) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let pem = ck.cert.pem();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(vec![cert], key)
    .unwrap();
    let mut config = config;
    if h2 {
        config.alpn_protocols = vec![b"h2".to_vec()];
    }
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let seen = SeenNames::default();
    let names = seen.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            let names = names.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let sni = tls.get_ref().1.server_name().map(str::to_string);
                names.lock().unwrap().push(sni);
                let svc = hyper::service::service_fn(
                    |req: http::Request<hyper::body::Incoming>| async move {
                        let doc = json!({
                            "upstream": "tls",
                            "version": format!("{:?}", req.version()),
                            "authority": req.uri().authority().map(|a| a.to_string()),
                            "host": req.headers().get("host").and_then(|h| h.to_str().ok()),
                        });
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                            doc.to_string(),
                        ))))
                    },
                );
                let io = TokioIo::new(tls);
                if h2 {
                    let _ = hyper::server::conn::http2::Builder::new(
                        hyper_util::rt::TokioExecutor::new(),
                    )
                    .serve_connection(io, svc)
                    .await;
                } else {
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(io, svc)
                        .await;
                }
            });
        }
    });
    (addr, pem, seen)
}

#[tokio::test]
async fn verified_by_default_and_verify_false_honoured() {
    let gw = Gateway::start().await;
    let (addr, _) = https_upstream().await;
    let node = format!("localhost:{}", addr.port());
    let mut up = upstream(&[(&node, 1)]);
    up["scheme"] = json!("https");
    gw.put("routes/v", json!({"uri": "/v", "upstream": up.clone()}))
        .await;
    assert_eq!(
        gw.get("/v").await.status,
        502,
        "an untrusted certificate is refused"
    );
    up["tls"] = json!({"verify": false});
    gw.put("routes/n", json!({"uri": "/n", "upstream": up}))
        .await;
    let r = gw.get("/n").await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, "tls".to_string()));
    gw.stop().await;
}

#[tokio::test]
async fn trusted_certificate_from_config() {
    let (addr, pem) = https_upstream().await;
    let (gw, _ca) = gateway_trusting(&pem).await;
    let mut up = upstream(&[(&format!("localhost:{}", addr.port()), 1)]);
    up["scheme"] = json!("https");
    gw.put("routes/t", json!({"uri": "/t", "upstream": up}))
        .await;
    let r = gw.get("/t").await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, "tls".to_string()));
    gw.stop().await;
}

/// With `pass_host: rewrite`, `upstream_host` is the TLS server name sent
/// and verified (nginx's `proxy_ssl_name $upstream_host`), so a node given
/// by address can still be verified by name.
#[tokio::test]
async fn rewritten_host_is_the_server_name() {
    let (addr, pem, seen) = tls_upstream(false).await;
    let (gw, _ca) = gateway_trusting(&pem).await;
    let mut up = upstream(&[(&addr.to_string(), 1)]);
    up["scheme"] = json!("https");
    gw.put("routes/ip", json!({"uri": "/ip", "upstream": up.clone()}))
        .await;
    assert_eq!(
        gw.get("/ip").await.status,
        502,
        "the certificate does not name 127.0.0.1"
    );
    up["pass_host"] = json!("rewrite");
    up["upstream_host"] = json!("localhost");
    gw.put("routes/named", json!({"uri": "/named", "upstream": up}))
        .await;
    let r = gw.get("/named").await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, "tls".to_string()));
    assert_eq!(
        seen.lock().unwrap().last().cloned().flatten().as_deref(),
        Some("localhost")
    );
    gw.stop().await;
}

#[tokio::test]
async fn grpcs_speaks_http2_over_tls() {
    let (addr, pem, seen) = tls_upstream(true).await;
    let (gw, _ca) = gateway_trusting(&pem).await;
    let mut up = upstream(&[(&format!("localhost:{}", addr.port()), 1)]);
    up["scheme"] = json!("grpcs");
    gw.put("routes/g", json!({"uri": "/g", "upstream": up}))
        .await;
    let r = gw.get("/g").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["version"], "HTTP/2.0");

    // A node by address, verified and addressed by the rewritten name.
    let mut up = upstream(&[(&addr.to_string(), 1)]);
    up["scheme"] = json!("grpcs");
    up["pass_host"] = json!("rewrite");
    up["upstream_host"] = json!("localhost");
    gw.put("routes/named", json!({"uri": "/named", "upstream": up}))
        .await;
    let r = gw.get("/named").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["authority"], "localhost");
    assert!(r.json()["host"].is_null(), "{}", r.text());
    assert_eq!(
        seen.lock().unwrap().last().cloned().flatten().as_deref(),
        Some("localhost")
    );
    gw.stop().await;
}

/// `checks.active.type: https` probes over TLS, verifying the certificate
/// against `checks.active.host`: the live TLS node stays in, the refusing
/// one is taken out.
#[tokio::test]
async fn https_active_checks() {
    let (addr, pem, _) = tls_upstream(false).await;
    let (gw, _ca) = gateway_trusting(&pem).await;
    let mut up = upstream(&[
        (&addr.to_string(), 1),
        (&harness::refused_addr().to_string(), 1),
    ]);
    up["scheme"] = json!("https");
    up["pass_host"] = json!("rewrite");
    up["upstream_host"] = json!("localhost");
    up["retries"] = json!(0);
    up["checks"] = json!({"active": {
        "type": "https", "host": "localhost", "http_path": "/", "timeout": 1,
        "healthy": {"interval": 1, "successes": 1},
        "unhealthy": {"interval": 1, "tcp_failures": 1, "http_failures": 1}
    }});
    gw.put("routes/c", json!({"uri": "/c", "upstream": up}))
        .await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        let mut statuses = Vec::new();
        for _ in 0..6 {
            statuses.push(gw.get("/c").await.status.as_u16());
        }
        if statuses.iter().all(|s| *s == 200) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "refusing node still served: {statuses:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    gw.stop().await;
}

/// An HTTPS upstream that requires a client certificate issued by `ca`
/// (PEM) and answers with the subject it saw.
async fn mtls_upstream(ca: &str) -> std::net::SocketAddr {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert: CertificateDer<'static> = ck.cert.der().clone();
    let key = PrivateKeyDer::try_from(ck.signing_key.serialize_der()).unwrap();
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    use rustls::pki_types::pem::PemObject;
    roots
        .add(CertificateDer::from_pem_slice(ca.as_bytes()).unwrap())
        .unwrap();
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
        Arc::new(roots),
        provider.clone(),
    )
    .build()
    .unwrap();
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(vec![cert], key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = l.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let presented = tls.get_ref().1.peer_certificates().map_or(0, |c| c.len());
                let svc = hyper::service::service_fn(
                    move |_req: http::Request<hyper::body::Incoming>| async move {
                        let doc = json!({"upstream": "mtls", "client_certs": presented});
                        Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from(
                            doc.to_string(),
                        ))))
                    },
                );
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    addr
}

/// Upstream mutual TLS: `tls.client_cert_id` (an ssl object of type
/// `client`) and inline `tls.client_cert`/`client_key` are presented to an
/// upstream that requires them; without one the upstream refuses (502).
#[tokio::test]
async fn client_certificate_presented_to_upstream() {
    let gw = Gateway::start().await;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, rcgen::KeyPair::generate().unwrap())
        .unwrap();
    let client_key = rcgen::KeyPair::generate().unwrap();
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "gateway");
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    let client_cert = params.signed_by(&client_key, &ca).unwrap();
    let (cert_pem, key_pem) = (client_cert.pem(), client_key.serialize_pem());
    let addr = mtls_upstream(&ca.pem()).await;
    let node = format!("localhost:{}", addr.port());

    let mut up = upstream(&[(&node, 1)]);
    up["scheme"] = json!("https");
    up["tls"] = json!({"verify": false});
    gw.put(
        "routes/none",
        json!({"uri": "/none", "upstream": up.clone()}),
    )
    .await;
    assert_eq!(gw.get("/none").await.status, 502, "no certificate: refused");

    let r = gw
        .put(
            "ssls/c1",
            json!({"type": "client", "cert": cert_pem, "key": key_pem}),
        )
        .await;
    assert!(r.status.is_success(), "{}", r.text());
    up["tls"] = json!({"verify": false, "client_cert_id": "c1"});
    gw.put(
        "routes/byid",
        json!({"uri": "/byid", "upstream": up.clone()}),
    )
    .await;
    let r = gw.get("/byid").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["client_certs"], 1);

    up["tls"] = json!({"verify": false, "client_cert": cert_pem, "client_key": key_pem});
    gw.put("routes/inline", json!({"uri": "/inline", "upstream": up}))
        .await;
    let r = gw.get("/inline").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["client_certs"], 1);
    gw.stop().await;
}
