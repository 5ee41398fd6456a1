//! Per-CPU scratch space for values too large for the 512-byte BPF stack: the FIB lookup's
//! parameters and the conntrack records a new flow writes. A packet program runs to
//! completion on one CPU, so one entry per CPU is enough.

use aya_ebpf::{bindings::bpf_fib_lookup, maps::lpm_trie::Key};
use lb_common::{
    Backend,
    external::{
        CtEntry, ExternalAffinityKey, ExternalAffinityMatchKey, FlowKey, FlowRevNat, SourceRange,
    },
    maps::SCRATCH_SIZE,
};

use crate::{maps::SCRATCH, nat::Rewrite};

/// A backend chosen for a new flow of a service.
pub struct Chosen {
    /// The north-south service id.
    pub svc_id: u32,
    /// The backend id (for debug events).
    pub id: u32,
    /// The backend.
    pub ep: Backend,
}

/// The scratch entry's layout.
#[repr(C)]
pub struct Scratch {
    /// FIB lookup parameters and results.
    pub fib: bpf_fib_lookup,
    /// A reply's flow key (reverse-NAT map key).
    pub reply: FlowKey,
    /// A flow's key found from its reverse entry (conntrack map key).
    pub fwd: FlowKey,
    /// A reverse-NAT entry.
    pub rev: FlowRevNat,
    /// A conntrack entry.
    pub ct: CtEntry,
    /// A source-ranges lookup key.
    pub range: Key<SourceRange>,
    /// A north-south affinity key (service and client).
    pub affinity: ExternalAffinityKey,
    /// A north-south affinity-match key (service and backend).
    pub affinity_match: ExternalAffinityMatchKey,
    /// The backend chosen for a new flow.
    pub chosen: Chosen,
    /// The rewrite of the packet being translated.
    pub rw: Rewrite,
    /// Non-zero in a dry run (`lb_common::external::XDP_DRY_RUN`): nothing is recorded.
    pub dry: u32,
}

const _: () = assert!(core::mem::size_of::<Scratch>() <= SCRATCH_SIZE as usize);

/// This CPU's scratch entry.
#[inline(always)]
pub fn get() -> Option<&'static mut Scratch> {
    let p = SCRATCH.get_ptr_mut(0)?;
    // SAFETY: a per-CPU map value of SCRATCH_SIZE bytes, which Scratch fits; only this
    // program invocation uses this CPU's entry until it returns.
    Some(unsafe { &mut *(p.cast::<Scratch>()) })
}
