//! Backend choice: uniformly at random among a service's slots, or, for a service with
//! session affinity, the backend the client used last if it is still the service's and the
//! timeout has not passed.

use aya_ebpf::{
    EbpfContext as _,
    helpers::generated::{bpf_get_netns_cookie, bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    programs::SockAddrContext,
};
use lb_common::{AffinityKey, AffinityMatchKey, AffinityValue, ServiceValue, SlotKey, stats as st};

use crate::{
    maps::{AFFINITY, AFFINITY_MATCH, SLOTS},
    stats,
};

const NS_PER_S: u64 = 1_000_000_000;

/// The backend id of a random slot of the service's table (`count` > 0).
#[inline(always)]
fn random_slot(svc: &ServiceValue, count: u32) -> Option<u32> {
    // SAFETY: plain helper call.
    let slot = unsafe { bpf_get_prandom_u32() } % count;
    let key = SlotKey::new(svc.id, svc.slot_gen(), slot);
    // SAFETY: slots are replaced whole by the agent; the id is copied at once. The slots of
    // the generation this value names stay until no program can be reading it.
    if let Some(&id) = unsafe { SLOTS.get(&key) } {
        Some(id)
    } else {
        stats::inc(st::ERR_SLOT_MISSING);
        None
    }
}

/// The backend id for this connection to a service with backends; `None` if the maps are
/// inconsistent (counted).
#[inline(always)]
pub fn backend(ctx: &SockAddrContext, svc: &ServiceValue) -> Option<u32> {
    let count = u32::from(svc.count);
    if svc.affinity_timeout_s == 0 {
        return random_slot(svc, count);
    }
    // SAFETY: plain helper calls on the program's context.
    let (cookie, now) = unsafe {
        (
            bpf_get_netns_cookie(ctx.as_ptr()),
            bpf_ktime_get_coarse_ns(),
        )
    };
    let key = AffinityKey::new(svc.id, cookie);
    if let Some(entry) = AFFINITY.get_ptr_mut(&key) {
        // SAFETY: a live LRU element; a concurrent update of last_used_ns is harmless.
        let entry = unsafe { &mut *entry };
        let fresh =
            now.wrapping_sub(entry.last_used_ns) <= u64::from(svc.affinity_timeout_s) * NS_PER_S;
        let member = AffinityMatchKey {
            svc_id: svc.id,
            backend_id: entry.backend_id,
        };
        if fresh && AFFINITY_MATCH.get_ptr(&member).is_some() {
            entry.last_used_ns = now;
            stats::inc(st::AFFINITY_HIT);
            return Some(entry.backend_id);
        }
    }
    let backend_id = random_slot(svc, count)?;
    let value = AffinityValue {
        backend_id,
        _pad: 0,
        last_used_ns: now,
    };
    if AFFINITY.insert(&key, &value, 0).is_err() {
        stats::inc(st::ERR_AFFINITY_UPDATE);
    }
    Some(backend_id)
}
