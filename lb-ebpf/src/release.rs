//! sock_release: a closing UDP socket's connected-socket entry goes with it.

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, macros::cgroup_sock,
    programs::SockContext,
};

use crate::maps::UDP_SOCKETS;

/// A socket of the cgroup is released. Always lets it go.
#[cgroup_sock(sock_release)]
pub fn sock_release(ctx: SockContext) -> i32 {
    // SAFETY: the kernel passes a valid socket for the duration of the program.
    if unsafe { (*ctx.sock).protocol } == u32::from(lb_common::proto::UDP) {
        // SAFETY: plain helper call on the program's context.
        let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
        // Most UDP sockets were never translated: nothing to remove is the usual case.
        let _ = UDP_SOCKETS.remove(&cookie);
    }
    1
}
