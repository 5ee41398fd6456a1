//! Bounds-checked parsing of the headers the XDP and tc programs look at, in one place.
//!
//! What is not handled is passed on untouched, each kind counted where it matters: non-IP
//! frames and VLAN-tagged frames, protocols other than TCP and UDP, IPv4 packets with options,
//! IPv6 packets with extension headers, fragments, and truncated or inconsistent headers.

use lb_common::{Addr6, external::FlowKey, proto, stats as st};

/// Ethernet header length.
pub const ETH_LEN: usize = 14;
/// EtherType of IPv4.
pub const ETH_P_IP: u16 = 0x0800;
/// EtherType of IPv6.
pub const ETH_P_IPV6: u16 = 0x86dd;
/// IPv4 header length without options.
pub const IPV4_LEN: usize = 20;
/// IPv6 header length.
pub const IPV6_LEN: usize = 40;
/// ICMP and ICMPv6 header length (type, code, checksum, and 4 bytes that depend on them).
pub const ICMP_LEN: usize = 8;

/// A parsed TCP or UDP packet.
pub struct Pkt {
    /// IPv6 (else IPv4).
    pub v6: bool,
    /// The flow as the packet carries it.
    pub key: FlowKey,
    /// Bytes from the IP header on, for counters.
    pub len: u32,
    /// The TCP flags byte (FIN, SYN, RST, PSH, ACK, ...); zero for UDP.
    pub tcp_flags: u8,
}

impl Pkt {
    /// Offset of the L4 header: a constant per family, since packets with IPv4 options or
    /// IPv6 extension headers are not parsed. (Computed rather than stored, so the verifier
    /// sees a bounded offset wherever it is used.)
    #[inline(always)]
    pub fn l4(&self) -> usize {
        if self.v6 {
            ETH_LEN + IPV6_LEN
        } else {
            ETH_LEN + IPV4_LEN
        }
    }

    /// Offset of the L4 checksum field.
    #[inline(always)]
    pub fn check_off(&self) -> usize {
        self.l4() + if self.key.proto == proto::TCP { 16 } else { 6 }
    }
}

/// Why a frame is not parsed.
#[derive(Clone, Copy)]
pub enum Skip {
    /// Not something the programs translate (not IP, not TCP/UDP): pass, uncounted.
    Other,
    /// Pass, counted under this `lb_common::stats` index.
    Counted(u32),
}

const MALFORMED: Skip = Skip::Counted(st::XDP_PASS_MALFORMED);

/// A pointer to `T` at `off` in `[start, end)`, if it fits.
#[inline(always)]
pub fn at<T>(start: usize, end: usize, off: usize) -> Option<*mut T> {
    if start + off + core::mem::size_of::<T>() > end {
        return None;
    }
    Some((start + off) as *mut T)
}

/// The `T` at `off` in `[start, end)`, if it fits.
#[inline(always)]
pub fn read<T: Copy>(start: usize, end: usize, off: usize) -> Option<T> {
    // SAFETY: `at` checked the bounds; packet data may be unaligned.
    at::<T>(start, end, off).map(|p| unsafe { p.read_unaligned() })
}

/// Writes `v` at `off` in `[start, end)`, if it fits.
#[inline(always)]
pub fn write<T>(start: usize, end: usize, off: usize, v: T) -> Option<()> {
    // SAFETY: as in `read`.
    at::<T>(start, end, off).map(|p| unsafe { p.write_unaligned(v) })
}

