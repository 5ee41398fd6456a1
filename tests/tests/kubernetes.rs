//! The Kubernetes source against the in-process API server fixture, with traffic through the
//! datapath in namespaces. Needs root (see tests/README.md).

use std::{
    sync::atomic::{AtomicBool, Ordering},
    thread,
    time::Duration,
};

use serde_json::json;

use lb_tests::{
    apiserver::{ApiServer, Resource},
    fixture::{BACKEND_PORT, WEB_V4, other_manifest, web_manifest},
    manifest::{Ep, Svc, documents, node, service, slice},
    probe::{Attempt, names},
    require_privileges,
    world::World,
};

/// A world of `n` backends serving, with `demo/web` over all of them in the API.
fn world(api: &ApiServer, n: usize) -> World {
    let w = World::with_backends(n, BACKEND_PORT);
    api.apply(&web_manifest(&w, &(0..n).collect::<Vec<_>>()));
    w
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn the_initial_list_is_programmed_and_serves_traffic() {
    require_privileges("the_initial_list_is_programmed_and_serves_traffic");
    let api = ApiServer::start();
    let mut w = world(&api, 2);
    w.start_agent_kube(&api, &[]);
    w.wait_for_backends(&format!("{WEB_V4}:80/TCP"), 2);
    let attempts = w.probe(&["tcp", &format!("{WEB_V4}:80"), "--count", "40"]);
    assert_eq!(Attempt::backends(&attempts).len(), 2);
}

const WEB_TCP: &str = "10.96.0.10:80/TCP";

/// Lines of the agent's log that report a sync that wrote to the maps.
fn write_syncs(w: &World) -> usize {
    w.agent_log().matches("agent: synced ").count()
}

const P: i64 = BACKEND_PORT as i64;

/// The agent on the API with `demo/web` over three backends and `demo/other`, synced.
fn web_and_other(api: &ApiServer) -> World {
    let mut w = world(api, 3);
    api.apply(&other_manifest(&w));
    w.start_agent_kube(api, &[]);
    w.wait_for_backends(WEB_TCP, 3);
    w.wait_for_backends("10.96.0.20:80/TCP", 1);
    w
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn watch_events_change_only_their_service() {
    require_privileges("watch_events_change_only_their_service");
    let api = ApiServer::start();
    let w = web_and_other(&api);
    let other = w.service("demo/other");

    // One EndpointSlice changes: web loses b2.
    api.apply(&web_manifest(&w, &[0, 1]));
    w.wait_for_backends(WEB_TCP, 2);
    assert_eq!(
        Attempt::backends(&w.probe(&["tcp", &format!("{WEB_V4}:80"), "--count", "30"])).len(),
        2
    );
    assert_eq!(
        w.service("demo/other"),
        other,
        "the other service is untouched"
    );
    let log = w.agent_log();
    let synced = log
        .lines()
        .rfind(|l| l.contains("agent: synced "))
        .expect("a sync");
    assert!(
        synced.contains("services=1") && synced.contains("latency_us="),
        "{synced}"
    );

    // The service is deleted, then created again.
    api.delete("Service", "demo", "web");
    w.wait_until("web is removed", Duration::from_secs(5), || {
        w.backend_count(WEB_TCP).is_none()
    });
    api.apply(&web_manifest(&w, &[0]));
    w.wait_for_backends(WEB_TCP, 1);
    assert_eq!(w.service("demo/other"), other);
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn this_nodes_zone_comes_from_its_node_object() {
    require_privileges("this_nodes_zone_comes_from_its_node_object");
    let api = ApiServer::start();
    let mut w = World::with_backends(2, BACKEND_PORT);
    let eps = [
        Ep::ready(w.backend_v4(0)).for_zones(&["zone-a"]),
        Ep::ready(w.backend_v4(1)).for_zones(&["zone-b"]),
    ];
    api.apply(&documents(&[
        service("demo", "s", &["10.96.0.30"], &[("", 80, "TCP")]),
        slice("demo", "s-1", "s", "IPv4", &[("", P, "TCP")], &eps),
        node("node-1", "zone-a"),
        node("node-2", "zone-b"),
    ]));
    w.start_agent_kube(&api, &["--node-name", "node-1"]);
    w.wait_for_backends("10.96.0.30:80/TCP", 1);
    assert_eq!(
        Attempt::backends(&w.probe(&["tcp", "10.96.0.30:80", "--count", "20"])),
        names(&["b0"])
    );
    api.apply(&node("node-1", "zone-b"));
    w.wait_until("the zone-b endpoint serves", Duration::from_secs(5), || {
        Attempt::backends(&w.probe(&["tcp", "10.96.0.30:80", "--count", "5"])) == names(&["b1"])
    });
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_burst_of_slice_updates_converges_on_the_last_one() {
    require_privileges("a_burst_of_slice_updates_converges_on_the_last_one");
    let api = ApiServer::start();
    let w = web_and_other(&api);
    let other = w.service("demo/other");
    let sets: [&[usize]; 4] = [&[0, 1], &[2], &[0, 1, 2], &[1, 2]];
    for i in 0..400 {
        api.apply(&web_manifest(&w, sets[i % 4]));
    }
    api.apply(&web_manifest(&w, &[0]));
    w.wait_for_backends(WEB_TCP, 1);
    w.wait_until("the last update is served", Duration::from_secs(10), || {
        Attempt::backends(&w.probe(&["tcp", &format!("{WEB_V4}:80"), "--count", "10"]))
            == names(&["b0"])
    });
    assert_eq!(
        w.service("demo/other"),
        other,
        "the other service is untouched"
    );
    let syncs = write_syncs(&w);
    assert!(syncs <= 401, "at most one sync per update: {syncs}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn dropped_watches_resume_without_relisting() {
    require_privileges("dropped_watches_resume_without_relisting");
    let api = ApiServer::start();
    let mut w = world(&api, 2);
    w.start_agent_kube(&api, &[]);
    w.wait_for_backends(WEB_TCP, 2);
    let before = api.requests();
    api.drop_watches();
    api.apply(&web_manifest(&w, &[1]));
    w.wait_for_backends(WEB_TCP, 1);
    let after = api.requests();
    for (resource, (lists, watches)) in &after {
        let (lists_before, watches_before) = before.get(resource).copied().unwrap_or_default();
        assert_eq!(*lists, lists_before, "{resource:?} was not listed again");
        assert!(*watches > watches_before, "{resource:?} was watched again");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_relist_after_410_gone_applies_only_what_changed() {
    require_privileges("a_relist_after_410_gone_applies_only_what_changed");
    let api = ApiServer::start();
    let w = web_and_other(&api);
    let (web, other) = (w.service("demo/web"), w.service("demo/other"));
    let services_lists =
        |api: &ApiServer| api.requests().get(&Resource::Services).map_or(0, |r| r.0);

    // An expired resourceVersion with nothing changed: a relist that writes nothing.
    let lists = services_lists(&api);
    let writes = write_syncs(&w);
    api.expire_history();
    w.wait_until(
        "the services are listed again",
        Duration::from_secs(20),
        || services_lists(&api) > lists,
    );
    thread::sleep(Duration::from_millis(300));
    assert_eq!(write_syncs(&w), writes, "the relist changed nothing");
    assert_eq!(
        (w.service("demo/web"), w.service("demo/other")),
        (web, other.clone())
    );

    // Changes made while the agent's watches were away arrive through the relist.
    api.set_down(true);
    api.apply(&web_manifest(&w, &[0]));
    api.expire_history();
    api.set_down(false);
    w.wait_until(
        "the relist applied the change",
        Duration::from_secs(40),
        || w.backend_count(WEB_TCP) == Some(1),
    );
    assert_eq!(
        w.service("demo/other"),
        other,
        "the unchanged service is untouched"
    );
    assert!(w.agent_log().contains("relisted; applying the difference"));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_api_outage_keeps_the_datapath_and_recovery_catches_up() {
    require_privileges("an_api_outage_keeps_the_datapath_and_recovery_catches_up");
    let api = ApiServer::start();
    let (w, port) = ready_world(&api);
    assert_eq!(metric(port, "lb_source_up"), Some(1.0));
    api.set_down(true);
    w.wait_until(
        "the agent notices the outage",
        Duration::from_secs(20),
        || w.agent_log().contains("watch failed"),
    );
    assert_eq!(metric(port, "lb_source_up"), Some(0.0));
    // After --stale-after the agent reports the outage as unready, and stays healthy and live:
    // restarting it would not help, and the datapath serves its last state.
    w.wait_until(
        "readiness reports the outage",
        Duration::from_secs(10),
        || health(port, "/readyz") == Some(503),
    );
    let (_, why) = get(port, "/readyz").expect("readyz");
    assert!(why.contains("unreachable for"), "{why}");
    assert_eq!(health(port, "/healthz"), Some(200));
    assert_eq!(health(port, "/livez"), Some(200));
    for _ in 0..3 {
        let attempts = w.probe(&["tcp", &format!("{WEB_V4}:80"), "--count", "40"]);
        assert_eq!(
            Attempt::backends(&attempts).len(),
            2,
            "served during the outage"
        );
        thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(w.backend_count(WEB_TCP), Some(2), "nothing was flushed");
    api.apply(&web_manifest(&w, &[1]));
    api.set_down(false);
    w.wait_until(
        "the change made during the outage is applied",
        Duration::from_secs(40),
        || w.backend_count(WEB_TCP) == Some(1),
    );
    assert!(w.agent_log().contains("watch recovered"));
    w.wait_until("ready again", Duration::from_secs(10), || {
        health(port, "/readyz") == Some(200)
    });
    assert_eq!(metric(port, "lb_source_up"), Some(1.0));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn metrics_report_the_agent_and_the_datapath() {
    require_privileges("metrics_report_the_agent_and_the_datapath");
    let api = ApiServer::start();
    let mut w = world(&api, 2);
    api.apply(&duplicate_port_service());
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    w.start_agent_kube(&api, &["--metrics-bind-address", &addr]);
    w.wait_for_backends(WEB_TCP, 2);
    let attempts = w.probe(&["tcp", &format!("{WEB_V4}:80"), "--count", "20"]);
    assert_eq!(Attempt::backends(&attempts).len(), 2);
    api.apply(&other_manifest(&w));
    w.wait_for_backends("10.96.0.20:80/TCP", 1);

    let (status, text) = get(port, "/metrics").expect("metrics");
    assert_eq!(status, 200);
    let m = |series: &str| {
        lb_tests::metric(&text, series).unwrap_or_else(|| panic!("{series} missing:\n{text}"))
    };
    assert!(m(r#"lb_datapath_events_total{event="connect_translated"}"#) >= 20.0);
    assert_eq!(
        m(r#"lb_datapath_drops_total{reason="socket_no_backend"}"#),
        0.0
    );
    assert_eq!(
        m(r#"lb_rejected_services_total{reason="duplicate_port"}"#),
        1.0
    );
    // demo/web has 4 frontends (IPv4 and IPv6, TCP and UDP), demo/other 1.
    assert_eq!(m(r#"lb_frontends{path="socket"}"#), 5.0);
    assert_eq!(m("lb_backends"), w.backends().len() as f64);
    // Map fill as lbctl capacity reads it from the maps (the LRU maps change with traffic).
    let lru = ["lb_revnat_v1", "lb_aff_v1", "lb_ct_v2", "lb_natrev_v1"];
    let capacity = w.capacity();
    assert!(capacity.len() >= 12, "{capacity:?}");
    for row in capacity {
        let labels = format!("{{map=\"{}\"}}", row.map);
        assert_eq!(
            m(&format!("lb_map_capacity{labels}")),
            row.capacity as f64,
            "{}",
            row.map
        );
        if !lru.contains(&row.map.as_str()) {
            assert_eq!(
                m(&format!("lb_map_entries{labels}")),
                row.entries as f64,
                "{}",
                row.map
            );
        }
    }
    assert_eq!(m(r#"lb_map_entries{map="lb_svc_v2"}"#), 5.0);
    // The LRU maps are counted by walking them: 20 translated connections left entries.
    assert!(m(r#"lb_map_entries{map="lb_revnat_v1"}"#) >= 1.0);
    assert!(m("lb_source_updates_total") >= 2.0);
    assert!(m("lb_syncs_total") >= 2.0);
    assert!(m("lb_map_writes_total") >= 7.0);
    assert!(m("lb_event_to_datapath_seconds_count") >= 2.0);
    assert!(m("lb_sync_duration_seconds_count") >= 2.0);
    assert_eq!(m("lb_map_write_errors_total"), 0.0);
    // Per frontend and per backend, exactly the 20 connections made.
    assert_eq!(
        m(
            r#"lb_service_connections_total{namespace="demo",service="web",port="http",frontend="10.96.0.10:80/TCP"}"#
        ),
        20.0
    );
    let per_backend: f64 = text
        .lines()
        .filter(|l| l.starts_with("lb_backend_connections_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(per_backend, 20.0);
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn services_for_another_proxy_are_filtered_by_the_api() {
    require_privileges("services_for_another_proxy_are_filtered_by_the_api");
    let api = ApiServer::start();
    let mut w = world(&api, 1);
    let theirs = Svc::new("demo", "theirs", &["10.96.0.40"], &[("", 80, "TCP")])
        .label("service.kubernetes.io/service-proxy-name", "someone-else");
    api.apply(&theirs.yaml());
    w.start_agent_kube(&api, &[]);
    w.wait_for_backends(WEB_TCP, 1);
    assert!(w.backend_count("10.96.0.40:80/TCP").is_none());
}

/// A GET on the agent's health endpoint (on loopback): status and body.
fn get(port: u16, path: &str) -> Option<(u16, String)> {
    lb_tests::http_get(([127, 0, 0, 1], port).into(), path, Duration::from_secs(2)).ok()
}

/// The HTTP status of a GET on the agent's health endpoint.
fn health(port: u16, path: &str) -> Option<u16> {
    get(port, path).map(|(status, _)| status)
}

/// One sample of the agent's metrics.
fn metric(port: u16, series: &str) -> Option<f64> {
    lb_tests::metric(&get(port, "/metrics")?.1, series)
}

/// `demo/bad`, with port 80/TCP twice: rejected as a duplicate port.
fn duplicate_port_service() -> String {
    Svc::new(
        "demo",
        "bad",
        &["10.96.0.99"],
        &[("a", 80, "TCP"), ("b", 80, "TCP")],
    )
    .yaml()
}

/// A world of two backends whose agent reads `api` (`--stale-after 2`), serves its metrics
/// on a free loopback port and is ready: the world and that port.
fn ready_world(api: &ApiServer) -> (World, u16) {
    let mut w = world(api, 2);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    w.start_agent_kube(
        api,
        &["--metrics-bind-address", &addr, "--stale-after", "2"],
    );
    w.wait_for_backends(WEB_TCP, 2);
    w.wait_until("ready", Duration::from_secs(10), || {
        health(port, "/readyz") == Some(200)
    });
    (w, port)
}

/// A free loopback port for the agent's health endpoint.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn the_agent_is_ready_only_after_its_first_complete_sync() {
    require_privileges("the_agent_is_ready_only_after_its_first_complete_sync");
    let api = ApiServer::start();
    let w = world(&api, 1);
    let mut w = w;
    api.set_down(true);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    w.start_agent_kube(&api, &["--metrics-bind-address", &addr]);
    w.wait_until(
        "the health endpoint answers",
        Duration::from_secs(10),
        || health(port, "/healthz") == Some(200),
    );
    assert_eq!(
        health(port, "/readyz"),
        Some(503),
        "not ready while the API is unreachable"
    );
    api.set_down(false);
    w.wait_until(
        "ready after the first sync",
        Duration::from_secs(40),
        || health(port, "/readyz") == Some(200),
    );
    assert_eq!(w.backend_count(WEB_TCP), Some(1));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn the_service_of_the_agents_own_api_address_never_loses_every_backend() {
    require_privileges("the_service_of_the_agents_own_api_address_never_loses_every_backend");
    let api = ApiServer::start();
    let mut w = world(&api, 1);
    // The agent reaches the API at 127.0.0.1:<port>; a service names that address.
    let port = i64::from(api.port());
    let kubernetes = |eps: &[Ep]| {
        documents(&[
            service(
                "default",
                "kubernetes",
                &["127.0.0.1"],
                &[("https", port, "TCP")],
            ),
            slice(
                "default",
                "kubernetes",
                "kubernetes",
                "IPv4",
                &[("https", port, "TCP")],
                eps,
            ),
        ])
    };
    api.apply(&kubernetes(&[Ep::ready("127.0.0.1")]));
    w.start_agent_kube(&api, &[]);
    let frontend = format!("127.0.0.1:{port}/TCP");
    w.wait_for_backends(&frontend, 1);
    w.wait_for_backends(WEB_TCP, 1);

    api.apply(&kubernetes(&[]));
    api.apply(&web_manifest(&w, &[]));
    w.wait_for_backends(WEB_TCP, 0);
    assert_eq!(
        w.backend_count(&frontend),
        Some(1),
        "the API service keeps its backend"
    );
    assert!(
        w.agent_log()
            .contains("is the agent's own API server address")
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn service_semantics_arrive_through_the_api() {
    require_privileges("service_semantics_arrive_through_the_api");
    let api = ApiServer::start();
    let mut w = World::with_backends(3, BACKEND_PORT);
    let port = [("", P, "TCP")];
    let one = |svc: Svc, name: &str, eps: &[Ep]| {
        documents(&[
            svc.yaml(),
            slice("demo", &format!("{name}-1"), name, "IPv4", &port, eps),
        ])
    };
    let all: Vec<Ep> = (0..3).map(|i| Ep::ready(w.backend_v4(i))).collect();
    api.apply(&one(
        Svc::new("demo", "sticky", &["10.96.3.1"], &[("", 80, "TCP")])
            .spec("sessionAffinity", json!("ClientIP")),
        "sticky",
        &all,
    ));
    api.apply(&one(
        Svc::new("demo", "local", &["10.96.3.2"], &[("", 80, "TCP")])
            .spec("internalTrafficPolicy", json!("Local")),
        "local",
        &[
            Ep::ready(w.backend_v4(0)).on_node("node-a"),
            Ep::ready(w.backend_v4(1)).on_node("node-b"),
        ],
    ));
    api.apply(&one(
        Svc::new("demo", "draining", &["10.96.3.3"], &[("", 80, "TCP")])
            .spec("externalIPs", json!(["192.0.2.33"])),
        "draining",
        &[
            Ep::terminating(w.backend_v4(2)),
            Ep::not_ready(w.backend_v4(1)),
        ],
    ));
    w.start_agent_kube(&api, &["--node-name", "node-a"]);
    w.wait_for_backends("10.96.3.1:80/TCP", 3);
    w.wait_for_backends("10.96.3.2:80/TCP", 1);
    w.wait_for_backends("192.0.2.33:80/TCP", 1);
    let seen = |addr: &str| Attempt::backends(&w.probe(&["tcp", addr, "--count", "20"]));
    assert_eq!(
        seen("10.96.3.1:80").len(),
        1,
        "affinity keeps the client on one backend"
    );
    assert_eq!(
        seen("10.96.3.2:80"),
        names(&["b0"]),
        "Local: this node's endpoint"
    );
    assert_eq!(
        seen("10.96.3.3:80"),
        names(&["b2"]),
        "terminating still serves"
    );
    assert_eq!(seen("192.0.2.33:80"), names(&["b2"]), "external IP");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_unprogrammable_service_gets_one_warning_event() {
    require_privileges("an_unprogrammable_service_gets_one_warning_event");
    let api = ApiServer::start();
    let mut w = world(&api, 1);
    api.apply(&duplicate_port_service());
    w.start_agent_kube(&api, &["--node-name", "node-a"]);
    w.wait_for_backends(WEB_TCP, 1);
    let events_of = |name: &str| -> Vec<serde_json::Value> {
        api.events()
            .into_iter()
            .filter(|e| e["regarding"]["name"] == name)
            .collect()
    };
    w.wait_until("the event is published", Duration::from_secs(10), || {
        !events_of("bad").is_empty()
    });
    let e = &events_of("bad")[0];
    assert_eq!(e["type"], "Warning");
    assert_eq!(e["reason"], "InvalidService");
    assert_eq!(e["regarding"]["kind"], "Service");
    assert_eq!(e["regarding"]["namespace"], "demo");
    assert_eq!(e["reportingController"], "lb-agent");
    assert_eq!(e["reportingInstance"], "node-a");
    assert!(
        e["note"]
            .as_str()
            .is_some_and(|n| n.contains("port 80/TCP is listed twice")),
        "{e}"
    );
    // More syncs reject it again, but within the interval no new event is made.
    for n in [0, 1, 0] {
        api.apply(&web_manifest(&w, &[n][..]));
        thread::sleep(Duration::from_millis(200));
    }
    w.wait_for_backends(WEB_TCP, 1);
    let again = events_of("bad");
    assert_eq!(again.len(), 1, "{again:?}");
    assert!(again[0]["series"].is_null(), "{again:?}");
    assert!(events_of("web").is_empty(), "valid services get no event");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_upgrade_to_new_map_layouts_has_no_gap_even_before_the_api_answers() {
    require_privileges("an_upgrade_to_new_map_layouts_has_no_gap_even_before_the_api_answers");
    use lb_common::maps;
    let api = ApiServer::start();
    let mut w = world(&api, 2);
    w.start_agent_kube(&api, &[]);
    w.wait_for_backends(WEB_TCP, 2);
    let vip = format!("{WEB_V4}:80");
    let mut held = w.hold(&vip);
    let backend = held.first.backend.clone().expect("answered");

    // A new build whose service maps have new layouts (new names): its agent finds none of
    // them pinned and creates them empty. The old agent dies (SIGKILL, as in a rolling
    // update that kills), and the new one starts while the API server is unreachable, so
    // its first sync waits.
    w.kill_agent();
    for name in [
        maps::SERVICES,
        maps::SLOTS,
        maps::BACKENDS,
        maps::SERVICE_INFO,
    ] {
        std::fs::remove_file(w.pin_dir().join("maps").join(name)).expect("unpinning");
    }
    api.set_down(true);
    w.start_agent_kube(&api, &[]);
    w.wait_until(
        "the new agent waits for the API",
        Duration::from_secs(10),
        || w.agent_log().matches("watch failed").count() >= 1,
    );
    // The old programs keep serving from the old maps: no connection fails.
    for _ in 0..5 {
        let attempts = w.probe(&["tcp", &vip, "--count", "10"]);
        assert!(
            attempts.iter().all(|a| a.error.is_none()),
            "served while the new agent waits: {attempts:?}"
        );
        thread::sleep(Duration::from_millis(200));
    }
    let attached = || w.agent_log().matches("programs attached").count();
    assert_eq!(
        attached(),
        1,
        "the new agent attaches nothing before its first sync"
    );

    api.set_down(false);
    w.wait_until("the new programs serve", Duration::from_secs(40), || {
        attached() == 2
    });
    assert_eq!(
        w.backend_count(WEB_TCP),
        Some(2),
        "the new maps hold the service"
    );
    let attempts = w.probe(&["tcp", &vip, "--count", "20"]);
    assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
    assert_eq!(Attempt::backends(&attempts).len(), 2);
    assert_eq!(
        held.ping().backend,
        Some(backend),
        "the connection survived"
    );
}

/// The agent's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .expect("VmRSS")
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn sustained_endpoint_churn_is_coalesced_with_bounded_memory() {
    require_privileges("sustained_endpoint_churn_is_coalesced_with_bounded_memory");
    const SERVICES: usize = 100;
    const MAX_UPDATES: usize = 20_000;
    const BURST: Duration = Duration::from_secs(3);
    let api = ApiServer::start();
    let mut w = world(&api, 3);
    let addrs: Vec<String> = (0..3).map(|b| w.backend_v4(b).to_string()).collect();
    let churn = |i: usize, backends: &[usize]| {
        let eps: Vec<Ep> = backends.iter().map(|b| Ep::ready(&addrs[*b])).collect();
        slice(
            "churn",
            &format!("s{i}-1"),
            &format!("s{i}"),
            "IPv4",
            &[("", P, "TCP")],
            &eps,
        )
    };
    for i in 0..SERVICES {
        let ip = format!("10.96.10.{}", i + 1);
        api.apply(&documents(&[
            service("churn", &format!("s{i}"), &[&ip], &[("", 80, "TCP")]),
            churn(i, &[0, 1, 2]),
        ]));
    }
    w.start_agent_kube(&api, &[]);
    w.wait_for_backends(&format!("10.96.10.{SERVICES}:80/TCP"), 3);
    let pid = w.agent_pid().expect("the agent runs");
    let rss_before = rss_kib(pid);
    let syncs_before = write_syncs(&w);

    // As many slice updates as the API fixture takes for a few seconds, bounded in count.
    let sets: [&[usize]; 4] = [&[0, 1], &[2], &[0, 1, 2], &[1, 2]];
    let started = std::time::Instant::now();
    let mut updates = 0;
    while started.elapsed() < BURST && updates < MAX_UPDATES {
        let i = updates % SERVICES;
        let set = (updates / SERVICES + i) % 4;
        api.apply(&churn(i, sets[set]));
        updates += 1;
    }
    let burst = started.elapsed();
    // The final state: every service on one backend, b0, so convergence is plain to see.
    for i in 0..SERVICES {
        api.apply(&churn(i, &[0]));
    }
    let converged = w.wait_until("the agent caught up", Duration::from_secs(20), || {
        let rows = w.services();
        rows.iter()
            .filter(|r| r.frontend.starts_with("10.96.10.") && r.backends == 1)
            .count()
            == SERVICES
    });
    let rss_after = rss_kib(pid);
    let syncs = write_syncs(&w) - syncs_before;
    let total = updates + SERVICES;
    eprintln!(
        "churn: {total} slice updates in {burst:?} ({:.0}/s), {syncs} syncs that wrote \
         ({:.1} updates per sync), caught up {converged:?} after the last one, RSS \
         {rss_before} -> {rss_after} KiB",
        updates as f64 / burst.as_secs_f64(),
        total as f64 / syncs.max(1) as f64,
    );
    assert!(updates >= 1000, "the burst was a burst: {updates}");
    assert!(
        syncs < total,
        "updates were coalesced: {syncs} syncs for {total}"
    );
    assert!(
        rss_after < rss_before + 32 * 1024,
        "memory stayed bounded: {rss_before} -> {rss_after} KiB"
    );
    let attempts = w.probe(&["tcp", "10.96.10.7:80", "--count", "5"]);
    assert_eq!(Attempt::backends(&attempts), names(&["b0"]));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_scrape_storm_delays_no_sync_and_grows_no_memory() {
    require_privileges("a_scrape_storm_delays_no_sync_and_grows_no_memory");
    let api = ApiServer::start();
    let mut w = world(&api, 2);
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    w.start_agent_kube(&api, &["--metrics-bind-address", &addr]);
    w.wait_for_backends(WEB_TCP, 2);
    // Idle: how long a change takes to reach the maps.
    api.apply(&web_manifest(&w, &[1]));
    let idle = w.wait_for_backends(WEB_TCP, 1);
    let pid = w.agent_pid().expect("the agent runs");
    let before = rss_kib(pid);
    // 200 concurrent scrapes while a change is made: each is answered, the change is as
    // fast as when idle (give or take 2x and a scheduling margin), and the agent's memory
    // does not grow with the scrapes (the maps are read once a second at most, and at most
    // 32 connections are served at once).
    let go = std::sync::Arc::new(AtomicBool::new(false));
    let scrapers: Vec<_> = (0..200)
        .map(|_| {
            let go = go.clone();
            thread::spawn(move || {
                while !go.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(1));
                }
                get(port, "/metrics").is_some_and(|(s, _)| s == 200)
            })
        })
        .collect();
    go.store(true, Ordering::Relaxed);
    api.apply(&web_manifest(&w, &[0, 1]));
    let busy = w.wait_for_backends(WEB_TCP, 2);
    let answered = scrapers
        .into_iter()
        .map(|t| t.join().expect("scraper"))
        .filter(|ok| *ok)
        .count();
    assert_eq!(answered, 200, "every scrape is answered");
    assert!(
        busy <= idle * 2 + Duration::from_millis(300),
        "a change took {busy:?} during the storm, {idle:?} idle"
    );
    let after = rss_kib(pid);
    assert!(
        after <= before + 16 * 1024,
        "the agent grew from {before} KiB to {after} KiB"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_api_server_that_answers_nothing_makes_the_agent_unready() {
    require_privileges("an_api_server_that_answers_nothing_makes_the_agent_unready");
    let api = ApiServer::start();
    let (w, port) = ready_world(&api);
    // The server accepts connections and answers nothing (as if stopped with SIGSTOP): the
    // watches stay open and silent, which alone looks like no change. The agent's probe
    // notices; after --stale-after it is unready, still live, and the datapath serves.
    api.set_hung(true);
    w.wait_until(
        "readiness reports the silence",
        Duration::from_secs(15),
        || health(port, "/readyz") == Some(503),
    );
    assert_eq!(health(port, "/livez"), Some(200));
    assert_eq!(metric(port, "lb_source_up"), Some(0.0));
    let attempts = w.probe(&["tcp", &format!("{WEB_V4}:80"), "--count", "40"]);
    assert_eq!(Attempt::backends(&attempts).len(), 2, "served meanwhile");
    assert!(
        w.agent_log().contains("the API server does not answer"),
        "the silence is logged"
    );
    // It answers again: ready again, and a change made meanwhile arrives.
    api.apply(&web_manifest(&w, &[1]));
    api.set_hung(false);
    w.wait_until("ready again", Duration::from_secs(15), || {
        health(port, "/readyz") == Some(200)
    });
    w.wait_until("the change arrives", Duration::from_secs(40), || {
        w.backend_count(WEB_TCP) == Some(1)
    });
}
