//! IP address and CIDR sets with lookups whose cost does not grow with the
//! number of entries.
//!
//! Entries are written the way APISIX's `ip_def` accepts them: `10.0.0.1`,
//! `10.0.0.0/8`, `::1`, `2001:db8::/32`. A set is built once per config
//! snapshot; [`IpSet::contains`] then walks a multi-bit prefix trie, so a list
//! of 10,000 CIDRs costs about as much as a list of one. Sets of up to
//! [`SMALL`] entries (most route lists) are a plain list instead: scanning a
//! few prefixes is as quick as the trie and holds a few dozen bytes where a
//! trie holds about 500.

use std::net::IpAddr;
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net, Ipv6Net};
use prefix_trie::PrefixSet;

/// Why an entry is not an IP address or CIDR.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid ip address: {0}")]
pub struct InvalidIp(pub String);

/// Parses one `ip_def` entry: a single address (taken as /32 or /128) or a
/// CIDR whose prefix length fits the family. Host bits after the prefix are
/// ignored, as nginx and APISIX do.
pub fn parse_entry(entry: &str) -> Result<IpNet, InvalidIp> {
    let bad = || InvalidIp(entry.to_string());
    if entry.contains('/') {
        // ipnet accepts "1.2.3.4/24"; reject forms it tolerates and APISIX
        // does not, like a leading '+' or spaces.
        if entry.contains(char::is_whitespace) {
            return Err(bad());
        }
        IpNet::from_str(entry).map(|n| n.trunc()).map_err(|_| bad())
    } else {
        IpAddr::from_str(entry).map(IpNet::from).map_err(|_| bad())
    }
}

/// Entries a set keeps as a list before it builds tries.
pub const SMALL: usize = 4;

/// A listed prefix, ready for one AND and one compare per lookup.
#[derive(Clone, Copy)]
enum Masked {
    V4 { net: u32, mask: u32 },
    V6 { net: u128, mask: u128 },
}

impl Masked {
    fn of(net: IpNet) -> Self {
        match net {
            IpNet::V4(n) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(n.prefix_len()))
                    .unwrap_or(0);
                Masked::V4 {
                    net: u32::from(n.network()) & mask,
                    mask,
                }
            }
            IpNet::V6(n) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(n.prefix_len()))
                    .unwrap_or(0);
                Masked::V6 {
                    net: u128::from(n.network()) & mask,
                    mask,
                }
            }
        }
    }

    fn net(self) -> IpNet {
        let len = |mask: u128| mask.count_ones() as u8;
        match self {
            Masked::V4 { net, mask } => {
                IpNet::V4(Ipv4Net::new(net.into(), len(u128::from(mask))).unwrap_or_default())
            }
            Masked::V6 { net, mask } => {
                IpNet::V6(Ipv6Net::new(net.into(), len(mask)).unwrap_or_default())
            }
        }
    }
}

/// A compiled set of IPv4 and IPv6 prefixes.
///
/// Up to [`SMALL`] entries are a list; past that, each family's trie is
/// boxed and made only when it gets an entry: a trie is some 400 bytes
/// before its first entry, and most sets (one per route with
/// `remote_addrs` and per ip-restriction) use one family or none.
#[derive(Clone, Default)]
pub struct IpSet {
    /// The entries while there are at most [`SMALL`], as network and mask;
    /// empty once the tries hold them.
    small: Vec<Masked>,
    v4: Option<Box<PrefixSet<Ipv4Net>>>,
    v6: Option<Box<PrefixSet<Ipv6Net>>>,
    len: usize,
}

impl std::fmt::Debug for IpSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IpSet").field("len", &self.len).finish()
    }
}

impl IpSet {
    /// Builds a set from `ip_def` entries; fails on the first invalid one.
    pub fn from_entries<S: AsRef<str>>(entries: &[S]) -> Result<Self, InvalidIp> {
        let mut set = IpSet::default();
        for e in entries {
            set.insert(parse_entry(e.as_ref())?);
        }
        set.small.shrink_to_fit();
        Ok(set)
    }

    pub fn insert(&mut self, net: IpNet) {
        self.len += 1;
        let in_tries = self.v4.is_some() || self.v6.is_some();
        if !in_tries && self.small.len() < SMALL {
            self.small.push(Masked::of(net));
            return;
        }
        for listed in std::mem::take(&mut self.small) {
            self.insert_in_trie(listed.net());
        }
        self.insert_in_trie(net);
    }

    fn insert_in_trie(&mut self, net: IpNet) {
        match net {
            IpNet::V4(n) => {
                self.v4.get_or_insert_with(Box::default).insert(n);
            }
            IpNet::V6(n) => {
                self.v6.get_or_insert_with(Box::default).insert(n);
            }
        }
    }

