//! `ewma`: prefers the node that has been answering fastest. Each node keeps
//! an exponentially weighted moving average of its response time that decays
//! towards 0 over [`DECAY`] (so a node that was slow gets tried again); a
//! pick compares two nodes chosen at random ("power of two choices") by
//! average x (in flight + 1) / weight and takes the better one.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::eligible;

/// Time over which an old measurement loses most of its weight
/// (APISIX's `DECAY_TIME` is 10 s).
pub const DECAY: Duration = Duration::from_secs(10);

#[derive(Debug)]
struct Stat {
    /// Seconds, decayed.
    ewma: f64,
    at: Instant,
}

#[derive(Debug)]
pub struct Ewma {
    weights: Vec<u64>,
    stats: Vec<Mutex<Stat>>,
    in_flight: Vec<AtomicUsize>,
    rand: AtomicU64,
    live: usize,
}

impl Ewma {
    pub fn new(weights: Vec<u64>) -> Self {
        let now = Instant::now();
        Ewma {
            stats: weights
                .iter()
                .map(|_| Mutex::new(Stat { ewma: 0.0, at: now }))
                .collect(),
            in_flight: weights.iter().map(|_| AtomicUsize::new(0)).collect(),
            rand: AtomicU64::new(0x9e37_79b9_7f4a_7c15 ^ now.elapsed().as_nanos() as u64),
            live: weights.iter().filter(|w| **w > 0).count(),
            weights,
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }

    /// xorshift: cheap, lock-free, good enough to pick two nodes.
    fn random(&self) -> u64 {
        let mut x = self.rand.load(Ordering::Relaxed);
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rand.store(x, Ordering::Relaxed);
        x
    }

    fn score(&self, i: usize, now: Instant) -> f64 {
        let ewma = self.stats[i]
            .lock()
            .map_or(0.0, |s| decayed(s.ewma, now.duration_since(s.at)));
        let load = (self.in_flight[i].load(Ordering::Relaxed) + 1) as f64;
        (ewma + 1e-6) * load / self.weights[i] as f64
    }

    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let candidates: Vec<usize> = (0..self.weights.len())
            .filter(|i| eligible(&self.weights, tried, *i))
            .collect();
        match candidates.len() {
            0 => None,
            1 => Some(candidates[0]),
            n => {
                let a = candidates[(self.random() % n as u64) as usize];
                let mut b = candidates[(self.random() % n as u64) as usize];
                if a == b {
                    b = candidates[(candidates.iter().position(|c| *c == a).unwrap_or(0) + 1) % n];
                }
                let now = Instant::now();
                Some(if self.score(a, now) <= self.score(b, now) {
                    a
                } else {
                    b
                })
            }
        }
    }

    pub fn started(&self, i: usize) {
        if let Some(c) = self.in_flight.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn finished(&self, i: usize, elapsed: Duration) {
        if let Some(c) = self.in_flight.get(i) {
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
        if let Some(Ok(mut s)) = self.stats.get(i).map(Mutex::lock) {
            let now = Instant::now();
            let old = decayed(s.ewma, now.duration_since(s.at));
            let w = (-(now.duration_since(s.at).as_secs_f64()) / DECAY.as_secs_f64()).exp();
            s.ewma = old * w + elapsed.as_secs_f64() * (1.0 - w).max(0.1);
            s.at = now;
        }
    }
}

fn decayed(value: f64, age: Duration) -> f64 {
    value * (-(age.as_secs_f64()) / DECAY.as_secs_f64()).exp()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefers_the_faster_node() {
        let e = Ewma::new(vec![1, 1]);
        for _ in 0..20 {
            e.started(0);
            e.finished(0, Duration::from_millis(200));
            e.started(1);
            e.finished(1, Duration::from_millis(2));
        }
        let fast = (0..200).filter(|_| e.pick(&[]) == Some(1)).count();
        assert!(fast > 150, "fast node picked {fast}/200");
        assert_eq!(e.pick(&[1]), Some(0));
        assert_eq!(e.pick(&[0, 1]), None);
    }
}
