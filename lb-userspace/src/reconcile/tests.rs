use std::collections::BTreeMap;

use k8s_openapi::api::{
    core::v1::{ClientIPConfig, Service, SessionAffinityConfig},
    discovery::v1::EndpointSlice,
};
use lb_common::{
    AffinityMatchKey, ServiceInfo, SlotKey,
    external::{EXTERNAL_F_AFFINITY, EXTERNAL_F_LOCAL, EXTERNAL_F_SOURCE_RANGES},
    maps,
    service::SLOT_GEN1,
};

use super::{
    index::{Ids, identity},
    socket::arrange,
    *,
};
use crate::{
    addr::{frontend_string, to_socket_addr},
    datapath::fake::FakeDatapath,
    k8s::store::{Snapshot, Update},
    model,
    testutil::{ready, service, slice},
};

const CAPS: Capacities = Capacities {
    services: 100,
    slots: 1000,
    backends: 100,
    affinity_match: 1000,
    external: 100,
    external_ids: 8,
    table_entries: 8 * 61,
    ranges: 20,
    external_match: 100,
};
const LIMITS: Limits = Limits {
    max_backends_per_service: 50,
    max_frontends_per_service: 4096,
    max_table_size: 61,
    entries_per_backend: 100,
};

fn web(ip: &str) -> Service {
    service("ns", "web", &[ip], &[("http", 80, "TCP")])
}

fn web_slice(addrs: &[&str]) -> EndpointSlice {
    let eps: Vec<_> = addrs.iter().map(|a| ready(a)).collect();
    slice("ns", "web-1", "web", "IPv4", &[("http", 8080, "TCP")], &eps)
}

fn dns(addrs: &[&str]) -> (Service, EndpointSlice) {
    let eps: Vec<_> = addrs.iter().map(|a| ready(a)).collect();
    (
        service(
            "kube-system",
            "dns",
            &["10.96.0.10"],
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
        ),
        slice(
            "kube-system",
            "dns-1",
            "dns",
            "IPv4",
            &[("dns", 53, "UDP"), ("dns-tcp", 53, "TCP")],
            &eps,
        ),
    )
}

struct Harness {
    store: Store,
    rec: Reconciler<FakeDatapath>,
}

impl Harness {
    fn new() -> Self {
        Self::over(FakeDatapath::new(CAPS))
    }

    fn over(dp: FakeDatapath) -> Self {
        Self {
            store: Store::default(),
            rec: Reconciler::new(dp, LIMITS).unwrap(),
        }
    }

    fn sync(&mut self, services: Vec<Service>, slices: Vec<EndpointSlice>) -> SyncReport {
        let dirty = self.store.update(Update::Snapshot(Snapshot {
            services,
            slices,
            nodes: vec![],
        }));
        let mut report = self.rec.sync(&self.store, dirty);
        report.merge(self.rec.retire());
        assert_eq!(
            self.rec.contents(),
            &self.rec.datapath().contents,
            "the mirror equals the maps"
        );
        report
    }

    /// A sync of nothing new (what the agent's retry timer runs), and a retirement.
    fn resync(&mut self) -> SyncReport {
        let mut report = self.rec.sync(&self.store, BTreeSet::new());
        report.merge(self.rec.retire());
        report
    }

    /// The programmed frontend `frontend` ("10.96.0.1:80/TCP").
    fn key(&self, frontend: &str) -> ServiceKey {
        *self
            .rec
            .contents()
            .services
            .keys()
            .find(|k| frontend_string(k) == frontend)
            .expect("programmed")
    }

    fn log(&self) -> &[Op] {
        &self.rec.datapath().log
    }

    /// What the datapath serves: frontend -> (owner, backends in slot order).
    fn served(&self) -> BTreeMap<String, (String, Vec<String>)> {
        served(&self.rec.datapath().contents)
    }
}

fn served(c: &Contents) -> BTreeMap<String, (String, Vec<String>)> {
    c.check_lookups().unwrap();
    c.services
        .iter()
        .map(|(k, v)| {
            let info = &c.info[&v.id];
            let owner = format!(
                "{}/{}:{}",
                info.namespace().unwrap(),
                info.name().unwrap(),
                info.port_name().unwrap()
            );
            let backends = c
                .live_slots(v)
                .map(|(_, id)| to_socket_addr(&c.backends[id]).to_string())
                .collect();
            (frontend_string(k), (owner, backends))
        })
        .collect()
}

fn entry(owner: &str, backends: &[&str]) -> (String, Vec<String>) {
    (
        owner.to_string(),
        backends
            .iter()
            .map(std::string::ToString::to_string)
            .collect(),
    )
}

/// Entries in each map: (services, slots, backends, info).
fn sizes(c: &Contents) -> (usize, usize, usize, usize) {
    (
        c.services.len(),
        c.slots.len(),
        c.backends.len(),
        c.info.len(),
    )
}

/// The kind of each write, in order.
fn kinds(ops: &[Op]) -> Vec<&'static str> {
    ops.iter()
        .map(|op| match op {
            Op::PutBackend(..) => "put-backend",
            Op::PutSlot(..) => "put-slot",
            Op::PutInfo(..) => "put-info",
            Op::PutService(..) => "put-service",
            Op::DeleteService(_) => "del-service",
            Op::DeleteSlot(_) => "del-slot",
            Op::DeleteInfo(_) => "del-info",
            Op::DeleteBackend(_) => "del-backend",
            Op::PutMatch(_) => "put-match",
            Op::DeleteMatch(_) => "del-match",
            Op::PutExternal(..) => "put-external",
            Op::DeleteExternal(_) => "del-external",
            Op::PutTable { .. } => "put-table",
            Op::ClearTable { .. } => "clear-table",
            Op::PutExternalInfo(..) => "put-ext-info",
            Op::DeleteExternalInfo(_) => "del-ext-info",
            Op::PutRange(_) => "put-range",
            Op::DeleteRange(_) => "del-range",
            Op::PutExternalMatch(..) => "put-ext-match",
            Op::DeleteExternalMatch(_) => "del-ext-match",
            Op::ResetCounters(_) => "reset-counters",
            Op::ResetServiceCounters(_) => "reset-svc-counters",
            Op::ResetBackendCounters(_) => "reset-be-counters",
        })
        .collect()
}

#[test]
fn a_new_service_is_written_backends_first_service_last() {
    let mut h = Harness::new();
    let report = h.sync(
        vec![web("10.96.0.1")],
        vec![web_slice(&["10.0.0.1", "10.0.0.2"])],
    );
    assert!(report.errors.is_empty() && report.rejected.is_empty());
    assert_eq!(
        kinds(h.log()),
        [
            "reset-svc-counters",
            "reset-be-counters",
            "put-backend",
            "reset-be-counters",
            "put-backend",
            "put-slot",
            "put-slot",
            "put-info",
            "put-service"
        ],
        "the new ids' counters are zeroed before anything names them"
    );
    assert_eq!(
        h.served(),
        [(
            "10.96.0.1:80/TCP".to_string(),
            entry("ns/web:http", &["10.0.0.1:8080", "10.0.0.2:8080"])
        )]
        .into()
    );
}

#[test]
fn an_unchanged_sync_writes_nothing() {
    let mut h = Harness::new();
    let (svc, sl) = dns(&["10.0.0.1"]);
    h.sync(vec![svc.clone()], vec![sl.clone()]);
    let before = h.log().len();
    let report = h.sync(vec![svc], vec![sl]);
    assert_eq!(report.writes, 0);
    assert_eq!(h.log().len(), before);
}

#[test]
fn replacing_a_backend_writes_a_new_table_and_switches_to_it_in_one_write() {
    let mut h = Harness::new();
    let (dns_svc, dns_slice) = dns(&["10.0.1.1"]);
    h.sync(
        vec![web("10.96.0.1"), dns_svc.clone()],
        vec![
            web_slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            dns_slice.clone(),
        ],
    );
    let before = h.log().len();
    let graces = h.rec.datapath().graces;
    let old = h.rec.contents().services[&h.key("10.96.0.1:80/TCP")];
    h.sync(
        vec![web("10.96.0.1"), dns_svc],
        vec![web_slice(&["10.0.0.1", "10.0.0.4", "10.0.0.3"]), dns_slice],
    );
    let ops = &h.log()[before..];
    // The whole table in the other generation, one write to switch, and the old slots and
    // the old backend after a grace period (the fake checks no lookup begun before it
    // could see a change). dns is not touched.
    assert_eq!(
        kinds(ops),
        [
            "reset-be-counters",
            "put-backend",
            "put-slot",
            "put-slot",
            "put-slot",
            "put-service",
            "del-slot",
            "del-slot",
            "del-slot",
            "del-backend"
        ]
    );
    assert_eq!(h.rec.datapath().graces, graces + 1);
    let new = h.rec.contents().services[&h.key("10.96.0.1:80/TCP")];
    assert_eq!(
        (new.id, new.slot_gen()),
        (old.id, old.slot_gen() ^ SLOT_GEN1)
    );
    assert!(ops.iter().all(|op| match op {
        Op::PutSlot(k, _) => k.generation() == new.slot_gen(),
        Op::DeleteSlot(k) => k.generation() == old.slot_gen(),
        _ => true,
    }));
    // The new backend took the removed one's position; the others kept theirs.
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"].1,
        ["10.0.0.1:8080", "10.0.0.4:8080", "10.0.0.3:8080"]
    );
}

