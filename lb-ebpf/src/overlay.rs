//! tc ingress on overlay devices (VXLAN, Geneve: devices without XDP through which backends
//! on other nodes are reached): replies of SNATed flows arriving there get the frontend back
//! as their source and the client as their destination, and are redirected out of the device
//! the route to the client takes, the next hop's MAC resolved by the kernel
//! (`bpf_redirect_neigh`). They skip the stack, which would see the frontend (often the
//! node's own address) arriving from outside. Anything else goes on untouched.

use aya_ebpf::{helpers::generated::bpf_redirect_neigh, macros::classifier, programs::TcContext};
use lb_common::{Addr6, stats as st};

use crate::{fib, icmp, scratch, skb, stats, tc::TCX_NEXT};

/// Reverse translation of replies from backends on other nodes, arriving over an overlay,
/// and of ICMP errors about packets sent to them.
#[classifier]
pub fn tc_overlay(ctx: TcContext) -> i32 {
    if let Some(verdict) = reverse(&ctx) {
        return verdict;
    }
    translate_error(&ctx)
}

/// Translates the packet and sends it on if it is an ICMP error about a packet sent to a
/// backend from an SNAT source. Its own BPF function, as [`reverse`].
#[inline(never)]
fn translate_error(ctx: &TcContext) -> i32 {
    let Some(packet) = icmp::translate_skb(ctx, false) else {
        return TCX_NEXT;
    };
    stats::inc(st::TC_ICMP_TRANSLATED);
    match scratch::get() {
        Some(s) => {
            let (src, dst) = (s.reply.saddr, s.rw.src.ip);
            send_on(ctx, packet, &src, &dst)
        }
        None => TCX_NEXT,
    }
}

/// Reverses the packet and sends it on if it is a reply of a live SNATed flow: the
/// verdict, or `None` when it is not one. Its own BPF function, so its stack and the ICMP
/// translation's are not added up.
#[inline(never)]
fn reverse(ctx: &TcContext) -> Option<i32> {
    let (p, rev) = skb::live_reply(ctx, true)?;
    if skb::rewrite(ctx, &p, &rev).is_err() {
        return Some(TCX_NEXT);
    }
    let verdict = send_on(ctx, (p.v6, p.key.proto), &rev.src, &rev.dst);
    if verdict != TCX_NEXT {
        skb::count(&rev, &p, st::OVERLAY_REVERSED);
    }
    Some(verdict)
}

/// Redirects the translated packet (family and protocol as given) out of the device the
/// route from `src` to `dst` takes; when there is no route out (or the packet is too big for
/// it), lets it go on to the stack, which answers as for any packet. Its own BPF function;
/// the lookup's parameters live in the scratch entry.
#[inline(never)]
fn send_on(ctx: &TcContext, (v6, proto): (bool, u8), src: &Addr6, dst: &Addr6) -> i32 {
    let Some(s) = scratch::get() else {
        return TCX_NEXT;
    };
    // SAFETY: the context's skb pointer is valid.
    let ifindex = unsafe { (*ctx.skb.skb).ifindex };
    // Length 0: the kernel checks the skb itself against the egress device's MTU.
    let rc = fib::query(ctx, ifindex, &mut s.fib, (v6, proto, 0), src, dst);
    if !fib::forwarded(rc) {
        return TCX_NEXT;
    }
    // SAFETY: plain helper call; no parameters, so the kernel looks up the next hop itself.
    unsafe { bpf_redirect_neigh(s.fib.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
