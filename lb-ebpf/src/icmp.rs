//! ICMP errors about translated flows, translated in turn (as RFC 5508 asks of a NAT), so
//! that path MTU discovery and unreachable reports work through the node:
//! - an error about a packet this node sent to a backend for a client (SNATed: the error
//!   comes to the SNAT address) goes to the client, its quoted packet made the client's own
//!   (client to frontend);
//! - an error about a reply this node sent to a client (from the frontend) goes to the
//!   backend, its quoted packet made the backend's own reply (backend to SNAT source or
//!   client);
//! - an error a pod of this node sends about a packet it got through a flow that kept the
//!   client's address (tc egress) goes on to the client, its quoted packet made the
//!   client's own.
//!
//! An error sent by the quoted packet's destination itself (a backend's port unreachable)
//! gets that destination's new address as its source too, so the client hears it from the
//! frontend, as from any NAT.
//!
//! Handled: IPv4 destination unreachable (fragmentation needed among them) and time
//! exceeded; ICMPv6 destination unreachable, packet too big and time exceeded; each quoting
//! a TCP or UDP packet without IPv4 options or IPv6 extension headers. Anything else passes
//! untouched. An error refreshes no flow.

use aya_ebpf::{
    bindings::xdp_action,
    programs::{TcContext, XdpContext},
};
use lb_common::{Addr6, external::FlowKey, proto, stats as st};

use crate::{
    csum::Delta,
    ct, fib,
    pkt::{ETH_LEN, ETH_P_IP, ETH_P_IPV6, ICMP_LEN, IPV4_LEN, IPV6_LEN, at, read, write},
    scratch::{self, Scratch},
    stats,
};

const PROTO_ICMP: u8 = 1;
const PROTO_ICMPV6: u8 = 58;

/// Where the fields of an error lie (offsets from the frame's start) and what it quotes.
struct Layout {
    v6: bool,
    /// The outer IP header's length field covers this many bytes (for the FIB lookup).
    len: u32,
    /// The outer destination address.
    outer_dst: usize,
    /// The ICMP checksum.
    icmp_check: usize,
    /// The quoted IP header.
    inner: usize,
    /// The quoted L4 header.
    inner_l4: usize,
}

impl Layout {
    /// The offsets for the family (IPv6 when `v6`); the length is filled in after.
    const fn of(v6: bool) -> Self {
        let ip = if v6 { IPV6_LEN } else { IPV4_LEN };
        Self {
            v6,
            len: 0,
            outer_dst: ETH_LEN + if v6 { 24 } else { 16 },
            icmp_check: ETH_LEN + ip + 2,
            inner: ETH_LEN + ip + ICMP_LEN,
            inner_l4: ETH_LEN + ip + ICMP_LEN + ip,
        }
    }

    /// The ICMP protocol number of the family.
    const fn proto(&self) -> u8 {
        if self.v6 { PROTO_ICMPV6 } else { PROTO_ICMP }
    }

    /// Offsets of the quoted addresses: source, destination.
    fn inner_addrs(&self) -> (usize, usize) {
        if self.v6 {
            (self.inner + 8, self.inner + 24)
        } else {
            (self.inner + 12, self.inner + 16)
        }
    }
}

/// An address of the family at `off`.
#[inline(always)]
fn addr(start: usize, end: usize, off: usize, v6: bool) -> Option<Addr6> {
    Some(if v6 {
        Addr6 {
            words: read::<[u32; 4]>(start, end, off)?,
        }
    } else {
        Addr6::v4_mapped(read::<u32>(start, end, off)?)
    })
}

/// Writes `new` over the address at `off`, accounting for the change in every delta given.
#[inline(always)]
fn set_addr(
    start: usize,
    end: usize,
    off: usize,
    new: &Addr6,
    v6: bool,
    deltas: &mut [&mut Delta],
) -> Option<()> {
    if v6 {
        let old = read::<[u32; 4]>(start, end, off)?;
        for (o, n) in old.iter().zip(new.words) {
            for d in deltas.iter_mut() {
                d.dword(*o, n);
            }
        }
        write(start, end, off, new.words)
    } else {
        let old = read::<u32>(start, end, off)?;
        for d in deltas.iter_mut() {
            d.dword(old, new.v4_be());
        }
        write(start, end, off, new.v4_be())
    }
}

