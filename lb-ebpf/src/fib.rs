//! Forwarding a translated packet: the kernel's FIB lookup picks the egress device and the
//! MAC addresses; the packet is redirected (or sent back out with XDP_TX) when it leaves
//! through a device the XDP program runs on, and otherwise handed to the stack, which routes
//! it (to a local pod, into an overlay, or when the next hop's MAC is not resolved yet). The
//! lookup's parameters and results live in the scratch entry.

use aya_ebpf::{
    EbpfContext,
    bindings::{
        BPF_FIB_LKUP_RET_FRAG_NEEDED, BPF_FIB_LKUP_RET_NO_NEIGH, BPF_FIB_LKUP_RET_SUCCESS,
        BPF_FIB_LOOKUP_SRC, bpf_fib_lookup, xdp_action,
    },
    helpers::generated::{bpf_fib_lookup as fib_lookup, bpf_redirect},
    programs::XdpContext,
};
use lb_common::{Addr6, maps::DEVICE_XDP, stats as st};

use crate::{
    maps::XDP_DEVICES,
    pkt::{Pkt, at},
    scratch::Scratch,
    stats,
};

const AF_INET: u8 = 2;
const AF_INET6: u8 = 10;

/// Looks up the route from `src` to `dst` for packet `pkt`; the result is in `s.fib`, the
/// return value is `BPF_FIB_LKUP_RET_*`. Its own BPF function, to keep the stack of its
/// callers small.
#[inline(never)]
pub fn lookup(ctx: &XdpContext, s: &mut Scratch, pkt: &Pkt, src: &Addr6, dst: &Addr6) -> u32 {
    route(ctx, s, (pkt.v6, pkt.key.proto, pkt.len), src, dst)
}

/// Looks up the route from `src` to `dst` for a packet of family (IPv6 when `v6`), protocol
/// and IP length as given; as [`lookup`], which calls it.
#[inline(always)]
pub fn route(
    ctx: &XdpContext,
    s: &mut Scratch,
    packet: (bool, u8, u32),
    src: &Addr6,
    dst: &Addr6,
) -> u32 {
    query(
        ctx,
        ctx.ingress_ifindex() as u32,
        &mut s.fib,
        packet,
        src,
        dst,
    )
}

/// The route lookup of [`route`] for any program (XDP or tc), the packet arriving on device
/// `ifindex`; parameters and results in `p`.
#[inline(always)]
pub fn query<C: EbpfContext>(
    ctx: &C,
    ifindex: u32,
    p: &mut bpf_fib_lookup,
    (v6, protocol, len): (bool, u8, u32),
    src: &Addr6,
    dst: &Addr6,
) -> u32 {
    p.family = 0;
    p.l4_protocol = protocol;
    p.sport = 0;
    p.dport = 0;
    p.__bindgen_anon_1.tot_len = len as u16;
    p.ifindex = ifindex;
    p.__bindgen_anon_2.flowinfo = 0;
    p.__bindgen_anon_5.tbid = 0;
    if v6 {
        p.family = AF_INET6;
        p.__bindgen_anon_3.ipv6_src = src.words;
        p.__bindgen_anon_4.ipv6_dst = dst.words;
    } else {
        p.family = AF_INET;
        p.__bindgen_anon_3.ipv4_src = src.v4_be();
        p.__bindgen_anon_4.ipv4_dst = dst.v4_be();
    }
    // SAFETY: a helper call with a valid context and a parameter struct of the size passed.
    unsafe {
        fib_lookup(
            ctx.as_ptr(),
            p,
            core::mem::size_of::<bpf_fib_lookup>() as i32,
            BPF_FIB_LOOKUP_SRC,
        ) as u32
    }
}

/// Looks up the route from the packet's source to the backend it is being translated to
/// (`s.rw.dst`), as [`lookup`].
#[inline(never)]
pub fn lookup_to_backend(ctx: &XdpContext, s: &mut Scratch, pkt: &Pkt) -> u32 {
    let dst = s.rw.dst.ip;
    lookup(ctx, s, pkt, &pkt.key.saddr, &dst)
}

/// The route's MTU, when the lookup answered `BPF_FIB_LKUP_RET_FRAG_NEEDED`: the packet is
/// bigger.
#[inline(always)]
pub fn too_big(s: &Scratch, rc: u32) -> Option<u16> {
    // SAFETY: the lookup wrote the MTU over the length it was given when it says so.
    (rc == BPF_FIB_LKUP_RET_FRAG_NEEDED).then_some(unsafe { s.fib.__bindgen_anon_1.mtu_result })
}

/// Whether the lookup found a route out of the node (`rc` is its return value), on device
/// `p.ifindex`; its next hop's MAC may still be unknown.
#[inline(always)]
pub fn forwarded(rc: u32) -> bool {
    rc == BPF_FIB_LKUP_RET_SUCCESS || rc == BPF_FIB_LKUP_RET_NO_NEIGH
}

/// Whether the route found leaves through a device the north-south programs run on (so
/// replies arriving there are reversed): an XDP device or an overlay device.
#[inline(always)]
pub fn leaves_by_our_device(s: &Scratch, rc: u32) -> bool {
    forwarded(rc) && XDP_DEVICES.get_ptr(&s.fib.ifindex).is_some()
}

/// The source address the kernel would use on the route found.
#[inline(always)]
pub fn source(s: &Scratch, v6: bool) -> Addr6 {
    // SAFETY: reading the union member that matches the family.
    unsafe {
        if v6 {
            Addr6 {
                words: s.fib.__bindgen_anon_3.ipv6_src,
            }
        } else {
            Addr6::v4_mapped(s.fib.__bindgen_anon_3.ipv4_src)
        }
    }
}

/// Sends the (already rewritten) packet along the route found.
#[inline(always)]
pub fn send(ctx: &XdpContext, s: &Scratch, rc: u32) -> u32 {
    let ifindex = s.fib.ifindex;
    // SAFETY: a u8 value, read at once.
    let kind = unsafe { XDP_DEVICES.get(&ifindex) }.copied();
    if rc != BPF_FIB_LKUP_RET_SUCCESS || kind != Some(DEVICE_XDP) {
        stats::inc(st::XDP_TO_STACK);
        return xdp_action::XDP_PASS;
    }
    let (Some(dmac), Some(smac)) = (
        at::<[u8; 6]>(ctx.data(), ctx.data_end(), 0),
        at::<[u8; 6]>(ctx.data(), ctx.data_end(), 6),
    ) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: bounds checked by `at`.
    unsafe {
        dmac.write_unaligned(s.fib.dmac);
        smac.write_unaligned(s.fib.smac);
    }
    stats::inc(st::XDP_REDIRECTED);
    if ifindex == ctx.ingress_ifindex() as u32 {
        return xdp_action::XDP_TX;
    }
    // SAFETY: plain helper call.
    unsafe { bpf_redirect(ifindex, 0) as u32 }
}
