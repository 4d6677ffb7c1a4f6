//! The in-kernel deny list: the `blacklist` of `ip-restriction` in global
//! rules, also enforced by an XDP program (`gateway/bpf/xdp_deny.c`) that
//! drops TCP packets from those sources to the data-plane ports before a
//! connection exists.
//!
//! Settings: `plugin_attr.ip-restriction.xdp` — `enable` (default false),
//! `interfaces` (names; required when enabled), `mode` (`generic` default,
//! `native`), `max_entries` (per address family, default 65,536).
//!
//! User space keeps enforcing the same list whatever happens here: when the
//! program cannot be loaded or attached (no `CAP_BPF`/`CAP_NET_ADMIN`, BPF
//! disabled, unknown interface) the gateway logs once why the in-kernel
//! list is off and goes on. The maps follow every configuration change by
//! difference (new prefixes in before stale ones out, so the list is never
//! empty in between); the program is detached when the gateway stops, even
//! when killed, because it is held by a link the process owns.
//!
//! Entries that overlap `nginx_config.http.real_ip_from` stay in user space
//! only: requests from a trusted proxy are judged by the address it
//! forwards, not by the packet's source.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::sync::Mutex;

use aya::maps::lpm_trie::{Key, LpmTrie};
use aya::maps::{HashMap as BpfHashMap, MapData, PerCpuArray};
use aya::programs::{Xdp, XdpMode};
use aya::{Ebpf, EbpfLoader};
use ipnet::IpNet;
use serde_json::Value;

/// The compiled program (see `build.rs`).
static OBJECT: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/xdp_deny.o"));

/// `max_entries` when not configured.
pub const DEFAULT_MAX_ENTRIES: u32 = 65_536;

/// `plugin_attr.ip-restriction.xdp`.
#[derive(Debug, Clone, PartialEq)]
pub struct XdpConf {
    pub interfaces: Vec<String>,
    /// `native`: in the driver; otherwise generic (in the stack, works
    /// on every interface).
    pub native: bool,
    pub max_entries: u32,
}

impl XdpConf {
    /// The settings when `enable` is true; `Ok(None)` when off or absent.
    pub fn from_plugin_attr(attr: &serde_json::Map<String, Value>) -> Result<Option<Self>, String> {
        let Some(xdp) = attr.get("ip-restriction").and_then(|r| r.get("xdp")) else {
            return Ok(None);
        };
        let field = |name: &str| xdp.get(name);
        match field("enable") {
            None | Some(Value::Bool(false)) => return Ok(None),
            Some(Value::Bool(true)) => {}
            Some(_) => return Err("enable: expected a boolean".into()),
        }
        let interfaces: Vec<String> = match field("interfaces") {
            Some(Value::Array(list)) => list
                .iter()
                .map(|v| v.as_str().map(str::to_string))
                .collect::<Option<_>>()
                .ok_or("interfaces: expected interface names")?,
            _ => return Err("interfaces: a list of interfaces is required".into()),
        };
        if interfaces.is_empty() {
            return Err("interfaces: name at least one".into());
        }
        let native = match field("mode").map(|m| m.as_str()) {
            None | Some(Some("generic")) => false,
            Some(Some("native")) => true,
            _ => return Err("mode: `generic` or `native`".into()),
        };
        let max_entries = match field("max_entries") {
            None => DEFAULT_MAX_ENTRIES,
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .filter(|n| *n > 0)
                .ok_or("max_entries: a positive integer")?,
        };
        Ok(Some(XdpConf {
            interfaces,
            native,
            max_entries,
        }))
    }
}

/// The deny prefixes of the global rules' `ip-restriction` plugins that
/// apply to every request (not disabled, no `_meta.filter`), without those
/// overlapping `trusted` (the real-IP proxies). Entries that do not parse
/// are skipped: the Admin API refuses them before they get here.
pub fn global_deny_list<'a>(
    plugin_sets: impl Iterator<Item = &'a std::collections::BTreeMap<String, Value>>,
    trusted: &[IpNet],
) -> BTreeSet<IpNet> {
    let mut out = BTreeSet::new();
    for plugins in plugin_sets {
        let Some(conf) = plugins.get("ip-restriction") else {
            continue;
        };
        let meta = conf.get("_meta");
        let disabled = meta
            .and_then(|m| m.get("disable"))
            .and_then(Value::as_bool)
            .unwrap_or(false);
        if disabled || meta.is_some_and(|m| m.get("filter").is_some()) {
            continue;
        }
        let Some(list) = conf.get("blacklist").and_then(Value::as_array) else {
            continue;
        };
        for entry in list.iter().filter_map(Value::as_str) {
            let Some(net) = parse_entry(entry) else {
                continue;
            };
            let overlaps = trusted
                .iter()
                .any(|t| t.contains(&net.network()) || net.contains(&t.network()));
            if !overlaps {
                out.insert(net.trunc());
            }
        }
    }
    out
}

