//! What the benchmarks report: repeated measurements summarised (median and p99 over the
//! repetitions), goals checked against baselines measured in the same run, and the report
//! written as Markdown (BENCHMARKS.md) and JSON.

use std::fmt::Write as _;

use serde::Serialize;

/// The median and p99 (nearest rank) of `values`.
pub fn summarize(values: &[f64]) -> (f64, f64) {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let rank = |q: f64| v[((v.len() as f64 * q).ceil() as usize).clamp(1, v.len()) - 1];
    let median = if v.len() % 2 == 1 {
        v[v.len() / 2]
    } else {
        (v[v.len() / 2 - 1] + v[v.len() / 2]) / 2.0
    };
    (median, rank(0.99))
}

/// One measured quantity of one variant at one scale, over the repetitions.
#[derive(Clone, Debug, Serialize)]
pub struct Row {
    /// Benchmark id (`1-program-cost`, ...).
    pub bench: String,
    /// Services loaded (or the benchmark's own scale parameter).
    pub scale: u64,
    /// `ours`, `DIRECT`, `IPT`, `NFT`, `EMPTY`, ...
    pub variant: String,
    /// What was measured (`ns/run`, `connect p50`, ...).
    pub metric: String,
    /// Unit of the values.
    pub unit: String,
    /// One value per repetition.
    pub reps: Vec<f64>,
    /// Their median.
    pub median: f64,
    /// Their p99 (nearest rank).
    pub p99: f64,
}

/// A goal of the issue, checked.
#[derive(Clone, Debug, Serialize)]
pub struct Goal {
    /// Benchmark id.
    pub bench: String,
    /// The goal as stated.
    pub goal: String,
    /// The measured ratio or value it was checked with.
    pub measured: String,
    /// Whether it was met.
    pub met: bool,
}

/// The machine and build the numbers come from.
#[derive(Clone, Debug, Serialize)]
pub struct Meta {
    /// `uname -r`.
    pub kernel: String,
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// Git revision of the code measured.
    pub revision: String,
    /// When, UTC.
    pub date: String,
    /// Quick mode (fewer repetitions and scales).
    pub quick: bool,
}

/// Everything measured in one run.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    /// Machine and build.
    pub meta: Meta,
    /// Measurements.
    pub rows: Vec<Row>,
    /// Goals.
    pub goals: Vec<Goal>,
    /// Notes on what was not measured, or why a goal is missed.
    pub notes: Vec<String>,
}

impl Report {
    /// An empty report for this machine.
    pub fn new(meta: Meta) -> Self {
        Self {
            meta,
            rows: Vec::new(),
            goals: Vec::new(),
            notes: Vec::new(),
        }
    }

    /// Records the repetitions of one quantity; returns its median.
    pub fn add(
        &mut self,
        bench: &str,
        scale: u64,
        variant: &str,
        metric: &str,
        unit: &str,
        reps: Vec<f64>,
    ) -> f64 {
        let (median, p99) = summarize(&reps);
        self.rows.push(Row {
            bench: bench.into(),
            scale,
            variant: variant.into(),
            metric: metric.into(),
            unit: unit.into(),
            reps,
            median,
            p99,
        });
        median
    }

    /// The median of a recorded quantity.
    pub fn median(&self, bench: &str, scale: u64, variant: &str, metric: &str) -> Option<f64> {
        self.rows
            .iter()
            .find(|r| {
                r.bench == bench && r.scale == scale && r.variant == variant && r.metric == metric
            })
            .map(|r| r.median)
    }

    /// Checks a goal.
    pub fn goal(&mut self, bench: &str, goal: &str, measured: String, met: bool) {
        self.goals.push(Goal {
            bench: bench.into(),
            goal: goal.into(),
            measured,
            met,
        });
    }

