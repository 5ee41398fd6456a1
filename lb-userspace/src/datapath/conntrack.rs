//! The north-south conntrack's agent side: the sweep that deletes what the kernel programs
//! already treat as gone, so memory stays bounded and SNAT ports come back.
//!
//! The kernel (`lb-ebpf/src/ct.rs`) gives every flow a lifetime by state and counts an
//! expired entry as absent at once; the SNAT port of a flow that ended or expired can be
//! taken by a new flow before any sweep. The sweep ([`Sweeper::sweep`]), run off the sync
//! path at an interval that shortens while it finds much to delete, removes:
//! - expired entries, with their reverse entries;
//! - entries of north-south services that are no longer programmed;
//! - UDP flows to a backend that is no longer an endpoint of the service (in any condition),
//!   so their clients move to another, as kube-proxy clears UDP conntrack entries; TCP flows
//!   stay on their backend while it exists (draining) and until they end;
//! - reverse entries no flow points to any more, once seen so in two sweeps in a row (a new
//!   flow writes its reverse entry just before its conntrack entry).
//!
//! The maps of answered flows and those of new flows (see `lb_common::maps::CT_NEW`) are
//! swept alike.
//!
//! Each deletion first reads the entry again, so a flow refreshed or replaced since the bulk
//! read is kept, and deletes by lookup-and-delete, putting back what a packet wrote between
//! the two calls ([`delete_if`]). What to delete is decided by [`verdict`], a pure function.

use std::{
    collections::{BTreeMap, BTreeSet, HashSet},
    io,
    time::{Duration, Instant},
};

use lb_common::{
    Endpoint,
    external::{
        CT_SEEN, CT_STATES, CtEntry, CtEntryV1, CtTimeouts, FlowKey, FlowRevNat, TCP_ACK, TCP_SYN,
    },
    maps, proto,
};

use crate::{
    datapath::raw::{BPF_NOEXIST, RawMap},
    loader::{LoadError, PinLayout},
};

/// Shortest interval between sweeps.
pub const MIN_INTERVAL: Duration = Duration::from_secs(1);

/// Now on the kernel programs' conntrack clock: seconds of `CLOCK_MONOTONIC_COARSE` (what
/// `bpf_ktime_get_coarse_ns` reads), plus the programs' clock offset.
pub fn clock_now(offset: u32) -> u32 {
    ((crate::datapath::bpf::coarse_now_ns() / 1_000_000_000) as u32).wrapping_add(offset)
}

/// Why the sweep removes a flow.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Removal {
    /// Its lifetime ran out.
    Expired,
    /// Its north-south service is no longer programmed.
    ServiceGone,
    /// A UDP flow whose backend is no longer an endpoint of its service.
    EndpointGone,
}

impl Removal {
    /// Every reason, in metric label order.
    pub const ALL: [Self; 3] = [Self::Expired, Self::ServiceGone, Self::EndpointGone];

    /// The metric label.
    pub fn label(self) -> &'static str {
        match self {
            Self::Expired => "expired",
            Self::ServiceGone => "service_gone",
            Self::EndpointGone => "endpoint_gone",
        }
    }
}

/// The endpoints each programmed north-south service (by id) keeps flows to, as the agent
/// knew them at one time.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Owners {
    /// Endpoints by north-south service id.
    pub endpoints: BTreeMap<u32, BTreeSet<Endpoint>>,
    /// When they were taken, on the conntrack clock: flows created since (or in the same
    /// second) may belong to services and endpoints programmed after, and are judged by a
    /// later sweep.
    pub at: u32,
}

impl Owners {
    /// `endpoints`, taken now on the clock of programs loaded with `clock_offset`.
    pub fn now(endpoints: BTreeMap<u32, BTreeSet<Endpoint>>, clock_offset: u32) -> Self {
        Self {
            endpoints,
            at: clock_now(clock_offset),
        }
    }
}

/// Whether the sweep removes the flow `key` with entry `e` at time `now`, given the
/// endpoints each programmed north-south service keeps flows to.
pub fn verdict(key: &FlowKey, e: &CtEntry, now: u32, owners: &Owners) -> Option<Removal> {
    if e.expired(now) {
        return Some(Removal::Expired);
    }
    if e.created >= owners.at {
        return None;
    }
    let Some(endpoints) = owners.endpoints.get(&e.svc_id) else {
        return Some(Removal::ServiceGone);
    };
    (key.proto != proto::TCP && !endpoints.contains(&e.backend)).then_some(Removal::EndpointGone)
}

