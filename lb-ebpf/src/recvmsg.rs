//! recvmsg4 / recvmsg6: a reply from a backend shows the service as its source, so a client
//! that checks where the answer came from (a DNS resolver does) accepts it.

use aya_ebpf::{macros::cgroup_sock_addr, programs::SockAddrContext};

use crate::{
    family::{V4, V6},
    revnat::reverse,
};

/// IPv4 UDP recvmsg().
#[cgroup_sock_addr(recvmsg4)]
pub fn recvmsg4(ctx: SockAddrContext) -> i32 {
    reverse::<V4>(&ctx)
}

/// IPv6 UDP recvmsg().
#[cgroup_sock_addr(recvmsg6)]
pub fn recvmsg6(ctx: SockAddrContext) -> i32 {
    reverse::<V6>(&ctx)
}