    /// Number of entries the set was built from.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether `ip` falls in any entry. IPv4-mapped IPv6 addresses
    /// (`::ffff:10.0.0.1`, what a dual-stack socket reports) are matched as
    /// the IPv4 address they carry.
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        if !self.small.is_empty() {
            return match ip {
                IpAddr::V4(a) => {
                    let a = u32::from(a);
                    self.small
                        .iter()
                        .any(|m| matches!(*m, Masked::V4 { net, mask } if a & mask == net))
                }
                IpAddr::V6(a) => {
                    let a = u128::from(a);
                    self.small
                        .iter()
                        .any(|m| matches!(*m, Masked::V6 { net, mask } if a & mask == net))
                }
            };
        }
        match ip {
            IpAddr::V4(a) => self
                .v4
                .as_ref()
                .is_some_and(|set| set.get_spm(&Ipv4Net::from(a)).is_some()),
            IpAddr::V6(a) => self
                .v6
                .as_ref()
                .is_some_and(|set| set.get_spm(&Ipv6Net::from(a)).is_some()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn set(entries: &[&str]) -> IpSet {
        IpSet::from_entries(entries).expect("valid entries")
    }

    #[test]
    fn single_addresses_and_cidrs() {
        let s = set(&["10.0.0.1", "192.168.0.0/16", "::1", "2001:db8::/32"]);
        assert!(s.contains("10.0.0.1".parse().unwrap()));
        assert!(!s.contains("10.0.0.2".parse().unwrap()));
        assert!(s.contains("192.168.255.1".parse().unwrap()));
        assert!(s.contains("::1".parse().unwrap()));
        assert!(s.contains("2001:db8:1::5".parse().unwrap()));
        assert!(!s.contains("2001:db9::1".parse().unwrap()));
    }

    #[test]
    fn ipv4_mapped_peer_matches_ipv4_entry() {
        let s = set(&["127.0.0.0/24"]);
        assert!(s.contains("::ffff:127.0.0.9".parse().unwrap()));
    }

    #[test]
    fn host_bits_are_ignored() {
        let s = set(&["10.1.2.3/8"]);
        assert!(s.contains("10.200.0.1".parse().unwrap()));
    }

    #[test]
    fn zero_prefix_matches_everything_in_family() {
        let s = set(&["0.0.0.0/0"]);
        assert!(s.contains("8.8.8.8".parse().unwrap()));
        assert!(!s.contains("::2".parse().unwrap()));
    }

    #[test]
    fn rejects_what_apisix_rejects() {
        for bad in [
            "10.255.256.0/24",
            "10.255.254.0/38",
            "::1/129",
            "::ffgg",
            "not-an-ip",
            "",
            "1.2.3",
            "01.2.3.4",
            " 1.2.3.4/8",
        ] {
            assert!(parse_entry(bad).is_err(), "{bad:?} should be rejected");
        }
    }

    #[test]
    fn small_sets_and_the_move_to_tries() {
        // One entry per /16 of 10.x: 10.0/16 .. 10.(n-1)/16, plus ::1.
        let entries = |n: usize| -> Vec<String> {
            let mut e: Vec<String> = (0..n).map(|i| format!("10.{i}.0.0/16")).collect();
            e.push("::1".into());
            e
        };
        for n in [0, 1, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL] {
            let s = IpSet::from_entries(&entries(n)).unwrap();
            assert_eq!(s.len(), n + 1);
            assert_eq!(s.small.is_empty(), n + 1 > SMALL, "{n} entries");
            for i in 0..n {
                assert!(
                    s.contains(format!("10.{i}.200.1").parse().unwrap()),
                    "{n}: 10.{i}"
                );
                assert!(s.contains(format!("::ffff:10.{i}.0.1").parse().unwrap()));
            }
            assert!(!s.contains(format!("10.{n}.0.1").parse().unwrap()), "{n}");
            assert!(s.contains("::1".parse().unwrap()));
            assert!(!s.contains("::2".parse().unwrap()));
            assert!(!s.contains("11.0.0.1".parse().unwrap()));
        }
    }

    fn linear(nets: &[IpNet], ip: IpAddr) -> bool {
        nets.iter().any(|n| n.contains(&ip.to_canonical()))
    }

    proptest! {
        #[test]
        fn trie_equals_linear_scan(
            v4 in proptest::collection::vec((any::<u32>(), 0u8..=32), 0..40),
            v6 in proptest::collection::vec((any::<u128>(), 0u8..=128), 0..20),
            // Small sets (a list, not tries) as often as large ones.
            small in any::<bool>(),
            probes4 in proptest::collection::vec(any::<u32>(), 1..40),
            probes6 in proptest::collection::vec(any::<u128>(), 1..20),
        ) {
            let (v4, v6) = if small {
                (v4.into_iter().take(SMALL / 2).collect::<Vec<_>>(), v6.into_iter().take(SMALL - SMALL / 2).collect::<Vec<_>>())
            } else {
                (v4, v6)
            };
            let mut nets: Vec<IpNet> = Vec::new();
            for (a, l) in v4 {
                nets.push(IpNet::V4(Ipv4Net::new(a.into(), l).unwrap().trunc()));
            }
            for (a, l) in v6 {
                nets.push(IpNet::V6(Ipv6Net::new(a.into(), l).unwrap().trunc()));
            }
            let mut s = IpSet::default();
            for n in &nets {
                s.insert(*n);
            }
            // Probe addresses inside the entries too, not only random ones.
            let mut probes: Vec<IpAddr> = probes4.into_iter().map(|a| IpAddr::from(std::net::Ipv4Addr::from(a))).collect();
            probes.extend(probes6.into_iter().map(|a| IpAddr::from(std::net::Ipv6Addr::from(a))));
            probes.extend(nets.iter().map(|n| n.addr()));
            probes.extend(nets.iter().map(|n| n.broadcast()));
            for ip in probes {
                prop_assert_eq!(s.contains(ip), linear(&nets, ip), "ip {}", ip);
            }
        }
    }
}