#[test]
fn deletions_wait_for_the_grace_period_and_a_second_change_waits_for_them() {
    let mut dp = FakeDatapath::new(CAPS);
    dp.slow_graces = true;
    let mut h = Harness::over(dp);
    let svc = || vec![web("10.96.0.1")];
    h.sync(
        svc(),
        vec![web_slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])],
    );
    // (The first sync looks for leftovers of an earlier run: done once its period ends.)
    h.rec.datapath_mut().end_graces();
    h.rec.retire();
    assert!(!h.rec.has_pending());
    // A replaced backend: the new table is live at once, the old one and the backend stay
    // while its grace period runs (a lookup may still be reading them).
    h.sync(
        svc(),
        vec![web_slice(&["10.0.0.1", "10.0.0.4", "10.0.0.3"])],
    );
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"].1,
        ["10.0.0.1:8080", "10.0.0.4:8080", "10.0.0.3:8080"]
    );
    assert_eq!(sizes(h.rec.contents()).1, 6, "both tables");
    assert_eq!(h.rec.contents().backends.len(), 4);
    assert!(h.rec.has_pending());
    assert_eq!(h.rec.retire().writes, 0, "nothing is due yet");
    h.rec.datapath_mut().end_graces();
    let report = h.rec.retire();
    assert_eq!(report.writes, 4, "three old slots and the backend");
    assert_eq!(sizes(h.rec.contents()).1, 3);
    assert_eq!(h.rec.contents().backends.len(), 3);
    assert!(!h.rec.has_pending());

    // Changes within one grace period: the second would write the generation the first
    // left, so the frontend keeps its table until the period ends, and the retirement that
    // deletes the old slots programs it as it is wanted then (the fake checks that no
    // lookup begun before saw a change). No sync waits.
    h.sync(
        svc(),
        vec![web_slice(&["10.0.0.1", "10.0.0.5", "10.0.0.3"])],
    );
    h.sync(
        svc(),
        vec![web_slice(&["10.0.0.6", "10.0.0.5", "10.0.0.3"])],
    );
    h.sync(
        svc(),
        vec![web_slice(&["10.0.0.7", "10.0.0.5", "10.0.0.3"])],
    );
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"].1,
        ["10.0.0.1:8080", "10.0.0.5:8080", "10.0.0.3:8080"],
        "deferred"
    );
    h.rec.datapath_mut().end_graces();
    let before = h.log().len();
    h.rec.retire();
    let ops = &h.log()[before..];
    let last_delete = position(ops, "del-slot", true);
    assert!(
        last_delete < position(ops, "put-slot", false),
        "{:?}",
        kinds(ops)
    );
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"].1,
        ["10.0.0.7:8080", "10.0.0.5:8080", "10.0.0.3:8080"],
        "the last wanted state, in one switch"
    );
    h.rec.datapath_mut().end_graces();
    h.rec.retire();
    assert!(!h.rec.has_pending());
    assert_eq!(sizes(h.rec.contents()).1, 3);
}

#[test]
fn adding_or_removing_the_last_backends_changes_the_table_in_place() {
    let mut h = Harness::new();
    h.sync(
        vec![web("10.96.0.1")],
        vec![web_slice(&["10.0.0.1", "10.0.0.2"])],
    );
    let generation = |h: &Harness| {
        h.rec
            .contents()
            .services
            .values()
            .next()
            .unwrap()
            .slot_gen()
    };
    let first = generation(&h);
    // An added backend is a new slot past the count: the count switches to it.
    let before = h.log().len();
    h.sync(
        vec![web("10.96.0.1")],
        vec![web_slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])],
    );
    assert_eq!(
        kinds(&h.log()[before..]),
        [
            "reset-be-counters",
            "put-backend",
            "put-slot",
            "put-service"
        ]
    );
    // The backend in the last slot goes: the count shrinks, and its slot and the backend
    // go after a grace period.
    let before = h.log().len();
    h.sync(
        vec![web("10.96.0.1")],
        vec![web_slice(&["10.0.0.1", "10.0.0.2"])],
    );
    assert_eq!(
        kinds(&h.log()[before..]),
        ["put-service", "del-slot", "del-backend"]
    );
    assert_eq!(generation(&h), first, "the same generation");
    // The first goes: the last takes its position in a new table of the other generation.
    let before = h.log().len();
    h.sync(vec![web("10.96.0.1")], vec![web_slice(&["10.0.0.2"])]);
    assert_eq!(
        kinds(&h.log()[before..]),
        [
            "put-slot",
            "put-service",
            "del-slot",
            "del-slot",
            "del-backend"
        ]
    );
    assert_ne!(generation(&h), first);
    assert_eq!(h.served()["10.96.0.1:80/TCP"].1, ["10.0.0.2:8080"]);
    assert_eq!(h.rec.contents().slots.len(), 1);
}

#[test]
fn a_deleted_service_is_removed_service_entry_first() {
    let mut h = Harness::new();
    let (svc, sl) = dns(&["10.0.0.1"]);
    h.sync(
        vec![svc, web("10.96.0.1")],
        vec![sl, web_slice(&["10.0.0.1"])],
    );
    let before = h.log().len();
    h.sync(vec![web("10.96.0.1")], vec![web_slice(&["10.0.0.1"])]);
    assert_eq!(
        kinds(&h.log()[before..]),
        [
            "del-service",
            "del-service",
            "del-slot",
            "del-info",
            "del-slot",
            "del-info",
            "del-backend"
        ]
    );
    assert_eq!(h.served().len(), 1);
    // The backend shared with web on another port stays... 10.0.0.1:53 was dns-only.
    assert_eq!(h.rec.contents().backends.len(), 1);
}

#[test]
fn backends_shared_by_services_are_kept_while_referenced() {
    let mut h = Harness::new();
    let other = service("ns", "other", &["10.96.0.2"], &[("http", 80, "TCP")]);
    let other_slice = slice(
        "ns",
        "other-1",
        "other",
        "IPv4",
        &[("http", 8080, "TCP")],
        &[ready("10.0.0.1")],
    );
    h.sync(
        vec![web("10.96.0.1"), other.clone()],
        vec![web_slice(&["10.0.0.1"]), other_slice.clone()],
    );
    assert_eq!(
        h.rec.contents().backends.len(),
        1,
        "one backend, two services"
    );
    h.sync(vec![other.clone()], vec![other_slice.clone()]);
    assert_eq!(h.rec.contents().backends.len(), 1);
    h.sync(vec![], vec![]);
    assert_eq!(h.rec.contents(), &Contents::default());
}

#[test]
fn no_ready_endpoint_programs_a_service_without_backends() {
    let mut h = Harness::new();
    h.sync(vec![web("10.96.0.1")], vec![]);
    assert_eq!(h.served()["10.96.0.1:80/TCP"], entry("ns/web:http", &[]));
}

#[test]
fn a_restarted_reconciler_adopts_the_maps_and_writes_nothing() {
    let mut h = Harness::new();
    let (svc, sl) = dns(&["10.0.0.1", "10.0.0.2"]);
    let objects = (
        vec![svc, web("10.96.0.1")],
        vec![sl, web_slice(&["10.0.0.3"])],
    );
    h.sync(objects.0.clone(), objects.1.clone());
    let programmed = h.rec.contents().clone();

    let mut restarted = Harness::over(FakeDatapath::with_contents(CAPS, programmed.clone()));
    let report = restarted.sync(objects.0, objects.1);
    assert_eq!(report.writes, 0, "{:?}", restarted.log());
    assert_eq!(restarted.rec.contents(), &programmed);
}

