//! tc ingress on overlay devices (VXLAN, Geneve: devices without XDP through which backends
//! on other nodes are reached): replies of SNATed flows arriving there get the frontend back
//! as their source and the client as their destination, and are redirected out of the device
//! the route to the client takes, the next hop's MAC resolved by the kernel
//! (`bpf_redirect_neigh`). They skip the stack, which would see the frontend (often the
//! node's own address) arriving from outside. Anything else goes on untouched.

use aya_ebpf::{
    bindings::bpf_fib_lookup, helpers::generated::bpf_redirect_neigh, macros::classifier,
    programs::TcContext,
};
use lb_common::stats as st;

use crate::{fib, skb, tc::TCX_NEXT};

/// Reverse translation of replies from backends on other nodes, arriving over an overlay.
#[classifier]
pub fn tc_overlay(ctx: TcContext) -> i32 {
    let Some((p, rev)) = skb::live_reply(&ctx, true) else {
        return TCX_NEXT;
    };
    if skb::rewrite(&ctx, &p, &rev).is_err() {
        return TCX_NEXT;
    }
    // SAFETY: a plain-data struct, all zeroes valid; the context's skb pointer is valid.
    let (mut route, ifindex) = unsafe {
        (
            core::mem::zeroed::<bpf_fib_lookup>(),
            (*ctx.skb.skb).ifindex,
        )
    };
    // Length 0: the kernel checks the skb itself against the egress device's MTU.
    let rc = fib::query(
        &ctx,
        ifindex,
        &mut route,
        (p.v6, p.key.proto, 0),
        &rev.src,
        &rev.dst,
    );
    if !fib::forwarded(rc) {
        // No route out (or too big for it): the stack answers, as for any packet.
        return TCX_NEXT;
    }
    skb::count(&rev, &p, st::OVERLAY_REVERSED);
    // SAFETY: plain helper call; no parameters, so the kernel looks up the next hop itself.
    unsafe { bpf_redirect_neigh(route.ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}
