use std::collections::BTreeMap;

use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};

use super::*;
use crate::{
    addr::{frontend_string, to_socket_addr},
    datapath::fake::FakeDatapath,
    store::{Snapshot, Update},
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
};
const LIMITS: Limits = Limits {
    max_backends_per_service: 50,
    table_size: 61,
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
        let report = self.rec.sync(&self.store, dirty);
        assert_eq!(
            self.rec.contents(),
            &self.rec.datapath().contents,
            "the mirror equals the maps"
        );
        report
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
            let backends = (0..u32::from(v.count))
                .map(|slot| {
                    let id = c.slots[&SlotKey { svc_id: v.id, slot }];
                    to_socket_addr(&c.backends[&id]).to_string()
                })
                .collect();
            (frontend_string(k), (owner, backends))
        })
        .collect()
}

fn entry(owner: &str, backends: &[&str]) -> (String, Vec<String>) {
    (
        owner.to_string(),
        backends.iter().map(|b| b.to_string()).collect(),
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
            Op::ResetCounters(_) => "reset-counters",
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
            "put-backend",
            "put-backend",
            "put-slot",
            "put-slot",
            "put-info",
            "put-service"
        ]
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
fn replacing_one_backend_rewrites_one_slot_and_touches_no_other_service() {
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
    h.sync(
        vec![web("10.96.0.1"), dns_svc],
        vec![web_slice(&["10.0.0.1", "10.0.0.4", "10.0.0.3"]), dns_slice],
    );
    let ops = &h.log()[before..];
    assert_eq!(kinds(ops), ["put-backend", "put-slot", "del-backend"]);
    // The new backend took the removed one's slot; the others kept theirs.
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"].1,
        ["10.0.0.1:8080", "10.0.0.4:8080", "10.0.0.3:8080"]
    );
}

#[test]
fn removing_a_backend_compacts_slots_then_shrinks_then_deletes() {
    let mut h = Harness::new();
    h.sync(
        vec![web("10.96.0.1")],
        vec![web_slice(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])],
    );
    let before = h.log().len();
    h.sync(
        vec![web("10.96.0.1")],
        vec![web_slice(&["10.0.0.2", "10.0.0.3"])],
    );
    assert_eq!(
        kinds(&h.log()[before..]),
        ["put-slot", "put-service", "del-slot", "del-backend"]
    );
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"].1,
        ["10.0.0.3:8080", "10.0.0.2:8080"]
    );
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
            "del-slot",
            "del-info",
            "del-service",
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
        .insert(55, crate::addr::to_endpoint("10.9.9.9:1".parse().unwrap()));
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
    let report = h.sync(vec![web("10.96.0.999")], vec![web_slice(&["10.0.0.2"])]);
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
        assert!(h.rec.needs_retry());
        let report = h.rec.sync(&h.store, BTreeSet::new());
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
fn a_frontend_claimed_twice_goes_to_the_first_service() {
    let mut h = Harness::new();
    let twin = service("ns", "aaa-twin", &["10.96.0.1"], &[("http", 80, "TCP")]);
    let report = h.sync(vec![web("10.96.0.1"), twin], vec![web_slice(&["10.0.0.1"])]);
    assert_eq!(report.conflicts.len(), 1);
    assert_eq!(report.conflicts[0].winner, ObjectRef::new("ns", "aaa-twin"));
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"],
        entry("ns/aaa-twin:http", &[])
    );
    // When the winner goes, the other takes over.
    h.sync(vec![web("10.96.0.1")], vec![web_slice(&["10.0.0.1"])]);
    assert_eq!(
        h.served()["10.96.0.1:80/TCP"],
        entry("ns/web:http", &["10.0.0.1:8080"])
    );
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
            "put-backend",
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
            "del-slot",
            "del-match",
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
fn ids_are_lowest_free_and_reused() {
    let mut ids = Ids::from_used([1, 4]);
    assert_eq!(ids.take(), 2);
    assert_eq!(ids.take(), 3);
    assert_eq!(ids.take(), 5);
    ids.release(2);
    assert_eq!(ids.take(), 2);
    ids.mark_used(9);
    assert_eq!(ids.take(), 6);
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
