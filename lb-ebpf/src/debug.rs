//! Kernel-side debug events, off unless the agent runs with `--kernel-debug`.
//!
//! The switch is a read-only global the loader sets before verification: the verifier knows
//! its value, so when it is off the event code is dead and removed from the program (no cost
//! at all). When on, each event is a ring buffer record the agent reads and logs.

use lb_common::debug::DebugEvent;

use crate::maps::DEBUG_EVENTS;

/// Whether debug events are on (set by the agent at load time; its name is
/// `lb_common::debug::DEBUG_GLOBAL`).
#[unsafe(no_mangle)]
static DEBUG: u8 = 0;

/// Sends an event if debug events are on. A full ring drops it.
#[inline(always)]
pub fn event(kind: u32, id: u32, arg: u32) {
    // SAFETY: a volatile read of a constant the loader may have set.
    if unsafe { core::ptr::read_volatile(&DEBUG) } == 0 {
        return;
    }
    let _dropped = DEBUG_EVENTS.output::<DebugEvent>(
        DebugEvent {
            kind,
            id,
            arg,
            _pad: 0,
        },
        0,
    );
}
