//! Ethernet/IPv4/IPv6 TCP and UDP frames for BPF_PROG_TEST_RUN (`lbctl explain` and the
//! tests): built with correct checksums, and parsed back with every checksum verified. The
//! checksums are computed here, from the whole packet, independently of the incremental
//! updates the kernel programs make.

use std::net::{IpAddr, SocketAddr};

use bytes::BufMut;

/// TCP.
pub const TCP: u8 = 6;
/// UDP.
pub const UDP: u8 = 17;

/// Source MAC of built frames.
pub const CLIENT_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0xc1];
/// Destination MAC of built frames.
pub const NODE_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 0x01];

/// The one's-complement sum of `data` (as 16-bit big-endian words) added to `sum`.
fn sum16(data: &[u8], mut sum: u32) -> u32 {
    let mut chunks = data.chunks_exact(2);
    for c in &mut chunks {
        sum += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        sum += u32::from(*last) << 8;
    }
    sum
}

fn fold(mut sum: u32) -> u16 {
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

fn pseudo_sum(src: IpAddr, dst: IpAddr, proto: u8, len: usize) -> u32 {
    let mut p = Vec::new();
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            p.put_slice(&s.octets());
            p.put_slice(&d.octets());
            p.put_u16(u16::from(proto));
            p.put_u16(len as u16);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            p.put_slice(&s.octets());
            p.put_slice(&d.octets());
            p.put_u32(len as u32);
            p.put_u32(u32::from(proto));
        }
        _ => panic!("mixed families"),
    }
    sum16(&p, 0)
}

/// TCP flags for [`tcp_frame`], as the kernel programs' conntrack reads them.
pub use lb_common::external::{TCP_ACK as ACK, TCP_FIN as FIN, TCP_RST as RST, TCP_SYN as SYN};

/// A TCP SYN (or a UDP datagram) from `src` to `dst` with `payload`, in an Ethernet frame.
pub fn frame(proto: u8, src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
    build(proto, src, dst, SYN, payload)
}

/// A TCP segment with `flags` (e.g. `ACK | FIN`) from `src` to `dst`, in an Ethernet frame.
pub fn tcp_frame(src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
    build(TCP, src, dst, flags, payload)
}

fn build(proto: u8, src: SocketAddr, dst: SocketAddr, flags: u8, payload: &[u8]) -> Vec<u8> {
    let mut l4 = Vec::new();
    l4.put_u16(src.port());
    l4.put_u16(dst.port());
    if proto == TCP {
        l4.put_u32(1000); // seq
        l4.put_u32(u32::from(flags & ACK != 0)); // ack
        l4.put_slice(&[5 << 4, flags]); // data offset 5, flags
        l4.put_u16(64240); // window
        l4.put_u32(0); // checksum, urgent pointer
    } else {
        l4.put_u16((8 + payload.len()) as u16);
        l4.put_u16(0); // checksum
    }
    l4.put_slice(payload);
    let check_at = if proto == TCP { 16 } else { 6 };
    let mut c = fold(sum16(&l4, pseudo_sum(src.ip(), dst.ip(), proto, l4.len())));
    if proto == UDP && c == 0 {
        c = 0xffff;
    }
    l4[check_at..check_at + 2].copy_from_slice(&c.to_be_bytes());
    ip_frame((src.ip(), dst.ip()), proto, &l4)
}

/// An Ethernet frame (to the node's MAC, from the client's) carrying an IP packet from
/// `src` to `dst` of protocol `proto` with `payload` (IPv4: "don't fragment", the header
/// checksum computed).
fn ip_frame((src, dst): (IpAddr, IpAddr), proto: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.put_slice(&NODE_MAC);
    f.put_slice(&CLIENT_MAC);
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            f.put_u16(0x0800);
            let mut ip = Vec::with_capacity(20);
            ip.put_slice(&[0x45, 0]);
            ip.put_u16((20 + payload.len()) as u16);
            ip.put_u16(0x1234); // id
            ip.put_u16(0x4000); // don't fragment
            ip.put_slice(&[64, proto]);
            ip.put_u16(0); // checksum, below
            ip.put_slice(&s.octets());
            ip.put_slice(&d.octets());
            let c = fold(sum16(&ip, 0));
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            f.put_slice(&ip);
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            f.put_u16(0x86dd);
            f.put_u32(0x6000_0000); // version 6, no class or flow label
            f.put_u16(payload.len() as u16);
            f.put_slice(&[proto, 64]);
            f.put_slice(&s.octets());
            f.put_slice(&d.octets());
        }
        _ => panic!("mixed families"),
    }
    f.put_slice(payload);
    f
}

