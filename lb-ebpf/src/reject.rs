//! ICMP errors the node answers with in place of a packet:
//! - a new flow for a Cluster-policy frontend with no backend gets a port unreachable
//!   (ICMPv6 for IPv6) back to the client, as kube-proxy's REJECT rule sends, so a TCP
//!   connect fails at once with ECONNREFUSED and a connected UDP socket learns it, rather
//!   than waiting out a silent drop;
//! - a packet too big for the route it is translated onto (IPv4 with "don't fragment",
//!   any IPv6) gets a "fragmentation needed" or "packet too big" with the route's MTU back
//!   to its sender, about the packet as the sender sent it, as a router would: the stack
//!   cannot do it for a packet already translated (it would answer the SNAT address, its
//!   own).
//!
//! The packet is turned into the answer in place: the head grows by the new IP and ICMP
//! headers, which land just before the original IP header; the tail is cut after the first
//! 8 bytes of the original L4 header (RFC 792 quotes the IP header and 64 bits; RFC 4443
//! allows less than the whole packet). It leaves by the device it came in on (`XDP_TX`),
//! to the MAC address it came from.

use aya_ebpf::{
    bindings::xdp_action,
    helpers::generated::{bpf_csum_diff, bpf_xdp_adjust_head, bpf_xdp_adjust_tail},
    programs::XdpContext,
};

use crate::pkt::{ETH_LEN, ICMP_LEN, IPV4_LEN, IPV6_LEN, read};

/// Bytes of the original L4 header quoted after its IP header: its ports (and TCP sequence
/// number), all a stack needs to find the socket.
const QUOTED_L4: usize = 8;
const HOP_LIMIT: u8 = 64;

/// Turns the packet (IPv6 when `v6`) into an ICMP port unreachable to its source: `XDP_TX`,
/// or `XDP_DROP` if the packet could not be reshaped.
#[inline(always)]
pub fn port_unreachable(ctx: &XdpContext, v6: bool) -> u32 {
    // IPv4 destination unreachable / port unreachable; ICMPv6 the same (1, 4).
    error(ctx, v6, if v6 { 0x0104 } else { 0x0303 }, 0)
}

/// Turns the packet into a "fragmentation needed" (IPv4) or "packet too big" (IPv6) to its
/// source, with `mtu`: as [`port_unreachable`].
#[inline(always)]
pub fn too_big(ctx: &XdpContext, v6: bool, mtu: u16) -> u32 {
    // IPv4: destination unreachable / fragmentation needed, the next-hop MTU in the low 16
    // bits; ICMPv6 packet too big (2, 0), the MTU in all 32.
    error(ctx, v6, if v6 { 0x0200 } else { 0x0304 }, u32::from(mtu))
}

/// Whether an IPv4 packet may be fragmented on the way (its "don't fragment" bit clear);
/// IPv6 packets never are.
#[inline(always)]
pub fn may_fragment(ctx: &XdpContext, v6: bool) -> bool {
    !v6 && read::<u16>(ctx.data(), ctx.data_end(), ETH_LEN + 6)
        .is_some_and(|frag| u16::from_be(frag) & 0x4000 == 0)
}

/// Turns the packet into an ICMP error of `type_code` (type in the high byte) and `rest`
/// (the 4 bytes after the checksum, host order) to its source. Its own BPF function.
#[inline(never)]
fn error(ctx: &XdpContext, v6: bool, type_code: u16, rest: u32) -> u32 {
    let built = if v6 {
        build_v6(ctx, type_code, rest)
    } else {
        build_v4(ctx, type_code, rest)
    };
    if built.is_some() {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_DROP
    }
}

/// Grows the head by `grow` bytes and cuts the packet to `out` bytes: the new start.
#[inline(always)]
fn reshape(ctx: &XdpContext, grow: usize, out: usize) -> Option<*mut u8> {
    // SAFETY: helper calls on this program's context; the pointers are read again after.
    unsafe {
        if bpf_xdp_adjust_head(ctx.ctx, -(grow as i32)) != 0 {
            return None;
        }
        let len = ctx.data_end() - ctx.data();
        if len < out || bpf_xdp_adjust_tail(ctx.ctx, out as i32 - len as i32) != 0 {
            return None;
        }
    }
    let (start, end) = (ctx.data(), ctx.data_end());
    if start + out > end {
        return None;
    }
    Some(start as *mut u8)
}

/// Writes the Ethernet header at `p` from the original one at `orig`: the MAC addresses
/// swapped, the same EtherType. The two do not overlap.
///
/// # Safety
/// `p` and `orig` point at 14 bytes each inside the packet.
#[inline(always)]
unsafe fn reply_eth(p: *mut u8, orig: *const u8) {
    // SAFETY: as the caller promises.
    unsafe {
        core::ptr::copy_nonoverlapping(orig.add(6), p, 6);
        core::ptr::copy_nonoverlapping(orig, p.add(6), 6);
        core::ptr::copy_nonoverlapping(orig.add(12), p.add(12), 2);
    }
}

