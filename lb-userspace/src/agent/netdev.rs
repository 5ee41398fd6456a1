//! The node's network devices and addresses, as the north-south datapath needs them: which
//! addresses serve node ports (kube-proxy's `--nodeport-addresses`), which devices run the
//! XDP program in `auto` mode, and which are overlays (by their driver, through the
//! `SIOCETHTOOL` ioctl, which answers for the caller's network namespace, where sysfs may
//! show another's). The choices are pure functions of what [`interfaces`] and
//! [`default_route_devices`] read from the kernel, so they are unit-tested without one.

use std::{
    collections::BTreeSet,
    fs, io,
    net::IpAddr,
    os::fd::{AsRawFd, FromRawFd},
    path::Path,
};

use ipnet::IpNet;

/// One address of one interface.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct IfAddr {
    /// The interface's name.
    pub ifname: String,
    /// The interface's index.
    pub ifindex: u32,
    /// The address.
    pub ip: IpAddr,
}

/// Whether a node port may be served on `ip`: an address outside clients reach the node at
/// ([`crate::addr::is_outside_unicast`]). Node ports on loopback (`127.0.0.1:<nodePort>`)
/// are not served, as in kube-proxy's nftables mode: its iptables mode serves them only by
/// turning on `route_localnet`, which lets the network reach the node's localhost services.
/// Link-local addresses are ambiguous across interfaces.
pub fn serves_node_ports(ip: &IpAddr) -> bool {
    crate::addr::is_outside_unicast(ip)
}

/// The addresses that serve node ports: every address of the node that may (see
/// [`serves_node_ports`]), inside one of `cidrs` when any are given. Sorted, without
/// duplicates.
pub fn nodeport_addresses(addrs: &[IfAddr], cidrs: &[IpNet]) -> Vec<IpAddr> {
    let set: BTreeSet<IpAddr> = addrs
        .iter()
        .map(|a| a.ip)
        .filter(serves_node_ports)
        .filter(|ip| cidrs.is_empty() || cidrs.iter().any(|c| c.contains(ip)))
        .collect();
    set.into_iter().collect()
}

/// The devices `auto` mode attaches XDP to: those holding one of the Node object's
/// addresses; without any (no Node object yet, or none of its addresses is local), those of
/// the default routes. Sorted by name, without duplicates.
pub fn auto_devices(
    addrs: &[IfAddr],
    node_ips: &[IpAddr],
    default_routes: &[String],
) -> Vec<String> {
    let by_node: BTreeSet<String> = addrs
        .iter()
        .filter(|a| node_ips.contains(&a.ip) && a.ifname != "lo")
        .map(|a| a.ifname.clone())
        .collect();
    if !by_node.is_empty() {
        return by_node.into_iter().collect();
    }
    let set: BTreeSet<String> = default_routes
        .iter()
        .filter(|d| d.as_str() != "lo")
        .cloned()
        .collect();
    set.into_iter().collect()
}

/// Every address of every interface that is up, in this network namespace.
pub fn interfaces() -> io::Result<Vec<IfAddr>> {
    use nix::net::if_::InterfaceFlags;
    let mut out = Vec::new();
    for ifa in nix::ifaddrs::getifaddrs().map_err(io::Error::from)? {
        if !ifa.flags.contains(InterfaceFlags::IFF_UP) {
            continue;
        }
        let Some(addr) = ifa.address else { continue };
        let ip = if let Some(v4) = addr.as_sockaddr_in() {
            IpAddr::V4(v4.ip())
        } else if let Some(v6) = addr.as_sockaddr_in6() {
            IpAddr::V6(v6.ip())
        } else {
            continue;
        };
        let ifindex = nix::net::if_::if_nametoindex(ifa.interface_name.as_str()).unwrap_or(0);
        out.push(IfAddr {
            ifname: ifa.interface_name,
            ifindex,
            ip,
        });
    }
    out.sort();
    out.dedup();
    Ok(out)
}

/// The index of the interface called `name`, if there is one.
pub fn ifindex(name: &str) -> Option<u32> {
    nix::net::if_::if_nametoindex(name).ok().filter(|i| *i != 0)
}

/// The devices of the IPv4 and IPv6 default routes (main table), from procfs.
pub fn default_route_devices() -> Vec<String> {
    let v4 = fs::read_to_string("/proc/net/route").unwrap_or_default();
    let v6 = fs::read_to_string("/proc/net/ipv6_route").unwrap_or_default();
    let mut devs = parse_route_v4(&v4);
    devs.extend(parse_route_v6(&v6));
    devs.sort();
    devs.dedup();
    devs
}

