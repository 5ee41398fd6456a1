//! Benchmark 7, incremental update latency with 10k services loaded, through the production
//! path (the Kubernetes source watching the API fixture); also the cold sync through that
//! path (6).
//!
//! Two clocks per change. The agent's own: each sync it logs the time from the oldest source
//! event it includes to its last map write (`latency_us`), and how many services it
//! recomputed (`services`, which shows there is no full resync). End to end: a client in the
//! sandbox tries one connection after another (200 µs apart) from before the change is made
//! until the datapath answers the new way; the time from the change to that answer.

use std::{
    io::{BufRead as _, BufReader},
    net::Ipv4Addr,
    process::{Child, ChildStdout, Stdio},
    time::{Duration, Instant},
};

use lb_tests::{
    apiserver::ApiServer,
    bench::Report,
    kubeproxy,
    manifest::{Ep, documents, service, slice},
    world::World,
};
use serde_json::Value;

use crate::{
    Plan,
    fixture::{capacities, objects, services, timed_start},
    progress,
};

const BENCH: &str = "7-updates";
/// A service over backend 1 whose endpoint is flipped to not-ready and back.
const FLIP_VIP: &str = "10.111.255.250";
/// A service rolled from backend 0 to backend 1 and back, after the 10% of the other
/// services rolled in the same burst.
const ROLL_VIP: &str = "10.111.255.251";
const PORT: i64 = 8080;

/// One sync the agent logged.
#[derive(Debug)]
struct Sync {
    /// From its oldest source event to its last map write, ms.
    latency_ms: f64,
    /// Services recomputed.
    services: u64,
}

/// The syncs that wrote to the maps, logged after byte `offset` of the agent's log.
fn syncs_since(log: &str, offset: usize) -> Vec<Sync> {
    log.get(offset..)
        .unwrap_or_default()
        .lines()
        .filter(|l| l.contains("agent: synced "))
        .map(|l| {
            let field = |name: &str| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(name)?.strip_prefix('='))
                    .and_then(|v| v.parse::<f64>().ok())
                    .unwrap_or_else(|| panic!("no {name} in the agent's sync line {l:?}"))
            };
            Sync {
                latency_ms: field("latency_us") / 1e3,
                services: field("services") as u64,
            }
        })
        .collect()
}

/// A client trying connections until the datapath answers the new way.
struct Watcher {
    child: Child,
    out: BufReader<ChildStdout>,
}

impl Watcher {
    /// Starts trying `vip`:80 until backend `backend` answers (or with `not`, until it does
    /// not); returns once the client runs.
    fn start(w: &World, vip: &str, backend: &str, not: bool) -> Self {
        let mut cmd = w.client_command(true);
        cmd.args(["until", &format!("{vip}:80"), "--backend", backend])
            .stdout(Stdio::piped());
        if not {
            cmd.arg("--not");
        }
        let mut child = cmd.spawn().expect("spawning lb-probe until");
        let mut out = BufReader::new(child.stdout.take().expect("piped"));
        let mut line = String::new();
        out.read_line(&mut line).expect("lb-probe until");
        assert_eq!(line.trim(), "ready", "lb-probe until did not start");
        Self { child, out }
    }

    /// Waits for the answer; the ms from `changed` to it.
    fn finish(mut self, changed: Instant) -> f64 {
        let mut line = String::new();
        self.out.read_line(&mut line).expect("lb-probe until");
        let ms = changed.elapsed().as_secs_f64() * 1e3;
        let _ = self.child.wait();
        let v: Value = serde_json::from_str(&line).expect("lb-probe until JSON");
        assert_eq!(
            v["done"], true,
            "the datapath never answered the new way: {v}"
        );
        ms
    }
}

/// The latencies of one kind of change, over its repetitions.
#[derive(Default)]
struct Samples {
    agent: Vec<f64>,
    end_to_end: Vec<f64>,
    /// The most services one sync recomputed.
    most_services: u64,
    /// Syncs per change.
    syncs: Vec<f64>,
}

impl Samples {
    /// Makes a change with `apply` while a client waits for `vip` to answer from
    /// (or, with `not`, not from) `backend`; records both clocks.
    fn measure(
        &mut self,
        w: &World,
        (vip, backend, not): (&str, &str, bool),
        apply: impl FnOnce(),
    ) {
        let offset = w.agent_log().len();
        let watcher = Watcher::start(w, vip, backend, not);
        let changed = Instant::now();
        apply();
        self.end_to_end.push(watcher.finish(changed));
        // The sync that made the change visible has logged by now, or within moments.
        let mut syncs = Vec::new();
        w.wait_until("the agent logged the sync", Duration::from_secs(5), || {
            syncs = syncs_since(&w.agent_log(), offset);
            !syncs.is_empty()
        });
        std::thread::sleep(Duration::from_millis(50));
        syncs = syncs_since(&w.agent_log(), offset);
        self.syncs.push(syncs.len() as f64);
        for s in syncs {
            self.agent.push(s.latency_ms);
            self.most_services = self.most_services.max(s.services);
        }
    }

    fn report(&self, report: &mut Report, n: u64, change: &str, touched: u64) {
        let agent = report.add(
            BENCH,
            n,
            "ours",
            &format!("{change}: event → last map write"),
            "ms",
            self.agent.clone(),
        );
        let e2e = report.add(
            BENCH,
            n,
            "ours",
            &format!("{change}: change → first connect served the new way"),
            "ms",
            self.end_to_end.clone(),
        );
        report.add(
            BENCH,
            n,
            "ours",
            &format!("{change}: syncs"),
            "",
            self.syncs.clone(),
        );
        let p99 = |v: &[f64]| lb_tests::bench::summarize(v).1;
        let (a, e) = (p99(&self.agent), p99(&self.end_to_end));
        report.goal(
            BENCH,
            &format!(
                "{change} at {n} services: p99 <= 10 ms in the agent, <= 250 ms end to end, no \
                 full resync (at most {touched} services recomputed per sync)"
            ),
            format!(
                "agent p50 {agent:.2} / p99 {a:.2} ms, end to end p50 {e2e:.1} / p99 {e:.1} ms, \
                 at most {} services per sync",
                self.most_services
            ),
            a <= 10.0 && e <= 250.0 && self.most_services <= touched,
        );
    }
}

