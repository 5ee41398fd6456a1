//! Changes over time: endpoints going away, the agent crashing and restarting, stopping and
//! cleaning up. Needs root (see tests/README.md).

use std::{
    collections::BTreeSet,
    sync::atomic::{AtomicBool, Ordering},
    time::Duration,
};

use lb_tests::{
    fixture::{BACKEND_PORT, WEB_V4, web_manifest, web_world},
    require_privileges,
};

fn vip() -> String {
    format!("{WEB_V4}:80")
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_removed_backend_gets_no_new_connections_within_a_second_and_keeps_established_ones() {
    require_privileges("a_removed_backend_gets_no_new_connections");
    let w = web_world(3, &[]);
    // Hold a connection that landed on b2 (each try has a 1/3 chance).
    let mut held = (0..60)
        .map(|_| w.hold(&vip()))
        .find(|h| h.first.backend.as_deref() == Some("b2"))
        .expect("a connection reaches b2 within 60 tries");

    w.write_manifest("web.yaml", &web_manifest(&w, &[0, 1]));
    let took = w.wait_for_backends(&format!("{WEB_V4}:80/TCP"), 2);
    assert!(
        took < Duration::from_secs(1),
        "the datapath dropped b2 after {took:?}"
    );
    let attempts = w.probe(&["tcp", &vip(), "--count", "200"]);
    assert!(
        attempts
            .iter()
            .all(|a| a.error.is_none() && a.backend.as_deref() != Some("b2")),
        "new connections reach only b0 and b1: {:?}",
        attempts
            .iter()
            .find(|a| a.error.is_some() || a.backend.as_deref() == Some("b2"))
    );
    for _ in 0..3 {
        let a = held.ping();
        assert_eq!(
            a.backend.as_deref(),
            Some("b2"),
            "the established connection still works: {a:?}"
        );
    }

    // The removed backend is gone from the maps; the service entry only changed count.
    let backends: Vec<String> = w.backends().iter().map(|b| b.address.to_string()).collect();
    assert!(
        !backends
            .iter()
            .any(|b| b.contains(&w.backend_v4(2).to_string())),
        "{backends:?}"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn backend_changes_under_load_leave_no_connection_untranslated() {
    require_privileges("backend_changes_under_load_leave_no_connection_untranslated");
    let w = web_world(4, &[]);
    let frontend = format!("{WEB_V4}:80/TCP");
    // Connections all along, from another thread, while the backends change under them:
    // replaced (a new table in the other generation), added (the table grows in place),
    // removed from the end and from the middle.
    let done = AtomicBool::new(false);
    let attempts = std::thread::scope(|scope| {
        let load = scope.spawn(|| {
            let mut attempts = Vec::new();
            // Bounded: at most 40 rounds of 100 connections.
            for _ in 0..40 {
                if done.load(Ordering::Relaxed) && !attempts.is_empty() {
                    break;
                }
                let args = ["tcp", &vip(), "--count", "100"];
                attempts.extend(lb_tests::run_probe(w.client_probe(), &args));
            }
            attempts
        });
        let sets: [&[usize]; 8] = [
            &[0, 1, 2],
            &[1, 2, 3],
            &[1, 2, 3, 0],
            &[1, 2],
            &[2, 3],
            &[0, 1, 2, 3],
            &[3],
            &[0, 2, 3],
        ];
        for set in sets {
            w.write_manifest("web.yaml", &web_manifest(&w, set));
            let want: BTreeSet<String> = set
                .iter()
                .map(|&i| format!("{}:{BACKEND_PORT}", w.backend_v4(i)))
                .collect();
            w.wait_until(
                &format!("{frontend} served by {want:?}"),
                Duration::from_secs(10),
                || {
                    let slots = w.service(&frontend);
                    let have: BTreeSet<String> = slots
                        .iter()
                        .flat_map(|d| &d.slots)
                        .filter_map(|s| s.backend.map(|b| b.to_string()))
                        .collect();
                    have == want
                },
            );
            // Some connections under each table.
            std::thread::sleep(Duration::from_millis(50));
        }
        done.store(true, Ordering::Relaxed);
        load.join().expect("the load thread")
    });
    eprintln!("{} connections during 8 changes", attempts.len());
    assert!(attempts.len() >= 200, "connections all along the changes");
    let failed: Vec<_> = attempts.iter().filter(|a| a.error.is_some()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} connections failed, first {:?}",
        failed.len(),
        attempts.len(),
        failed.first()
    );
    // Every connect found the whole table it looked up: no slot or backend was deleted
    // under a lookup (they go only after a grace period).
    let stats = w.stats();
    assert_eq!(stats.get("err_slot_missing"), Some(&0), "{stats:?}");
    assert_eq!(stats.get("err_backend_missing"), Some(&0), "{stats:?}");
    assert!(
        stats["connect_translated"] >= attempts.len() as u64,
        "{stats:?}"
    );
    // Nothing is left of the tables switched away from.
    let programmed = w.service(&frontend);
    assert_eq!(programmed[0].slots.len(), 3);
    assert_eq!(w.backends().len(), 3 * 2, "IPv4 and IPv6 of b0, b2, b3");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_agent_crash_and_restart_keep_connections_and_maps() {
    require_privileges("an_agent_crash_and_restart_keep_connections_and_maps");
    let mut w = web_world(3, &[]);
    let mut held = w.hold(&vip());
    let backend = held.first.backend.clone().expect("answered");
    let services = w.services();
    let backends = w.backends();
    let detail = w.service("demo/web");
    assert_eq!(services.len(), 4, "two families x two ports: {services:?}");

    w.kill_agent();
    // While no agent runs, the pinned maps and links keep serving.
    assert_eq!(w.services(), services, "maps are intact without the agent");
    let attempts = w.probe(&["tcp", &vip(), "--count", "30"]);
    assert!(
        attempts.iter().all(|a| a.error.is_none()),
        "served without the agent: {attempts:?}"
    );
    assert_eq!(held.ping().backend.as_ref(), Some(&backend));

    w.start_agent(&[]);
    w.wait_until(
        "the restarted agent has synced",
        Duration::from_secs(10),
        || w.agent_log().matches("initial sync done").count() == 2,
    );
    let log = w.agent_log();
    let second = log.rsplit("initial sync done").next().unwrap_or_default();
    let line = second.lines().next().unwrap_or_default();
    assert!(
        line.contains("writes=0"),
        "unchanged services are not rewritten: {line}"
    );
    assert_eq!(w.services(), services, "same frontends and ids");
    assert_eq!(w.backends(), backends, "same backends and ids");
    assert_eq!(w.service("demo/web"), detail, "same slots");
    for _ in 0..3 {
        assert_eq!(
            held.ping().backend.as_ref(),
            Some(&backend),
            "the connection survived"
        );
    }
    let links = std::fs::read_dir(w.pin_dir().join("links"))
        .expect("links")
        .count();
    assert_eq!(links, 9, "one link per program, the old ones replaced");
    let attempts = w.probe(&["tcp", &vip(), "--count", "30"]);
    assert!(attempts.iter().all(|a| a.error.is_none()));
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_stopped_agent_leaves_the_datapath_and_cleanup_removes_it() {
    require_privileges("a_stopped_agent_leaves_the_datapath_and_cleanup_removes_it");
    let mut w = web_world(2, &[]);
    w.stop_agent();
    assert!(
        w.probe(&["tcp", &vip(), "--count", "5"])
            .iter()
            .all(|a| a.error.is_none())
    );

    let out = w.run_agent(&["--cleanup"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!w.pin_dir().exists(), "the pin directory is removed");
    assert!(
        w.lbctl(&["services"]).is_err(),
        "nothing is pinned any more"
    );
    // Untranslated, the VIP is unroutable in the sandbox.
    for a in w.probe(&["tcp", &vip(), "--count", "2"]) {
        assert_eq!(
            a.error.as_deref(),
            Some("ENETUNREACH"),
            "programs are detached: {a:?}"
        );
    }
    // Cleaning up twice is fine.
    assert!(w.run_agent(&["--cleanup"]).status.success());
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn a_deleted_service_stops_being_translated() {
    require_privileges("a_deleted_service_stops_being_translated");
    let w = web_world(1, &[]);
    w.remove_manifest("web.yaml");
    // Its backends go with it, after a grace period.
    w.wait_until(
        "the service and its backends are removed",
        Duration::from_secs(5),
        || w.services().is_empty() && w.backends().is_empty(),
    );
    for a in w.probe(&["tcp", &vip(), "--count", "2"]) {
        assert_eq!(a.error.as_deref(), Some("ENETUNREACH"), "{a:?}");
    }
}

/// A capability set from `/proc/PID/status` (`CapEff`, `CapBnd`...).
fn capabilities(pid: u32, set: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    let hex = status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{set}:")))
        .unwrap_or_else(|| panic!("{set} missing"));
    u64::from_str_radix(hex.trim(), 16).expect("hex")
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn the_running_agent_keeps_only_the_capabilities_it_needs_and_its_pins_are_root_only() {
    require_privileges(
        "the_running_agent_keeps_only_the_capabilities_it_needs_and_its_pins_are_root_only",
    );
    use std::os::unix::fs::PermissionsExt as _;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let mut w = web_world(2, &["--metrics-bind-address", &format!("127.0.0.1:{port}")]);
    // A scrape reads the maps on a thread of the blocking pool, started now.
    let (status, _) = lb_tests::http_get(
        ([127, 0, 0, 1], port).into(),
        "/metrics",
        Duration::from_secs(5),
    )
    .expect("metrics");
    assert_eq!(status, 200);
    let pid = w.agent_pid().expect("the agent runs");
    let runtime = lb_userspace::agent::privileges::mask(&lb_userspace::agent::privileges::RUNTIME);
    for set in ["CapEff", "CapPrm", "CapBnd"] {
        assert_eq!(capabilities(pid, set), runtime, "{set}");
    }
    // Every thread, the blocking pool's too.
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).expect("tasks") {
        let tid: u32 = task
            .expect("task")
            .file_name()
            .to_string_lossy()
            .parse()
            .expect("tid");
        assert_eq!(capabilities(tid, "CapEff"), runtime, "thread {tid}");
    }
    assert_eq!(capabilities(pid, "CapInh"), 0);
    assert_eq!(capabilities(pid, "CapAmb"), 0);
    assert!(
        w.agent_log()
            .contains("start-up done: capabilities limited")
    );

    // Still able to do its work: a change is programmed and translated.
    w.write_manifest("web.yaml", &web_manifest(&w, &[1]));
    w.wait_for_backends(&format!("{WEB_V4}:80/TCP"), 1);
    let attempts = w.probe(&["tcp", &vip(), "--count", "5"]);
    assert!(
        attempts.iter().all(|a| a.backend.as_deref() == Some("b1")),
        "{attempts:?}"
    );

    // Only root reads or writes the maps and links.
    let mode =
        |p: &std::path::Path| std::fs::metadata(p).expect("pin").permissions().mode() & 0o777;
    for dir in [
        w.pin_dir().to_owned(),
        w.pin_dir().join("maps"),
        w.pin_dir().join("links"),
    ] {
        assert_eq!(mode(&dir), 0o700, "{}", dir.display());
    }
    for pin in std::fs::read_dir(w.pin_dir().join("maps")).expect("maps") {
        let pin = pin.expect("entry").path();
        assert_eq!(mode(&pin) & 0o077, 0, "{}", pin.display());
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn raising_map_capacities_copies_the_maps_without_a_gap() {
    require_privileges("raising_map_capacities_copies_the_maps_without_a_gap");
    let small = ["--max-rev-nat", "1024", "--max-services", "16"];
    let mut w = web_world(2, &small);
    let mut held = w.hold(&vip());
    let backend = held.first.backend.clone().expect("answered");
    let attempts = w.probe(&["tcp", &vip(), "--count", "20"]);
    assert!(attempts.iter().all(|a| a.error.is_none()));
    let row = |w: &lb_tests::world::World, map: &str| {
        w.capacity()
            .into_iter()
            .find(|r| r.map == map)
            .unwrap_or_else(|| panic!("{map}"))
    };
    let rev_nat_before = row(&w, "lb_revnat_v1");
    assert_eq!(rev_nat_before.capacity, 1024);
    let services = w.services();

    // A restart with larger maps: new maps, filled from the old ones, and the old programs
    // keep serving until the new ones replace them.
    w.kill_agent();
    w.start_agent(&["--max-rev-nat", "4096", "--max-services", "64"]);
    for _ in 0..5 {
        let attempts = w.probe(&["tcp", &vip(), "--count", "10"]);
        assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
    }
    w.wait_ready();
    assert!(w.agent_log().contains("map resized: entries copied"));
    assert_eq!(row(&w, "lb_revnat_v1").capacity, 4096);
    assert_eq!(row(&w, "lb_svc_v2").capacity, 64);
    assert!(
        row(&w, "lb_revnat_v1").entries >= rev_nat_before.entries,
        "reverse-NAT entries carried over"
    );
    assert_eq!(w.services(), services, "same frontends and ids");
    assert_eq!(
        held.ping().backend,
        Some(backend),
        "the connection survived"
    );
    let attempts = w.probe(&["tcp", &vip(), "--count", "20"]);
    assert!(attempts.iter().all(|a| a.error.is_none()));
    let leftovers: Vec<String> = std::fs::read_dir(w.pin_dir().join("maps"))
        .expect("maps")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with("-old"))
        .collect();
    assert!(leftovers.is_empty(), "old maps unpinned: {leftovers:?}");
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn an_upgrade_from_the_v1_service_maps_migrates_them_and_keeps_the_ids() {
    require_privileges("an_upgrade_from_the_v1_service_maps_migrates_them");
    let mut w = web_world(3, &[]);
    let mut held = w.hold(&vip());
    let backend = held.first.backend.clone().expect("answered");
    let attempts = w.probe(&["tcp", &vip(), "--count", "30"]);
    assert!(attempts.iter().all(|a| a.error.is_none()));
    let services = w.services();
    let connections = |w: &lb_tests::world::World| -> u64 {
        let rows: Vec<serde_json::Value> = w
            .lbctl_json(&["stats", "--services"])
            .expect("lbctl stats --services");
        let web = format!("{WEB_V4}:80/TCP");
        rows.iter()
            .find(|r| r["frontend"] == web.as_str() && r["path"] == "socket")
            .and_then(|r| r["connections"].as_u64())
            .unwrap_or_else(|| panic!("{web} in {rows:?}"))
    };
    let before = connections(&w);
    assert!(before >= 31, "{before}");

    // As an agent of the previous release left them: the service and slot maps pinned
    // under their v1 names (v2 only added the generation bit, zero in v1), still read by
    // the running programs.
    w.kill_agent();
    let maps = w.pin_dir().join("maps");
    for (old, new) in lb_common::maps::MIGRATIONS {
        std::fs::rename(maps.join(new), maps.join(old)).expect("renaming a pin");
    }
    w.start_agent(&[]);
    for _ in 0..5 {
        let attempts = w.probe(&["tcp", &vip(), "--count", "10"]);
        assert!(attempts.iter().all(|a| a.error.is_none()), "{attempts:?}");
    }
    w.wait_ready();
    assert_eq!(
        w.agent_log().matches("map layout migrated").count(),
        2,
        "{}",
        w.agent_log()
    );
    // The same ids, so the same counters (and affinity entries) go on.
    assert_eq!(w.services(), services, "same frontends and ids");
    assert!(connections(&w) >= before + 50, "the counters went on");
    assert_eq!(
        held.ping().backend,
        Some(backend),
        "the connection survived"
    );
    for (old, _) in lb_common::maps::MIGRATIONS {
        assert!(!maps.join(old).exists(), "{old} is unpinned once unused");
    }
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn json_logs_are_one_object_per_line() {
    require_privileges("json_logs_are_one_object_per_line");
    let w = web_world(1, &["--log-format", "json"]);
    let log = w.agent_log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() >= 3, "{log}");
    assert!(
        lines
            .iter()
            .all(|l| l["level"].is_string() && l["timestamp"].is_string())
    );
    let synced = lines
        .iter()
        .find(|l| l["fields"]["message"] == "initial sync done")
        .expect("the initial sync is logged");
    assert!(
        synced["fields"]["frontends"]
            .as_u64()
            .is_some_and(|n| n >= 4),
        "{synced}"
    );
}

#[test]
#[ignore = "needs root: run by cargo xtask test (or cargo test -- --include-ignored as root)"]
fn idle_connections_to_the_health_port_do_not_crowd_out_probes() {
    require_privileges("idle_connections_to_the_health_port_do_not_crowd_out_probes");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let _w = web_world(1, &["--healthz-bind-address", &format!("127.0.0.1:{port}")]);
    // Any pod of the node reaches the health port: 200 connections that send nothing
    // (more than the metrics port would serve at once) leave the probes answered at once,
    // and are dropped after the header timeout.
    let idle: Vec<std::net::TcpStream> = (0..200)
        .map(|_| std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect"))
        .collect();
    let started = std::time::Instant::now();
    let (status, _) = lb_tests::http_get(
        ([127, 0, 0, 1], port).into(),
        "/livez",
        Duration::from_secs(1),
    )
    .expect("a probe is answered");
    assert_eq!(status, 200);
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );
    std::thread::sleep(lb_userspace::agent::health::HEADER_TIMEOUT + Duration::from_millis(500));
    for mut s in idle {
        s.set_read_timeout(Some(Duration::from_millis(200)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        let n = std::io::Read::read(&mut s, &mut buf).unwrap_or(1);
        assert_eq!(
            n, 0,
            "an idle connection is closed after the header timeout"
        );
    }
}
