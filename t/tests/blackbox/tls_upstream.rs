#![allow(clippy::unwrap_used)]
//! `scheme: https` upstreams: verified by default, `tls.verify: false`
//! honoured, extra CAs from `apisix.ssl.ssl_trusted_certificate`.

use std::convert::Infallible;
use std::sync::Arc;

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
                let svc = hyper::service::service_fn(|_req| async {
                    Ok::<_, Infallible>(http::Response::new(Full::new(Bytes::from_static(
                        b"{\"upstream\":\"tls\"}",
                    ))))
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), svc)
                    .await;
            });
        }
    });
    (addr, pem)
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
    let dir = tempfile::tempdir().unwrap();
    let ca = dir.path().join("ca.pem");
    std::fs::write(&ca, pem).unwrap();
    let gw = Gateway::start_with_apisix(&format!(
        "  ssl:\n    ssl_trusted_certificate: {}\n",
        ca.display()
    ))
    .await;
    let mut up = upstream(&[(&format!("localhost:{}", addr.port()), 1)]);
    up["scheme"] = json!("https");
    gw.put("routes/t", json!({"uri": "/t", "upstream": up}))
        .await;
    let r = gw.get("/t").await;
    assert_eq!((r.status.as_u16(), r.upstream()), (200, "tls".to_string()));
    gw.stop().await;
}