/// Parses an Ethernet frame of `len` bytes whose first bytes are in `[start, end)`: all of
/// it in XDP, the linear part of an skb in tc (whose payload may sit in fragments; the
/// headers are pulled in first). Its own BPF function, so its temporaries are not on the
/// stack of the translation that follows.
#[inline(never)]
pub fn parse(start: usize, end: usize, len: usize) -> Result<Pkt, Skip> {
    let ethertype = u16::from_be(read::<u16>(start, end, 12).ok_or(Skip::Other)?);
    let (v6, l3) = match ethertype {
        ETH_P_IP => (false, ETH_LEN),
        ETH_P_IPV6 => (true, ETH_LEN),
        _ => return Err(Skip::Other),
    };
    let (saddr, daddr, nexthdr, l4, ip_len) = if v6 {
        let first = read::<u8>(start, end, l3).ok_or(MALFORMED)?;
        if first >> 4 != 6 {
            return Err(MALFORMED);
        }
        let payload = usize::from(u16::from_be(
            read::<u16>(start, end, l3 + 4).ok_or(MALFORMED)?,
        ));
        let nexthdr = read::<u8>(start, end, l3 + 6).ok_or(MALFORMED)?;
        let src = read::<[u32; 4]>(start, end, l3 + 8).ok_or(MALFORMED)?;
        let dst = read::<[u32; 4]>(start, end, l3 + 24).ok_or(MALFORMED)?;
        if l3 + IPV6_LEN + payload > len {
            return Err(MALFORMED);
        }
        // Never on the wire: such a packet must not reach an IPv4 frontend or flow.
        let (s6, d6) = (Addr6 { words: src }, Addr6 { words: dst });
        if s6.is_v4_mapped() || d6.is_v4_mapped() {
            return Err(Skip::Counted(st::XDP_PASS_V4_MAPPED));
        }
        match nexthdr {
            proto::TCP | proto::UDP => {}
            44 => return Err(Skip::Counted(st::XDP_PASS_FRAGMENT)),
            0 | 43 | 50 | 51 | 60 | 135 | 139 | 140 => {
                return Err(Skip::Counted(st::XDP_PASS_IP_OPTIONS));
            }
            _ => return Err(Skip::Other),
        }
        (
            Addr6 { words: src },
            Addr6 { words: dst },
            nexthdr,
            l3 + IPV6_LEN,
            IPV6_LEN + payload,
        )
    } else {
        let vihl = read::<u8>(start, end, l3).ok_or(MALFORMED)?;
        if vihl >> 4 != 4 || vihl & 0xf < 5 {
            return Err(MALFORMED);
        }
        let tot = usize::from(u16::from_be(
            read::<u16>(start, end, l3 + 2).ok_or(MALFORMED)?,
        ));
        let frag = u16::from_be(read::<u16>(start, end, l3 + 6).ok_or(MALFORMED)?);
        let nexthdr = read::<u8>(start, end, l3 + 9).ok_or(MALFORMED)?;
        let src = read::<u32>(start, end, l3 + 12).ok_or(MALFORMED)?;
        let dst = read::<u32>(start, end, l3 + 16).ok_or(MALFORMED)?;
        if tot < IPV4_LEN || l3 + tot > len {
            return Err(MALFORMED);
        }
        if nexthdr != proto::TCP && nexthdr != proto::UDP {
            return Err(Skip::Other);
        }
        // More fragments, or an offset: a fragment.
        if frag & 0x3fff != 0 {
            return Err(Skip::Counted(st::XDP_PASS_FRAGMENT));
        }
        if vihl & 0xf != 5 {
            return Err(Skip::Counted(st::XDP_PASS_IP_OPTIONS));
        }
        (
            Addr6::v4_mapped(src),
            Addr6::v4_mapped(dst),
            nexthdr,
            l3 + IPV4_LEN,
            tot,
        )
    };
    let l4_len = if nexthdr == proto::TCP { 20 } else { 8 };
    if ip_len < l4 - l3 + l4_len {
        return Err(MALFORMED);
    }
    let sport = read::<u16>(start, end, l4).ok_or(MALFORMED)?;
    let dport = read::<u16>(start, end, l4 + 2).ok_or(MALFORMED)?;
    // The whole L4 header must be there (the checksum field included).
    if start + l4 + l4_len > end {
        return Err(MALFORMED);
    }
    let tcp_flags = if nexthdr == proto::TCP {
        read::<u8>(start, end, l4 + 13).ok_or(MALFORMED)?
    } else {
        0
    };
    Ok(Pkt {
        v6,
        key: FlowKey::new(saddr, daddr, sport, dport, nexthdr),
        len: ip_len as u32,
        tcp_flags,
    })
}
