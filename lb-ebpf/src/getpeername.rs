//! getpeername4 / getpeername6: a translated socket reports the service as its peer.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    family::{V4, V6},
    revnat::reverse,
};

/// IPv4 getpeername().
#[cgroup_sock_addr(getpeername4)]
pub fn getpeername4(ctx: SockAddrContext) -> i32 {
    reverse::<V4>(&ctx)
}

/// IPv6 getpeername().
#[cgroup_sock_addr(getpeername6)]
pub fn getpeername6(ctx: SockAddrContext) -> i32 {
    reverse::<V6>(&ctx)
}
