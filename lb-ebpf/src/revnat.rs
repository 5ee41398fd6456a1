//! Reverse translation: what a translated socket sees of its peer is the service, not the
//! backend: the source of received datagrams and the result of getpeername().

use aya_ebpf::{
    EbpfContext as _, helpers::generated::bpf_get_socket_cookie, programs::SockAddrContext,
};
use lb_common::{Endpoint, RevNatKey, UdpSocket, stats as st};

use crate::{
    family::Family,
    maps::{REV_NAT, UDP_SOCKETS},
    stats,
};

/// Return value of a sock_addr hook that lets the syscall proceed.
pub const ALLOW: i32 = 1;

/// The socket's cookie, allocated by the kernel on first use.
#[inline(always)]
fn cookie(ctx: &SockAddrContext) -> u64 {
    // SAFETY: plain helper call on the program's context.
    unsafe { bpf_get_socket_cookie(ctx.as_ptr()) }
}

/// Remembers that this socket's traffic to `backend` was for `frontend`.
#[inline(always)]
pub fn remember(ctx: &SockAddrContext, backend: &Endpoint, frontend: &Endpoint) {
    let key = RevNatKey::new(cookie(ctx), backend);
    if REV_NAT.insert(&key, frontend, 0).is_err() {
        stats::inc(st::ERR_REV_NAT_UPDATE);
    }
}

/// Remembers where a connected UDP socket was translated, until it closes (see the
/// sock_release hook): the agent finds it there should its backend leave.
#[inline(always)]
pub fn remember_connected(ctx: &SockAddrContext, backend: &Endpoint, frontend: &Endpoint) {
    let socket = UdpSocket {
        frontend: *frontend,
        backend: *backend,
    };
    if UDP_SOCKETS.insert(&cookie(ctx), &socket, 0).is_err() {
        stats::inc(st::ERR_UDP_SOCKET_UPDATE);
    }
}

/// Rewrites the peer address of a translated socket back to the service frontend.
#[inline(always)]
pub fn reverse<F: Family>(ctx: &SockAddrContext) -> i32 {
    // SAFETY: the kernel passes a valid context for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    let peer = Endpoint::new(F::addr(sa), sa.user_port as u16);
    // SAFETY: LRU entries are replaced whole on update; the value is copied at once.
    let Some(&frontend) = (unsafe { REV_NAT.get(&RevNatKey::new(cookie(ctx), &peer)) }) else {
        return ALLOW;
    };
    if F::set_addr(sa, &frontend.addr) {
        sa.user_port = u32::from(frontend.port_be);
        stats::inc(st::REVERSED);
    }
    ALLOW
}