/// Default-route devices of `/proc/net/route` (columns: Iface Destination Gateway Flags ...
/// Mask ...; destination and mask in hex).
fn parse_route_v4(text: &str) -> Vec<String> {
    text.lines()
        .skip(1)
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() > 7 && cols[1] == "00000000" && cols[7] == "00000000")
                .then(|| cols[0].to_owned())
        })
        .collect()
}

/// Default-route devices of `/proc/net/ipv6_route` (columns: destination, prefix length, source,
/// its length, next hop, metric, refcount, use, flags, device).
fn parse_route_v6(text: &str) -> Vec<String> {
    const ZERO: &str = "00000000000000000000000000000000";
    text.lines()
        .filter_map(|line| {
            let cols: Vec<&str> = line.split_whitespace().collect();
            (cols.len() == 10 && cols[0] == ZERO && cols[1] == "00" && cols[9] != "lo")
                .then(|| cols[9].to_owned())
        })
        .collect()
}

/// Lets device `name` accept IPv4 packets whose source is an address of this node
/// (`net.ipv4.conf.<name>.accept_local`, under `proc_sys_net`, the node's `/proc/sys/net`).
/// The XDP program hands a packet it SNATed to the node's address to the stack when the next
/// hop's MAC is not resolved yet; without this, the stack drops it as a martian.
pub fn accept_local(proc_sys_net: &Path, name: &str) -> io::Result<()> {
    let path = proc_sys_net.join(format!("ipv4/conf/{name}/accept_local"));
    fs::write(&path, "1").map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))
}

/// Whether strict reverse-path filtering applies to IPv4 packets arriving on device `name`
/// (`rp_filter` 1: the larger of the device's and `all`'s). The stack then drops the SNATed
/// packets XDP hands it (into an overlay, or before the next hop's MAC is known), whose
/// source is a node address; loose filtering (2) lets them through.
pub fn strict_rp_filter(name: &str) -> bool {
    let read = |conf: &str| {
        fs::read_to_string(format!("/proc/sys/net/ipv4/conf/{conf}/rp_filter"))
            .ok()
            .and_then(|v| v.trim().parse::<u8>().ok())
            .unwrap_or(0)
    };
    read("all").max(read(name)) == 1
}

/// Drivers of overlay devices whose frames are Ethernet: what `--overlay-devices auto`
/// attaches to.
const OVERLAY_DRIVERS: [&str; 2] = ["vxlan", "geneve"];

/// `ARPHRD_ETHER`: the hardware type of Ethernet devices (VXLAN and Geneve ones included).
pub const ARPHRD_ETHER: u16 = 1;

/// The overlay devices of this network namespace, by name: those whose driver is one of
/// [`OVERLAY_DRIVERS`].
pub fn overlay_devices() -> Vec<String> {
    let Ok(all) = nix::net::if_::if_nameindex() else {
        return Vec::new();
    };
    let mut out: Vec<String> = all
        .iter()
        .filter_map(|i| i.name().to_str().ok().map(str::to_owned))
        .filter(|name| driver(name).is_some_and(|d| OVERLAY_DRIVERS.contains(&d.as_str())))
        .collect();
    out.sort();
    out
}

/// An `ifreq` as the two ioctls below use it: the name, then a union of at most 24 bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    data: [u8; 24],
}

/// Runs ioctl `request` on device `name` with `data` (the union's first bytes, or a pointer
/// to them) through a datagram socket of this network namespace.
fn ifreq_ioctl(name: &str, request: libc::c_ulong, data: [u8; 24]) -> io::Result<IfReq> {
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        data,
    };
    let bytes = name.as_bytes();
    if bytes.len() >= libc::IFNAMSIZ {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    req.name[..bytes.len()].copy_from_slice(bytes);
    // SAFETY: plain socket and ioctl calls on a struct laid out as the kernel's ifreq; the
    // descriptor is owned and closed on return.
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let fd = std::os::fd::OwnedFd::from_raw_fd(fd);
        if libc::ioctl(fd.as_raw_fd(), request as _, &mut req) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(req)
}

/// The hardware type (`ARPHRD_*`) of device `name`: [`ARPHRD_ETHER`] for Ethernet, VXLAN
/// and Geneve; others for L3 devices (WireGuard, IPIP).
pub fn hardware_type(name: &str) -> Option<u16> {
    let req = ifreq_ioctl(name, libc::SIOCGIFHWADDR, [0; 24]).ok()?;
    // The union holds a struct sockaddr whose family is the hardware type.
    Some(u16::from_ne_bytes([req.data[0], req.data[1]]))
}

