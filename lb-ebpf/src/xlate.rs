//! Forward translation: a destination that is a service frontend becomes one of its backends.

use aya_ebpf::{helpers::generated::bpf_set_retval, programs::SockAddrContext};
use lb_common::{Endpoint, ServiceKey, stats as st};

use crate::{
    debug,
    family::Family,
    maps::{BACKENDS, SERVICES},
    revnat::{self, ALLOW},
    select, stats,
};

/// Return value that fails the syscall (with the error set by `bpf_set_retval`).
const REJECT: i32 = 0;
const ECONNREFUSED: i32 = 111;

/// Translates the destination of a connect() or sendmsg() if it is a service frontend:
/// rewrites it to a backend (see `select`) and remembers the frontend for the reverse
/// direction. A service with no backends fails the call with ECONNREFUSED, as
/// kube-proxy's reject rule does. Anything unexpected (a missing slot or backend) leaves the
/// call untranslated rather than failing it, and is counted.
#[inline(always)]
pub fn forward<F: Family>(ctx: &SockAddrContext, translated: u32) -> i32 {
    // SAFETY: the kernel passes a valid context for the duration of the program.
    let sa = unsafe { &mut *ctx.sock_addr };
    // The port is the network-order value of sin_port in the low 16 bits.
    let key = ServiceKey::new(F::addr(sa), sa.user_port as u16, sa.protocol as u8);
    // SAFETY (all map reads): the maps are BPF_F_NO_PREALLOC hashes updated by whole-element
    // replacement, so a looked-up value is never rewritten under the reader.
    let Some(svc) = (unsafe { SERVICES.get(&key) }) else {
        return ALLOW;
    };
    let svc = *svc;
    if svc.count == 0 {
        stats::inc(st::REFUSED_NO_BACKEND);
        stats::socket(svc.id, None);
        debug::decision!("socket_refused service={}", svc.id);
        // SAFETY: plain helper call; sock_addr hooks may set their syscall's error.
        unsafe { bpf_set_retval(-ECONNREFUSED) };
        return REJECT;
    }
    let Some(backend_id) = select::backend(ctx, &svc) else {
        return ALLOW;
    };
    let Some(&backend) = (unsafe { BACKENDS.get(&backend_id) }) else {
        stats::inc(st::ERR_BACKEND_MISSING);
        return ALLOW;
    };
    if !F::set_addr(sa, &backend.addr) {
        stats::inc(st::ERR_FAMILY_MISMATCH);
        return ALLOW;
    }
    sa.user_port = u32::from(backend.port_be);
    let frontend = Endpoint::new(key.addr, key.port_be);
    revnat::remember(ctx, &backend.endpoint(), &frontend);
    if translated == st::CONNECT_TRANSLATED && key.proto == lb_common::proto::UDP {
        revnat::remember_connected(ctx, &backend.endpoint(), &frontend);
    }
    stats::inc(translated);
    stats::socket(svc.id, Some(backend_id));
    debug::decision!(
        "socket_translated service={} backend={}",
        svc.id,
        backend_id
    );
    ALLOW
}