/// Whether the reverse entry `rev` (key `reply`) belongs to the flow `flow` (`None`: no
/// such flow).
pub fn reverse_is_current(reply: &FlowKey, rev: &FlowRevNat, flow: Option<&CtEntry>) -> bool {
    let Some(e) = flow else {
        return false;
    };
    e.svc_id == rev.svc_id && e.reply_key(&rev.flow_key(reply.proto)) == *reply
}

/// A `lb_ct_v1` entry as a current one: its backend looked up by id (`None` when the
/// backend is gone: the flow is dropped), its state taken as answered both ways (TCP:
/// established), its lifetime started anew at `now`.
pub fn convert_v1(
    key: &FlowKey,
    old: &CtEntryV1,
    backend: Option<Endpoint>,
    now: u32,
    timeouts: &CtTimeouts,
) -> Option<CtEntry> {
    let backend = backend?;
    let flags = CT_SEEN | TCP_SYN | TCP_ACK;
    let mut e = CtEntry {
        backend,
        snat_addr: old.snat_addr,
        svc_id: old.svc_id,
        expires: 0,
        created: now,
        snat_port_be: old.snat_port_be,
        fwd_flags: flags,
        rev_flags: flags,
        // Read only once the flow is over, which takes a change of flags that sets it.
        changed_ms: 0,
    };
    let lifetime = timeouts.secs[e.state(key.proto)];
    e.expires = now.saturating_add(lifetime);
    Some(e)
}

/// What one sweep found and did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// Entries read.
    pub scanned: u64,
    /// Entries kept, by `CT_*` state.
    pub by_state: [u64; CT_STATES],
    /// Entries removed, by reason (indexed like [`Removal::ALL`]).
    pub removed: [u64; 3],
    /// Reverse entries removed that no flow pointed to.
    pub orphans_removed: u64,
    /// SNAT ports held by the kept flows.
    pub snat_ports: u64,
    /// Most SNAT ports held towards one backend from one address (what runs out first).
    pub snat_ports_busiest: u64,
    /// How long the sweep took.
    pub took: Duration,
}

impl SweepReport {
    /// All entries removed.
    pub fn removed_total(&self) -> u64 {
        self.removed.iter().sum::<u64>() + self.orphans_removed
    }
}

/// The next interval between sweeps after one that removed `removed` entries of a map of
/// `capacity`, the last interval being `last`: halved (down to [`MIN_INTERVAL`]) when it
/// removed a tenth of the capacity or more, doubled (up to `max`) when it removed under a
/// hundredth, else kept.
pub fn next_interval(last: Duration, removed: u64, capacity: u64, max: Duration) -> Duration {
    let max = max.max(MIN_INTERVAL);
    if removed.saturating_mul(10) >= capacity.max(1) {
        (last / 2).max(MIN_INTERVAL)
    } else if removed.saturating_mul(100) < capacity {
        (last * 2).min(max)
    } else {
        last.clamp(MIN_INTERVAL, max)
    }
}

/// Sweeps the pinned conntrack and reverse-NAT maps: those of answered flows and those of
/// new flows, alike.
pub struct Sweeper {
    /// The maps of answered flows, then those of new flows.
    tiers: [Tier; 2],
    capacity: u64,
    clock_offset: u32,
}

/// A conntrack map and its reverse-NAT map.
struct Tier {
    ct: RawMap,
    rev: RawMap,
    /// Reverse entries found without a flow in the last sweep.
    suspects: HashSet<FlowKey>,
}

impl Tier {
    fn open(
        layout: &PinLayout,
        (ct, rev): (&'static str, &'static str),
    ) -> Result<(Self, u32), LoadError> {
        let (ct, capacity) = RawMap::open(layout, ct)?;
        let (rev, _) = RawMap::open(layout, rev)?;
        let tier = Self {
            ct,
            rev,
            suspects: HashSet::new(),
        };
        Ok((tier, capacity))
    }
}