#[test]
fn a_restarted_reconciler_removes_what_no_service_claims_and_cleans_garbage() {
    let mut h = Harness::new();
    let (svc, sl) = dns(&["10.0.0.1"]);
    h.sync(
        vec![svc, web("10.96.0.1")],
        vec![sl, web_slice(&["10.0.0.3"])],
    );
    let mut programmed = h.rec.contents().clone();
    // Leftovers of a run interrupted mid-write: a slot and info of an id without a service,
    // and a backend nothing names.
    programmed.slots.insert(
        SlotKey {
            svc_id: 77,
            slot: 0,
        },
        1,
    );
    programmed
        .info
        .insert(77, ServiceInfo::new("x", "y", "").unwrap());
    programmed
        .backends
        .insert(55, crate::testutil::backend("10.9.9.9:1"));
    programmed.affinity_match.insert(AffinityMatchKey {
        svc_id: 77,
        backend_id: 55,
    });

    let mut restarted = Harness::over(FakeDatapath::with_contents(CAPS, programmed));
    restarted.sync(vec![web("10.96.0.1")], vec![web_slice(&["10.0.0.3"])]);
    assert_eq!(
        restarted.served(),
        [(
            "10.96.0.1:80/TCP".to_string(),
            entry("ns/web:http", &["10.0.0.3:8080"])
        )]
        .into()
    );
    assert_eq!(sizes(restarted.rec.contents()), (1, 1, 1, 1));
    assert!(restarted.rec.contents().affinity_match.is_empty());
}

#[test]
fn a_service_that_turns_invalid_keeps_what_it_had() {
    let mut h = Harness::new();
    h.sync(vec![web("10.96.0.1")], vec![web_slice(&["10.0.0.1"])]);
    let served = h.served();
    // Its endpoint still there, a new one too: it keeps what it had (not the new one).
    let report = h.sync(
        vec![web("10.96.0.999")],
        vec![web_slice(&["10.0.0.1", "10.0.0.2"])],
    );
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(report.rejected[0].1.reason(), "invalid_ip");
    assert_eq!(h.served(), served);
}

#[test]
fn an_invalid_service_keeps_what_an_earlier_run_programmed() {
    let mut h = Harness::new();
    let (svc, sl) = dns(&["10.0.0.1"]);
    h.sync(
        vec![web("10.96.0.1"), svc.clone()],
        vec![web_slice(&["10.0.0.1"]), sl.clone()],
    );
    let programmed = h.rec.contents().clone();
    let served = h.served();

    let mut restarted = Harness::over(FakeDatapath::with_contents(CAPS, programmed));
    let report = restarted.sync(
        vec![web("bad"), svc.clone()],
        vec![web_slice(&["10.0.0.1"]), sl.clone()],
    );
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(restarted.served(), served);
    // Deleting it later still removes it.
    restarted.sync(vec![svc], vec![sl]);
    assert!(!restarted.served().contains_key("10.96.0.1:80/TCP"));
}

#[test]
fn every_failed_write_leaves_whole_services_and_the_retry_converges() {
    // The fake panics if any prefix of the writes lets a lookup see a half-written service.
    let (dns_svc, dns_slice) = dns(&["10.0.1.1", "10.0.1.2"]);
    let before = (
        vec![sticky(web("10.96.0.1")), dns_svc.clone()],
        vec![web_slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"]), dns_slice],
    );
    let (_, dns_slice2) = dns(&["10.0.1.2", "10.0.1.3", "10.0.1.4"]);
    let after = (
        vec![sticky(web("10.96.0.1")), dns_svc],
        vec![web_slice(&["10.0.0.3", "10.0.0.5"]), dns_slice2],
    );
    let mut reference = Harness::new();
    reference.sync(before.0.clone(), before.1.clone());
    let start = reference.rec.contents().clone();
    let first_sync_writes = reference.log().len();
    reference.sync(after.0.clone(), after.1.clone());
    let goal = reference.served();
    let goal_sizes = sizes(reference.rec.contents());
    let writes = reference.log().len() - first_sync_writes;
    assert!(writes > 10, "the change is big enough to be interesting");

    for fail_at in 0..writes {
        let mut dp = FakeDatapath::with_contents(CAPS, start.clone());
        dp.fail_at = Some(fail_at);
        let mut h = Harness::over(dp);
        let report = h.sync(after.0.clone(), after.1.clone());
        assert_eq!(report.errors.len(), 1, "write {fail_at} fails");
        assert!(h.rec.needs_retry() || h.rec.has_pending());
        let report = h.resync();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(!h.rec.needs_retry());
        assert_eq!(h.served(), goal, "converged after failing write {fail_at}");
        assert_eq!(h.rec.contents(), &h.rec.datapath().contents);
        assert_eq!(
            sizes(h.rec.contents()),
            goal_sizes,
            "nothing left behind after failing write {fail_at}"
        );
    }
}

#[test]
fn a_full_map_refuses_the_new_service_and_keeps_the_others() {
    let caps = Capacities { slots: 3, ..CAPS };
    let mut h = Harness::over(FakeDatapath::new(caps));
    let (dns_svc, dns_slice) = dns(&["10.0.1.1"]);
    h.sync(vec![dns_svc.clone()], vec![dns_slice.clone()]);
    let report = h.sync(
        vec![dns_svc, web("10.96.0.1")],
        vec![dns_slice, web_slice(&["10.0.0.1", "10.0.0.2"])],
    );
    assert_eq!(report.full.len(), 1);
    assert_eq!(report.full[0].map, maps::SLOTS);
    assert!(report.errors.is_empty());
    let served = h.served();
    assert_eq!(served.len(), 2, "both dns frontends stay: {served:?}");
    assert!(!served.contains_key("10.96.0.1:80/TCP"));
}

#[test]
fn a_refused_service_is_reported_once_and_programmed_when_room_is_made() {
    let caps = Capacities { slots: 3, ..CAPS };
    let mut h = Harness::over(FakeDatapath::new(caps));
    let (dns_svc, dns_slice) = dns(&["10.0.1.1"]);
    // After dns's frontends in key order: web is the one that does not fit.
    let web_svc = web("10.96.0.200");
    let web_eps = web_slice(&["10.0.0.1", "10.0.0.2"]);
    let report = h.sync(
        vec![dns_svc.clone(), web_svc.clone()],
        vec![dns_slice.clone(), web_eps.clone()],
    );
    assert_eq!(report.full.len(), 1, "{report:?}");
    // Other changes: the refusal is not reported again.
    let (other_svc, other_slice) = dns(&["10.0.1.2"]);
    let report = h.sync(
        vec![other_svc, web_svc.clone()],
        vec![other_slice, web_eps.clone()],
    );
    assert!(report.full.is_empty(), "{:?}", report.full);
    assert!(!h.served().contains_key("10.96.0.200:80/TCP"));
    // dns goes: its slots free, and web is programmed in the same sync.
    let report = h.sync(vec![web_svc], vec![web_eps]);
    assert!(report.full.is_empty(), "{:?}", report.full);
    assert_eq!(
        h.served()["10.96.0.200:80/TCP"],
        entry("ns/web:http", &["10.0.0.1:8080", "10.0.0.2:8080"])
    );
    assert_eq!(h.served().len(), 1);
}

/// `svc`, created `secs` seconds into the epoch, with UID `uid`.
fn aged(mut svc: Service, secs: i64, uid: &str) -> Service {
    let at = jiff::Timestamp::from_second(secs).unwrap();
    svc.metadata.creation_timestamp =
        Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(at));
    svc.metadata.uid = Some(uid.into());
    svc
}

#[test]
fn a_frontend_claimed_twice_goes_to_the_oldest_service_whatever_its_name() {
    let mut h = Harness::new();
    let web = aged(web("10.96.0.1"), 1_000, "u-web");
    let twin = aged(
        service("ns", "aaa-twin", &["10.96.0.1"], &[("http", 80, "TCP")]),
        2_000,
        "u-twin",
    );
    let report = h.sync(
        vec![web.clone(), twin.clone()],
        vec![web_slice(&["10.0.0.1"])],
    );
    assert_eq!(report.conflicts.len(), 1);
    assert_eq!(report.conflicts[0].winner, ObjectRef::new("ns", "web"));
    assert_eq!(report.conflicts[0].loser, ObjectRef::new("ns", "aaa-twin"));
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"],
        entry("ns/web:http", &["10.0.0.1:8080"])
    );
    // Created in the same second: the UID decides.
    let twin = aged(twin, 1_000, "u-aaa");
    h.sync(vec![web.clone(), twin], vec![web_slice(&["10.0.0.1"])]);
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"],
        entry("ns/aaa-twin:http", &[])
    );
    // When the winner goes, the other takes over.
    h.sync(vec![web], vec![web_slice(&["10.0.0.1"])]);
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"],
        entry("ns/web:http", &["10.0.0.1:8080"])
    );
}

