//! Benchmark 10, Maglev: table build time and disruption when backends change.

use std::{net::Ipv4Addr, time::Instant};

use lb_common::Endpoint;
use lb_tests::bench::Report;
use lb_userspace::{addr::to_addr6, model::maglev};

use crate::{Plan, progress};

pub(super) fn endpoints(n: usize) -> Vec<(Endpoint, u32)> {
    (0..n)
        .map(|i| {
            let ip = Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 128, 0, 0)) + i as u32);
            (Endpoint::new(to_addr6(ip.into()), 8080u16.to_be()), 1)
        })
        .collect()
}

pub(super) fn maglev_bench(report: &mut Report, plan: &Plan) {
    progress("10: Maglev table builds and disruption");
    let id = "10-maglev";
    let backends = endpoints(1000);
    for (m, limit_ms) in [(16_381u32, 1.0), (65_537, 4.0)] {
        let reps: Vec<f64> = (0..plan.reps)
            .map(|_| {
                let t = Instant::now();
                let table = maglev::table(&backends, m);
                let ms = t.elapsed().as_secs_f64() * 1e3;
                assert_eq!(table.len(), m as usize);
                ms
            })
            .collect();
        let median = report.add(
            id,
            1000,
            "ours",
            &format!("build M={m}, 1000 backends"),
            "ms",
            reps,
        );
        report.goal(
            id,
            &format!("table build <= {limit_ms} ms for M={m} at 1000 backends"),
            format!("{median:.2} ms"),
            median <= limit_ms,
        );
    }
    let max = lb_common::maps::DEFAULT_MAGLEV_TABLE_SIZE;
    let mut worst = 0.0f64;
    for n in [10usize, 50, 100] {
        // At the largest table size, and at the size the defaults give N backends.
        let sized = maglev::table_size(n, lb_common::maps::DEFAULT_MAGLEV_ENTRIES_PER_BACKEND, max);
        let mut sizes = vec![max];
        if sized != max {
            sizes.push(sized);
        }
        for m in sizes {
            let moved = disruption(plan, n, m);
            report.add(
                id,
                n as u64,
                "ours",
                &format!("entries moved between survivors, M={m}"),
                "%",
                moved.clone(),
            );
            if m == max {
                worst = worst.max(moved.iter().copied().fold(0.0, f64::max));
            }
        }
    }
    report.goal(
        id,
        &format!("entries moved between surviving backends <= 1% for N <= 100 at M={max}"),
        format!("worst {worst:.2}%"),
        worst <= 1.0,
    );
}

/// The % of a table's `m` entries that move between surviving backends when one of `n`
/// leaves, for several choices of the one that leaves.
pub(super) fn disruption(plan: &Plan, n: usize, m: u32) -> Vec<f64> {
    let all = endpoints(n);
    let before = maglev::table(&all, m);
    // Each backend leaves once; entries that move between two surviving backends are the
    // disruption beyond the minimum.
    (0..n.min(plan.reps * 2))
        .map(|gone| {
            let rest: Vec<(Endpoint, u32)> = all
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != gone)
                .map(|(_, b)| *b)
                .collect();
            let after = maglev::table(&rest, m);
            let moved = before
                .iter()
                .zip(&after)
                .filter(|(b, a)| {
                    let old = all[**b as usize].0;
                    let new = rest[**a as usize].0;
                    **b as usize != gone && old != new
                })
                .count();
            moved as f64 * 100.0 / f64::from(m)
        })
        .collect()
}