impl Sweeper {
    /// Opens the maps pinned under `layout` for writing; `clock_offset` as the programs were
    /// loaded with.
    pub fn open(layout: &PinLayout, clock_offset: u32) -> Result<Self, LoadError> {
        let (answered, capacity) = Tier::open(layout, (maps::CONNTRACK, maps::EXTERNAL_REV_NAT))?;
        let (new, _) = Tier::open(layout, (maps::CT_NEW, maps::EXTERNAL_REV_NAT_NEW))?;
        Ok(Self {
            tiers: [answered, new],
            capacity: u64::from(capacity),
            clock_offset,
        })
    }

    /// The conntrack map's capacity (of answered flows).
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// The clock offset the programs were loaded with.
    pub fn clock_offset(&self) -> u32 {
        self.clock_offset
    }

    /// One sweep, with the endpoints each programmed north-south service keeps flows to.
    pub fn sweep(&mut self, owners: &Owners) -> io::Result<SweepReport> {
        let started = Instant::now();
        let mut report = SweepReport::default();
        let mut kept: BTreeMap<FlowKey, CtEntry> = BTreeMap::new();
        let mut per_backend: BTreeMap<(lb_common::Addr6, Endpoint), u64> = BTreeMap::new();
        for tier in &self.tiers {
            self.sweep_flows(tier, owners, &mut report, &mut kept, &mut per_backend)?;
        }
        report.snat_ports_busiest = per_backend.values().copied().max().unwrap_or(0);
        // Reverse entries of no flow (in either map: a flow being answered moves): removed
        // when found so twice in a row.
        for i in 0..self.tiers.len() {
            let suspects = self.orphans(&self.tiers[i], &kept, &mut report)?;
            self.tiers[i].suspects = suspects;
        }
        report.took = started.elapsed();
        Ok(report)
    }

    /// Removes the flows of one conntrack map that [`verdict`] removes, with their reverse
    /// entries; counts the others in `report` and keeps them in `kept`.
    fn sweep_flows(
        &self,
        tier: &Tier,
        owners: &Owners,
        report: &mut SweepReport,
        kept: &mut BTreeMap<FlowKey, CtEntry>,
        per_backend: &mut BTreeMap<(lb_common::Addr6, Endpoint), u64>,
    ) -> io::Result<()> {
        let now = clock_now(self.clock_offset);
        let flows: Vec<(FlowKey, CtEntry)> = tier.ct.lookup_batch()?;
        report.scanned += flows.len() as u64;
        for (key, e) in flows {
            let Some(why) = verdict(&key, &e, now, owners) else {
                // A flow being answered may be in both maps for a moment: counted once.
                if kept.insert(key, e).is_none() {
                    report.by_state[e.state(key.proto)] += 1;
                    if e.is_snat() {
                        report.snat_ports += 1;
                        *per_backend.entry((e.snat_addr, e.backend)).or_default() += 1;
                    }
                }
                continue;
            };
            // Read again: a packet since the bulk read may have refreshed or replaced it.
            let Some(now_e) = tier.ct.lookup::<FlowKey, CtEntry>(&key)? else {
                continue;
            };
            let now = clock_now(self.clock_offset);
            if verdict(&key, &now_e, now, owners) != Some(why) {
                kept.insert(key, now_e);
                continue;
            }
            if !delete_if(&tier.ct, &key, |e: &CtEntry| {
                verdict(&key, e, now, owners) == Some(why)
            })? {
                continue;
            }
            report.removed[why as usize] += 1;
            let reply = now_e.reply_key(&key);
            if let Some(rev) = tier.rev.lookup::<FlowKey, FlowRevNat>(&reply)?
                && rev.is_of(&key)
            {
                delete_if(&tier.rev, &reply, |r: &FlowRevNat| r.is_of(&key))?;
            }
        }
        Ok(())
    }

    /// Removes the reverse entries of one map that no kept flow points to and that were
    /// suspects already; returns this sweep's suspects.
    fn orphans(
        &self,
        tier: &Tier,
        kept: &BTreeMap<FlowKey, CtEntry>,
        report: &mut SweepReport,
    ) -> io::Result<HashSet<FlowKey>> {
        let mut suspects = HashSet::new();
        for (reply, rev) in tier.rev.lookup_batch::<FlowKey, FlowRevNat>()? {
            let flow = rev.flow_key(reply.proto);
            if reverse_is_current(&reply, &rev, kept.get(&flow)) {
                continue;
            }
            if !tier.suspects.contains(&reply) {
                suspects.insert(reply);
                continue;
            }
            if !self.points_back_now(&reply, &rev, &flow)?
                && delete_if(&tier.rev, &reply, |r: &FlowRevNat| *r == rev)?
            {
                report.orphans_removed += 1;
            }
        }
        Ok(suspects)
    }