    /// The report as Markdown: per benchmark a table of medians and p99s with the ratio to
    /// the baseline of the same scale and metric, then the goals.
    pub fn markdown(&self, titles: &[(&str, &str)]) -> String {
        let m = &self.meta;
        let mut out = String::from("# Benchmarks\n\n");
        let _ = writeln!(
            out,
            "Measured by `cargo xtask bench{}` on {} ({} CPUs), kernel {}, revision {}, {}.\n\
             Every figure is the median (and p99) over the repetitions listed in the JSON file; \
             \"vs baseline\" is this row's median divided by the baseline's, both measured in the \
             same run. Baselines: DIRECT (the client talks to the backend's own address), IPT and \
             NFT (kube-proxy's iptables and nftables rule layouts for the same services, the \
             measured one last), EMPTY (an empty program at the same hook). Absolute numbers on a \
             shared VM are noisy; the ratios are what the goals are about.\n",
            if m.quick { " --quick" } else { "" },
            m.cpu,
            m.cpus,
            m.kernel,
            m.revision,
            m.date
        );
        for (id, title) in titles {
            let rows: Vec<&Row> = self.rows.iter().filter(|r| r.bench == *id).collect();
            if rows.is_empty() {
                continue;
            }
            let _ = writeln!(out, "## {title}\n");
            out.push_str("| scale | metric | variant | median | p99 | vs baseline |\n|---|---|---|---|---|---|\n");
            for r in &rows {
                let base = rows
                    .iter()
                    .find(|b| {
                        b.scale == r.scale
                            && b.metric == r.metric
                            && BASELINES.contains(&b.variant.as_str())
                            && b.variant != r.variant
                    })
                    .filter(|_| !BASELINES.contains(&r.variant.as_str()) || r.variant != "DIRECT");
                let ratio = base
                    .filter(|b| b.median > 0.0)
                    .map(|b| format!("{:.2}x {}", r.median / b.median, b.variant))
                    .unwrap_or_default();
                let _ = writeln!(
                    out,
                    "| {} | {} | {} | {} {} | {} | {ratio} |",
                    r.scale,
                    r.metric,
                    r.variant,
                    fmt(r.median),
                    r.unit,
                    fmt(r.p99)
                );
            }
            let goals: Vec<&Goal> = self.goals.iter().filter(|g| g.bench == *id).collect();
            if !goals.is_empty() {
                out.push('\n');
                for g in goals {
                    let _ = writeln!(
                        out,
                        "- {} **{}**: {} (measured: {})",
                        if g.met { "✅" } else { "❌" },
                        if g.met { "met" } else { "missed" },
                        g.goal,
                        g.measured
                    );
                }
            }
            out.push('\n');
        }
        if !self.notes.is_empty() {
            out.push_str("## Notes\n\n");
            for n in &self.notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }
}

/// Variants that are baselines, in order of preference for the "vs baseline" column.
const BASELINES: [&str; 4] = ["DIRECT", "EMPTY", "IPT", "NFT"];

fn fmt(v: f64) -> String {
    if !v.is_finite() {
        "-".into()
    } else if v.abs() >= 100.0 {
        format!("{v:.0}")
    } else if v.abs() >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians_and_p99s() {
        assert_eq!(summarize(&[3.0, 1.0, 2.0]), (2.0, 3.0));
        assert_eq!(summarize(&[4.0, 1.0, 2.0, 3.0]), (2.5, 4.0));
        let hundred: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(summarize(&hundred), (50.5, 99.0));
    }

    #[test]
    fn markdown_has_ratios_and_goals() {
        let mut r = Report::new(Meta {
            kernel: "6.18".into(),
            cpu: "cpu".into(),
            cpus: 2,
            revision: "abc".into(),
            date: "today".into(),
            quick: true,
        });
        r.add(
            "2-connect",
            1,
            "DIRECT",
            "connect p50",
            "us",
            vec![10.0, 10.0, 10.0],
        );
        r.add(
            "2-connect",
            1,
            "ours",
            "connect p50",
            "us",
            vec![10.5, 10.5, 10.5],
        );
        r.goal("2-connect", "p50 <= 1.05x DIRECT", "1.05x".into(), true);
        let md = r.markdown(&[("2-connect", "connect() latency")]);
        assert!(
            md.contains("| 1 | connect p50 | ours | 10.5 us | 10.5 | 1.05x DIRECT |"),
            "{md}"
        );
        assert!(md.contains("✅ **met**: p50 <= 1.05x DIRECT"), "{md}");
    }
}
