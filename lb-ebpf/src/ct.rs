//! Connection tracking for north-south flows: a flow's first packet picks a backend (and an
//! SNAT source when the backend is on another node) and records both directions; later
//! packets follow the record, so backend changes never move established flows.
//!
//! Each entry has a lifetime that its state sets (`lb_common::external::CtTimeouts`): every
//! packet, either way, adds its TCP flags to its direction and pushes the expiry out. An
//! expired entry counts as absent here at once; the agent's sweep deletes it later. A port
//! of a closed or expired flow can be taken by a new flow before the sweep, so SNAT ports
//! come back as soon as their flows end.
//!
//! A flow starts in the maps of new flows (`CT_NEW`, `EXTERNAL_REV_NAT_NEW`) and moves to the main
//! ones (`CONNTRACK`, `EXTERNAL_REV_NAT`) once answered ([`settle`]), so that a flood of flows that
//! are never answered (spoofed SYNs) evicts only its own kind. Lookups try the main maps
//! first.

use aya_ebpf::{
    bindings::BPF_NOEXIST,
    helpers::generated::{bpf_get_prandom_u32, bpf_ktime_get_coarse_ns},
    maps::lpm_trie::Key,
};
use lb_common::{
    Addr6,
    external::{
        CT_FIN_ANSWERED, CT_FLAGS, CT_SEEN, CT_TCP_CLOSED, CtEntry, CtTimeouts, FlowKey,
        FlowRevNat, SOURCE_RANGE_ID_BITS, SourceRange, TCP_ACK, TCP_FIN, TCP_SYN, ct_assured,
        ct_state,
    },
    stats as st,
};

use crate::{
    maps::{CONNTRACK, CT_NEW, EXTERNAL_REV_NAT, EXTERNAL_REV_NAT_NEW, SOURCE_RANGES},
    scratch::Scratch,
    stats,
};

/// Lowest port used as an SNAT source (set by the agent at load time).
#[unsafe(no_mangle)]
static SNAT_PORT_MIN: u16 = 61000;
/// Highest port used as an SNAT source.
#[unsafe(no_mangle)]
static SNAT_PORT_MAX: u16 = 65535;
/// Lifetimes of the flow states (set by the agent at load time).
#[unsafe(no_mangle)]
static CT_TIMEOUTS: CtTimeouts = CtTimeouts::DEFAULT;
/// Seconds added to the clock: zero, except in tests that move time forward.
#[unsafe(no_mangle)]
static CT_CLOCK_OFFSET: u32 = 0;
/// Ports tried for a new SNAT flow before taking over the port of an ended or expired flow.
const SNAT_TRIES: u32 = 16;

/// The coarse monotonic clock plus the programs' clock offset, in units of `unit_ns`
/// nanoseconds, low 32 bits.
#[inline(always)]
fn clock(unit_ns: u64) -> u32 {
    // SAFETY: plain helper call; a volatile read of a constant the loader may have set.
    let (ns, offset_s) = unsafe {
        (
            bpf_ktime_get_coarse_ns(),
            core::ptr::read_volatile(&CT_CLOCK_OFFSET),
        )
    };
    ((ns + u64::from(offset_s) * 1_000_000_000) / unit_ns) as u32
}

/// Now, in seconds of the coarse monotonic clock (what `CtEntry::expires` counts in).
#[inline(always)]
pub fn now() -> u32 {
    clock(1_000_000_000)
}

/// Now, in milliseconds of the same clock, low 32 bits (what `CtEntry::changed_ms` counts
/// in). Read only when a flow's flags change or a port is taken over.
#[inline(always)]
fn now_ms() -> u32 {
    clock(1_000_000)
}

/// The lifetime of a flow in `state` (a `CT_*` state), in seconds.
#[inline(always)]
fn timeout(state: usize) -> u32 {
    // SAFETY: a volatile read of constants the loader may have set.
    let t = unsafe { core::ptr::read_volatile(&CT_TIMEOUTS) };
    t.secs.get(state).copied().unwrap_or(0)
}