#[test]
fn an_external_ip_never_takes_a_cluster_ip_in_any_order_or_after_a_restart() {
    // CVE-2020-8554's class: `default/x` (older, a name that sorts first, no endpoints)
    // claims cluster DNS's address through externalIPs.
    let (dns_svc, dns_slice) = dns(&["10.0.1.1", "10.0.1.2"]);
    let dns_svc = aged(dns_svc, 2_000, "u-dns");
    let mut x = service("default", "x", &["10.96.0.99"], &[("dns", 53, "UDP")]);
    x.spec.as_mut().unwrap().external_ips = Some(vec!["10.96.0.10".into()]);
    let x = aged(x, 1_000, "u-x");
    let dns_served = entry("kube-system/dns:dns", &["10.0.1.1:53", "10.0.1.2:53"]);
    for order in [
        vec![
            (vec![x.clone()], vec![]),
            (vec![x.clone(), dns_svc.clone()], vec![dns_slice.clone()]),
        ],
        vec![
            (vec![dns_svc.clone()], vec![dns_slice.clone()]),
            (vec![dns_svc.clone(), x.clone()], vec![dns_slice.clone()]),
        ],
    ] {
        let mut h = Harness::new();
        let mut conflicts = Vec::new();
        for (services, slices) in order {
            conflicts.extend(h.sync(services, slices).conflicts);
        }
        assert_eq!(h.served()["10.96.0.10:53/UDP"], dns_served);
        assert!(
            conflicts
                .iter()
                .any(|c| c.loser == ObjectRef::new("default", "x")),
            "{conflicts:?}"
        );
        // A restarted agent adopts the maps and decides the same.
        let programmed = h.rec.contents().clone();
        let mut h = Harness::over(FakeDatapath::with_contents(CAPS, programmed));
        h.sync(vec![x.clone(), dns_svc.clone()], vec![dns_slice.clone()]);
        assert_eq!(h.served()["10.96.0.10:53/UDP"], dns_served);
    }
}

fn sticky(svc: Service) -> Service {
    let mut svc = svc;
    svc.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    svc
}

#[test]
fn affinity_members_are_added_before_slots_and_removed_after() {
    let mut h = Harness::new();
    h.sync(
        vec![sticky(web("10.96.0.1"))],
        vec![web_slice(&["10.0.0.1", "10.0.0.2"])],
    );
    assert_eq!(
        kinds(h.log()),
        [
            "reset-svc-counters",
            "reset-be-counters",
            "put-backend",
            "reset-be-counters",
            "put-backend",
            "put-match",
            "put-match",
            "put-slot",
            "put-slot",
            "put-info",
            "put-service"
        ]
    );
    assert_eq!(h.rec.contents().affinity_match.len(), 2);
    let v = h.rec.contents().services.values().next().unwrap();
    assert_eq!(v.affinity_timeout_s, model::DEFAULT_AFFINITY_TIMEOUT_S);

    let before = h.log().len();
    h.sync(
        vec![sticky(web("10.96.0.1"))],
        vec![web_slice(&["10.0.0.2"])],
    );
    assert_eq!(
        kinds(&h.log()[before..]),
        [
            "put-slot",
            "put-service",
            "del-match",
            "del-slot",
            "del-slot",
            "del-backend"
        ]
    );
    assert_eq!(h.rec.contents().affinity_match.len(), 1);

    // Affinity off: the match entries go after the service entry is rewritten.
    let before = h.log().len();
    h.sync(vec![web("10.96.0.1")], vec![web_slice(&["10.0.0.2"])]);
    assert_eq!(kinds(&h.log()[before..]), ["put-service", "del-match"]);
    assert!(h.rec.contents().affinity_match.is_empty());

    h.sync(
        vec![sticky(web("10.96.0.1"))],
        vec![web_slice(&["10.0.0.2"])],
    );
    h.sync(vec![], vec![]);
    assert_eq!(
        h.rec.contents(),
        &Contents::default(),
        "removal takes the members too"
    );
}

#[test]
fn udp_backends_that_leave_are_reported_as_stale() {
    let mut h = Harness::new();
    let (svc, sl) = dns(&["10.0.0.1", "10.0.0.2"]);
    let report = h.sync(vec![svc.clone()], vec![sl]);
    assert!(report.stale_udp.is_empty());
    let (_, fewer) = dns(&["10.0.0.2"]);
    let report = h.sync(vec![svc.clone()], vec![fewer.clone()]);
    let stale: Vec<String> = report
        .stale_udp
        .iter()
        .map(|s| {
            format!(
                "{} {}",
                to_socket_addr(&s.frontend),
                to_socket_addr(&s.backend)
            )
        })
        .collect();
    assert_eq!(
        stale,
        ["10.96.0.10:53 10.0.0.1:53"],
        "only the UDP frontend, only the removed backend"
    );
    let report = h.sync(vec![], vec![]);
    assert_eq!(
        report.stale_udp.len(),
        1,
        "a removed UDP frontend's backends are stale too"
    );
}

#[test]
fn the_agents_own_api_service_keeps_its_last_backends() {
    let mut h = Harness::new();
    let api = service(
        "default",
        "kubernetes",
        &["10.96.0.1"],
        &[("https", 443, "TCP")],
    );
    let eps = |addrs: &[&str]| {
        let eps: Vec<_> = addrs.iter().map(|a| ready(a)).collect();
        slice(
            "default",
            "kubernetes",
            "kubernetes",
            "IPv4",
            &[("https", 6443, "TCP")],
            &eps,
        )
    };
    h.rec.protect_api(ServiceKey::new(
        crate::addr::to_addr6("10.96.0.1".parse().unwrap()),
        443u16.to_be(),
        lb_common::proto::TCP,
    ));
    h.sync(
        vec![api.clone(), web("10.96.0.2")],
        vec![eps(&["10.0.0.1"]), web_slice(&["10.0.0.5"])],
    );
    // Every endpoint goes, for both services: only the API frontend keeps its backend.
    let report = h.sync(vec![api.clone(), web("10.96.0.2")], vec![eps(&[])]);
    assert_eq!(h.served()["10.96.0.1:443/TCP"].1, ["10.0.0.1:6443"]);
    assert_eq!(h.served()["10.96.0.2:80/TCP"].1, Vec::<String>::new());
    assert!(
        report
            .notes
            .iter()
            .any(|(_, n)| n.contains("agent's own API server"))
    );
    // New endpoints replace the kept ones as usual.
    h.sync(vec![api, web("10.96.0.2")], vec![eps(&["10.0.0.2"])]);
    assert_eq!(h.served()["10.96.0.1:443/TCP"].1, ["10.0.0.2:6443"]);
}

#[test]
fn ids_are_the_hash_of_the_identity_or_the_next_free_one() {
    let mut ids = Ids::from_used(10, [4, 5]);
    // Hash 2 is id 3 (ids run from 1); 13 wraps to 4, taken, as is 5: 6.
    assert_eq!(ids.take(2), Some(3));
    assert_eq!(ids.take(13), Some(6));
    // The last id wraps around to the first.
    assert_eq!(ids.take(9), Some(10));
    assert_eq!(ids.take(9), Some(1));
    ids.release(3);
    assert_eq!(ids.take(2), Some(3), "a released id is its object's again");
    for _ in 0..4 {
        assert!(ids.take(0).is_some());
    }
    assert_eq!(ids.take(0), None, "all ten taken");
    assert_eq!(Ids::from_used(0, []).take(1), None);
    // The identity hash is FNV-1a 64 of the name: stable across builds and nodes.
    assert_eq!(identity(""), 0xcbf2_9ce4_8422_2325);
    assert_eq!(identity("a"), 0xaf63_dc4c_8601_ec8c);
}