/// The error's layout, if the frame is an error this module handles.
#[inline(always)]
fn layout(start: usize, end: usize) -> Option<Layout> {
    let ethertype = u16::from_be(read::<u16>(start, end, 12)?);
    let l = if ethertype == ETH_P_IP {
        let vihl = read::<u8>(start, end, ETH_LEN)?;
        let frag = u16::from_be(read::<u16>(start, end, ETH_LEN + 6)?);
        let kind = read::<u8>(start, end, ETH_LEN + IPV4_LEN)?;
        let inner_vihl = read::<u8>(start, end, ETH_LEN + IPV4_LEN + ICMP_LEN)?;
        if vihl != 0x45
            || frag & 0x3fff != 0
            || read::<u8>(start, end, ETH_LEN + 9)? != PROTO_ICMP
            || !(kind == 3 || kind == 11)
            || inner_vihl != 0x45
        {
            return None;
        }
        let mut l = Layout::of(false);
        l.len = u32::from(u16::from_be(read::<u16>(start, end, ETH_LEN + 2)?));
        l
    } else if ethertype == ETH_P_IPV6 {
        let kind = read::<u8>(start, end, ETH_LEN + IPV6_LEN)?;
        let inner_v = read::<u8>(start, end, ETH_LEN + IPV6_LEN + ICMP_LEN)?;
        if read::<u8>(start, end, ETH_LEN)? >> 4 != 6
            || read::<u8>(start, end, ETH_LEN + 6)? != PROTO_ICMPV6
            || !(1..=3).contains(&kind)
            || inner_v >> 4 != 6
        {
            return None;
        }
        let mut l = Layout::of(true);
        l.len = IPV6_LEN as u32 + u32::from(u16::from_be(read::<u16>(start, end, ETH_LEN + 4)?));
        l
    } else {
        return None;
    };
    let inner_proto = if l.v6 {
        read::<u8>(start, end, l.inner + 6)?
    } else {
        read::<u8>(start, end, l.inner + 9)?
    };
    if inner_proto != proto::TCP && inner_proto != proto::UDP {
        return None;
    }
    // The quoted ports (and, for UDP, its checksum) must be there.
    at::<[u8; 8]>(start, end, l.inner_l4)?;
    Some(l)
}

/// Translates the ICMP error in the frame if it is about a translated flow: `XDP_PASS`
/// when it is not one (or not about one), else where the translated error goes. Its own
/// BPF function.
#[inline(never)]
pub fn translate(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(l) = layout(start, end) else {
        return xdp_action::XDP_PASS;
    };
    let Some(s) = scratch::get() else {
        return xdp_action::XDP_PASS;
    };
    if rewrite(s, start, end, &l, false).is_none() {
        return xdp_action::XDP_PASS;
    }
    stats::inc(st::XDP_ICMP_TRANSLATED);
    let (src, dst) = (s.reply.saddr, s.rw.src.ip);
    let rc = fib::route(ctx, s, (l.v6, l.proto(), l.len), &src, &dst);
    fib::send(ctx, s, rc)
}

/// Headers pulled into the linear part of an skb before an error is read: Ethernet, IPv6,
/// ICMPv6, and the quoted IPv6 and L4 headers' first 8 bytes.
const SKB_HEADERS: u32 = (ETH_LEN + IPV6_LEN + ICMP_LEN + IPV6_LEN + 8) as u32;

/// Translates, in place, the ICMP error an skb carries if it is about a translated flow:
/// at tc egress (`from_local_pod`) an error from a pod of this node about a packet of a
/// flow that kept the client's address, on an overlay device one about a packet sent to a
/// backend from an SNAT source (as XDP does). Returns the family (IPv6 when true) and ICMP
/// protocol, or `None` when it is not one; the error's source and destination (for the
/// route on) are left in the scratch entry's `reply.saddr` and `rw.src.ip`. Its own BPF
/// function (it returns in a register: the caller's stack is short).
#[inline(never)]
pub fn translate_skb(ctx: &TcContext, from_local_pod: bool) -> Option<(bool, u8)> {
    // Only ICMP and ICMPv6 are pulled and read further.
    let (start, end) = (ctx.data(), ctx.data_end());
    let next = match u16::from_be(read::<u16>(start, end, 12)?) {
        ETH_P_IP => read::<u8>(start, end, ETH_LEN + 9)?,
        ETH_P_IPV6 => read::<u8>(start, end, ETH_LEN + 6)?,
        _ => return None,
    };
    if next != PROTO_ICMP && next != PROTO_ICMPV6 {
        return None;
    }
    let _ = ctx.pull_data(SKB_HEADERS.min(ctx.len()));
    let (start, end) = (ctx.data(), ctx.data_end());
    let l = layout(start, end)?;
    let s = scratch::get()?;
    rewrite(s, start, end, &l, from_local_pod)?;
    Some((l.v6, l.proto()))
}

