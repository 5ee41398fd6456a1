//! tc egress on the node's XDP devices: replies of flows translated to a backend on this
//! node (not SNATed, so they leave the node towards the client directly) get the frontend back
//! as their source, while their flow lives (they also keep its state and lifetime).

use aya_ebpf::{macros::classifier, programs::TcContext};
use lb_common::stats as st;

use crate::skb;

/// Lets the packet continue to other tc programs and the device (TCX_NEXT).
pub const TCX_NEXT: i32 = -1;

/// Reverse translation of replies from local backends.
#[classifier]
pub fn tc_egress(ctx: TcContext) -> i32 {
    if let Some((p, rev)) = skb::live_reply(&ctx, false)
        && skb::rewrite(&ctx, &p, &rev).is_ok()
    {
        skb::count(&rev, &p, st::TC_REVERSED);
    }
    TCX_NEXT
}