#[test]
fn ids_follow_the_objects_not_the_order_they_come_in() {
    let (dns_svc, dns_slice) = dns(&["10.0.1.1", "10.0.1.2"]);
    let ids = |services: Vec<Service>, slices: Vec<EndpointSlice>| {
        let mut h = Harness::new();
        h.sync(services, slices);
        let c = h.rec.contents().clone();
        let services: BTreeMap<String, u32> = c
            .services
            .iter()
            .map(|(k, v)| (frontend_string(k), v.id))
            .collect();
        let backends: BTreeMap<String, u32> = c
            .backends
            .iter()
            .map(|(id, ep)| (to_socket_addr(ep).to_string(), *id))
            .collect();
        (services, backends)
    };
    let web_slice = web_slice(&["10.0.0.1", "10.0.0.2"]);
    let one = ids(
        vec![web("10.96.0.1"), dns_svc.clone()],
        vec![web_slice.clone(), dns_slice.clone()],
    );
    let other = ids(
        vec![dns_svc.clone(), web("10.96.0.1")],
        vec![dns_slice.clone(), web_slice.clone()],
    );
    assert_eq!(one, other);
    // Each is its identity's hash into 1..=capacity, or the next id when another object
    // holds that one.
    let check = |ids: &BTreeMap<String, u32>, max: u32| {
        for (name, id) in ids {
            let own = u32::try_from(identity(name) % u64::from(max)).unwrap() + 1;
            assert!(
                *id == own || ids.values().any(|other| *other == own),
                "{name}: {id}, its own {own} free"
            );
        }
    };
    check(&one.0, CAPS.services);
    check(&one.1, CAPS.backends);
    // A frontend that goes and comes back has its id again.
    let mut h = Harness::new();
    h.sync(vec![web("10.96.0.1")], vec![web_slice.clone()]);
    let first = h.key("10.96.0.1:80/TCP");
    let id = h.rec.contents().services[&first].id;
    h.sync(vec![], vec![]);
    assert!(h.rec.contents().services.is_empty());
    h.sync(vec![web("10.96.0.1")], vec![web_slice]);
    assert_eq!(h.rec.contents().services[&first].id, id);
}

#[test]
fn arrange_keeps_positions_and_compacts() {
    assert_eq!(arrange(&[], &[1, 2]), [1, 2]);
    assert_eq!(arrange(&[Some(1), Some(2), Some(3)], &[1, 3, 4]), [1, 4, 3]);
    assert_eq!(arrange(&[Some(1), Some(2), Some(3)], &[2, 3]), [3, 2]);
    assert_eq!(arrange(&[Some(1), Some(2), Some(3)], &[1]), [1]);
    assert_eq!(arrange(&[Some(1), None, Some(1)], &[1, 2]), [1, 2]);
    assert_eq!(arrange(&[Some(1), Some(2)], &[]), Vec::<u32>::new());
}

// North-south (XDP) frontends.

const NODE: &str = "192.0.2.1";

/// A LoadBalancer service `name` on port 80 (node port `node_port`) with ingress `lb_ip`.
fn lb(name: &str, cluster_ip: &str, lb_ip: &str, node_port: i32) -> Service {
    use k8s_openapi::api::core::v1::{LoadBalancerIngress, LoadBalancerStatus, ServiceStatus};
    let mut svc = service("ns", name, &[cluster_ip], &[("http", 80, "TCP")]);
    let spec = svc.spec.as_mut().unwrap();
    spec.type_ = Some("LoadBalancer".into());
    spec.ports.as_mut().unwrap()[0].node_port = Some(node_port);
    svc.status = Some(ServiceStatus {
        load_balancer: Some(LoadBalancerStatus {
            ingress: Some(vec![LoadBalancerIngress {
                ip: Some(lb_ip.into()),
                ..Default::default()
            }]),
        }),
        ..Default::default()
    });
    svc
}

fn lb_slice(name: &str, addrs: &[&str]) -> EndpointSlice {
    let eps: Vec<_> = addrs.iter().map(|a| ready(a)).collect();
    slice(
        "ns",
        &format!("{name}-1"),
        name,
        "IPv4",
        &[("http", 8080, "TCP")],
        &eps,
    )
}

/// `n` backend addresses 10.0.0.1...
fn addrs(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("10.0.0.{i}")).collect()
}

impl Harness {
    /// A harness for node `n1` with address [`NODE`] and Maglev tables of `table_size`.
    fn node(table_size: u32) -> Self {
        let caps = Capacities {
            table_entries: 8 * table_size,
            ..CAPS
        };
        let limits = Limits {
            max_table_size: table_size,
            ..LIMITS
        };
        let mut store = Store::new(Some("n1".into()));
        store.set_addresses(vec![NODE.parse().unwrap()]);
        Self {
            store,
            rec: Reconciler::new(FakeDatapath::new(caps), limits).unwrap(),
        }
    }

    /// What XDP serves: frontend -> (owner, flags, backends by table share), lookups checked.
    fn served_external(&self) -> BTreeMap<String, (String, u16, BTreeMap<String, usize>)> {
        served_external(&self.rec.datapath().contents)
    }
}

fn served_external(c: &Contents) -> BTreeMap<String, (String, u16, BTreeMap<String, usize>)> {
    c.check_lookups().unwrap();
    c.external
        .iter()
        .map(|(k, v)| {
            let info = &c.external_info[&v.id];
            let owner = format!("{}/{}", info.namespace().unwrap(), info.name().unwrap());
            let mut shares = BTreeMap::new();
            for id in c.table_of(v).unwrap_or_default() {
                *shares
                    .entry(to_socket_addr(&c.backends[id]).to_string())
                    .or_default() += 1;
            }
            (frontend_string(k), (owner, v.flags, shares))
        })
        .collect()
}

fn position(ops: &[Op], kind: &str, last: bool) -> usize {
    let k = kinds(ops);
    let found = if last {
        k.iter().rposition(|x| *x == kind)
    } else {
        k.iter().position(|x| *x == kind)
    };
    found.unwrap_or_else(|| panic!("no {kind} in {k:?}"))
}

#[test]
fn a_load_balancer_service_is_written_table_first_frontends_last() {
    let mut h = Harness::node(61);
    let a = addrs(3);
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let report = h.sync(
        vec![lb("web", "10.96.0.1", "198.51.100.1", 30080)],
        vec![lb_slice("web", &a)],
    );
    assert!(
        report.rejected.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );
    let served = h.served_external();
    assert_eq!(
        served.keys().collect::<Vec<_>>(),
        ["192.0.2.1:30080/TCP", "198.51.100.1:80/TCP"]
    );
    for (owner, flags, shares) in served.values() {
        assert_eq!((owner.as_str(), *flags), ("ns/web", 0));
        assert_eq!(shares.len(), 3);
        assert!(shares.values().all(|n| (20..=21).contains(n)), "{shares:?}");
    }
    // Both frontends share one id and one table.
    let ids: BTreeSet<u32> = h.rec.contents().external.values().map(|v| v.id).collect();
    assert_eq!(ids.len(), 1);
    let ops = h.log();
    let last_backend = position(ops, "put-backend", true);
    let table = position(ops, "put-table", false);
    let info = position(ops, "put-ext-info", false);
    let frontend = position(ops, "put-external", false);
    assert!(position(ops, "reset-counters", false) < frontend);
    assert!(
        last_backend < table && table < frontend && info < frontend,
        "{:?}",
        kinds(ops)
    );
    // Nothing to write when nothing changed.
    let before = h.log().len();
    h.sync(
        vec![lb("web", "10.96.0.1", "198.51.100.1", 30080)],
        vec![lb_slice("web", &a)],
    );
    assert_eq!(h.log().len(), before);
}

#[test]
fn removing_one_of_n_backends_moves_about_one_nth_of_the_table_in_a_new_region() {
    // M/N = 1000 (1000 entries per backend, up to 10007).
    let m = 10007;
    let mut h = Harness::node(m);
    h.rec = Reconciler::new(
        FakeDatapath::new(Capacities {
            table_entries: 8 * m,
            ..CAPS
        }),
        Limits {
            max_table_size: m,
            entries_per_backend: 1000,
            ..LIMITS
        },
    )
    .unwrap();
    let svc = || vec![lb("web", "10.96.0.1", "198.51.100.1", 30080)];
    let all = addrs(10);
    let all: Vec<&str> = all.iter().map(String::as_str).collect();
    h.sync(svc(), vec![lb_slice("web", &all)]);
    let before = h.rec.contents().clone();
    let writes_before = h.log().len();
    h.sync(svc(), vec![lb_slice("web", &all[1..])]);
    let ops = &h.log()[writes_before..];
    let after = h.rec.contents();
    let (was, v) = (
        before.external.values().next().unwrap(),
        after.external.values().next().unwrap(),
    );
    let (old, new) = (before.table_of(was).unwrap(), after.table_of(v).unwrap());
    let changed = old.iter().zip(new).filter(|(a, b)| a != b).count();
    // Exactly the entries of the removed backend move (a Maglev property at M >> N).
    let removed_id = *before
        .backends
        .iter()
        .find(|(_, ep)| to_socket_addr(*ep).to_string() == "10.0.0.1:8080")
        .unwrap()
        .0;
    let had = old.iter().filter(|id| **id == removed_id).count();
    assert!(
        changed <= had * 5 / 4,
        "changed {changed}, the removed backend had {had}"
    );
    assert!(!new.contains(&removed_id));
    // The new table is written whole to another region, each frontend switches to it in one
    // write (same id), and the old region and the backend go after them (past a grace
    // period: the fake checks that no packet that read the old entry sees a change).
    assert_ne!(was.table_off, v.table_off);
    assert_eq!(was.id, v.id);
    let external: Vec<&str> = kinds(ops)
        .into_iter()
        .filter(|k| !["put-slot", "put-service", "del-slot"].contains(k))
        .collect();
    assert_eq!(
        external,
        [
            "put-table",
            "put-external",
            "put-external",
            "clear-table",
            "del-backend"
        ]
    );
}