/// A parsed frame whose checksums were all verified.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Parsed {
    /// Destination MAC.
    pub dmac: [u8; 6],
    /// Source MAC.
    pub smac: [u8; 6],
    /// Protocol.
    pub proto: u8,
    /// Source address and port.
    pub src: SocketAddr,
    /// Destination address and port.
    pub dst: SocketAddr,
    /// The L4 payload.
    pub payload: Vec<u8>,
}

/// The layout of a plain TCP or UDP packet in a frame: no IPv4 options, no IPv6 extension
/// headers, not a fragment, lengths consistent with the frame (trailing bytes allowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Layout {
    /// Source address.
    pub src: IpAddr,
    /// Destination address.
    pub dst: IpAddr,
    /// Protocol.
    pub proto: u8,
    /// Where the L4 header starts.
    pub l4: usize,
    /// Where the L4 data (header and payload) ends, by the IP length.
    pub end: usize,
}

/// The layout of `f` if it is a plain TCP or UDP packet (see [`Layout`]), else `None`; never
/// panics, whatever the bytes.
pub fn layout(f: &[u8]) -> Option<Layout> {
    let ethertype = u16::from_be_bytes([*f.get(12)?, *f.get(13)?]);
    let (src, dst, proto, l4, end) = match ethertype {
        0x0800 => {
            let ip = f.get(L3..L3 + 20)?;
            if ip[0] != 0x45 {
                return None;
            }
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            if frag & 0x3fff != 0 {
                return None;
            }
            let tot = usize::from(u16::from_be_bytes([ip[2], ip[3]]));
            let s: [u8; 4] = ip[12..16].try_into().ok()?;
            let d: [u8; 4] = ip[16..20].try_into().ok()?;
            (IpAddr::from(s), IpAddr::from(d), ip[9], L3 + 20, L3 + tot)
        }
        0x86dd => {
            let ip = f.get(L3..L3 + 40)?;
            if ip[0] >> 4 != 6 {
                return None;
            }
            let len = usize::from(u16::from_be_bytes([ip[4], ip[5]]));
            let s: [u8; 16] = ip[8..24].try_into().ok()?;
            let d: [u8; 16] = ip[24..40].try_into().ok()?;
            (
                IpAddr::from(s),
                IpAddr::from(d),
                ip[6],
                L3 + 40,
                L3 + 40 + len,
            )
        }
        _ => return None,
    };
    let header = match proto {
        TCP => 20,
        UDP => 8,
        _ => return None,
    };
    if end > f.len() || end < l4 + header {
        return None;
    }
    Some(Layout {
        src,
        dst,
        proto,
        l4,
        end,
    })
}

/// Whether the IPv4 header checksum (if any) and the L4 checksum of a plain packet are valid.
fn checksums_ok(f: &[u8], l: &Layout) -> bool {
    if l.src.is_ipv4() && fold(sum16(&f[L3..L3 + 20], 0)) != 0 {
        return false;
    }
    let data = &f[l.l4..l.end];
    fold(sum16(data, pseudo_sum(l.src, l.dst, l.proto, data.len()))) == 0
}

/// Recomputes the IPv4 header and L4 checksums of a plain packet (after editing it); other
/// frames are left as they are.
pub fn fix_checksums(f: &mut [u8]) {
    let Some(l) = layout(f) else { return };
    if l.src.is_ipv4() {
        fix_ipv4_checksum(f);
    }
    let at = l.l4 + if l.proto == TCP { 16 } else { 6 };
    f[at..at + 2].copy_from_slice(&[0, 0]);
    let data = &f[l.l4..l.end];
    let mut c = fold(sum16(data, pseudo_sum(l.src, l.dst, l.proto, data.len())));
    if l.proto == UDP && c == 0 {
        c = 0xffff;
    }
    f[at..at + 2].copy_from_slice(&c.to_be_bytes());
}

/// Parses a plain TCP or UDP frame (see [`layout`]), verifying the IPv4 header checksum and
/// the TCP or UDP checksum (over the pseudo-header) from scratch.
pub fn parse(f: &[u8]) -> Result<Parsed, String> {
    let l = layout(f).ok_or_else(|| format!("not a plain TCP or UDP frame: {f:02x?}"))?;
    if !checksums_ok(f, &l) {
        return Err(format!(
            "bad checksum ({}) from {} to {}",
            l.proto, l.src, l.dst
        ));
    }
    let l4 = &f[l.l4..l.end];
    let mac = |o: usize| -> [u8; 6] { f[o..o + 6].try_into().expect("6 bytes") };
    let port = |o: usize| u16::from_be_bytes([l4[o], l4[o + 1]]);
    let header = if l.proto == TCP {
        usize::from(l4[12] >> 4) * 4
    } else {
        8
    }
    .clamp(8, l4.len());
    Ok(Parsed {
        dmac: mac(0),
        smac: mac(6),
        proto: l.proto,
        src: SocketAddr::new(l.src, port(0)),
        dst: SocketAddr::new(l.dst, port(2)),
        payload: l4[header..].to_vec(),
    })
}