/// Services `0..count` of `svcs` with their endpoints moved to new addresses (alternating
/// between two address ranges with `rep`), as slice documents.
fn rolled(svcs: &[kubeproxy::Service], count: usize, rep: usize) -> Vec<String> {
    let base = if rep.is_multiple_of(2) {
        Ipv4Addr::new(10, 130, 0, 0)
    } else {
        Ipv4Addr::new(10, 128, 0, 0)
    };
    let moved: Vec<kubeproxy::Service> = svcs[..count]
        .iter()
        .enumerate()
        .map(|(k, s)| kubeproxy::Service {
            endpoints: (0..10u32)
                .map(|b| {
                    let ip = Ipv4Addr::from(u32::from(base) + (k as u32 + 1) * 10 + b);
                    std::net::SocketAddrV4::new(ip, PORT as u16)
                })
                .collect(),
            ..s.clone()
        })
        .collect();
    objects(&moved)
        .iter()
        .filter(|o| o["kind"] == "EndpointSlice")
        .map(Value::to_string)
        .collect()
}

fn one_endpoint(name: &str, vip: &str, ep: Ep) -> (String, String) {
    (
        service("bench", name, &[vip], &[("http", 80, "TCP")]),
        slice(
            "bench",
            &format!("{name}-1"),
            name,
            "IPv4",
            &[("http", PORT, "TCP")],
            &[ep],
        ),
    )
}

/// Benchmark 7 (and the Kubernetes-source cold sync of 6) at `n` services.
pub fn update_latency(report: &mut Report, plan: &Plan, n: u64) {
    progress(&format!("7: incremental updates at {n} services"));
    let mut w = World::with_backends(2, PORT as u16);
    let (b0, b1) = (w.backend_v4(0).to_string(), w.backend_v4(1).to_string());
    let api = ApiServer::start();
    let svcs = services(n);
    let mut docs: Vec<String> = objects(&svcs).iter().map(Value::to_string).collect();
    let (flip_svc, flip_ready) = one_endpoint("flip", FLIP_VIP, Ep::ready(&b1));
    let (roll_svc, roll_b0) = one_endpoint("roll", ROLL_VIP, Ep::ready(&b0));
    docs.extend([flip_svc, flip_ready.clone(), roll_svc, roll_b0.clone()]);
    api.apply(&documents(&docs));

    let cap = (n * 12 + 1024).max(65_536).to_string();
    let cold = timed_start(&mut w, |w| w.start_agent_kube(&api, &capacities(&cap)));
    report.add(
        "6-cold-sync",
        n,
        "ours, Kubernetes source",
        "all entries written",
        "ms",
        vec![cold],
    );
    progress(&format!(
        "   agent synced {n} services from the API in {cold:.0} ms"
    ));

    let mut add = Samples::default();
    let (mut not_ready, mut ready) = (Samples::default(), Samples::default());
    for r in 0..plan.update_reps {
        let name = format!("added-{r}");
        let vip = format!("10.111.254.{}", r + 1);
        let (svc, eps) = one_endpoint(&name, &vip, Ep::ready(&b1));
        add.measure(&w, (&vip, "b1", false), || {
            api.apply(&documents(&[svc, eps]));
        });
        let (_, flipped) = one_endpoint("flip", FLIP_VIP, Ep::not_ready(&b1));
        not_ready.measure(&w, (FLIP_VIP, "b1", true), || {
            api.apply(&flipped);
        });
        ready.measure(&w, (FLIP_VIP, "b1", false), || {
            api.apply(&flip_ready);
        });
    }
    add.report(report, n, "add one service", 1);
    not_ready.report(report, n, "flip one endpoint to not-ready", 1);
    ready.report(report, n, "flip it back to ready", 1);

    progress("   rolling 10% of the endpoints");
    let count = (n as usize / 10).min(svcs.len());
    let mut roll = Samples::default();
    for r in 0..plan.roll_reps {
        let mut burst = rolled(&svcs, count, r);
        let (_, last) = one_endpoint(
            "roll",
            ROLL_VIP,
            Ep::ready(if r.is_multiple_of(2) { &b1 } else { &b0 }),
        );
        burst.push(last);
        let target = if r.is_multiple_of(2) { "b1" } else { "b0" };
        roll.measure(&w, (ROLL_VIP, target, false), || {
            api.apply(&documents(&burst));
        });
    }
    roll.report(
        report,
        n,
        &format!("roll 10% of the endpoints ({} slices)", count + 1),
        count as u64 + 1,
    );
    drop(w);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sync_lines_are_parsed() {
        let log = "2026-12-01T00:00:00Z  INFO lb_userspace::agent: initial sync done frontends=3 backends=2 writes=9 latency_us=12\n\
                   2026-12-01T00:00:01Z  INFO lb_userspace::agent: synced updates=2 services=1 frontends_changed=1 writes=3 latency_us=1500\n";
        let s = syncs_since(log, 0);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].services, 1);
        assert!((s[0].latency_ms - 1.5).abs() < 1e-9);
        assert!(syncs_since(log, log.len()).is_empty());
    }
}