#[test]
fn local_policy_without_a_local_endpoint_programs_an_empty_table() {
    let mut h = Harness::node(61);
    let mut svc = lb("web", "10.96.0.1", "198.51.100.1", 30080);
    svc.spec.as_mut().unwrap().external_traffic_policy = Some("Local".into());
    let mut local = lb_slice("web", &["10.0.0.1", "10.0.0.2"]);
    local.endpoints.as_mut().unwrap()[0].node_name = Some("n1".into());
    local.endpoints.as_mut().unwrap()[1].node_name = Some("n2".into());
    h.sync(vec![svc.clone()], vec![local.clone()]);
    let served = h.served_external();
    for (_, flags, shares) in served.values() {
        assert_eq!(*flags, EXTERNAL_F_LOCAL);
        assert_eq!(shares.keys().collect::<Vec<_>>(), ["10.0.0.1:8080"]);
    }
    // The local endpoint goes: the frontends stay, with no table (XDP drops), and the old
    // region is zeroed after the frontends stopped naming it.
    local.endpoints.as_mut().unwrap().remove(0);
    let writes_before = h.log().len();
    h.sync(vec![svc], vec![local]);
    let ops = &h.log()[writes_before..];
    let c = h.rec.contents();
    assert_eq!(c.external.len(), 2);
    assert!(
        c.external
            .values()
            .all(|v| v.table_size == 0 && v.flags == EXTERNAL_F_LOCAL)
    );
    assert!(c.tables.is_empty(), "{:?}", c.tables.keys());
    assert!(position(ops, "put-external", true) < position(ops, "clear-table", false));
}

#[test]
fn source_ranges_are_admitted_before_the_frontend_filters_and_dropped_after() {
    let mut h = Harness::node(61);
    let mut svc = lb("web", "10.96.0.1", "198.51.100.1", 30080);
    svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["203.0.113.0/24".into()]);
    h.sync(vec![svc.clone()], vec![lb_slice("web", &["10.0.0.1"])]);
    let served = h.served_external();
    // Only the load-balancer IP filters; the node port does not (as kube-proxy).
    assert_eq!(served["198.51.100.1:80/TCP"].1, EXTERNAL_F_SOURCE_RANGES);
    assert_eq!(served["192.0.2.1:30080/TCP"].1, 0);
    assert_eq!(h.rec.contents().ranges.len(), 1);
    let ops = h.log();
    assert!(position(ops, "put-range", false) < position(ops, "put-external", false));
    // A new range replaces the old: admitted first, the old dropped last.
    svc.spec.as_mut().unwrap().load_balancer_source_ranges = Some(vec!["198.18.0.0/15".into()]);
    let writes_before = h.log().len();
    h.sync(vec![svc.clone()], vec![lb_slice("web", &["10.0.0.1"])]);
    let ops = &h.log()[writes_before..];
    assert_eq!(kinds(ops), ["put-range", "del-range"]);
    // Ranges removed: the flag goes first, then the range.
    svc.spec.as_mut().unwrap().load_balancer_source_ranges = None;
    let writes_before = h.log().len();
    h.sync(vec![svc], vec![lb_slice("web", &["10.0.0.1"])]);
    let ops = &h.log()[writes_before..];
    assert_eq!(kinds(ops), ["put-external", "del-range"]);
    assert!(h.rec.contents().ranges.is_empty());
}

#[test]
fn session_affinity_marks_the_table_backends_before_the_frontends_use_them() {
    let mut h = Harness::node(61);
    let mut svc = lb("web", "10.96.0.1", "198.51.100.1", 30080);
    svc.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    h.sync(
        vec![svc.clone()],
        vec![lb_slice("web", &["10.0.0.1", "10.0.0.2"])],
    );
    let served = h.served_external();
    assert!(
        served
            .values()
            .all(|(_, flags, _)| *flags == EXTERNAL_F_AFFINITY)
    );
    let matches = |h: &Harness| -> Vec<(String, u32)> {
        h.rec
            .contents()
            .external_match
            .iter()
            .map(|(k, t)| (crate::addr::to_socket_addr(&k.backend).to_string(), *t))
            .collect()
    };
    // Both backends with kube-proxy's default timeout, written before the frontends.
    assert_eq!(
        matches(&h),
        [
            ("10.0.0.1:8080".into(), 10800),
            ("10.0.0.2:8080".into(), 10800)
        ]
    );
    let ops = h.log();
    assert!(position(ops, "put-ext-match", true) < position(ops, "put-external", false));

    // A restarted agent adopts the marks with the rest and writes nothing.
    let dp = FakeDatapath::with_contents(CAPS, h.rec.contents().clone());
    let mut restarted = Harness::node(61);
    restarted.rec = Reconciler::new(dp, LIMITS).unwrap();
    restarted.sync(
        vec![svc.clone()],
        vec![lb_slice("web", &["10.0.0.1", "10.0.0.2"])],
    );
    assert!(restarted.log().is_empty(), "{:?}", kinds(restarted.log()));

    // A backend leaves: its mark goes before the table switch, so affinity to it is not
    // honoured even while the old table is in use.
    let writes_before = h.log().len();
    h.sync(vec![svc.clone()], vec![lb_slice("web", &["10.0.0.1"])]);
    let ops = &h.log()[writes_before..];
    assert!(position(ops, "del-ext-match", false) < position(ops, "put-external", false));
    assert_eq!(matches(&h), [("10.0.0.1:8080".into(), 10800)]);

    // A new timeout rewrites the mark; no affinity removes marks and flag.
    svc.spec.as_mut().unwrap().session_affinity_config = Some(SessionAffinityConfig {
        client_ip: Some(ClientIPConfig {
            timeout_seconds: Some(60),
        }),
    });
    h.sync(vec![svc.clone()], vec![lb_slice("web", &["10.0.0.1"])]);
    assert_eq!(matches(&h), [("10.0.0.1:8080".into(), 60)]);
    svc.spec.as_mut().unwrap().session_affinity = None;
    h.sync(vec![svc.clone()], vec![lb_slice("web", &["10.0.0.1"])]);
    assert!(matches(&h).is_empty());
    assert!(
        h.served_external()
            .values()
            .all(|(_, flags, _)| *flags == 0)
    );

    // The service goes: so do its marks.
    svc.spec.as_mut().unwrap().session_affinity = Some("ClientIP".into());
    h.sync(vec![svc], vec![lb_slice("web", &["10.0.0.1"])]);
    assert_eq!(matches(&h).len(), 1);
    h.sync(vec![], vec![]);
    assert!(matches(&h).is_empty());
}

#[test]
fn a_deleted_service_removes_its_frontends_before_table_info_and_backends() {
    let mut h = Harness::node(61);
    h.sync(
        vec![lb("web", "10.96.0.1", "198.51.100.1", 30080)],
        vec![lb_slice("web", &["10.0.0.1", "10.0.0.2"])],
    );
    let writes_before = h.log().len();
    h.sync(vec![], vec![]);
    let ops = &h.log()[writes_before..];
    let c = h.rec.contents();
    assert!(c.external.is_empty() && c.tables.is_empty() && c.external_info.is_empty());
    assert!(c.backends.is_empty() && c.services.is_empty());
    let last_frontend = position(ops, "del-external", true);
    for kind in ["clear-table", "del-ext-info", "del-backend"] {
        assert!(
            last_frontend < position(ops, kind, false),
            "{kind}: {:?}",
            kinds(ops)
        );
    }
}

