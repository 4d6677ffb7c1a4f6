//! `tcp-logger` and `udp-logger`: each request's log entry to a TCP or UDP
//! collector, in batches.
//!
//! Mirror APISIX 3.18's plugins (`tcp-logger` priority 405, `udp-logger`
//! 400; log phase, body_filter with `include_resp_body`):
//!
//! ```json
//! {"host": "127.0.0.1", "port": 5044, "timeout": 1000, "batch_max_size": 100}
//! ```
//!
//! A batch is the JSON of its entries (one object when `batch_max_size` is
//! 1, else an array): over a new TCP connection per batch (`timeout` in
//! milliseconds, default 1000), or as one UDP datagram (`timeout` in
//! seconds, default 3). The entry and the batching are the loggers' (see
//! [`crate::logger`], [`crate::batch`]). With `tls: true` (tcp-logger) the
//! connection is TLS, with `tls_options` as the server name (else `host`)
//! and, as APISIX's `sslhandshake(..., false)`, no certificate check.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use serde_json::Value;
use tokio::io::AsyncWriteExt;

use crate::batch::{self, BatchConf, SendFuture, Sender};
use crate::logger::{self, Logger};
use crate::plugin::{CompileCx, Plugin, PluginSpec, SchemaType};
use crate::registry::cached;
use crate::schema::Schema;

/// Which transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Transport {
    Tcp,
    Udp,
}

fn build_tcp_schema() -> Schema {
    let schema = Schema::object()
        .prop("host", Schema::string().done())
        .prop("port", Schema::integer().min(0.0).int())
        .prop("tls", Schema::Boolean)
        .prop("tls_options", Schema::string().done())
        .prop("timeout", Schema::integer().min(1.0).int())
        .required(&["host", "port"]);
    batch::add_schema(logger::common_schema(schema)).done()
}

fn build_udp_schema() -> Schema {
    let schema = Schema::object()
        .prop("host", Schema::string().done())
        .prop("port", Schema::integer().min(0.0).int())
        .prop("timeout", Schema::integer().min(1.0).int())
        .required(&["host", "port"]);
    batch::add_schema(logger::common_schema(schema)).done()
}

fn build_metadata_schema() -> Schema {
    logger::metadata_schema()
}

fn metadata_schema() -> &'static Schema {
    static CELL: OnceLock<Schema> = OnceLock::new();
    cached(&CELL, build_metadata_schema)
}

struct SocketSender {
    transport: Transport,
    target: String,
    /// tcp-logger `tls`: the server name to present.
    tls: Option<rustls::pki_types::ServerName<'static>>,
    timeout: Duration,
    batch_max_size: usize,
}

impl Sender for SocketSender {
    fn send(&self, entries: Vec<Value>) -> SendFuture {
        let (transport, target, timeout) = (self.transport, self.target.clone(), self.timeout);
        let tls = self.tls.clone();
        let size = self.batch_max_size;
        Box::pin(async move {
            let data = batch::encode_off_thread(entries, size, false).await;
            let io = async {
                match transport {
                    Transport::Tcp => {
                        let sock = tokio::net::TcpStream::connect(&target).await?;
                        match tls {
                            Some(name) => {
                                let connector = tokio_rustls::TlsConnector::from(
                                    crate::tls_client::client_config(false),
                                );
                                let mut sock = connector.connect(name, sock).await?;
                                sock.write_all(data.as_bytes()).await?;
                                sock.shutdown().await
                            }
                            None => {
                                let mut sock = sock;
                                sock.write_all(data.as_bytes()).await?;
                                sock.shutdown().await
                            }
                        }
                    }
                    Transport::Udp => {
                        let sock = tokio::net::UdpSocket::bind(if target.starts_with('[') {
                            "[::]:0"
                        } else {
                            "0.0.0.0:0"
                        })
                        .await?;
                        sock.connect(&target).await?;
                        sock.send(data.as_bytes()).await.map(|_| ())
                    }
                }
            };
            match tokio::time::timeout(timeout, io).await {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(format!("failed to send data to {target}: {e}")),
                Err(_) => Err(format!("timed out sending to {target}")),
            }
        })
    }
}

