//! Per-CPU counters of hook outcomes (indexes in `lb_common::stats`).

use crate::maps::STATS;

/// Adds one to counter `idx` on this CPU.
#[inline(always)]
pub fn inc(idx: u32) {
    if let Some(counter) = STATS.get_ptr_mut(idx) {
        // SAFETY: the pointer is this CPU's slot of a live per-CPU array element; socket
        // hooks run with migration disabled, so nothing else writes it meanwhile.
        unsafe { *counter += 1 };
    }
}
