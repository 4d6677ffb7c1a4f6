//! Load balancers, one module each, behind one [`Balancer`] type.
//!
//! | `type` | picks |
//! |---|---|
//! | `roundrobin` (default) | interleaved weighted round robin, as APISIX |
//! | `chash` | consistent hashing of a request key (`hash_on` + `key`) |
//! | `least_conn` | fewest requests in flight, relative to weight |
//! | `ewma` | lowest decayed response time, two random choices |
//!
//! Every balancer skips nodes already tried for this request (retries) and
//! nodes of weight 0. Balancer state (round-robin position, in-flight
//! counts, latency averages) lives in the balancer, which the gateway reuses
//! across config snapshots while the upstream's nodes and type are unchanged.

mod chash;
mod ewma;
mod least_conn;

use std::time::Duration;

use admin_api::model::BalancerType;

pub use chash::Ring;
pub use ewma::Ewma;
pub use least_conn::LeastConn;
pub use plugins::roundrobin::{RoundRobin, MAX_SCHEDULE_LEN};

/// A balancer over node indexes `0..weights.len()`.
#[derive(Debug)]
pub enum Balancer {
    RoundRobin(RoundRobin),
    Chash(Ring),
    LeastConn(LeastConn),
    Ewma(Ewma),
}

impl Balancer {
    /// Builds the balancer of `balancer_type` (APISIX's `type`); `ids`
    /// name the nodes (`host:port`) for consistent hashing.
    pub fn new(balancer_type: BalancerType, weights: Vec<u64>, ids: &[String]) -> Self {
        match balancer_type {
            BalancerType::Chash => Balancer::Chash(Ring::new(ids, &weights)),
            BalancerType::LeastConn => Balancer::LeastConn(LeastConn::new(weights)),
            BalancerType::Ewma => Balancer::Ewma(Ewma::new(weights)),
            BalancerType::Roundrobin => Balancer::RoundRobin(RoundRobin::new(weights)),
        }
    }

    /// Number of nodes that can be picked.
    pub fn live(&self) -> usize {
        match self {
            Balancer::RoundRobin(b) => b.live(),
            Balancer::Chash(b) => b.live(),
            Balancer::LeastConn(b) => b.live(),
            Balancer::Ewma(b) => b.live(),
        }
    }

    /// The node for this try; `key` is the request's hash key (chash only).
    pub fn pick(&self, key: Option<&str>, tried: &[usize]) -> Option<usize> {
        match self {
            Balancer::RoundRobin(b) => b.pick_excluding(tried),
            Balancer::Chash(b) => b.pick(key.unwrap_or_default(), tried),
            Balancer::LeastConn(b) => b.pick(tried),
            Balancer::Ewma(b) => b.pick(tried),
        }
    }

    /// A request to node `i` starts.
    pub fn started(&self, i: usize) {
        match self {
            Balancer::LeastConn(b) => b.started(i),
            Balancer::Ewma(b) => b.started(i),
            _ => {}
        }
    }

    /// Whether [`Balancer::finished`] uses the time a request took: only
    /// `ewma` does, so the others spare the two clock reads per request.
    pub fn measures_latency(&self) -> bool {
        matches!(self, Balancer::Ewma(_))
    }

    /// A request to node `i` ended after `elapsed` (to its response head).
    pub fn finished(&self, i: usize, elapsed: Duration) {
        match self {
            Balancer::LeastConn(b) => b.finished(i),
            Balancer::Ewma(b) => b.finished(i, elapsed),
            _ => {}
        }
    }
}

/// Whether a node can be picked for this request.
fn eligible(weights: &[u64], tried: &[usize], i: usize) -> bool {
    weights[i] > 0 && !tried.contains(&i)
}
