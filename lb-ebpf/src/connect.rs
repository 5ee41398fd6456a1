//! connect4 / connect6: a TCP or UDP connect() to a service goes to one of its backends.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};
use lb_common::stats::CONNECT_TRANSLATED;

use crate::{
    family::{V4, V6},
    xlate::forward,
};

/// IPv4 connect().
#[cgroup_sock_addr(connect4)]
pub fn connect4(ctx: SockAddrContext) -> i32 {
    forward::<V4>(&ctx, CONNECT_TRANSLATED)
}

/// IPv6 connect(), including v4-mapped destinations of dual-stack sockets.
#[cgroup_sock_addr(connect6)]
pub fn connect6(ctx: SockAddrContext) -> i32 {
    forward::<V6>(&ctx, CONNECT_TRANSLATED)
}