    /// Whether the reverse entry `rev` (key `reply`) belongs to flow `flow` as the maps
    /// hold it now (answered flows first, as the programs look).
    fn points_back_now(
        &self,
        reply: &FlowKey,
        rev: &FlowRevNat,
        flow: &FlowKey,
    ) -> io::Result<bool> {
        for tier in &self.tiers {
            if let Some(e) = tier.ct.lookup::<FlowKey, CtEntry>(flow)? {
                return Ok(reverse_is_current(reply, rev, Some(&e)));
            }
        }
        Ok(false)
    }
}

/// Deletes `key` from `map` if the value it holds at the instant of deletion is still one
/// the sweep `judged` removable; any other (a new flow's, written by a packet since the
/// sweep read it) is put back at once, unless a newer one is there already. A plain delete
/// after a read would remove such a flow: under port pressure a new flow can take a port
/// over, or a client reuse its port, between the two calls. Whether it was deleted.
fn delete_if<K: aya::Pod, V: aya::Pod>(
    map: &RawMap,
    key: &K,
    judged: impl FnOnce(&V) -> bool,
) -> io::Result<bool> {
    let Some(gone) = map.take::<K, V>(key)? else {
        return Ok(false);
    };
    if judged(&gone) {
        return Ok(true);
    }
    map.update(key, &gone, BPF_NOEXIST)?;
    Ok(false)
}

/// Converts the entries of the `lb_ct_v1` map pinned at `from` into the current conntrack
/// map under `layout` (entries already there are kept); returns how many.
pub fn convert_v1_map(
    from: &std::path::Path,
    layout: &PinLayout,
    timeouts: &CtTimeouts,
    clock_offset: u32,
) -> Result<usize, LoadError> {
    let name = maps::CONNTRACK;
    let merr = |source| LoadError::Map { name, source };
    let old = aya::maps::MapData::from_pin(from).map_err(merr)?;
    let old = RawMap::from_data(&old).map_err(|e| io_load(from, e))?;
    let (new, _) = RawMap::open(layout, name)?;
    let (backends, _) = RawMap::open(layout, maps::BACKENDS)?;
    let now = clock_now(clock_offset);
    let mut n = 0;
    let entries = old
        .lookup_batch::<FlowKey, CtEntryV1>()
        .map_err(|e| io_load(from, e))?;
    for (key, e) in entries {
        let backend = backends
            .lookup::<u32, Endpoint>(&e.backend_id)
            .map_err(|e| io_load(from, e))?;
        if let Some(v2) = convert_v1(&key, &e, backend, now, timeouts)
            && new
                .update(&key, &v2, BPF_NOEXIST)
                .map_err(|e| io_load(from, e))?
        {
            n += 1;
        }
    }
    Ok(n)
}

