//! `least_conn`: the node with the fewest requests in flight relative to its
//! weight. Ties go round robin, so that an idle upstream still spreads load.

use std::sync::atomic::{AtomicUsize, Ordering};

use super::eligible;

#[derive(Debug)]
pub struct LeastConn {
    weights: Vec<u64>,
    in_flight: Vec<AtomicUsize>,
    next: AtomicUsize,
    live: usize,
}

impl LeastConn {
    pub fn new(weights: Vec<u64>) -> Self {
        LeastConn {
            in_flight: weights.iter().map(|_| AtomicUsize::new(0)).collect(),
            live: weights.iter().filter(|w| **w > 0).count(),
            next: AtomicUsize::new(0),
            weights,
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }

    pub fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.weights.len();
        if n == 0 {
            return None;
        }
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        let mut best: Option<(usize, f64)> = None;
        for k in 0..n {
            let i = (start + k) % n;
            if !eligible(&self.weights, tried, i) {
                continue;
            }
            let score =
                (self.in_flight[i].load(Ordering::Relaxed) + 1) as f64 / self.weights[i] as f64;
            if best.is_none_or(|(_, s)| score < s) {
                best = Some((i, score));
            }
        }
        best.map(|(i, _)| i)
    }

    pub fn started(&self, i: usize) {
        if let Some(c) = self.in_flight.get(i) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn finished(&self, i: usize) {
        if let Some(c) = self.in_flight.get(i) {
            // Never below zero, even if a start was missed.
            let _ = c.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| v.checked_sub(1));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn busy_nodes_are_avoided() {
        let lc = LeastConn::new(vec![1, 1, 1]);
        lc.started(0);
        lc.started(0);
        lc.started(1);
        assert_eq!(lc.pick(&[]), Some(2));
        lc.started(2);
        lc.started(2);
        assert_eq!(lc.pick(&[]), Some(1));
        lc.finished(0);
        lc.finished(0);
        assert_eq!(lc.pick(&[]), Some(0));
        assert_eq!(lc.pick(&[0, 1, 2]), None);
    }

    #[test]
    fn idle_nodes_share_by_turn_and_weight_zero_is_skipped() {
        let lc = LeastConn::new(vec![1, 0, 1]);
        let picks: Vec<_> = (0..4).map(|_| lc.pick(&[]).unwrap()).collect();
        assert!(
            picks.contains(&0) && picks.contains(&2) && !picks.contains(&1),
            "{picks:?}"
        );
    }
}
