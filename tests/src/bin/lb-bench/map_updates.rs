//! Benchmark 8, map update throughput: the agent's single-element writes against
//! `BPF_MAP_UPDATE_BATCH`.

use std::{fs, net::Ipv4Addr, time::Instant};

use lb_common::{Backend, Endpoint, node};
use lb_tests::{
    bench::Report,
    world::{new_tag, pin_dir_of},
};
use lb_userspace::{
    addr::to_addr6,
    datapath::{Datapath as _, Op},
    loader::{Loaded, MapSizes, PinLayout},
};

use crate::{Plan, progress};

pub(super) fn map_updates(report: &mut Report, plan: &Plan) {
    progress("8: map update throughput");
    let id = "8-map-updates";
    let count: u32 = if plan.reps > 5 { 200_000 } else { 50_000 };
    let pins = pin_dir_of(&new_tag());
    let layout = PinLayout::new(&pins);
    let sizes = MapSizes {
        services: 16,
        slots: 16,
        backends: count + 16,
        rev_nat: 16,
        affinity: 16,
        external: 16,
        external_ids: 16,
        table_entries: 16,
        flows: 16,
        new_flows: 16,
        source_ranges: 16,
    };
    let result = (|| -> Result<(Vec<f64>, Vec<f64>), String> {
        let mut loaded =
            Loaded::load(&layout, &sizes, (61000, 65535)).map_err(|e| e.to_string())?;
        let mut dp = loaded.datapath().map_err(|e| e.to_string())?;
        let (backends, _) =
            lb_userspace::datapath::raw::RawMap::open(&layout, lb_common::maps::BACKENDS)
                .map_err(|e| e.to_string())?;
        let values: Vec<Backend> = (0..count)
            .map(|i| {
                let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i);
                Backend::new(
                    Endpoint::new(to_addr6(ip.into()), 8080u16.to_be()),
                    node::REMOTE,
                )
            })
            .collect();
        let keys: Vec<u32> = (1..=count).collect();
        let (mut single, mut batched) = (Vec::new(), Vec::new());
        for _ in 0..plan.reps {
            // The agent's path: one bpf() call per element.
            let t = Instant::now();
            for (k, v) in keys.iter().zip(&values) {
                dp.apply(&Op::PutBackend(*k, *v))
                    .map_err(|e| e.to_string())?;
            }
            single.push(f64::from(count) / t.elapsed().as_secs_f64());
            // Batched, 10k elements per call.
            let t = Instant::now();
            for (k, v) in keys.chunks(10_000).zip(values.chunks(10_000)) {
                backends.update_batch(k, v).map_err(|e| e.to_string())?;
            }
            batched.push(f64::from(count) / t.elapsed().as_secs_f64());
        }
        Ok((single, batched))
    })();
    let _ = fs::remove_dir_all(&pins);
    match result {
        Ok((single, batched)) => {
            let scale = u64::from(count);
            report.add(
                id,
                scale,
                "single",
                "hash map updates",
                "elements/s",
                single,
            );
            let b = report.add(
                id,
                scale,
                "batched",
                "hash map updates",
                "elements/s",
                batched,
            );
            report.goal(
                id,
                ">= 500k elements/s batched",
                format!("{:.0}k/s", b / 1000.0),
                b >= 500_000.0,
            );
            report.notes.push(
                "8: the agent still writes element by element; batching its first sync is \
                 planned (docs/performance.md)."
                    .into(),
            );
        }
        Err(e) => report.notes.push(format!("8 (map updates) failed: {e}")),
    }
}
