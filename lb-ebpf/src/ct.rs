//! Connection tracking for north-south flows: a flow's first packet picks a backend (and an
//! SNAT source when the backend is on another node), and records both directions; later
//! packets follow the record, so backend changes never move established flows.

use aya_ebpf::{
    bindings::BPF_NOEXIST, helpers::generated::bpf_get_prandom_u32, maps::lpm_trie::Key,
};
use lb_common::{
    Addr6, Endpoint,
    ns::{CtEntry, FlowKey, SOURCE_RANGE_ID_BITS, SourceRange},
};

use crate::{
    maps::{BACKENDS, CONNTRACK, NAT_REV, SOURCE_RANGES},
    scratch::Scratch,
};

/// Lowest port used as an SNAT source (set by the agent at load time).
#[unsafe(no_mangle)]
static SNAT_PORT_MIN: u16 = 61000;
/// Highest port used as an SNAT source.
#[unsafe(no_mangle)]
static SNAT_PORT_MAX: u16 = 65535;
/// Ports tried for a new SNAT flow before giving up.
const SNAT_TRIES: u32 = 8;

/// The conntrack entry of an established flow of service `svc_id` and its backend, while
/// that still exists (when it is gone, its pod is, and the flow moves). An entry of another
/// service (the frontend was reprogrammed since) is ignored.
#[inline(always)]
pub fn established(key: &FlowKey, svc_id: u32) -> Option<(&'static CtEntry, Endpoint)> {
    // SAFETY: LRU and hash entries are replaced whole; the references are used during this
    // program run, and the backend is copied at once.
    let ct = unsafe { CONNTRACK.get(key) }?;
    if ct.svc_id != svc_id {
        return None;
    }
    let backend = unsafe { BACKENDS.get(&ct.backend_id) }?;
    Some((ct, *backend))
}

/// The SNAT port range (set by the agent at load time).
#[inline(always)]
fn snat_range() -> (u16, u16) {
    // SAFETY: volatile reads of constants the loader may have set.
    unsafe {
        (
            core::ptr::read_volatile(&SNAT_PORT_MIN),
            core::ptr::read_volatile(&SNAT_PORT_MAX),
        )
    }
}

/// Whether a port (network order) is in the SNAT range: a reply to an SNATed flow.
#[inline(always)]
pub fn is_snat_port(port_be: u16) -> bool {
    let (min, max) = snat_range();
    let port = u16::from_be(port_be);
    port >= min && port <= max
}

/// A backend chosen for a new flow of a service.
pub struct Chosen {
    /// The north-south service id.
    pub svc_id: u32,
    /// The backend id.
    pub id: u32,
    /// Its address and port.
    pub ep: Endpoint,
}

/// Records a new flow to the backend in `s.chosen`, SNATed to `snat` when given, and sets
/// `s.rw.src` to the source the packets take (the client's, or the SNAT address and a free
/// port). False when no SNAT port is free. The records are built in the scratch entry, field
/// by field. Its own BPF function.
#[inline(never)]
pub fn create(s: &mut Scratch, key: &FlowKey, snat: &Option<Addr6>) -> bool {
    s.rev.src = key.daddr;
    s.rev.dst = key.saddr;
    s.rev.sport_be = key.dport_be;
    s.rev.dport_be = key.sport_be;
    s.rev.svc_id = s.chosen.svc_id;
    match *snat {
        None => {
            // Replies come from the backend straight to the client.
            s.reply = FlowKey::new(
                s.chosen.ep.addr,
                key.saddr,
                s.chosen.ep.port_be,
                key.sport_be,
                key.proto,
            );
            // A failed insert only loses the reverse entry of this flow: replies then pass
            // untranslated and the client resets; nothing else is affected.
            let _ = NAT_REV.insert(&s.reply, &s.rev, 0);
            s.rw.src.ip = key.saddr;
            s.rw.src.port_be = key.sport_be;
            s.ct.snat_addr = Addr6::default();
            s.ct.snat_port_be = 0;
        }
        Some(ip) => {
            let Some(port_be) = snat_port(s, key.proto, &ip) else {
                return false;
            };
            s.rw.src.ip = ip;
            s.rw.src.port_be = port_be;
            s.ct.snat_addr = ip;
            s.ct.snat_port_be = port_be;
        }
    }
    s.ct.backend_id = s.chosen.id;
    s.ct.svc_id = s.chosen.svc_id;
    s.ct._pad = [0; 6];
    let _ = CONNTRACK.insert(key, &s.ct, 0);
    true
}

/// Claims a free SNAT port for replies from `backend` to `ip`, recording the reverse entry
/// (already in `s.rev`).
#[inline(always)]
fn snat_port(s: &mut Scratch, proto: u8, ip: &Addr6) -> Option<u16> {
    let (min, max) = snat_range();
    let range = u32::from(max.saturating_sub(min)) + 1;
    // SAFETY: plain helper call.
    let mut offset = unsafe { bpf_get_prandom_u32() } % range;
    for _ in 0..SNAT_TRIES {
        let port = (u32::from(min) + offset) as u16;
        s.reply = FlowKey::new(
            s.chosen.ep.addr,
            *ip,
            s.chosen.ep.port_be,
            port.to_be(),
            proto,
        );
        if NAT_REV
            .insert(&s.reply, &s.rev, u64::from(BPF_NOEXIST))
            .is_ok()
        {
            return Some(port.to_be());
        }
        offset = (offset + 1) % range;
    }
    None
}

/// Whether `addr` is inside the `loadBalancerSourceRanges` of service `svc_id`.
#[inline(always)]
pub fn source_allowed(s: &mut Scratch, svc_id: u32, addr: &Addr6) -> bool {
    s.range = Key::new(
        SOURCE_RANGE_ID_BITS + 128,
        SourceRange {
            svc_id_be: svc_id.to_be(),
            addr: *addr,
        },
    );
    SOURCE_RANGES.get(&s.range).is_some()
}
