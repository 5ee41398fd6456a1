//! sendmsg4 / sendmsg6: each datagram an unconnected UDP socket sends to a service goes to
//! one of its backends.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use lb_common::stats::SENDMSG_TRANSLATED;

use crate::{
    family::{V4, V6},
    xlate::forward,
};

/// IPv4 UDP sendmsg() with a destination address.
#[cgroup_sock_addr(sendmsg4)]
pub fn sendmsg4(ctx: SockAddrContext) -> i32 {
    forward::<V4>(&ctx, SENDMSG_TRANSLATED)
}

/// IPv6 UDP sendmsg() with a destination address.
#[cgroup_sock_addr(sendmsg6)]
pub fn sendmsg6(ctx: SockAddrContext) -> i32 {
    forward::<V6>(&ctx, SENDMSG_TRANSLATED)
}
