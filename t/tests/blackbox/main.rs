//! One test binary for every black-box test: linking the gateway once
//! instead of once per file keeps the suite quick to build.

mod access_log;
mod admin_api;
mod balancing;
mod edge_plugins;
mod etcd;
mod health;
mod hot_reload;
mod ip_restriction;
mod limits;
mod loggers;
mod metrics;
mod netns;
mod plugins;
mod proxy;
mod redis_limits;
mod routing;
mod soak;
mod tls_edge;
mod tls_upstream;
mod tproxy;
mod traces;
mod traffic_plugins;
mod upstream_conn;
mod websocket;
mod xdp;