/// Finds the flow the quoted packet belongs to and rewrites the error for the other side:
/// an error about a packet sent to a backend when the packet's source port is an SNAT
/// port or the error is `from_local_pod`, else one about a reply sent to a client. Leaves
/// the quoted packet's new source (where the error now goes) in `s.rw.src` and its new
/// destination in `s.rw.dst`, and the error's own source in `s.reply.saddr`.
#[inline(always)]
fn rewrite(
    s: &mut Scratch,
    start: usize,
    end: usize,
    l: &Layout,
    from_local_pod: bool,
) -> Option<()> {
    let v6 = l.v6;
    let (isrc_at, idst_at) = l.inner_addrs();
    let isport = read::<u16>(start, end, l.inner_l4)?;
    let idport = read::<u16>(start, end, l.inner_l4 + 2)?;
    let iproto = if v6 {
        read::<u8>(start, end, l.inner + 6)?
    } else {
        read::<u8>(start, end, l.inner + 9)?
    };
    // The quoted packet turned around: the reply key of a packet sent to a backend, or the
    // flow key of a reply sent to a client.
    let turned = FlowKey::new(
        addr(start, end, idst_at, v6)?,
        addr(start, end, isrc_at, v6)?,
        idport,
        isport,
        iproto,
    );
    let now = ct::now();
    if from_local_pod || ct::is_snat_port(isport) {
        // About a packet sent to a backend (from an SNAT source, or from the client to a
        // pod of this node): to the client.
        s.reply = turned;
        let rev = ct::reverse_entry(&s.reply)?;
        // SAFETY: a live LRU value, read in place.
        let rev = unsafe { &*rev };
        ct::reply_flow(rev, &s.reply, &mut s.fwd, now)?;
        s.rw.src.ip = rev.dst;
        s.rw.src.port_be = rev.dport_be;
        s.rw.dst.ip = rev.src;
        s.rw.dst.port_be = rev.sport_be;
    } else {
        // About a reply sent to a client: to the backend, from its SNAT source or client.
        s.fwd = turned;
        let flow = ct::find(&s.fwd)?;
        // SAFETY: as above.
        let e = unsafe { &*flow.entry };
        if e.expired(now) {
            return None;
        }
        let (dst, dst_port) = e.reply_dst(&s.fwd);
        s.rw.dst.ip = *dst;
        s.rw.dst.port_be = dst_port;
        s.rw.src.ip = e.backend.addr;
        s.rw.src.port_be = e.backend.port_be;
    }
    // The error goes to whoever sent the packet it quotes, as that packet now reads; its
    // own source (the router that sent it) stays, unless it is the quoted packet's
    // destination itself, which takes that destination's new address.
    let outer_src = l.outer_dst - if v6 { 16 } else { 4 };
    let sender = addr(start, end, outer_src, v6)?;
    let (mut outer_ip, mut icmp, mut inner_ip, mut inner_l4) = (
        Delta::default(),
        Delta::default(),
        Delta::default(),
        Delta::default(),
    );
    // ICMPv6's checksum covers the outer addresses (its pseudo-header); ICMP's does not.
    let outer: &mut Delta = if v6 { &mut icmp } else { &mut outer_ip };
    if sender == addr(start, end, idst_at, v6)? {
        set_addr(start, end, outer_src, &s.rw.dst.ip, v6, &mut [&mut *outer])?;
        s.reply.saddr = s.rw.dst.ip;
    } else {
        s.reply.saddr = sender;
    }
    set_addr(
        start,
        end,
        l.outer_dst,
        &s.rw.src.ip,
        v6,
        &mut [&mut *outer],
    )?;
    let mut all = [&mut icmp, &mut inner_ip, &mut inner_l4];
    set_addr(start, end, isrc_at, &s.rw.src.ip, v6, &mut all)?;
    set_addr(start, end, idst_at, &s.rw.dst.ip, v6, &mut all)?;
    for (off, old, new) in [
        (l.inner_l4, isport, s.rw.src.port_be),
        (l.inner_l4 + 2, idport, s.rw.dst.port_be),
    ] {
        icmp.word(old, new);
        inner_l4.word(old, new);
        write(start, end, off, new)?;
    }
    // The quoted IPv4 header's checksum, and the quoted L4 checksum where the quote holds
    // it (a UDP checksum of zero means none).
    if !v6 {
        let old = read::<u16>(start, end, l.inner + 10)?;
        let new = inner_ip.apply(old);
        icmp.word(old, new);
        write(start, end, l.inner + 10, new)?;
    }
    let l4_check = l.inner_l4 + if iproto == proto::TCP { 16 } else { 6 };
    if let Some(old) = read::<u16>(start, end, l4_check)
        && (iproto == proto::TCP || old != 0)
    {
        let new = inner_l4.apply(old);
        icmp.word(old, new);
        write(start, end, l4_check, new)?;
    }
    let old = read::<u16>(start, end, l.icmp_check)?;
    write(start, end, l.icmp_check, icmp.apply(old))?;
    if !v6 {
        let at_check = ETH_LEN + 10;
        let old = read::<u16>(start, end, at_check)?;
        write(start, end, at_check, outer_ip.apply(old))?;
    }
    Some(())
}