#[test]
fn a_restarted_reconciler_adopts_north_south_state_and_writes_nothing() {
    let mut h = Harness::node(61);
    let svcs = vec![
        lb("web", "10.96.0.1", "198.51.100.1", 30080),
        lb("api", "10.96.0.2", "198.51.100.2", 30081),
    ];
    let slices = vec![
        lb_slice("web", &["10.0.0.1", "10.0.0.2"]),
        lb_slice("api", &["10.0.0.3"]),
    ];
    h.sync(svcs.clone(), slices.clone());
    let served = h.served_external();
    let dp = FakeDatapath::with_contents(
        Capacities {
            table_entries: 8 * 61,
            ..CAPS
        },
        h.rec.contents().clone(),
    );
    let mut restarted = Harness::node(61);
    restarted.rec = Reconciler::new(
        dp,
        Limits {
            max_table_size: 61,
            ..LIMITS
        },
    )
    .unwrap();
    restarted.sync(svcs.clone(), slices.clone());
    assert!(restarted.log().is_empty(), "{:?}", kinds(restarted.log()));
    assert_eq!(restarted.served_external(), served);
    // A restart with another table size rebuilds each table in a new region of that size,
    // switching each frontend over in one write.
    let dp = FakeDatapath::with_contents(
        Capacities {
            table_entries: 8 * 61,
            ..CAPS
        },
        h.rec.contents().clone(),
    );
    let mut resized = Harness::node(61);
    resized.rec = Reconciler::new(
        dp,
        Limits {
            max_table_size: 53,
            ..LIMITS
        },
    )
    .unwrap();
    resized.sync(svcs, slices);
    let c = resized.rec.contents();
    assert!(
        c.external.values().all(|v| v.table_size == 53),
        "{:?}",
        c.external
    );
    assert!(c.tables.values().all(|t| t.len() == 53));
    assert_eq!(c.tables.len(), 2, "the old regions are zeroed");
}

#[test]
fn a_full_table_array_refuses_the_new_service_and_keeps_the_others() {
    let caps = Capacities {
        table_entries: 61 + 60,
        ..CAPS
    };
    let mut h = Harness::node(61);
    h.rec = Reconciler::new(
        FakeDatapath::new(caps),
        Limits {
            max_table_size: 61,
            ..LIMITS
        },
    )
    .unwrap();
    h.sync(
        vec![lb("web", "10.96.0.1", "198.51.100.1", 30080)],
        vec![lb_slice("web", &["10.0.0.1"])],
    );
    let report = h.sync(
        vec![
            lb("web", "10.96.0.1", "198.51.100.1", 30080),
            lb("api", "10.96.0.2", "198.51.100.2", 30081),
        ],
        vec![
            lb_slice("web", &["10.0.0.1"]),
            lb_slice("api", &["10.0.0.2"]),
        ],
    );
    assert_eq!(report.full.len(), 1, "{report:?}");
    assert_eq!(report.full[0].map, maps::TABLES);
    assert!(report.errors.is_empty());
    let served = h.served_external();
    assert_eq!(served.len(), 2, "web's frontends stay: {served:?}");
    assert!(served.values().all(|(owner, ..)| owner == "ns/web"));
    // api's cluster IP is still served at the socket level.
    assert!(h.served().contains_key("10.96.0.2:80/TCP"));
    // A refusal is not a failed write: no retry loop, and it is reported once.
    assert!(!h.rec.needs_retry());
    let report = h.sync(
        vec![
            lb("web", "10.96.0.1", "198.51.100.1", 30080),
            lb("api", "10.96.0.2", "198.51.100.2", 30081),
        ],
        vec![
            lb_slice("web", &["10.0.0.1", "10.0.0.3"]),
            lb_slice("api", &["10.0.0.2"]),
        ],
    );
    // web's new table needs a second region while the old one serves: there is no room for
    // it, so web keeps its table (and says so once).
    assert_eq!(report.full.len(), 1, "{:?}", report.full);
    assert_eq!(report.full[0].service.name, "web");
    assert_eq!(
        h.served_external()
            .values()
            .map(|(_, _, shares)| shares.len())
            .collect::<Vec<_>>(),
        [1, 1]
    );
    // web goes: the region it frees is cleared after a grace period in the same sync, and
    // api, refused before, is programmed then.
    let report = h.sync(
        vec![lb("api", "10.96.0.2", "198.51.100.2", 30081)],
        vec![lb_slice("api", &["10.0.0.2"])],
    );
    assert!(
        report.full.is_empty() && report.errors.is_empty(),
        "{report:?}"
    );
    assert!(!h.rec.needs_retry());
    let served = h.served_external();
    assert!(
        !served.is_empty() && served.values().all(|(owner, ..)| owner == "ns/api"),
        "{served:?}"
    );
}

#[test]
fn every_failed_north_south_write_leaves_lookups_whole_and_the_retry_converges() {
    let svcs = |ranges: &[&str]| {
        let mut web = lb("web", "10.96.0.1", "198.51.100.1", 30080);
        web.spec.as_mut().unwrap().load_balancer_source_ranges = Some(
            ranges
                .iter()
                .map(std::string::ToString::to_string)
                .collect(),
        );
        vec![web, lb("api", "10.96.0.2", "198.51.100.2", 30081)]
    };
    let before = (
        svcs(&["203.0.113.0/24"]),
        vec![
            lb_slice("web", &["10.0.0.1", "10.0.0.2", "10.0.0.3"]),
            lb_slice("api", &["10.0.0.9"]),
        ],
    );
    // web changes backends and ranges; api goes; dns comes.
    let mut after_svcs = svcs(&["198.18.0.0/15"]);
    after_svcs.pop();
    after_svcs.push(lb("dns", "10.96.0.3", "198.51.100.3", 30082));
    let after = (
        after_svcs,
        vec![
            lb_slice("web", &["10.0.0.2", "10.0.0.4"]),
            lb_slice("dns", &["10.0.0.5"]),
        ],
    );
    let mut reference = Harness::node(61);
    reference.sync(before.0.clone(), before.1.clone());
    let start = reference.rec.contents().clone();
    let first = reference.log().len();
    reference.sync(after.0.clone(), after.1.clone());
    let goal = reference.served_external();
    let writes = reference.log().len() - first;
    assert!(writes > 10, "an interesting change: {writes} writes");
    let caps = Capacities {
        table_entries: 8 * 61,
        ..CAPS
    };
    for fail_at in 0..writes {
        let mut dp = FakeDatapath::with_contents(caps, start.clone());
        dp.fail_at = Some(fail_at);
        let mut h = Harness::node(61);
        h.rec = Reconciler::new(
            dp,
            Limits {
                max_table_size: 61,
                ..LIMITS
            },
        )
        .unwrap();
        let report = h.sync(after.0.clone(), after.1.clone());
        assert_eq!(report.errors.len(), 1, "write {fail_at} fails");
        let report = h.resync();
        assert!(report.errors.is_empty(), "{:?}", report.errors);
        assert!(!h.rec.needs_retry());
        assert_eq!(
            h.served_external(),
            goal,
            "converged after failing write {fail_at}"
        );
        let c = h.rec.contents();
        assert_eq!(
            c.tables.len(),
            2,
            "no table left behind after failing write {fail_at}"
        );
        assert_eq!(c.external_info.len(), 2);
    }
}

#[test]
fn health_checks_follow_local_load_balancer_services() {
    let mut h = Harness::node(61);
    let mut svc = lb("web", "10.96.0.1", "198.51.100.1", 30080);
    let spec = svc.spec.as_mut().unwrap();
    spec.external_traffic_policy = Some("Local".into());
    spec.health_check_node_port = Some(32000);
    let mut s = lb_slice("web", &["10.0.0.1"]);
    s.endpoints.as_mut().unwrap()[0].node_name = Some("n1".into());
    h.sync(vec![svc], vec![s]);
    let checks: Vec<_> = h.rec.health_checks().values().copied().collect();
    assert_eq!(
        checks,
        [model::HealthCheck {
            port: 32000,
            local_endpoints: 1
        }]
    );
    h.sync(vec![], vec![]);
    assert!(h.rec.health_checks().is_empty());
}

