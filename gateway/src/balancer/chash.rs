//! `chash`: consistent hashing. Each node gets [`POINTS_PER_WEIGHT`] points
//! per unit of weight on a 32-bit ring; a request goes to the first point at
//! or after the hash of its key. Adding or removing a node moves only the
//! keys that land on its points. A retry walks on along the ring to the next
//! node not tried yet.

use super::eligible;

/// Ring points per unit of weight (the ketama convention).
pub const POINTS_PER_WEIGHT: u64 = 160;
/// Bound on the points of one node, whatever its weight.
pub const MAX_POINTS_PER_NODE: u64 = 160 * 100;
/// Bound on the points of a ring (32 MiB of them). Past it every node's
/// share is scaled down alike (at least one point each), so an upstream
/// of tens of thousands of heavy nodes costs memory in proportion to this,
/// not to nodes times weight.
pub const MAX_POINTS: u64 = 4 << 20;

/// FNV-1a, 32 bit: stable across processes and releases, which a
/// consistent hash needs (clients must keep landing on the same node).
fn hash32(data: &[u8]) -> u32 {
    let mut h: u32 = 0x811c_9dc5;
    for b in data {
        h ^= u32::from(*b);
        h = h.wrapping_mul(0x0100_0193);
    }
    // Final avalanche so that similar keys spread over the ring.
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// The hash ring.
#[derive(Debug)]
pub struct Ring {
    weights: Vec<u64>,
    /// (point, node), sorted by point.
    points: Vec<(u32, u32)>,
    live: usize,
}

impl Ring {
    pub fn new(ids: &[String], weights: &[u64]) -> Self {
        let wanted = |w: u64| w.saturating_mul(POINTS_PER_WEIGHT).min(MAX_POINTS_PER_NODE);
        let total: u64 = weights.iter().map(|w| wanted(*w)).sum();
        let points_of = |w: u64| match wanted(w) {
            n if total <= MAX_POINTS || n == 0 => n,
            // n * MAX_POINTS fits: n is at most 16,000.
            n => (n * MAX_POINTS / total).max(1),
        };
        let mut points = Vec::with_capacity(total.min(MAX_POINTS + ids.len() as u64) as usize);
        for (i, (id, w)) in ids.iter().zip(weights).enumerate() {
            for p in 0..points_of(*w) {
                points.push((hash32(format!("{id}#{p}").as_bytes()), i as u32));
            }
        }
        points.sort_unstable();
        Ring {
            live: weights.iter().filter(|w| **w > 0).count(),
            weights: weights.to_vec(),
            points,
        }
    }

    pub fn live(&self) -> usize {
        self.live
    }

    pub fn pick(&self, key: &str, tried: &[usize]) -> Option<usize> {
        if self.points.is_empty() || tried.len() >= self.live {
            return None;
        }
        let h = hash32(key.as_bytes());
        let start = self.points.partition_point(|(p, _)| *p < h);
        (0..self.points.len())
            .map(|k| self.points[(start + k) % self.points.len()].1 as usize)
            .find(|i| eligible(&self.weights, tried, *i))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("10.0.0.{i}:80")).collect()
    }

    #[test]
    fn same_key_same_node_and_spread() {
        let ring = Ring::new(&ids(3), &[1, 1, 1]);
        let mut counts = [0usize; 3];
        for k in 0..3000 {
            let key = format!("client-{k}");
            let a = ring.pick(&key, &[]).unwrap();
            assert_eq!(ring.pick(&key, &[]), Some(a));
            counts[a] += 1;
        }
        for c in counts {
            assert!((700..1300).contains(&c), "uneven spread {counts:?}");
        }
    }

    #[test]
    fn removing_a_node_moves_only_its_keys() {
        let before = Ring::new(&ids(4), &[1, 1, 1, 1]);
        let after = Ring::new(&ids(4), &[1, 1, 1, 0]);
        for k in 0..1000 {
            let key = format!("k{k}");
            let a = before.pick(&key, &[]).unwrap();
            if a != 3 {
                assert_eq!(after.pick(&key, &[]), Some(a), "key {key} moved");
            }
        }
    }

    #[test]
    fn a_huge_ring_is_scaled_down_alike() {
        // 2,000 nodes at the largest per-node share would be 32M points.
        let n = 2_000;
        let mut weights = vec![100u64; n];
        weights[0] = 1;
        weights[1] = 0;
        let ring = Ring::new(&ids(n), &weights);
        assert!(ring.points.len() as u64 <= MAX_POINTS + n as u64);
        let of = |node: u32| ring.points.iter().filter(|(_, i)| *i == node).count();
        assert_eq!(of(0), 20, "weights keep their proportions");
        assert_eq!(of(1), 0, "a node of weight 0 has none");
        assert!((2000..2200).contains(&of(2)), "{}", of(2));
        assert_eq!(ring.live(), n - 1);
    }

    #[test]
    fn retries_walk_to_other_nodes() {
        let ring = Ring::new(&ids(2), &[1, 1]);
        let first = ring.pick("x", &[]).unwrap();
        let second = ring.pick("x", &[first]).unwrap();
        assert_ne!(first, second);
        assert_eq!(ring.pick("x", &[0, 1]), None);
    }
}