/// `10.0.0.1`, `10.0.0.0/8`, `2001:db8::/32`; an IPv4-mapped IPv6 entry as
/// the IPv4 one it names.
pub fn parse_entry(entry: &str) -> Option<IpNet> {
    let net = match entry.parse::<IpNet>() {
        Ok(net) => net,
        Err(_) => IpNet::from(entry.parse::<IpAddr>().ok()?),
    };
    if let IpNet::V6(v6) = net {
        if let (Some(v4), true) = (v6.addr().to_ipv4_mapped(), v6.prefix_len() >= 96) {
            return IpNet::new(IpAddr::V4(v4), v6.prefix_len() - 96).ok();
        }
    }
    Some(net)
}

/// The loaded program and what its maps hold.
pub struct DenyList {
    inner: Mutex<Loaded>,
}

struct Loaded {
    /// Holds the program and its links: dropping it detaches.
    ebpf: Option<Ebpf>,
    v4: LpmTrie<MapData, [u8; 4], u8>,
    v6: LpmTrie<MapData, [u8; 16], u8>,
    drops: PerCpuArray<MapData, u64>,
    current: BTreeSet<IpNet>,
    max_entries: u32,
    /// Prefixes the tries had no room for (user space still denies them).
    overflow_logged: bool,
}

/// Why the in-kernel list is off.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct XdpError(String);

impl DenyList {
    /// Loads the program, guards `ports`, attaches it to every configured
    /// interface. Fails (with the reason to log) when any step is refused;
    /// nothing stays attached then.
    pub fn start(conf: &XdpConf, ports: &[u16]) -> Result<Self, XdpError> {
        let err = |what: &str, e: &dyn std::fmt::Display| XdpError(format!("{what}: {e}"));
        let mut ebpf = EbpfLoader::new()
            .map_max_entries("DENY_V4", conf.max_entries)
            .map_max_entries("DENY_V6", conf.max_entries)
            .load(OBJECT)
            .map_err(|e| err("loading the XDP program", &e))?;
        {
            let map = ebpf
                .map_mut("PORTS")
                .ok_or_else(|| XdpError("the XDP object has no PORTS map".into()))?;
            let mut guarded: BpfHashMap<&mut MapData, u16, u8> =
                BpfHashMap::try_from(map).map_err(|e| err("PORTS map", &e))?;
            for port in ports {
                guarded
                    .insert(port.to_be(), 1, 0)
                    .map_err(|e| err("PORTS map", &e))?;
            }
        }
        let take = |ebpf: &mut Ebpf, name: &str| {
            ebpf.take_map(name)
                .ok_or_else(|| XdpError(format!("the XDP object has no {name} map")))
        };
        let v4 = LpmTrie::try_from(take(&mut ebpf, "DENY_V4")?).map_err(|e| err("DENY_V4", &e))?;
        let v6 = LpmTrie::try_from(take(&mut ebpf, "DENY_V6")?).map_err(|e| err("DENY_V6", &e))?;
        let drops =
            PerCpuArray::try_from(take(&mut ebpf, "DROPS")?).map_err(|e| err("DROPS", &e))?;
        let program: &mut Xdp = ebpf
            .program_mut("xdp_deny")
            .ok_or_else(|| XdpError("the XDP object has no xdp_deny program".into()))?
            .try_into()
            .map_err(|e| err("xdp_deny", &e))?;
        program
            .load()
            .map_err(|e| err("loading the XDP program into the kernel", &e))?;
        let mode = if conf.native {
            XdpMode::Driver
        } else {
            XdpMode::Skb
        };
        for interface in &conf.interfaces {
            // On failure `ebpf` is dropped with the links made so far.
            program
                .attach(interface, mode)
                .map_err(|e| err(&format!("attaching XDP to {interface}"), &e))?;
        }
        Ok(DenyList {
            inner: Mutex::new(Loaded {
                ebpf: Some(ebpf),
                v4,
                v6,
                drops,
                current: BTreeSet::new(),
                max_entries: conf.max_entries,
                overflow_logged: false,
            }),
        })
    }

    /// Makes the maps hold `wanted`: new prefixes first, then stale ones
    /// removed, so a prefix in both the old and the new list is never
    /// missing in between.
    pub fn sync(&self, wanted: &BTreeSet<IpNet>) {
        let mut loaded = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let added: Vec<IpNet> = wanted.difference(&loaded.current).copied().collect();
        let removed: Vec<IpNet> = loaded.current.difference(wanted).copied().collect();
        for net in &added {
            match loaded.insert(net) {
                Ok(()) => {
                    loaded.current.insert(*net);
                }
                Err(e) if !loaded.overflow_logged => {
                    loaded.overflow_logged = true;
                    tracing::warn!(prefix = %net, error = %e, max_entries = loaded.max_entries,
                        "in-kernel deny list full or refused a prefix; user space still denies it");
                }
                Err(_) => {}
            }
        }
        for net in &removed {
            if let Err(e) = loaded.remove(net) {
                tracing::warn!(prefix = %net, error = %e, "removing a prefix from the in-kernel deny list failed");
            }
            loaded.current.remove(net);
        }
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                prefixes = loaded.current.len(),
                added = added.len(),
                removed = removed.len(),
                "in-kernel deny list updated"
            );
        }
    }

    /// Packets dropped so far: (IPv4, IPv6), summed over CPUs.
    pub fn drops(&self) -> (u64, u64) {
        let loaded = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let count = |i: u32| {
            loaded
                .drops
                .get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum::<u64>())
                .unwrap_or(0)
        };
        (count(0), count(1))
    }
}

