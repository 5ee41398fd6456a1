//! The Kubernetes source against the in-process API server fixture, with traffic through the
//! datapath in namespaces. Needs root (see tests/README.md).

use std::{collections::BTreeSet, time::Duration};

use lb_tests::{
    apiserver::ApiServer,
    fixture::{BACKEND_PORT, WEB_V4, web_manifest},
    probe::Attempt,
    require_privileges,
    world::World,
};

fn backends_of(attempts: &[Attempt]) -> BTreeSet<String> {
    attempts
        .iter()
        .map(|a| {
            assert_eq!(a.error, None, "answered: {a:?}");
            a.backend.clone().expect("answered")
        })
        .collect()
}

/// A world of `n` backends serving, with `demo/web` over all of them in the API.
fn world(api: &ApiServer, n: usize) -> World {
    let mut w = World::new(n);
    for i in 0..n {
        w.serve(i, &format!("b{i}"), BACKEND_PORT);
    }
    api.apply(&web_manifest(&w, &(0..n).collect::<Vec<_>>()));
    w
}

#[test]
fn the_initial_list_is_programmed_and_serves_traffic() {
    if !require_privileges("the_initial_list_is_programmed_and_serves_traffic") {
        return;
    }
    let api = ApiServer::start();
    let mut w = world(&api, 2);
    w.start_agent_kube(&api, &[]);
    w.wait_for_backends(&format!("{WEB_V4}:80/TCP"), 2);
    let attempts = w.probe(&["tcp", &format!("{WEB_V4}:80"), "--count", "40"]);
    assert_eq!(backends_of(&attempts).len(), 2);
    let _ = Duration::ZERO;
}