/// An ICMP (IPv4) or ICMPv6 error from `src` to `dst` of type `kind` and `code`, with
/// `rest` (the 4 bytes after the checksum: the next-hop MTU of a "fragmentation needed",
/// the MTU of a "packet too big") and `quoted` (the packet it answers, IP header first), in
/// an Ethernet frame with valid checksums.
pub fn icmp_error(
    (src, dst): (IpAddr, IpAddr),
    (kind, code): (u8, u8),
    rest: [u8; 4],
    quoted: &[u8],
) -> Vec<u8> {
    let mut body = vec![kind, code, 0, 0];
    body.extend(rest);
    body.extend(quoted);
    let seed = if src.is_ipv6() {
        pseudo_sum(src, dst, 58, body.len())
    } else {
        0
    };
    let c = fold(sum16(&body, seed));
    body[2..4].copy_from_slice(&c.to_be_bytes());
    ip_frame((src, dst), if src.is_ipv6() { 58 } else { 1 }, &body)
}

/// An ICMP or ICMPv6 error message, as [`parse_icmp_error`] reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IcmpError {
    /// Destination MAC address.
    pub dmac: [u8; 6],
    /// Source MAC address.
    pub smac: [u8; 6],
    /// Who sent it.
    pub src: IpAddr,
    /// To whom.
    pub dst: IpAddr,
    /// ICMP type (3: destination unreachable) or ICMPv6 type (1: the same).
    pub kind: u8,
    /// Its code (IPv4 3, IPv6 4: port unreachable).
    pub code: u8,
    /// The 4 bytes after the checksum (an MTU, for "fragmentation needed" and "packet too
    /// big").
    pub rest: [u8; 4],
    /// The quoted part of the packet it answers (its IP header first).
    pub quoted: Vec<u8>,
}

/// Parses an Ethernet frame carrying an ICMP (IPv4, no options) or ICMPv6 (no extension
/// headers) error, verifying the IPv4 header checksum and the ICMP checksum (over the
/// pseudo-header for ICMPv6) from scratch.
pub fn parse_icmp_error(f: &[u8]) -> Result<IcmpError, String> {
    let short = || format!("not an ICMP error frame: {f:02x?}");
    if f.len() < L3 + 20 {
        return Err(short());
    }
    let (src, dst, body) = match u16::from_be_bytes([f[12], f[13]]) {
        0x0800 if f[L3] == 0x45 && f[L3 + 9] == 1 => {
            let total = usize::from(u16::from_be_bytes([f[L3 + 2], f[L3 + 3]]));
            if fold(sum16(&f[L3..L3 + 20], 0)) != 0 || f.len() < L3 + total {
                return Err(format!("bad IPv4 header: {f:02x?}"));
            }
            let ip = |o: usize| IpAddr::from(<[u8; 4]>::try_from(&f[o..o + 4]).expect("4"));
            (ip(L3 + 12), ip(L3 + 16), &f[L3 + 20..L3 + total])
        }
        0x86dd if f.len() >= L3 + 40 && f[L3] >> 4 == 6 && f[L3 + 6] == 58 => {
            let payload = usize::from(u16::from_be_bytes([f[L3 + 4], f[L3 + 5]]));
            if f.len() < L3 + 40 + payload {
                return Err(short());
            }
            let ip = |o: usize| IpAddr::from(<[u8; 16]>::try_from(&f[o..o + 16]).expect("16"));
            (ip(L3 + 8), ip(L3 + 24), &f[L3 + 40..L3 + 40 + payload])
        }
        _ => return Err(short()),
    };
    if body.len() < 8 {
        return Err(short());
    }
    let seed = if src.is_ipv6() {
        pseudo_sum(src, dst, 58, body.len())
    } else {
        0
    };
    if fold(sum16(body, seed)) != 0 {
        return Err(format!("bad ICMP checksum from {src} to {dst}"));
    }
    let mac = |o: usize| -> [u8; 6] { f[o..o + 6].try_into().expect("6 bytes") };
    Ok(IcmpError {
        dmac: mac(0),
        smac: mac(6),
        src,
        dst,
        kind: body[0],
        code: body[1],
        rest: body[4..8].try_into().expect("4 bytes"),
        quoted: body[8..].to_vec(),
    })
}

/// Offset of the IP header in frames.
pub const L3: usize = 14;

/// The frame as an IPv4 fragment (more fragments set).
pub fn as_fragment(mut f: Vec<u8>) -> Vec<u8> {
    f[L3 + 6] |= 0x20;
    fix_ipv4_checksum(&mut f);
    f
}