/// Whether `flags` (a TCP flags byte) open a connection: SYN without ACK.
#[inline(always)]
pub fn is_syn(flags: u8) -> bool {
    flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// A tracked flow's entry, and which map holds it.
#[derive(Clone, Copy)]
pub struct Flow {
    /// The entry, a live LRU value.
    pub entry: *mut CtEntry,
    /// Whether the map of new flows holds it (the flow is not answered yet).
    pub new: bool,
}

/// The entry of flow `key`, answered flows first.
#[inline(always)]
pub fn find(key: &FlowKey) -> Option<Flow> {
    match CONNTRACK.get_ptr_mut(key) {
        Some(entry) => Some(Flow { entry, new: false }),
        None => CT_NEW
            .get_ptr_mut(key)
            .map(|entry| Flow { entry, new: true }),
    }
}

/// The reverse entry of a reply with key `reply`, of answered flows first.
#[inline(always)]
pub fn reverse_entry(reply: &FlowKey) -> Option<*const FlowRevNat> {
    EXTERNAL_REV_NAT
        .get_ptr(reply)
        .or_else(|| EXTERNAL_REV_NAT_NEW.get_ptr(reply))
}

/// The live flow `key` of service `svc_id`, if any: not expired, of this service (an entry
/// of another is left by a frontend reprogrammed since), and not a closed TCP flow that a
/// SYN (`syn`) opens again (the client reusing its port starts a new flow).
#[inline(always)]
pub fn live(key: &FlowKey, svc_id: u32, syn: bool, now: u32) -> Option<Flow> {
    let flow = find(key)?;
    // SAFETY: a live LRU value; its fields are read one by one.
    let e = unsafe { &*flow.entry };
    if e.svc_id != svc_id || e.expired(now) {
        return None;
    }
    if syn && e.state(key.proto) == CT_TCP_CLOSED {
        return None;
    }
    Some(flow)
}

/// Moves the new flow `fwd` (entry `entry`) to the maps of answered flows if it is answered
/// now, with its reverse entry (key `reply`) when that is still its own. Each entry is
/// written to the main map before it leaves the other, so a packet on another CPU finds it
/// in one or the other. Its own BPF function.
#[inline(never)]
pub fn settle(entry: *mut CtEntry, fwd: &FlowKey, reply: &FlowKey) {
    // SAFETY: a live LRU value, read in place.
    let e = unsafe { &*entry };
    if !ct_assured(fwd.proto, e.fwd_flags, e.rev_flags) || CONNTRACK.insert(fwd, e, 0).is_err() {
        return;
    }
    if let Some(rev) = EXTERNAL_REV_NAT_NEW.get_ptr(reply) {
        // SAFETY: as above.
        let rev = unsafe { &*rev };
        if rev.is_of(fwd) && EXTERNAL_REV_NAT.insert(reply, rev, 0).is_ok() {
            let _ = EXTERNAL_REV_NAT_NEW.remove(reply);
        }
    }
    let _ = CT_NEW.remove(fwd);
}

/// [`settle`] after a packet from the client of flow `key`: its reply key is built in
/// `s.reply`. Its own BPF function.
#[inline(never)]
pub fn settle_from_client(s: &mut Scratch, entry: *mut CtEntry, key: &FlowKey) {
    // SAFETY: a live LRU value, read in place.
    unsafe { reply_key_of(s, &*entry, key) };
    settle(entry, key, &s.reply);
}

/// Builds in `s.reply` the key of the replies of flow `key` with entry `e`.
#[inline(always)]
fn reply_key_of(s: &mut Scratch, e: &CtEntry, key: &FlowKey) {
    let (daddr, dport_be) = e.reply_dst(key);
    s.reply.set(
        &e.backend.addr,
        daddr,
        e.backend.port_be,
        dport_be,
        key.proto,
    );
}

/// Whether a packet with key `key`, sent to an SNAT port ([`is_snat_port`], which callers
/// test before the lookup), is a reply of an SNATed flow by its reverse entry `rev`: the
/// entry does not keep the packet's destination (entries of flows that kept the client's
/// address are keyed by the backend-to-client tuple, and such a packet arriving from
/// outside, to a client port in the SNAT range, is spoofed).
#[inline(always)]
pub fn reverses_snat(rev: &FlowRevNat, key: &FlowKey) -> bool {
    rev.dst != key.daddr || rev.dport_be != key.dport_be
}

/// The live flow a reply with key `reply` belongs to, through its reverse entry `rev`; the
/// flow's key is built in `fwd`. `None` when the flow expired or the entry is stale (its
/// flow was replaced, or its SNAT port taken over): the reply is not translated.
#[inline(always)]
pub fn reply_flow(rev: &FlowRevNat, reply: &FlowKey, fwd: &mut FlowKey, now: u32) -> Option<Flow> {
    *fwd = rev.flow_key(reply.proto);
    let flow = find(fwd)?;
    // SAFETY: as in `live`.
    let e = unsafe { &*flow.entry };
    if !points_back(e, reply, rev.svc_id, now) {
        return None;
    }
    Some(flow)
}

/// Whether the live entry `e` of service `svc_id` sends its replies with key `reply`.
#[inline(always)]
fn points_back(e: &CtEntry, reply: &FlowKey, svc_id: u32, now: u32) -> bool {
    e.svc_id == svc_id && !e.expired(now) && replies_to(e, reply)
}

/// Whether the entry `e` sends its replies with key `reply`.
#[inline(always)]
fn replies_to(e: &CtEntry, reply: &FlowKey) -> bool {
    if e.backend.addr != reply.saddr || e.backend.port_be != reply.sport_be {
        return false;
    }
    // An SNATed flow's replies come to its SNAT source; the others' to the client, which
    // is the reverse entry's own destination.
    !e.is_snat() || (e.snat_port_be == reply.dport_be && e.snat_addr == reply.daddr)
}

/// Records a packet of flow `ct` (from the backend when `reply`) with TCP flags `flags`:
/// the direction's flags, and the expiry the resulting state gives. The entry is written
/// only when the flags change or the expiry has fallen behind by more than an eighth of
/// the lifetime, so a busy flow does not write its entry at every packet.
#[inline(always)]
pub fn touch(ct: *mut CtEntry, proto: u8, flags: u8, reply: bool, now: u32) {
    let bits = (flags & CT_FLAGS) | CT_SEEN;
    // SAFETY: a live LRU value. Concurrent packets of the same flow on other CPUs may race
    // these stores; a lost flag comes back with the next packet of that direction.
    unsafe {
        let (fwd, rev) = ((*ct).fwd_flags, (*ct).rev_flags);
        // A packet answers the other direction's FIN when one was seen before it.
        let (new_fwd, new_rev) = if reply {
            (fwd | answered(fwd), rev | bits)
        } else {
            (fwd | bits, rev | answered(rev))
        };
        let lifetime = timeout(ct_state(proto, new_fwd, new_rev));
        let expires = now.saturating_add(lifetime);
        if new_fwd != fwd || new_rev != rev {
            (*ct).fwd_flags = new_fwd;
            (*ct).rev_flags = new_rev;
            (*ct).expires = expires;
            (*ct).changed_ms = now_ms();
        } else if expires > (*ct).expires.saturating_add(lifetime / 8) {
            (*ct).expires = expires;
        }
    }
}

/// [`CT_FIN_ANSWERED`] if the direction with flags `flags` sent a FIN, else nothing.
#[inline(always)]
fn answered(flags: u8) -> u8 {
    if flags & TCP_FIN != 0 {
        CT_FIN_ANSWERED
    } else {
        0
    }
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

/// Records a new flow `key` (first packet's TCP flags `flags`) to the backend in
/// `s.chosen`, SNATed to `snat` when given, and sets `s.rw.src` to the source the packets
/// take (the client's, or the SNAT address and a port). What an earlier flow with the same
/// key left (expired, closed, or of a reprogrammed frontend) is replaced, its reverse entry
/// removed. False when no SNAT port is free. The records are built in the scratch entry,
/// field by field. Its own BPF function.
#[inline(never)]
pub fn create(s: &mut Scratch, key: &FlowKey, snat: &Option<Addr6>, flags: u8, now: u32) -> bool {
    release_old(s, key);
    s.rev.src = key.daddr;
    s.rev.dst = key.saddr;
    s.rev.sport_be = key.dport_be;
    s.rev.dport_be = key.sport_be;
    s.rev.svc_id = s.chosen.svc_id;
    match snat {
        None => {
            // Replies come from the backend straight to the client.
            s.reply.set(
                &s.chosen.ep.addr,
                &key.saddr,
                s.chosen.ep.port_be,
                key.sport_be,
                key.proto,
            );
            // The newest flow owns the reply key: a client port reused towards another
            // frontend of the same backend makes the same replies, and an older flow's entry
            // among answered ones would be found first. A failed insert only loses the
            // reverse entry of this flow: replies then pass untranslated and the client
            // resets; nothing else is affected.
            let _ = EXTERNAL_REV_NAT.remove(&s.reply);
            let _ = EXTERNAL_REV_NAT_NEW.insert(&s.reply, &s.rev, 0);
            s.rw.src.ip = key.saddr;
            s.rw.src.port_be = key.sport_be;
            s.ct.snat_addr = Addr6::default();
            s.ct.snat_port_be = 0;
        }
        Some(ip) => {
            let Some(port_be) = snat_port(s, key, ip, now) else {
                return false;
            };
            s.rw.src.ip = *ip;
            s.rw.src.port_be = port_be;
            s.ct.snat_addr = *ip;
            s.ct.snat_port_be = port_be;
        }
    }
    s.ct.backend = s.chosen.ep.endpoint();
    s.ct.svc_id = s.chosen.svc_id;
    s.ct.created = now;
    s.ct.fwd_flags = (flags & CT_FLAGS) | CT_SEEN;
    s.ct.rev_flags = 0;
    s.ct.changed_ms = now_ms();
    s.ct.expires = now.saturating_add(timeout(ct_state(key.proto, s.ct.fwd_flags, 0)));
    let _ = CT_NEW.insert(key, &s.ct, 0);
    true
}

/// What [`create`] would set `s.rw.src` to for the flow `key`, without recording anything
/// or taking a port: a dry run's answer. An SNATed flow shows port 0, as its port is only
/// taken when the flow starts.
#[inline(always)]
pub fn preview(s: &mut Scratch, key: &FlowKey, snat: &Option<Addr6>) {
    if let Some(ip) = snat {
        s.rw.src.ip = *ip;
        s.rw.src.port_be = 0;
    } else {
        s.rw.src.ip = key.saddr;
        s.rw.src.port_be = key.sport_be;
    }
}

/// Removes what the flow an entry for `key` recorded before left: its reverse entry, if
/// still its own (the new flow may take another port or backend, and the old one's SNAT
/// port is then free at once), and its entry among answered flows (the new flow starts
/// among new ones, and lookups try the answered first). Reads the entries in place (the
/// stack is short).
#[inline(always)]
fn release_old(s: &mut Scratch, key: &FlowKey) {
    let Some(old) = find(key) else {
        return;
    };
    // SAFETY: a live LRU value, read in place.
    unsafe { reply_key_of(s, &*old.entry, key) };
    if !old.new {
        let _ = CONNTRACK.remove(key);
    }
    let Some(rev) = reverse_entry(&s.reply) else {
        return;
    };
    // SAFETY: as above.
    if unsafe { (*rev).is_of(key) } {
        let _ = EXTERNAL_REV_NAT.remove(&s.reply);
        let _ = EXTERNAL_REV_NAT_NEW.remove(&s.reply);
    }
}

/// Claims an SNAT port for the flow `key` to the backend in `s.chosen`, SNATed to `ip`, and
/// records the reverse entry (already in `s.rev`). The client's own port is kept when it is
/// in the range and free (as Linux's NAT does); otherwise ports are tried at random. When
/// none of those is free, the port of an expired flow found among them, or of one over at
/// both ends for a moment (`CtEntry::frees_port`), is taken over (that flow's entry is
/// removed).
#[inline(always)]
fn snat_port(s: &mut Scratch, key: &FlowKey, ip: &Addr6, now: u32) -> Option<u16> {
    let (min, max) = snat_range();
    let range = u32::from(max.saturating_sub(min)) + 1;
    let client = u16::from_be(key.sport_be);
    let mut port = if client >= min && client <= max {
        client
    } else {
        random_port(min, range)
    };
    let mut reusable = 0u16;
    for _ in 0..SNAT_TRIES {
        snat_reply(s, ip, port, key.proto);
        if claim(s) {
            return Some(port.to_be());
        }
        if reusable == 0 && reusable_port(s, now) {
            reusable = port;
        }
        port = random_port(min, range);
    }
    if reusable == 0 {
        return None;
    }
    snat_reply(s, ip, reusable, key.proto);
    // The flow holding the port is over: its entry goes, so its late packets cannot reach
    // the backend from the port the new flow now uses.
    if !reusable_port(s, now) {
        // Taken by a live flow since it was tried.
        return None;
    }
    if s.fwd.proto != 0 {
        let _ = CONNTRACK.remove(&s.fwd);
        let _ = CT_NEW.remove(&s.fwd);
    }
    let _ = EXTERNAL_REV_NAT.remove(&s.reply);
    if EXTERNAL_REV_NAT_NEW.insert(&s.reply, &s.rev, 0).is_err() {
        return None;
    }
    stats::inc(st::SNAT_PORT_REUSED);
    Some(reusable.to_be())
}

/// Records the new flow's reverse entry (`s.rev`) at the reply key in `s.reply` if no flow
/// holds that key: the port is the new flow's. The insert into the map of new flows
/// decides between new flows; an answered flow moves its entry to the main map before it
/// leaves the other, so one found there after the insert was answered meanwhile, and keeps
/// the port.
#[inline(always)]
fn claim(s: &Scratch) -> bool {
    if EXTERNAL_REV_NAT.get_ptr(&s.reply).is_some()
        || EXTERNAL_REV_NAT_NEW
            .insert(&s.reply, &s.rev, u64::from(BPF_NOEXIST))
            .is_err()
    {
        return false;
    }
    if EXTERNAL_REV_NAT.get_ptr(&s.reply).is_some() {
        let _ = EXTERNAL_REV_NAT_NEW.remove(&s.reply);
        return false;
    }
    true
}

/// A port of the SNAT range starting at `min`, `range` ports long, at random.
#[inline(always)]
fn random_port(min: u16, range: u32) -> u16 {
    // SAFETY: plain helper call.
    min.wrapping_add((unsafe { bpf_get_prandom_u32() } % range) as u16)
}

/// Builds in `s.reply` the reverse key of a flow of protocol `proto` to the backend in
/// `s.chosen`, SNATed to `ip` and `port` (host order).
#[inline(always)]
fn snat_reply(s: &mut Scratch, ip: &Addr6, port: u16, proto: u8) {
    s.reply.set(
        &s.chosen.ep.addr,
        ip,
        s.chosen.ep.port_be,
        port.to_be(),
        proto,
    );
}

/// Whether the reverse entry at `s.reply` belongs to no live flow, or to one whose port is
/// free again (`CtEntry::frees_port`): its port may be taken over. When that flow's entry
/// is still there, leaves its key in `s.fwd` (else `s.fwd.proto` is zero). Its own BPF
/// function (called from the port loop).
#[inline(never)]
fn reusable_port(s: &mut Scratch, now: u32) -> bool {
    s.fwd.proto = 0;
    let Some(rev) = reverse_entry(&s.reply) else {
        return true;
    };
    // SAFETY: a live LRU value, read in place.
    let rev_svc = unsafe {
        s.fwd = (*rev).flow_key(s.reply.proto);
        (*rev).svc_id
    };
    let Some(flow) = find(&s.fwd) else {
        s.fwd.proto = 0;
        return true;
    };
    // SAFETY: as above.
    let e = unsafe { &*flow.entry };
    if !replies_to(e, &s.reply) {
        // The client's flow was replaced by one with another port: this entry is stale.
        s.fwd.proto = 0;
        return true;
    }
    e.svc_id != rev_svc || e.frees_port(s.reply.proto, now, now_ms())
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