/// The driver of device `name`, as `ethtool -i` reports it (`vxlan`, `geneve`, `veth`...).
pub fn driver(name: &str) -> Option<String> {
    /// `ETHTOOL_GDRVINFO`.
    const GDRVINFO: u32 = 3;
    // struct ethtool_drvinfo: cmd, then driver[32] and the rest.
    let mut info = [0u8; 196];
    info[..4].copy_from_slice(&GDRVINFO.to_ne_bytes());
    let mut data = [0u8; 24];
    data[..8].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    ifreq_ioctl(name, libc::SIOCETHTOOL, data).ok()?;
    let driver = &info[4..36];
    let len = driver.iter().position(|b| *b == 0).unwrap_or(driver.len());
    std::str::from_utf8(&driver[..len]).ok().map(str::to_owned)
}

/// The kernel's `ip_local_port_range` (ephemeral ports of local sockets), if readable.
pub fn local_port_range() -> Option<(u16, u16)> {
    let text = fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range").ok()?;
    let mut it = text.split_whitespace().map(str::parse::<u16>);
    Some((it.next()?.ok()?, it.next()?.ok()?))
}

/// Whether two inclusive port ranges overlap.
pub fn overlaps(a: (u16, u16), b: (u16, u16)) -> bool {
    a.0 <= b.1 && b.0 <= a.1
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(ifname: &str, ip: &str) -> IfAddr {
        IfAddr {
            ifname: ifname.into(),
            ifindex: 1,
            ip: ip.parse().unwrap(),
        }
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    #[test]
    fn node_ports_are_served_on_global_unicast_addresses_only() {
        let addrs = [
            a("lo", "127.0.0.1"),
            a("lo", "::1"),
            a("eth0", "192.0.2.10"),
            a("eth0", "fe80::1"),
            a("eth0", "2001:db8::10"),
            a("eth1", "169.254.1.1"),
            a("eth1", "10.1.0.5"),
        ];
        assert_eq!(
            nodeport_addresses(&addrs, &[]),
            ips(&["10.1.0.5", "192.0.2.10", "2001:db8::10"])
        );
        let cidrs: Vec<IpNet> = vec!["192.0.2.0/24".parse().unwrap()];
        assert_eq!(nodeport_addresses(&addrs, &cidrs), ips(&["192.0.2.10"]));
        let none: Vec<IpNet> = vec!["198.51.100.0/24".parse().unwrap()];
        assert!(nodeport_addresses(&addrs, &none).is_empty());
    }

    #[test]
    fn auto_devices_prefer_the_node_objects_addresses() {
        let addrs = [
            a("eth0", "192.0.2.10"),
            a("eth1", "10.1.0.5"),
            a("lo", "127.0.0.1"),
        ];
        let routes = vec!["eth0".to_string()];
        assert_eq!(auto_devices(&addrs, &ips(&["10.1.0.5"]), &routes), ["eth1"]);
        assert_eq!(
            auto_devices(&addrs, &ips(&["10.1.0.5", "192.0.2.10"]), &routes),
            ["eth0", "eth1"]
        );
        // No Node object, or none of its addresses here: the default routes' devices.
        assert_eq!(auto_devices(&addrs, &[], &routes), ["eth0"]);
        assert_eq!(
            auto_devices(&addrs, &ips(&["203.0.113.1"]), &routes),
            ["eth0"]
        );
        assert!(auto_devices(&addrs, &[], &[]).is_empty());
    }

    #[test]
    fn default_routes_are_read_from_procfs_tables() {
        let v4 = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
                  eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
                  eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
                  eth1\t00000000\t0101A8C0\t0003\t0\t0\t0\t00000080\t0\t0\t0\n";
        assert_eq!(parse_route_v4(v4), ["eth0"]);
        let v6 = "00000000000000000000000000000000 00 00000000000000000000000000000000 00 fe800000000000000000000000000001 00000400 00000001 00000000 00000003 eth2\n\
                  20010db8000000000000000000000000 40 00000000000000000000000000000000 00 00000000000000000000000000000000 00000100 00000001 00000000 00000001 eth2\n\
                  00000000000000000000000000000000 00 00000000000000000000000000000000 00 00000000000000000000000000000000 ffffffff 00000001 00000000 00200200 lo\n";
        assert_eq!(parse_route_v6(v6), ["eth2"]);
    }

    #[test]
    fn port_ranges_overlap_when_they_share_a_port() {
        assert!(overlaps((32768, 60999), (60000, 65535)));
        assert!(!overlaps((32768, 60999), (61000, 65535)));
        assert!(overlaps((61000, 61000), (61000, 65535)));
    }
}