fn io_load(path: &std::path::Path, source: io::Error) -> LoadError {
    LoadError::Io {
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{
        Addr6,
        external::{
            CT_FIN_ANSWERED, CT_PORT_GRACE_MS, CT_TCP_CLOSE_WAIT, CT_TCP_CLOSED,
            CT_TCP_ESTABLISHED, CT_TCP_SYN, CT_UDP, CT_UDP_STREAM, TCP_FIN, TCP_RST, ct_assured,
            ct_over, ct_state,
        },
    };

    use super::*;

    fn ep(last: u32, port: u16) -> Endpoint {
        Endpoint::new(
            Addr6::v4_mapped(u32::from_be_bytes([10, 0, 0, last as u8]).to_be()),
            port.to_be(),
        )
    }

    fn flow(proto: u8) -> FlowKey {
        FlowKey::new(
            Addr6::v4_mapped(u32::from_be_bytes([203, 0, 113, 7]).to_be()),
            Addr6::v4_mapped(u32::from_be_bytes([192, 0, 2, 1]).to_be()),
            40000u16.to_be(),
            30080u16.to_be(),
            proto,
        )
    }

    fn entry(backend: Endpoint, svc_id: u32, expires: u32) -> CtEntry {
        CtEntry {
            backend,
            snat_addr: Addr6::v4_mapped(u32::from_be_bytes([192, 0, 2, 1]).to_be()),
            svc_id,
            expires,
            created: 0,
            snat_port_be: 61000u16.to_be(),
            fwd_flags: CT_SEEN | TCP_SYN | TCP_ACK,
            rev_flags: CT_SEEN | TCP_SYN | TCP_ACK,
            changed_ms: 0,
        }
    }

    #[test]
    fn the_state_follows_the_flags_of_both_directions() {
        let s = CT_SEEN;
        let tcp = proto::TCP;
        assert_eq!(ct_state(tcp, s | TCP_SYN, 0), CT_TCP_SYN);
        // The backend answered, the client has not acknowledged: still opening (a spoofed
        // SYN never gets further).
        assert_eq!(
            ct_state(tcp, s | TCP_SYN, s | TCP_SYN | TCP_ACK),
            CT_TCP_SYN
        );
        assert_eq!(
            ct_state(tcp, s | TCP_SYN | TCP_ACK, s | TCP_SYN | TCP_ACK),
            CT_TCP_ESTABLISHED
        );
        assert_eq!(
            ct_state(tcp, s | TCP_ACK | TCP_FIN, s | TCP_ACK),
            CT_TCP_CLOSE_WAIT
        );
        assert_eq!(
            ct_state(tcp, s | TCP_ACK | TCP_FIN, s | TCP_ACK | TCP_FIN),
            CT_TCP_CLOSED
        );
        assert_eq!(ct_state(tcp, s | TCP_ACK, s | TCP_RST), CT_TCP_CLOSED);
        assert_eq!(ct_state(proto::UDP, s, 0), CT_UDP);
        assert_eq!(ct_state(proto::UDP, s, s), CT_UDP_STREAM);
    }

    #[test]
    fn a_flow_is_answered_once_the_backend_spoke_and_a_tcp_client_acknowledged() {
        let (s, tcp) = (CT_SEEN, proto::TCP);
        // A spoofed SYN never is; a handshake only with the client's ACK.
        assert!(!ct_assured(tcp, s | TCP_SYN, 0));
        assert!(!ct_assured(tcp, s | TCP_SYN, s | TCP_SYN | TCP_ACK));
        assert!(ct_assured(
            tcp,
            s | TCP_SYN | TCP_ACK,
            s | TCP_SYN | TCP_ACK
        ));
        // Reset during the handshake: it stays among new flows, to expire there.
        assert!(!ct_assured(tcp, s | TCP_SYN | TCP_ACK, s | TCP_RST));
        // UDP: once the backend answers.
        assert!(!ct_assured(proto::UDP, s, 0));
        assert!(ct_assured(proto::UDP, s, s));
    }

    #[test]
    fn a_port_is_free_once_both_fins_are_answered_a_moment_ago_or_the_flow_expired() {
        let (s, a, fin) = (CT_SEEN, TCP_ACK, TCP_FIN);
        let tcp = proto::TCP;
        // Closed, but the last FIN not yet answered: its sender is in LAST_ACK.
        assert!(!ct_over(tcp, s | a | fin | CT_FIN_ANSWERED, s | a | fin));
        assert!(ct_over(
            tcp,
            s | a | fin | CT_FIN_ANSWERED,
            s | a | fin | CT_FIN_ANSWERED
        ));
        assert!(ct_over(tcp, s | a, s | TCP_RST));
        assert!(!ct_over(proto::UDP, s, s));

        let mut e = entry(ep(1, 8080), 7, 100);
        e.fwd_flags |= TCP_RST;
        e.changed_ms = u32::MAX - 4;
        // Over 5 ms ago (across the wrap of the millisecond clock): not yet.
        assert!(!e.frees_port(tcp, 50, 0));
        assert!(e.frees_port(tcp, 50, CT_PORT_GRACE_MS));
        // An entry lives through the second its expiry names.
        let live = entry(ep(1, 8080), 7, 100);
        assert!(!live.expired(100) && live.expired(101));
        assert!(!live.frees_port(tcp, 100, 0) && live.frees_port(tcp, 101, 0));
    }

    #[test]
    fn the_sweep_removes_expired_flows_and_udp_flows_of_deleted_endpoints_only() {
        let (a, b) = (ep(1, 8080), ep(2, 8080));
        let owners = Owners {
            endpoints: [(7, [a].into())].into(),
            at: 999,
        };
        let now = 1000;
        // Live TCP flow to an endpoint: kept, through the second its expiry names.
        assert_eq!(
            verdict(&flow(proto::TCP), &entry(a, 7, 1000), now, &owners),
            None
        );
        // Expired: removed, whatever else.
        assert_eq!(
            verdict(&flow(proto::TCP), &entry(a, 7, 999), now, &owners),
            Some(Removal::Expired)
        );
        // A TCP flow to a backend that is no longer an endpoint is kept until it ends (its
        // pod may still be there: kube-proxy keeps such connections too).
        assert_eq!(
            verdict(&flow(proto::TCP), &entry(b, 7, 2000), now, &owners),
            None
        );
        // A UDP one is removed, so its client moves.
        assert_eq!(
            verdict(&flow(proto::UDP), &entry(b, 7, 2000), now, &owners),
            Some(Removal::EndpointGone)
        );
        assert_eq!(
            verdict(&flow(proto::UDP), &entry(a, 7, 2000), now, &owners),
            None
        );
        // A service no longer programmed.
        assert_eq!(
            verdict(&flow(proto::TCP), &entry(a, 8, 2000), now, &owners),
            Some(Removal::ServiceGone)
        );
        // Unless the flow is younger than what the agent knew: its service or endpoint may
        // have been programmed since.
        let young = CtEntry {
            created: 999,
            ..entry(b, 8, 2000)
        };
        assert_eq!(verdict(&flow(proto::UDP), &young, now, &owners), None);
    }

    #[test]
    fn a_reverse_entry_is_current_only_while_its_flow_points_back_to_it() {
        let key = flow(proto::TCP);
        let e = entry(ep(1, 8080), 7, 2000);
        let reply = e.reply_key(&key);
        let rev = FlowRevNat {
            src: key.daddr,
            dst: key.saddr,
            sport_be: key.dport_be,
            dport_be: key.sport_be,
            svc_id: 7,
        };
        assert_eq!(rev.flow_key(proto::TCP), key);
        assert!(reverse_is_current(&reply, &rev, Some(&e)));
        assert!(!reverse_is_current(&reply, &rev, None));
        // The client's flow was replaced by one on another SNAT port.
        let moved = CtEntry {
            snat_port_be: 61001u16.to_be(),
            ..e
        };
        assert!(!reverse_is_current(&reply, &rev, Some(&moved)));
    }

    #[test]
    fn v1_entries_convert_to_established_flows_with_their_backend() {
        let key = flow(proto::TCP);
        let old = CtEntryV1 {
            backend_id: 3,
            svc_id: 7,
            snat_addr: Addr6::default(),
            snat_port_be: 0,
            _pad: [0; 6],
        };
        let t = CtTimeouts::DEFAULT;
        let e = convert_v1(&key, &old, Some(ep(1, 8080)), 100, &t).expect("converted");
        assert_eq!(e.backend, ep(1, 8080));
        assert_eq!(e.state(proto::TCP), CT_TCP_ESTABLISHED);
        assert_eq!(e.expires, 100 + t.secs[CT_TCP_ESTABLISHED]);
        assert!(!e.is_snat());
        assert_eq!(convert_v1(&key, &old, None, 100, &t), None);
        let udp = convert_v1(&flow(proto::UDP), &old, Some(ep(1, 53)), 100, &t).unwrap();
        assert_eq!(udp.state(proto::UDP), CT_UDP_STREAM);
    }

    #[test]
    fn sweeps_come_sooner_while_they_find_much_to_remove() {
        let max = Duration::from_secs(30);
        let s = Duration::from_secs(8);
        assert_eq!(next_interval(s, 500, 1000, max), Duration::from_secs(4));
        assert_eq!(next_interval(MIN_INTERVAL, 500, 1000, max), MIN_INTERVAL);
        assert_eq!(next_interval(s, 0, 1000, max), Duration::from_secs(16));
        assert_eq!(next_interval(Duration::from_secs(20), 0, 1000, max), max);
        assert_eq!(next_interval(s, 50, 1000, max), s);
    }
}
