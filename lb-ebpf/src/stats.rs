//! Per-CPU counters of hook outcomes (indexes in `lb_common::stats`).

use crate::maps::{BE_STATS, EXTERNAL_STATS, STATS, SVC_STATS};

/// Adds one to counter `idx` on this CPU.
#[inline(always)]
pub fn inc(idx: u32) {
    if let Some(counter) = STATS.get_ptr_mut(idx) {
        // SAFETY: the pointer is this CPU's slot of a live per-CPU array element; socket
        // hooks run with migration disabled, so nothing else writes it meanwhile.
        unsafe { *counter += 1 };
    }
}

/// Adds a packet of `bytes` (from the IP header on) to north-south service `svc_id`'s
/// counters, and a flow when it starts one.
#[inline(always)]
pub fn north_south(svc_id: u32, bytes: u32, new_flow: bool) {
    if let Some(c) = EXTERNAL_STATS.get_ptr_mut(svc_id) {
        // SAFETY: this CPU's slot; packet programs run with migration disabled.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += u64::from(bytes);
            (*c).flows += u64::from(new_flow);
        }
    }
}

/// Counts a translated connection (or datagram) of service `svc_id` to backend `backend_id`,
/// or (`backend_id` `None`) a refused one. Atomic adds: the arrays are shared by all CPUs.
#[inline(always)]
pub fn socket(svc_id: u32, backend_id: Option<u32>) {
    use core::intrinsics::{AtomicOrdering::Relaxed, atomic_xadd};
    if let Some(c) = SVC_STATS.get_ptr_mut(svc_id) {
        // SAFETY: a live array element, 8-byte aligned; only atomic adds write it.
        unsafe {
            let field = match backend_id {
                Some(_) => &raw mut (*c).translated,
                None => &raw mut (*c).refused,
            };
            atomic_xadd::<u64, u64, { Relaxed }>(field, 1);
        }
    }
    if let Some(id) = backend_id
        && let Some(c) = BE_STATS.get_ptr_mut(id)
    {
        // SAFETY: as above.
        unsafe { atomic_xadd::<u64, u64, { Relaxed }>(c, 1) };
    }
}
