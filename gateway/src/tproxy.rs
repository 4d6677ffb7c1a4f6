//! Transparent proxying (TProxy): a data-plane listener that accepts
//! connections for any destination the kernel diverts to it.
//!
//! A `node_listen` entry `{ip, port, transparent: true}` gets
//! `IP_TRANSPARENT` (and `IPV6_TRANSPARENT` on an IPv6 socket), so an
//! nftables `tproxy` rule plus policy routing of the marked packets to a
//! `local` route hands it connections addressed to other hosts. The
//! accepted socket's local address is then the address the client was
//! connecting to (`$server_addr`, `$server_port`). Setting the option needs
//! `CAP_NET_ADMIN`; without it the start fails, naming the listener.
//! [`setup_commands`] prints what an operator runs to divert traffic; the
//! gateway changes no firewall or routing itself.

use std::io;
use std::net::{IpAddr, SocketAddr};

use socket2::{Domain, Protocol, Socket, Type};

/// Binds a transparent listener on `addr` (`SO_REUSEADDR`, backlog 1024),
/// non-blocking, for tokio. Fails with an error that says which option the
/// kernel refused, and that it needs `CAP_NET_ADMIN`.
pub fn bind(addr: SocketAddr) -> io::Result<std::net::TcpListener> {
    let domain = if addr.is_ipv4() {
        Domain::IPV4
    } else {
        Domain::IPV6
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    let refused = |option: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("transparent: setting {option} needs CAP_NET_ADMIN: {e}"),
        )
    };
    if addr.is_ipv4() {
        socket
            .set_ip_transparent_v4(true)
            .map_err(|e| refused("IP_TRANSPARENT", e))?;
    } else {
        socket
            .set_ip_transparent_v6(true)
            .map_err(|e| refused("IPV6_TRANSPARENT", e))?;
        // A dual-stack socket also takes diverted IPv4 connections.
        let _ = socket.set_ip_transparent_v4(true);
    }
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Connects to `node` from `source`, an address of another host (the
/// client's), with `IP_TRANSPARENT` / `IPV6_TRANSPARENT`; the kernel picks
/// the port. The node's answers come back to the gateway only when routing
/// sends them here (see the README's TProxy section). Fails when the option
/// is refused (no `CAP_NET_ADMIN`) or the families differ.
pub async fn connect_from(source: IpAddr, node: SocketAddr) -> io::Result<tokio::net::TcpStream> {
    if source.is_ipv4() != node.is_ipv4() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("transparent source {source} and node {node} are of different IP families"),
        ));
    }
    let (domain, option) = if source.is_ipv4() {
        (Domain::IPV4, "IP_TRANSPARENT")
    } else {
        (Domain::IPV6, "IPV6_TRANSPARENT")
    };
    let socket = Socket::new(domain, Type::STREAM, Some(Protocol::TCP))?;
    let set = if source.is_ipv4() {
        socket.set_ip_transparent_v4(true)
    } else {
        socket.set_ip_transparent_v6(true)
    };
    set.map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("tproxy source client: setting {option} needs CAP_NET_ADMIN: {e}"),
        )
    })?;
    socket.bind(&SocketAddr::new(source, 0).into())?;
    socket.set_nonblocking(true)?;
    let socket = tokio::net::TcpSocket::from_std_stream(socket.into());
    socket.connect(node).await
}

/// The nftables and `ip` commands that divert TCP traffic arriving on
/// `interface` (every interface when `None`) for any destination to a
/// transparent listener on `port`, for IPv4 and IPv6. Marked packets are
/// routed to the local host through table 100. Packets of connections the
/// gateway already holds on a transparent socket are marked on every
/// interface: the upstreams' answers to connections made from a client's
/// address (`tproxy.source: client`) come back that way.
pub fn setup_commands(port: u16, interface: Option<&str>) -> String {
    let iif = interface
        .map(|i| format!("iifname \"{i}\" "))
        .unwrap_or_default();
    format!(
        "# Divert TCP connections to ferrogate's transparent listener on port {port}.\n\
         # Run as root; nothing here is run by ferrogate itself.\n\
         nft add table inet ferrogate\n\
         nft add chain inet ferrogate divert '{{ type filter hook prerouting priority mangle; policy accept; }}'\n\
         nft add rule inet ferrogate divert meta l4proto tcp socket transparent 1 meta mark set 1 accept\n\
         nft add rule inet ferrogate divert {iif}meta nfproto ipv4 meta l4proto tcp tproxy ip to :{port} meta mark set 1 accept\n\
         nft add rule inet ferrogate divert {iif}meta nfproto ipv6 meta l4proto tcp tproxy ip6 to :{port} meta mark set 1 accept\n\
         ip rule add fwmark 1 lookup 100\n\
         ip route add local 0.0.0.0/0 dev lo table 100\n\
         ip -6 rule add fwmark 1 lookup 100\n\
         ip -6 route add local ::/0 dev lo table 100\n\
         # Upstreams with tproxy.source: client need their replies to client\n\
         # addresses routed back through this host (e.g. their default route).\n\
         # Then, in conf/config.yaml:\n\
         #   apisix:\n\
         #     node_listen:\n\
         #       - {{ip: \"::\", port: {port}, transparent: true}}\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_name_the_port_and_interface() {
        let text = setup_commands(15001, Some("eth1"));
        assert!(text.contains("tproxy ip to :15001"), "{text}");
        assert!(text.contains("tproxy ip6 to :15001"), "{text}");
        assert!(text.contains("iifname \"eth1\""), "{text}");
        assert!(text.contains("ip rule add fwmark 1 lookup 100"), "{text}");
        assert!(!setup_commands(80, None).contains("iifname"));
        // Answers to connections from a client's address come back on the
        // upstream side: that rule names no interface.
        assert!(
            text.contains("divert meta l4proto tcp socket transparent 1 meta mark set 1 accept")
        );
    }

    #[test]
    fn binds_when_allowed() {
        // Root (or CAP_NET_ADMIN) may set the option; others get an error
        // naming the capability.
        let addr: SocketAddr = "127.0.0.1:0".parse().unwrap_or_else(|_| unreachable!());
        match bind(addr) {
            Ok(l) => assert!(l.local_addr().is_ok()),
            Err(e) => assert!(e.to_string().contains("CAP_NET_ADMIN"), "{e}"),
        }
    }
}
