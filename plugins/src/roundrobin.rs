//! Weighted round robin, as APISIX's `roundrobin` balancer picks.
//!
//! APISIX uses lua-resty-balancer's interleaved weighted round robin: the
//! current weight starts at the maximum, steps down by the gcd of all weights
//! every time the scan wraps, and a node is picked when its weight is at least
//! the current weight. Over one cycle (sum of weights / gcd picks) every node
//! gets exactly its share; weights 3:2:1 give `A A B A B C`, never long runs.
//! Nodes with weight 0 are never picked.
//!
//! The cycle depends only on the weights, so it is computed once, when the
//! config is compiled, into a table of node indexes; a pick is then one atomic
//! increment and one table lookup, lock-free. Cycles longer than
//! [`MAX_SCHEDULE_LEN`] (huge, coprime weights) are stepped under a mutex
//! instead. The position survives config swaps for as long as the upstream's
//! nodes are unchanged (the gateway reuses the same [`RoundRobin`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Longest precomputed cycle, in picks (64 Ki entries of 4 bytes).
pub const MAX_SCHEDULE_LEN: u64 = 1 << 16;

/// A weighted round-robin picker over node indexes `0..weights.len()`.
#[derive(Debug)]
pub struct RoundRobin {
    weights: Vec<u64>,
    /// Nodes with a weight above 0.
    live: usize,
    picker: Picker,
}

/// How picks are made: from a precomputed cycle when it is short enough,
/// else by stepping the state machine under a lock.
#[derive(Debug)]
enum Picker {
    /// No node has a weight above 0.
    Empty,
    Table {
        schedule: Vec<u32>,
        next: AtomicUsize,
    },
    Stepped(Mutex<Stepper>),
}

/// The interleaved weighted round-robin state machine.
#[derive(Debug, Clone)]
struct Stepper {
    weights: Vec<u64>,
    gcd: u64,
    max: u64,
    /// Index of the last node looked at.
    last: usize,
    current_weight: u64,
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

impl Stepper {
    fn new(weights: &[u64]) -> Option<Self> {
        let max = weights.iter().copied().max().filter(|m| *m > 0)?;
        let g = weights.iter().copied().filter(|w| *w > 0).fold(0, gcd);
        Some(Stepper {
            weights: weights.to_vec(),
            gcd: g,
            max,
            last: weights.len() - 1,
            current_weight: 0,
        })
    }

    fn step(&mut self) -> usize {
        loop {
            self.last = (self.last + 1) % self.weights.len();
            if self.last == 0 {
                self.current_weight = self.current_weight.saturating_sub(self.gcd);
                if self.current_weight == 0 {
                    self.current_weight = self.max;
                }
            }
            if self.weights[self.last] >= self.current_weight {
                return self.last;
            }
        }
    }
}

impl RoundRobin {
    pub fn new(weights: Vec<u64>) -> Self {
        let picker = match Stepper::new(&weights) {
            None => Picker::Empty,
            Some(mut stepper) => {
                // Weights come from users: a sum that overflows just means
                // "too long to tabulate".
                let cycle = weights
                    .iter()
                    .try_fold(0u64, |acc, w| acc.checked_add(w / stepper.gcd));
                if let Some(cycle) = cycle.filter(|c| (1..=MAX_SCHEDULE_LEN).contains(c)) {
                    let schedule = (0..cycle).map(|_| stepper.step() as u32).collect();
                    Picker::Table {
                        schedule,
                        next: AtomicUsize::new(0),
                    }
                } else {
                    Picker::Stepped(Mutex::new(stepper))
                }
            }
        };
        let live = weights.iter().filter(|w| **w > 0).count();
        RoundRobin {
            weights,
            live,
            picker,
        }
    }

    /// The weights this picker was built from.
    pub fn weights(&self) -> &[u64] {
        &self.weights
    }

