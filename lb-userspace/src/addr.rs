//! Conversions between std's addresses and the kernel's layouts.

use std::net::{IpAddr, Ipv6Addr, SocketAddr};

use lb_common::{Addr6, Endpoint, ServiceKey, proto};

/// Whether clients outside the node may reach it at `ip`: a unicast address that is not
/// loopback, link-local, unspecified, broadcast or IPv4-mapped. Node ports are served on
/// such addresses only, and only such external IPs are honoured.
pub fn is_outside_unicast(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(a) => {
            !(a.is_loopback()
                || a.is_link_local()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_broadcast())
        }
        IpAddr::V6(a) => {
            !(a.is_loopback()
                || a.is_unspecified()
                || a.is_multicast()
                || a.is_unicast_link_local()
                || a.to_ipv4_mapped().is_some())
        }
    }
}

/// The kernel form of an address: IPv4 v4-mapped.
pub fn to_addr6(ip: IpAddr) -> Addr6 {
    let v6 = match ip {
        IpAddr::V4(v4) => v4.to_ipv6_mapped(),
        IpAddr::V6(v6) => v6,
    };
    Addr6::from_octets(v6.octets())
}

/// The std form of a kernel address: v4-mapped addresses become IPv4.
pub fn to_ip(addr: Addr6) -> IpAddr {
    Ipv6Addr::from(addr.octets()).to_canonical()
}

/// The kernel form of an address and port.
pub fn to_endpoint(sa: SocketAddr) -> Endpoint {
    Endpoint::new(to_addr6(sa.ip()), sa.port().to_be())
}

/// The std form of a kernel endpoint (or backend's address and port).
pub fn to_socket_addr<E: Copy + Into<Endpoint>>(ep: &E) -> SocketAddr {
    let ep: Endpoint = (*ep).into();
    SocketAddr::new(to_ip(ep.addr), u16::from_be(ep.port_be))
}

/// A protocol's name as Kubernetes spells it, or its number.
pub fn protocol_name(proto: u8) -> String {
    match proto {
        proto::TCP => "TCP".into(),
        proto::UDP => "UDP".into(),
        other => other.to_string(),
    }
}

/// A frontend as `VIP:port/PROTO` (IPv6 in brackets).
pub fn frontend_string(key: &ServiceKey) -> String {
    let sa = SocketAddr::new(to_ip(key.addr), u16::from_be(key.port_be));
    format!("{sa}/{}", protocol_name(key.proto))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for s in ["10.96.0.10:53", "[fd00:96::a]:443"] {
            let sa: SocketAddr = s.parse().unwrap();
            assert_eq!(to_socket_addr(&to_endpoint(sa)), sa);
        }
    }

    #[test]
    fn ipv4_is_v4_mapped_with_network_order_port() {
        let ep = to_endpoint("10.0.0.1:8080".parse().unwrap());
        assert!(ep.addr.is_v4_mapped());
        assert_eq!(ep.addr.v4_be().to_ne_bytes(), [10, 0, 0, 1]);
        assert_eq!(ep.port_be.to_ne_bytes(), [0x1f, 0x90]);
    }

    #[test]
    fn frontend_strings() {
        let key = ServiceKey::new(
            to_addr6("fd00::1".parse().unwrap()),
            53u16.to_be(),
            proto::UDP,
        );
        assert_eq!(frontend_string(&key), "[fd00::1]:53/UDP");
    }
}