impl Loaded {
    fn insert(&mut self, net: &IpNet) -> Result<(), aya::maps::MapError> {
        match net {
            IpNet::V4(n) => {
                self.v4
                    .insert(&Key::new(n.prefix_len().into(), n.network().octets()), 1, 0)
            }
            IpNet::V6(n) => {
                self.v6
                    .insert(&Key::new(n.prefix_len().into(), n.network().octets()), 1, 0)
            }
        }
    }

    fn remove(&mut self, net: &IpNet) -> Result<(), aya::maps::MapError> {
        match net {
            IpNet::V4(n) => self
                .v4
                .remove(&Key::new(n.prefix_len().into(), n.network().octets())),
            IpNet::V6(n) => self
                .v6
                .remove(&Key::new(n.prefix_len().into(), n.network().octets())),
        }
    }
}

impl DenyList {
    /// Detaches the program from its interfaces and logs what it dropped;
    /// the list is then user space's alone. Done at shutdown (and on drop).
    pub fn detach(&self) {
        let (v4, v6) = self.drops();
        let ebpf = {
            let mut loaded = self.inner.lock().unwrap_or_else(|p| p.into_inner());
            loaded.ebpf.take()
        };
        if ebpf.is_some() {
            drop(ebpf);
            tracing::info!(
                ipv4 = v4,
                ipv6 = v6,
                "in-kernel deny list detached; packets dropped"
            );
        }
    }
}

impl Drop for DenyList {
    fn drop(&mut self) {
        self.detach();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::collections::BTreeMap;

    fn plugins(v: Value) -> BTreeMap<String, Value> {
        serde_json::from_value(v).unwrap_or_default()
    }

    #[test]
    fn settings() {
        let attr = |v: Value| {
            let mut m = serde_json::Map::new();
            m.insert("ip-restriction".into(), json!({ "xdp": v }));
            XdpConf::from_plugin_attr(&m)
        };
        assert_eq!(attr(json!({"enable": false})), Ok(None));
        assert_eq!(XdpConf::from_plugin_attr(&serde_json::Map::new()), Ok(None));
        let on = attr(json!({"enable": true, "interfaces": ["eth0"]}))
            .unwrap()
            .unwrap();
        assert_eq!(on.interfaces, ["eth0"]);
        assert!(!on.native);
        assert_eq!(on.max_entries, DEFAULT_MAX_ENTRIES);
        let native = attr(
            json!({"enable": true, "interfaces": ["a", "b"], "mode": "native",
            "max_entries": 10}),
        )
        .unwrap()
        .unwrap();
        assert!(native.native);
        assert_eq!(native.max_entries, 10);
        assert!(attr(json!({"enable": true})).is_err());
        assert!(attr(json!({"enable": true, "interfaces": []})).is_err());
        assert!(attr(json!({"enable": true, "interfaces": ["a"], "mode": "fast"})).is_err());
        assert!(attr(json!({"enable": true, "interfaces": ["a"], "max_entries": 0})).is_err());
    }

    #[test]
    fn only_unconditional_global_blacklists() {
        let rules = [
            plugins(json!({"ip-restriction": {"blacklist":
                ["192.0.2.66", "198.51.100.0/24", "2001:db8::1", "::ffff:203.0.113.9",
                 "10.1.2.3/8", "not an address"]}})),
            plugins(json!({"ip-restriction": {"whitelist": ["192.0.2.1"]}})),
            plugins(json!({"ip-restriction": {"blacklist": ["192.0.2.70"],
                "_meta": {"disable": true}}})),
            plugins(json!({"ip-restriction": {"blacklist": ["192.0.2.71"],
                "_meta": {"filter": [["arg_x", "==", "1"]]}}})),
            plugins(json!({"cors": {}})),
        ];
        let list = global_deny_list(rules.iter(), &[]);
        let got: Vec<String> = list.iter().map(ToString::to_string).collect();
        assert_eq!(
            got,
            [
                "10.0.0.0/8",
                "192.0.2.66/32",
                "198.51.100.0/24",
                "203.0.113.9/32",
                "2001:db8::1/128"
            ]
        );
        // A trusted proxy's address is judged by what it forwards.
        let trusted = ["198.51.100.7/32".parse().unwrap()];
        let list = global_deny_list(rules.iter(), &trusted);
        assert!(!list.contains(&"198.51.100.0/24".parse().unwrap()));
        assert!(list.contains(&"192.0.2.66/32".parse().unwrap()));
    }
}