/// The Internet checksum of the `len` bytes at `p` (a multiple of 4), added to `seed` (a
/// 32-bit partial sum), as it lies in memory.
///
/// # Safety
/// `p` points at `len` bytes inside the packet.
#[inline(always)]
unsafe fn checksum(p: *mut u8, len: u32, seed: u32) -> u16 {
    // SAFETY: as the caller promises; the helper only reads.
    let sum = unsafe { bpf_csum_diff(core::ptr::null_mut(), 0, p.cast(), len, seed) } as u64;
    let sum = (sum & 0xffff_ffff) + (sum >> 32);
    let sum = (sum & 0xffff) + (sum >> 16);
    let sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

fn build_v4(ctx: &XdpContext, type_code: u16, rest: u32) -> Option<()> {
    const GROW: usize = IPV4_LEN + ICMP_LEN;
    const OUT: usize = ETH_LEN + GROW + IPV4_LEN + QUOTED_L4;
    let p = reshape(ctx, GROW, OUT)?;
    // SAFETY: `reshape` checked that OUT bytes lie from `p` on; every offset is below OUT.
    // The original frame starts at GROW; the new headers overwrite its Ethernet header
    // only after it was read.
    unsafe {
        reply_eth(p, p.add(GROW));
        let orig_ip = p.add(GROW + ETH_LEN);
        let ip = p.add(ETH_LEN);
        let (src, dst) = (
            core::ptr::read_unaligned(orig_ip.add(16).cast::<u32>()),
            core::ptr::read_unaligned(orig_ip.add(12).cast::<u32>()),
        );
        let header: [u8; 12] = [
            0x45,
            0,
            0,
            (OUT - ETH_LEN) as u8,
            0,
            0,
            0,
            0,
            HOP_LIMIT,
            1, // ICMP
            0,
            0,
        ];
        core::ptr::copy_nonoverlapping(header.as_ptr(), ip, header.len());
        core::ptr::write_unaligned(ip.add(12).cast::<u32>(), src);
        core::ptr::write_unaligned(ip.add(16).cast::<u32>(), dst);
        let icmp = ip.add(IPV4_LEN);
        // Type and code; the checksum zero for now; the rest.
        core::ptr::write_unaligned(icmp.cast::<u32>(), (u32::from(type_code) << 16).to_be());
        core::ptr::write_unaligned(icmp.add(4).cast::<u32>(), rest.to_be());
        let ip_check = checksum(ip, IPV4_LEN as u32, 0);
        core::ptr::write_unaligned(ip.add(10).cast::<u16>(), ip_check);
        let icmp_check = checksum(icmp, (ICMP_LEN + IPV4_LEN + QUOTED_L4) as u32, 0);
        core::ptr::write_unaligned(icmp.add(2).cast::<u16>(), icmp_check);
    }
    Some(())
}

fn build_v6(ctx: &XdpContext, type_code: u16, rest: u32) -> Option<()> {
    const GROW: usize = IPV6_LEN + ICMP_LEN;
    const OUT: usize = ETH_LEN + GROW + IPV6_LEN + QUOTED_L4;
    const PAYLOAD: usize = ICMP_LEN + IPV6_LEN + QUOTED_L4;
    let p = reshape(ctx, GROW, OUT)?;
    // SAFETY: as in `build_v4`.
    unsafe {
        reply_eth(p, p.add(GROW));
        let orig_ip = p.add(GROW + ETH_LEN);
        let ip = p.add(ETH_LEN);
        // Version 6, no traffic class or flow label; payload length; ICMPv6; hop limit.
        let header: [u8; 8] = [0x60, 0, 0, 0, 0, PAYLOAD as u8, 58, HOP_LIMIT];
        core::ptr::copy_nonoverlapping(header.as_ptr(), ip, header.len());
        // Source: the original destination; destination: the original source. The new
        // header ends where the original begins, so the addresses do not overlap.
        core::ptr::copy_nonoverlapping(orig_ip.add(24), ip.add(8), 16);
        core::ptr::copy_nonoverlapping(orig_ip.add(8), ip.add(24), 16);
        let icmp = ip.add(IPV6_LEN);
        // Type and code; the checksum zero for now; the rest.
        core::ptr::write_unaligned(icmp.cast::<u32>(), (u32::from(type_code) << 16).to_be());
        core::ptr::write_unaligned(icmp.add(4).cast::<u32>(), rest.to_be());
        // The pseudo-header: both addresses, the upper-layer length, the next header.
        let pseudo = u64::from((PAYLOAD as u32).to_be()) + u64::from(58u32.to_be());
        let addrs = u64::from(!checksum(ip.add(8), 32, 0));
        let seed = addrs + pseudo;
        let seed = ((seed & 0xffff_ffff) + (seed >> 32)) as u32;
        let icmp_check = checksum(icmp, PAYLOAD as u32, seed);
        core::ptr::write_unaligned(icmp.add(2).cast::<u16>(), icmp_check);
    }
    Some(())
}
