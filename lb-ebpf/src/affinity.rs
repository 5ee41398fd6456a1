//! Session affinity (`ClientIP`) of north-south flows: a client's new flow goes to the
//! backend its last new flow went to, while the agent still names that backend as one of the
//! service's table (the match map, which also holds the timeout) and the timeout has not
//! run out since that flow. The socket hooks' affinity is in `select.rs`.

use lb_common::{Addr6, external::ExternalAffinityValue, stats as st};

use crate::{
    maps::{EXTERNAL_AFFINITY, EXTERNAL_AFFINITY_MATCH},
    scratch::Scratch,
    stats,
};

/// The remembered backend of `client` for service `svc_id`, into `s.chosen` (its backend id
/// left 0: affinity knows the address only); false when there is none to honour. Leaves the
/// affinity key in `s.affinity` for [`remember`]. Its own BPF function.
#[inline(never)]
pub fn recall(s: &mut Scratch, svc_id: u32, client: &Addr6, now: u32) -> bool {
    s.affinity.svc_id = svc_id;
    s.affinity.client = *client;
    // SAFETY: entries are replaced whole; the value is copied at once.
    let Some(last) = (unsafe { EXTERNAL_AFFINITY.get(&s.affinity) }).copied() else {
        return false;
    };
    s.affinity_match.svc_id = svc_id;
    s.affinity_match.backend = last.backend.endpoint();
    // SAFETY: as above.
    let Some(timeout_s) = (unsafe { EXTERNAL_AFFINITY_MATCH.get(&s.affinity_match) }).copied()
    else {
        return false;
    };
    if !last.holds(now, timeout_s) {
        return false;
    }
    s.chosen.svc_id = svc_id;
    s.chosen.id = 0;
    s.chosen.ep = last.backend;
    stats::inc(st::XDP_AFFINITY_HIT);
    true
}

/// Remembers `s.chosen` as the backend of the client whose key [`recall`] left in
/// `s.affinity`, as of `now` (each new flow starts the timeout again). Its own BPF function,
/// so the value is not on `forward`'s stack.
#[inline(never)]
pub fn remember(s: &Scratch, now: u32) {
    let value = ExternalAffinityValue {
        backend: s.chosen.ep,
        last_used: now,
    };
    if EXTERNAL_AFFINITY.insert(&s.affinity, &value, 0).is_err() {
        stats::inc(st::ERR_AFFINITY_UPDATE);
    }
}