fn compile(
    transport: Transport,
    name: &'static str,
    conf: &Value,
    cx: &CompileCx<'_>,
) -> Result<Arc<dyn Plugin>, String> {
    let host = conf.get("host").and_then(Value::as_str).unwrap_or_default();
    let port = conf.get("port").and_then(Value::as_u64).unwrap_or(0);
    let target = if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let timeout = match (transport, conf.get("timeout").and_then(Value::as_u64)) {
        (Transport::Tcp, t) => Duration::from_millis(t.unwrap_or(1000)),
        (Transport::Udp, t) => Duration::from_secs(t.unwrap_or(3)),
    };
    let batch_conf = BatchConf::from_conf(conf, name, Logger::max_pending(cx));
    let tls = match (transport, conf.get("tls").and_then(Value::as_bool)) {
        (Transport::Tcp, Some(true)) => {
            let name = conf
                .get("tls_options")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .unwrap_or(host);
            Some(
                rustls::pki_types::ServerName::try_from(name.trim_matches(['[', ']']).to_string())
                    .map_err(|e| format!("tls_options {name}: {e}"))?,
            )
        }
        _ => None,
    };
    let sender = SocketSender {
        transport,
        target,
        tls,
        timeout,
        batch_max_size: batch_conf.batch_max_size,
    };
    Logger::compile(conf, cx, batch_conf, Arc::new(sender), false)
}

/// `tcp-logger` or `udp-logger`.
pub struct SocketLoggerSpec(Transport);

/// `tcp-logger`.
pub const TCP_LOGGER: SocketLoggerSpec = SocketLoggerSpec(Transport::Tcp);
/// `udp-logger`.
pub const UDP_LOGGER: SocketLoggerSpec = SocketLoggerSpec(Transport::Udp);

impl PluginSpec for SocketLoggerSpec {
    fn name(&self) -> &'static str {
        match self.0 {
            Transport::Tcp => "tcp-logger",
            Transport::Udp => "udp-logger",
        }
    }

    fn priority(&self) -> i32 {
        match self.0 {
            Transport::Tcp => 405,
            Transport::Udp => 400,
        }
    }

    fn schema(&self) -> &'static Schema {
        static TCP: OnceLock<Schema> = OnceLock::new();
        static UDP: OnceLock<Schema> = OnceLock::new();
        match self.0 {
            Transport::Tcp => cached(&TCP, build_tcp_schema),
            Transport::Udp => cached(&UDP, build_udp_schema),
        }
    }

    fn metadata_schema(&self) -> Option<&'static Schema> {
        Some(metadata_schema())
    }

    fn check(&self, conf: &Value, target: SchemaType) -> Result<(), String> {
        if target == SchemaType::Metadata {
            return metadata_schema().validate(conf);
        }
        self.schema().validate(conf)?;
        logger::check(conf)
    }

    fn compile(&self, conf: &Value, cx: &CompileCx<'_>) -> Result<Arc<dyn Plugin>, String> {
        compile(self.0, self.name(), conf, cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;
    use serde_json::json;

    #[test]
    fn schemas() {
        let err = testing::refusal("tcp-logger", &json!({"host": "h"}));
        assert!(err.contains("\"port\" is required"), "{err}");
        assert!(TCP_LOGGER
            .check(
                &json!({"host": "h", "port": 1, "tls": true, "tls_options": "logs.example"}),
                SchemaType::Route
            )
            .is_ok());
        let err = testing::refusal("udp-logger", &json!({"host": "h", "port": -1}));
        assert!(err.contains("port"), "{err}");
        assert!(UDP_LOGGER
            .check(&json!({"host": "h", "port": 1}), SchemaType::Route)
            .is_ok());
    }

    #[tokio::test]
    async fn sends_a_batch_over_tcp_and_udp() {
        let tcp = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let entries = vec![json!({"a": 1}), json!({"b": 2})];
        let sender = |transport, addr: std::net::SocketAddr| SocketSender {
            transport,
            target: addr.to_string(),
            tls: None,
            timeout: Duration::from_secs(2),
            batch_max_size: 10,
        };
        let send = sender(Transport::Tcp, tcp.local_addr().expect("addr")).send(entries.clone());
        let (sent, accepted) = tokio::join!(send, tcp.accept());
        assert_eq!(sent, Ok(()));
        let (mut conn, _) = accepted.expect("accept");
        let mut got = String::new();
        tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut got)
            .await
            .expect("read");
        assert_eq!(got, "[{\"a\":1},{\"b\":2}]");
        sender(Transport::Udp, udp.local_addr().expect("addr"))
            .send(entries)
            .await
            .expect("sent");
        let mut buf = [0u8; 1024];
        let n = udp.recv(&mut buf).await.expect("recv");
        assert_eq!(&buf[..n], b"[{\"a\":1},{\"b\":2}]");
    }
}
