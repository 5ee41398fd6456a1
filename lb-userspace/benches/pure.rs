//! Micro-benchmarks of the agent's pure code, with criterion (`cargo bench -p lb-userspace`):
//! Maglev table builds, the model of one service, and the reconciler's incremental diff of
//! one changed service with 10k services programmed (against an in-memory datapath that
//! only records what is written).

#![expect(
    missing_docs,
    reason = "criterion's macros define an undocumented public `benches` function"
)]

use std::{collections::BTreeSet, hint::black_box, net::Ipv4Addr};

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use lb_common::Endpoint;
use lb_userspace::{
    addr::to_addr6,
    datapath::{Capacities, Contents, Datapath, DatapathError, Op},
    k8s::ObjectRef,
    k8s::store::{Object, Snapshot, Store, Update},
    model::endpoints::NodeInfo,
    model::maglev,
    model::{self, Limits, Slice},
    reconcile::Reconciler,
};
use serde_json::json;

fn backends(n: usize) -> Vec<(Endpoint, u32)> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32);
            (Endpoint::new(to_addr6(ip.into()), 8080u16.to_be()), 1)
        })
        .collect()
}

fn maglev_tables(c: &mut Criterion) {
    let mut g = c.benchmark_group("maglev table");
    for (n, m) in [(10, 1021), (100, 16381), (1000, 16381), (1000, 65537)] {
        let b = backends(n);
        g.bench_with_input(BenchmarkId::new(format!("N={n}"), m), &m, |bench, &m| {
            bench.iter(|| maglev::table(black_box(&b), m));
        });
    }
    g.finish();
}

fn service(i: u32) -> Service {
    let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 96, 0, 0)) + i);
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("s{i}")},
        "spec": {"clusterIP": ip.to_string(), "clusterIPs": [ip.to_string()],
                 "ports": [{"name": "http", "port": 80, "protocol": "TCP"}]},
    }))
    .expect("a Service")
}

/// Service `i`'s slice of `n` endpoints, the first `shifted` of them moved to other
/// addresses.
fn slice(i: u32, n: u32, shifted: u32) -> EndpointSlice {
    let eps: Vec<_> = (0..n)
        .map(|b| {
            let base = if b < shifted {
                0x0a81_0000
            } else {
                0x0a80_0000
            };
            let ip = Ipv4Addr::from(base + i * n + b);
            json!({"addresses": [ip.to_string()], "conditions": {"ready": true}})
        })
        .collect();
    serde_json::from_value(json!({
        "metadata": {"namespace": "bench", "name": format!("s{i}-1"),
                     "labels": {"kubernetes.io/service-name": format!("s{i}")}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": eps,
    }))
    .expect("an EndpointSlice")
}

const LIMITS: Limits = Limits {
    max_backends_per_service: 1000,
    max_frontends_per_service: 4096,
    max_table_size: 16381,
    entries_per_backend: 100,
};

fn model_of_one_service(c: &mut Criterion) {
    let mut g = c.benchmark_group("model of one service");
    for n in [10, 100, 1000] {
        let svc = service(1);
        let slices = [Slice::new(&slice(1, n, 0))];
        g.bench_with_input(BenchmarkId::from_parameter(n), &n, |bench, _| {
            bench.iter(|| model::desired(black_box(&svc), &slices, &NodeInfo::default(), &LIMITS));
        });
    }
    g.finish();
}

/// Maps that take every write, with no capacity limit and no programs to wait for.
struct Recorder(Contents);

impl Datapath for Recorder {
    fn read(&self) -> Result<Contents, DatapathError> {
        Ok(self.0.clone())
    }
    fn apply(&mut self, op: &Op) -> Result<(), DatapathError> {
        self.0.apply(op);
        Ok(())
    }
    fn capacities(&self) -> Capacities {
        Capacities {
            services: u32::MAX,
            slots: u32::MAX,
            backends: u32::MAX,
            affinity_match: u32::MAX,
            external: u32::MAX,
            external_ids: u32::MAX,
            table_entries: u32::MAX,
            ranges: u32::MAX,
            external_match: u32::MAX,
        }
    }
    fn begin_grace(&mut self) -> u64 {
        0
    }
    fn graces_ended(&self) -> u64 {
        0
    }
    fn wait_grace(&mut self, _n: u64) -> Result<(), DatapathError> {
        Ok(())
    }
}

fn incremental_sync(c: &mut Criterion) {
    let services = 10_000;
    let mut store = Store::new(None);
    let dirty = store.update(Update::Snapshot(Snapshot {
        services: (0..services).map(service).collect(),
        slices: (0..services).map(|i| slice(i, 10, 0)).collect(),
        nodes: Vec::new(),
    }));
    let mut rec = Reconciler::new(Recorder(Contents::default()), LIMITS).expect("a reconciler");
    rec.sync(&store, dirty);
    let target = ObjectRef::new("bench", "s5000");
    let mut g = c.benchmark_group("incremental sync at 10k services");
    for (what, shifted) in [("one endpoint replaced", 1), ("all 10 replaced", 10)] {
        let mut flip = false;
        g.bench_function(what, |bench| {
            bench.iter(|| {
                flip = !flip;
                let s = slice(5000, 10, if flip { shifted } else { 0 });
                let dirty = store.update(Update::Apply(Object::EndpointSlice(Box::new(s))));
                assert_eq!(dirty, BTreeSet::from([target.clone()]));
                rec.sync(&store, dirty)
            });
        });
    }
    g.finish();
}

criterion_group!(
    benches,
    maglev_tables,
    model_of_one_service,
    incremental_sync
);
criterion_main!(benches);