    /// The next node index, or `None` when every weight is 0.
    pub fn pick(&self) -> Option<usize> {
        match &self.picker {
            Picker::Empty => None,
            Picker::Table { schedule, next } => {
                let i = next.fetch_add(1, Ordering::Relaxed) % schedule.len();
                Some(schedule[i] as usize)
            }
            Picker::Stepped(m) => {
                let mut s = m.lock().unwrap_or_else(|p| p.into_inner());
                Some(s.step())
            }
        }
    }

    /// Number of nodes that can be picked.
    pub fn live(&self) -> usize {
        self.live
    }

    /// The next node index not in `tried`; `None` when none is left. When
    /// the scheduled node was tried already, the next untried live node in
    /// declaration order is taken, so a retry costs O(nodes), never a scan
    /// of the whole cycle.
    pub fn pick_excluding(&self, tried: &[usize]) -> Option<usize> {
        if tried.len() >= self.live {
            return None;
        }
        let first = self.pick()?;
        let n = self.weights.len();
        (0..n)
            .map(|k| (first + k) % n)
            .find(|i| self.weights[*i] > 0 && !tried.contains(i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn counts(rr: &RoundRobin, n: usize) -> Vec<usize> {
        let mut c = vec![0; rr.weights().len()];
        for _ in 0..n {
            c[rr.pick().unwrap()] += 1;
        }
        c
    }

    #[test]
    fn apisix_distributions() {
        assert_eq!(counts(&RoundRobin::new(vec![1, 2]), 30), [10, 20]);
        assert_eq!(counts(&RoundRobin::new(vec![3, 2, 1]), 12), [6, 4, 2]);
        assert_eq!(counts(&RoundRobin::new(vec![3, 0, 1]), 12), [9, 0, 3]);
    }

    #[test]
    fn equal_weights_alternate() {
        let rr = RoundRobin::new(vec![1, 1]);
        let picks: Vec<_> = (0..6).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(picks, [0, 1, 0, 1, 0, 1]);
    }

    #[test]
    fn interleaves_rather_than_bursts() {
        let rr = RoundRobin::new(vec![3, 2, 1]);
        let picks: Vec<_> = (0..6).map(|_| rr.pick().unwrap()).collect();
        assert_eq!(picks, [0, 0, 1, 0, 1, 2]);
    }

    #[test]
    fn overflowing_weights_do_not_panic() {
        let rr = RoundRobin::new(vec![u64::MAX, u64::MAX - 1, 1 << 63]);
        for _ in 0..10 {
            assert!(rr.pick().is_some());
        }
    }

    #[test]
    fn all_zero_picks_nothing() {
        assert_eq!(RoundRobin::new(vec![0, 0]).pick(), None);
        assert_eq!(RoundRobin::new(vec![]).pick(), None);
    }

    #[test]
    fn huge_coprime_weights_use_the_stepper() {
        let rr = RoundRobin::new(vec![1_000_003, 999_983]);
        assert!(matches!(rr.picker, Picker::Stepped(_)));
        let c = counts(&rr, 10_000);
        assert!(c[0] > 0 && c[1] > 0);
    }

    #[test]
    fn exclusion_skips_tried_nodes() {
        let rr = RoundRobin::new(vec![1, 1, 0]);
        assert_eq!(rr.pick_excluding(&[0]), Some(1));
        assert_eq!(rr.pick_excluding(&[1]), Some(0));
        assert_eq!(rr.pick_excluding(&[0, 1]), None);
    }

    proptest! {
        #[test]
        fn each_node_within_one_of_its_share(weights in proptest::collection::vec(0u64..20, 1..8), n in 1usize..400) {
            let rr = RoundRobin::new(weights.clone());
            let total: u64 = weights.iter().sum();
            prop_assume!(total > 0);
            let c = counts(&rr, n);
            for (i, w) in weights.iter().enumerate() {
                let expected = n as f64 * *w as f64 / total as f64;
                // Interleaving keeps every prefix close to the ideal share.
                prop_assert!((c[i] as f64 - expected).abs() <= *w as f64 + 1.0,
                    "node {} got {} expected {:.1} ({:?})", i, c[i], expected, weights);
                if *w == 0 { prop_assert_eq!(c[i], 0); }
            }
        }
    }
}