/// The IPv4 frame with 4 bytes of IP options (a no-op and end-of-list padding).
pub fn with_ipv4_options(f: Vec<u8>) -> Vec<u8> {
    let mut out = f[..L3 + 20].to_vec();
    out[L3] = 0x46;
    let tot = u16::from_be_bytes([out[L3 + 2], out[L3 + 3]]) + 4;
    out[L3 + 2..L3 + 4].copy_from_slice(&tot.to_be_bytes());
    out.extend([1, 1, 1, 0]);
    out.extend(&f[L3 + 20..]);
    fix_ipv4_checksum(&mut out);
    out
}

/// The IPv6 frame with an (empty) hop-by-hop options header before its TCP or UDP header.
pub fn with_ipv6_hop_by_hop(f: Vec<u8>) -> Vec<u8> {
    let mut out = f[..L3 + 40].to_vec();
    let next = out[L3 + 6];
    out[L3 + 6] = 0;
    let len = u16::from_be_bytes([out[L3 + 4], out[L3 + 5]]) + 8;
    out[L3 + 4..L3 + 6].copy_from_slice(&len.to_be_bytes());
    out.extend([next, 0, 1, 4, 0, 0, 0, 0]); // PadN of 4 bytes
    out.extend(&f[L3 + 40..]);
    out
}

/// Recomputes the IPv4 header checksum of a frame (after editing the header).
pub fn fix_ipv4_checksum(f: &mut [u8]) {
    let ihl = usize::from(f[L3] & 0xf) * 4;
    f[L3 + 10..L3 + 12].copy_from_slice(&[0, 0]);
    let c = fold(sum16(&f[L3..L3 + ihl], 0));
    f[L3 + 10..L3 + 12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn icmp_errors_parse_only_with_valid_checksums() {
        let quoted = &frame(
            TCP,
            "203.0.113.7:40000".parse().unwrap(),
            "192.0.2.1:80".parse().unwrap(),
            b"",
        )[L3..L3 + 28];
        let mut f = vec![0u8; 12];
        f.extend([0x08, 0x00, 0x45, 0, 0, 56, 0, 0, 0, 0, 64, 1, 0, 0]);
        f.extend([192, 0, 2, 1, 203, 0, 113, 7]);
        f.extend([3, 3, 0, 0, 0, 0, 0, 0]);
        f.extend(quoted);
        fix_ipv4_checksum(&mut f);
        let c = fold(sum16(&f[L3 + 20..], 0));
        f[L3 + 22..L3 + 24].copy_from_slice(&c.to_be_bytes());
        let e = parse_icmp_error(&f).unwrap();
        assert_eq!((e.kind, e.code, &e.quoted[..]), (3, 3, quoted));
        assert_eq!(e.src.to_string(), "192.0.2.1");
        for at in [L3 + 12, L3 + 30] {
            let mut bad = f.clone();
            bad[at] ^= 1;
            assert!(parse_icmp_error(&bad).is_err(), "byte {at} changed");
        }
    }

    #[test]
    fn built_frames_parse_with_valid_checksums() {
        for (proto, s, d) in [
            (TCP, "203.0.113.7:40000", "192.0.2.1:30080"),
            (UDP, "203.0.113.7:40000", "192.0.2.1:30053"),
            (TCP, "[2001:db8:9::7]:40000", "[2001:db8:1::1]:30080"),
            (UDP, "[2001:db8:9::7]:40000", "[2001:db8:1::1]:30053"),
        ] {
            let f = frame(proto, s.parse().unwrap(), d.parse().unwrap(), b"hello");
            let p = parse(&f).unwrap();
            assert_eq!(
                (p.src, p.dst, p.proto),
                (s.parse().unwrap(), d.parse().unwrap(), proto)
            );
            assert_eq!(p.payload, b"hello");
            // One flipped bit anywhere in the addresses or ports is caught.
            let mut bad = f.clone();
            let at = if s.contains('[') { L3 + 8 } else { L3 + 12 };
            bad[at] ^= 1;
            assert!(parse(&bad).is_err(), "{s}");
            fix_checksums(&mut bad);
            assert!(parse(&bad).is_ok(), "{s}: fixed");
            // Any prefix is rejected without a panic.
            for n in 0..f.len() {
                assert!(parse(&f[..n]).is_err(), "{s}: {n} bytes");
            }
        }
        let f = frame(
            TCP,
            "203.0.113.7:1".parse().unwrap(),
            "192.0.2.1:2".parse().unwrap(),
            b"",
        );
        assert!(layout(&as_fragment(f.clone())).is_none());
        assert!(layout(&with_ipv4_options(f)).is_none());
        let f6 = frame(
            UDP,
            "[2001:db8::1]:1".parse().unwrap(),
            "[2001:db8::2]:2".parse().unwrap(),
            b"",
        );
        assert!(layout(&with_ipv6_hop_by_hop(f6)).is_none());
    }
}