#[test]
fn tables_are_sized_from_the_backend_count_and_a_new_size_is_switched_in_one_write() {
    // Tables of 251 entries up to 2 backends, 509 up to 5 (100 per backend), 1021 at most.
    let mut h = Harness::node(1021);
    let svc = || vec![lb("web", "10.96.0.1", "198.51.100.1", 30080)];
    h.sync(svc(), vec![lb_slice("web", &["10.0.0.1"])]);
    let c = h.rec.contents().clone();
    assert!(c.external.values().all(|v| v.table_size == 251), "{c:?}");
    let old_start = c.external.values().next().unwrap().table_off;

    let five = addrs(5);
    let five: Vec<&str> = five.iter().map(String::as_str).collect();
    let writes_before = h.log().len();
    h.sync(svc(), vec![lb_slice("web", &five)]);
    let ops = &h.log()[writes_before..];
    let c = h.rec.contents();
    assert!(c.external.values().all(|v| v.table_size == 509));
    let new_start = c.external.values().next().unwrap().table_off;
    assert!(
        new_start >= old_start + 251 || new_start + 509 <= old_start,
        "the new region {new_start} overlaps the old {old_start}"
    );
    // The whole new table is written before any frontend names it, and the old region is
    // cleared only after none does.
    let k = kinds(ops);
    assert!(
        position(ops, "put-table", true) < position(ops, "put-external", false)
            && position(ops, "put-external", true) < position(ops, "clear-table", false),
        "{k:?}"
    );
    assert_eq!(c.tables.len(), 1, "{:?}", c.tables.keys());
    for (_, _, shares) in h.served_external().values() {
        assert_eq!(shares.len(), 5);
        assert!(
            shares.values().all(|n| (101..=102).contains(n)),
            "{shares:?}"
        );
    }
}

#[test]
fn a_fragmented_table_array_reuses_freed_regions_first_fit() {
    // Room for 4 tables of 251: three services, the middle one goes, a fourth and fifth come.
    let caps = Capacities {
        table_entries: 4 * 251,
        ..CAPS
    };
    let mut h = Harness::node(1021);
    h.rec = Reconciler::new(
        FakeDatapath::new(caps),
        Limits {
            max_table_size: 1021,
            ..LIMITS
        },
    )
    .unwrap();
    let svc = |i: usize| {
        lb(
            &format!("s{i}"),
            &format!("10.96.0.{i}"),
            &format!("198.51.100.{i}"),
            30080 + i as i32,
        )
    };
    let eps = |i: usize| lb_slice(&format!("s{i}"), &["10.0.0.1"]);
    h.sync((1..=3).map(svc).collect(), (1..=3).map(eps).collect());
    h.sync(vec![svc(1), svc(3)], vec![eps(1), eps(3)]);
    let report = h.sync(
        vec![svc(1), svc(3), svc(4), svc(5)],
        (1..=5).filter(|i| *i != 2).map(eps).collect(),
    );
    assert!(report.full.is_empty(), "{:?}", report.full);
    let c = h.rec.contents();
    let mut starts: Vec<u32> = c.tables.keys().copied().collect();
    starts.sort_unstable();
    assert_eq!(starts, [0, 251, 502, 753]);
    // A sixth does not fit: refused, the others kept.
    let report = h.sync(
        vec![svc(1), svc(3), svc(4), svc(5), svc(6)],
        (1..=6).filter(|i| *i != 2).map(eps).collect(),
    );
    assert_eq!(report.full.len(), 1);
    assert_eq!(report.full[0].map, maps::TABLES);
    assert_eq!(h.rec.contents().tables.len(), 4);
}

#[test]
fn a_rejected_service_keeps_only_backends_that_are_still_endpoints() {
    // A service edited into an invalid state keeps what it had, but never an address its
    // pods left: that address may be another tenant's pod next.
    let mut h = Harness::new();
    let with_ip = |ip: &str| {
        let mut svc = web(ip);
        svc.spec.as_mut().unwrap().external_ips = Some(vec!["203.0.113.5".into()]);
        svc
    };
    h.sync(
        vec![with_ip("10.96.0.1")],
        vec![web_slice(&["10.0.0.1", "10.0.0.2"])],
    );
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"],
        entry("ns/web:http", &["10.0.0.1:8080", "10.0.0.2:8080"])
    );
    let external = |h: &Harness| -> Vec<String> {
        served_external(&h.rec.datapath().contents)
            .get("203.0.113.5:80/TCP")
            .map(|(_, _, shares)| shares.keys().cloned().collect())
            .unwrap_or_default()
    };
    assert_eq!(external(&h), ["10.0.0.1:8080", "10.0.0.2:8080"]);
    // Invalid now (a bad cluster IP), and 10.0.0.1's pod is gone.
    let report = h.sync(vec![with_ip("10.96.0.300")], vec![web_slice(&["10.0.0.2"])]);
    assert_eq!(report.rejected.len(), 1);
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"],
        entry("ns/web:http", &["10.0.0.2:8080"])
    );
    assert_eq!(external(&h), ["10.0.0.2:8080"]);
    // Every pod gone: nothing to send to.
    h.sync(vec![with_ip("10.96.0.300")], vec![web_slice(&[])]);
    assert_eq!(h.served()["10.96.0.1:80/TCP"], entry("ns/web:http", &[]));
    assert!(external(&h).is_empty());
}

#[test]
fn a_namespace_over_its_share_is_refused_alone_and_served_once_it_frees_room() {
    // Shares of 10% of a service map of 100: each namespace may hold 10 frontends.
    let mut h = Harness::new();
    h.rec.set_namespace_share(10);
    let greedy = |i: u32| {
        let ports: Vec<(&str, i32, &str)> = vec![("a", 80, "TCP"), ("b", 81, "TCP")];
        service(
            "greedy",
            &format!("s{i}"),
            &[&format!("10.96.1.{i}")],
            &ports,
        )
    };
    let others = || {
        vec![
            web("10.96.0.1"),
            service("other", "x", &["10.96.2.1"], &[("a", 80, "TCP")]),
        ]
    };
    // Five services of two frontends fill greedy's share; the sixth is refused.
    let all = |n: u32| -> Vec<Service> { (0..n).map(greedy).chain(others()).collect() };
    let report = h.sync(all(6), vec![web_slice(&["10.0.0.1"])]);
    let refused: Vec<(String, &'static str)> = report
        .rejected
        .iter()
        .map(|(o, r)| (o.to_string(), r.reason()))
        .collect();
    assert_eq!(refused, [("greedy/s5".to_string(), "namespace_share")]);
    assert!(report.rejected[0].1.to_string().contains(maps::SERVICES));
    let served = h.served();
    assert!(!served.contains_key("10.96.1.5:80/TCP"));
    assert_eq!(
        served["10.96.0.1:80/TCP"],
        entry("ns/web:http", &["10.0.0.1:8080"])
    );
    assert!(
        served.contains_key("10.96.2.1:80/TCP"),
        "other namespaces are served"
    );
    assert_eq!(h.rec.shares().waiting(), 1);
    let row = &h.rec.shares().rows()[0];
    assert_eq!(
        (
            row.namespace.as_str(),
            row.map.as_str(),
            row.used,
            row.share,
            row.waiting
        ),
        ("greedy", maps::SERVICES, 10, 10, 1)
    );

    // One of greedy's services goes: the waiting one is programmed in the same sync.
    let services: Vec<Service> = (1..6).map(greedy).chain(others()).collect();
    let report = h.sync(services, vec![web_slice(&["10.0.0.1"])]);
    assert!(report.rejected.is_empty(), "{:?}", report.rejected);
    let served = h.served();
    assert!(served.contains_key("10.96.1.5:80/TCP"));
    assert!(!served.contains_key("10.96.1.0:80/TCP"));
    assert_eq!(h.rec.shares().waiting(), 0);
}

#[test]
fn a_service_over_its_share_keeps_what_it_had() {
    // Backends: a share of 10% of 100. Growing from 5 to 12 endpoints is refused; the five
    // it had serve on while they are endpoints.
    let mut h = Harness::new();
    h.rec.set_namespace_share(10);
    let addrs: Vec<String> = (1..=12).map(|i| format!("10.0.0.{i}")).collect();
    let some = |n: usize| -> Vec<&str> { addrs[..n].iter().map(String::as_str).collect() };
    h.sync(vec![web("10.96.0.1")], vec![web_slice(&some(5))]);
    let report = h.sync(vec![web("10.96.0.1")], vec![web_slice(&some(12))]);
    assert_eq!(report.rejected.len(), 1);
    assert!(report.rejected[0].1.to_string().contains(maps::BACKENDS));
    assert_eq!(h.served()["10.96.0.1:80/TCP"].1.len(), 5);
    // Back within the share: taken.
    let report = h.sync(vec![web("10.96.0.1")], vec![web_slice(&some(10))]);
    assert!(report.rejected.is_empty());
    assert_eq!(h.served()["10.96.0.1:80/TCP"].1.len(), 10);
}
