//! Project tasks, run as `cargo xtask <task>`.

mod build_ebpf;
mod setup;
mod toolchain;

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};
use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Args {
    #[command(subcommand)]
    task: Task,
}

#[derive(Debug, Subcommand)]
enum Task {
    /// Install what building and testing need (Debian/Ubuntu, as root); quick when all is there.
    Setup,
    /// Build the kernel object (lb-ebpf) into target/lb-ebpf.o, where the agent embeds it from.
    BuildEbpf {
        /// Optimised build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// What CI runs: setup, the kernel object, formatting, clippy, unit and namespace tests.
    Test {
        /// Arguments passed on to `cargo test` (e.g. a test name filter after `--`).
        #[arg(trailing_var_arg = true)]
        cargo_test_args: Vec<String>,
    },
    /// Show ClusterIP traffic balanced by the kernel programs, in a sandbox removed afterwards.
    Demo,
    /// Longer fuzzing than the test suite's: the packet programs on random and mutated frames
    /// (BPF_PROG_TEST_RUN, in a namespace of its own), and the object pipeline on random and
    /// hostile Services and EndpointSlices (property tests).
    Fuzz {
        /// Frames for the packet programs.
        #[arg(long, default_value_t = 1_000_000)]
        frames: u64,
        /// Cases per property test.
        #[arg(long, default_value_t = 20_000)]
        cases: u64,
        /// Seed of the packet fuzzer (to replay a failure); random by default.
        #[arg(long)]
        seed: Option<u64>,
    },
    /// Run the benchmarks against their baselines (DIRECT, kube-proxy's iptables and nftables
    /// layouts, an empty program) and write BENCHMARKS.md and benchmarks.json.
    Bench {
        /// Fewer repetitions and scales (under 5 minutes on 2 cores).
        #[arg(long)]
        quick: bool,
        /// Only these benchmarks (comma-separated numbers, e.g. 1,10).
        #[arg(long)]
        only: Option<String>,
    },
}

/// The workspace root.
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask is in the workspace")
        .to_owned()
}

/// Runs a command in the workspace root, failing if it fails.
fn cargo(args: &[&str]) -> Result<()> {
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root())
        .status()
        .with_context(|| format!("running cargo {}", args.join(" ")))?;
    if !status.success() {
        bail!("`cargo {}` failed ({status})", args.join(" "));
    }
    Ok(())
}

fn step(what: &str) {
    println!("\n==> {what}");
}

fn test(cargo_test_args: &[String]) -> Result<()> {
    step("setup");
    setup::run()?;
    step("build the kernel object (and the default profile's, which a test loads)");
    build_ebpf::build(false, build_ebpf::DEV_OBJECT)?;
    build_ebpf::run(true)?;
    step("formatting");
    cargo(&["fmt", "--all", "--check"])?;
    cargo(&["fmt", "--manifest-path", "lb-ebpf/Cargo.toml", "--check"])?;
    step("clippy");
    cargo(&[
        "clippy",
        "--workspace",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ])?;
    step("clippy on the kernel programs");
    build_ebpf::clippy()?;
    step("build the binaries");
    cargo(&["build", "--workspace", "--bins"])?;
    step("unit and namespace tests");
    cargo(&test_args(cargo_test_args))
}

/// `cargo test --workspace` with the caller's arguments, running the namespace tests too:
/// they are `#[ignore]`d (they need root), so a plain `cargo test` reports them as ignored.
fn test_args(cargo_test_args: &[String]) -> Vec<&str> {
    let mut args = vec!["test", "--workspace"];
    args.extend(cargo_test_args.iter().map(String::as_str));
    if !args.contains(&"--") {
        args.push("--");
    }
    args.push("--include-ignored");
    args
}

fn fuzz(frames: u64, cases: u64, seed: Option<u64>) -> Result<()> {
    setup::run()?;
    build_ebpf::run(true)?;
    let run = |what: &str, args: &[&str], env: &[(&str, String)]| -> Result<()> {
        step(what);
        let status = Command::new(env!("CARGO"))
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .current_dir(root())
            .status()
            .with_context(|| format!("running cargo {}", args.join(" ")))?;
        if !status.success() {
            bail!("{what} failed ({status})");
        }
        Ok(())
    };
    let mut env = vec![("LB_FUZZ_ITERATIONS", frames.to_string())];
    if let Some(seed) = seed {
        env.push(("LB_FUZZ_SEED", seed.to_string()));
    }
    run(
        &format!("packet programs: {frames} frames"),
        &[
            "test",
            "--release",
            "-p",
            "lb-tests",
            "--test",
            "xdp_programs",
            "fuzzed",
            "--",
            "--include-ignored",
            "--nocapture",
        ],
        &env,
    )?;
    run(
        &format!("object pipeline: {cases} cases per property"),
        &[
            "test",
            "--release",
            "-p",
            "lb-userspace",
            "--lib",
            "proptests",
        ],
        &[("PROPTEST_CASES", cases.to_string())],
    )
}

fn demo() -> Result<()> {
    setup::run()?;
    build_ebpf::run(true)?;
    cargo(&[
        "build",
        "--quiet",
        "-p",
        "lb-userspace",
        "-p",
        "lb-tests",
        "--bins",
    ])?;
    let status = Command::new(root().join("target/debug/lb-demo"))
        .status()
        .context("running lb-demo")?;
    if !status.success() {
        bail!("the demo failed ({status})");
    }
    Ok(())
}

fn bench(quick: bool, only: Option<&str>) -> Result<()> {
    step("setup (with iptables and nftables for the baselines)");
    setup::run_with(&[("iptables-restore", "iptables"), ("nft", "nftables")])?;
    step("build the kernel object and the release binaries");
    build_ebpf::run(true)?;
    cargo(&["build", "--release", "--workspace", "--bins"])?;
    let revision = Command::new("git")
        .args(["describe", "--always", "--dirty"])
        .current_dir(root())
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown".into(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    let micro = only.is_none_or(|o| o.split(',').any(|n| n.trim() == "11"));
    if micro {
        step("micro-benchmarks of the pure code (criterion)");
        let mut args = vec!["bench", "-p", "lb-userspace", "--bench", "pure", "--"];
        if quick {
            args.extend(["--warm-up-time", "1", "--measurement-time", "2"]);
        }
        cargo(&args)?;
    }
    step("benchmarks");
    let mut cmd = Command::new(root().join("target/release/lb-bench"));
    cmd.current_dir(root()).args(["--revision", &revision]);
    if micro {
        cmd.args(["--criterion", "target/criterion"]);
    }
    if quick {
        cmd.arg("--quick");
    }
    if let Some(only) = only {
        cmd.args(["--only", only]);
    }
    let status = cmd.status().context("running lb-bench")?;
    if !status.success() {
        bail!("the benchmarks failed ({status})");
    }
    Ok(())
}

fn main() -> Result<()> {
    match Args::parse().task {
        Task::Setup => setup::run(),
        Task::BuildEbpf { release } => build_ebpf::run(release).map(drop),
        Task::Test { cargo_test_args } => test(&cargo_test_args),
        Task::Demo => demo(),
        Task::Fuzz {
            frames,
            cases,
            seed,
        } => fuzz(frames, cases, seed),
        Task::Bench { quick, only } => bench(quick, only.as_deref()),
    }
}
