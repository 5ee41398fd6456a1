//! tc egress on the node's XDP devices: replies of flows translated to a backend on this
//! node (not SNATed, so they leave the node towards the client directly) get the frontend back
//! as their source, while their flow lives (they also keep its state and lifetime); ICMP
//! errors such a backend sends about the flow's packets are translated for the client.

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::stats as st;

use crate::{icmp, skb, stats};

/// Lets the packet continue to other tc programs and the device (TCX_NEXT).
pub const TCX_NEXT: i32 = -1;

/// Reverse translation of replies from local backends.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    if !reverse(&ctx) && icmp::translate_skb(&ctx, true).is_some() {
        stats::inc(st::TC_ICMP_TRANSLATED);
    }
    TCX_NEXT
}

/// Reverses the packet if it is a reply of a live flow; whether it is one. Its own BPF
/// function, so its stack and the ICMP translation's are not added up.
#[inline(never)]
fn reverse(ctx: &TcContext) -> bool {
    let Some((p, rev)) = skb::live_reply(ctx, false) else {
        return false;
    };
    if skb::rewrite(ctx, &p, &rev).is_ok() {
        skb::count(&rev, &p, st::TC_REVERSED);
    }
    true
}
