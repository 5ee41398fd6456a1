//! `cargo xtask build-ebpf`: compiles lb-ebpf for the BPF target by whichever route is
//! available, and copies the object to target/lb-ebpf.o for the agent to embed.

use std::{path::PathBuf, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::{
    root, step,
    toolchain::{self, INSTALL_HELP, Route, TARGET},
};

/// Where the agent's build script looks for the object.
pub const OBJECT: &str = "target/lb-ebpf.o";

/// Where `cargo xtask test` puts the object of the default (dev) profile, which a namespace
/// test loads: the command without `--release` must build an object the kernel accepts.
pub const DEV_OBJECT: &str = "target/lb-ebpf-dev.o";

/// Builds the object at [`OBJECT`]; returns its path.
pub fn run(release: bool) -> Result<PathBuf> {
    build(release, OBJECT)
}

/// A cargo command running `subcommand` on lb-ebpf for the BPF target by `route`, with
/// `linker` on PATH and its own target directory.
fn cargo_on(
    route: &Route,
    subcommand: &str,
    linker: &std::path::Path,
    target_dir: &std::path::Path,
) -> Result<Command> {
    let mut cmd = match route {
        Route::Prebuilt { rustc, version } => {
            step(&format!(
                "route: prebuilt core ({version} at {})",
                rustc.display()
            ));
            // Clippy must be the one of the same compiler: its cargo-clippy sits beside it.
            let mut cmd = if subcommand == "clippy" {
                Command::new(rustc.with_file_name("cargo-clippy"))
            } else {
                Command::new("cargo")
            };
            cmd.env("RUSTC", rustc)
                // aya-ebpf uses unstable features; this compiler is stable.
                .env("RUSTC_BOOTSTRAP", "1")
                .arg(subcommand);
            cmd
        }
        Route::Upstream { version } => {
            step(&format!("route: rustup nightly with rust-src ({version})"));
            let mut cmd = Command::new("cargo");
            cmd.args(["+nightly", subcommand, "-Z", "build-std=core"]);
            cmd
        }
    };
    // The host build's settings must not leak into the BPF build.
    for var in [
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
    ] {
        cmd.env_remove(var);
    }
    let linker_dir = linker.parent().filter(|p| !p.as_os_str().is_empty());
    if let Some(dir) = linker_dir {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let mut paths: Vec<PathBuf> = vec![dir.to_owned()];
        paths.extend(std::env::split_paths(&path));
        cmd.env("PATH", std::env::join_paths(paths)?);
    }
    cmd.args(["--locked", "--target", TARGET])
        .env("CARGO_TARGET_DIR", target_dir)
        .current_dir(root().join("lb-ebpf"));
    Ok(cmd)
}

/// Runs clippy on lb-ebpf for the BPF target with `-D warnings`, by the route that builds
/// it. Says SKIPPED when that route has no clippy (setup installs it on the prebuilt route).
pub fn clippy() -> Result<()> {
    let Some(route) = toolchain::route() else {
        bail!("no compiler for {TARGET} was found.\n\n{INSTALL_HELP}");
    };
    if !toolchain::has_clippy(&route) {
        println!(
            "SKIPPED: clippy on lb-ebpf: the route {route:?} has no clippy (on the prebuilt \
             route, `apt-get install rust-web-clippy`; on rustup, the clippy component)"
        );
        return Ok(());
    }
    let Some((linker, _)) = toolchain::bpf_linker() else {
        bail!("bpf-linker was not found.\n\n{INSTALL_HELP}");
    };
    let mut cmd = cargo_on(&route, "clippy", &linker, &root().join("target/ebpf"))?;
    cmd.args(["--release", "--", "-D", "warnings"]);
    let status = cmd.status().context("running clippy for lb-ebpf")?;
    if !status.success() {
        bail!("clippy on lb-ebpf failed ({status})");
    }
    Ok(())
}

/// Builds the object at `object` (relative to the workspace root); returns its path.
pub fn build(release: bool, object: &str) -> Result<PathBuf> {
    let Some(route) = toolchain::route() else {
        bail!("no compiler for {TARGET} was found.\n\n{INSTALL_HELP}");
    };
    let Some((linker, linker_version)) = toolchain::bpf_linker() else {
        bail!("bpf-linker was not found.\n\n{INSTALL_HELP}");
    };
    let root = root();
    let target_dir = root.join("target/ebpf");
    let mut cmd = cargo_on(&route, "build", &linker, &target_dir)?;
    println!("    bpf-linker: {linker_version}");
    cmd.args(release.then_some("--release"));
    let status = cmd.status().context("running cargo for lb-ebpf")?;
    if !status.success() {
        bail!("building lb-ebpf failed ({status})");
    }
    let profile = if release { "release" } else { "debug" };
    let built = target_dir.join(TARGET).join(profile).join("lb-ebpf");
    let object = root.join(object);
    let bytes = std::fs::read(&built).with_context(|| format!("reading {}", built.display()))?;
    // Rewriting an identical object would make cargo rebuild the agent for nothing.
    if std::fs::read(&object).ok().as_ref() != Some(&bytes) {
        std::fs::write(&object, &bytes).with_context(|| format!("writing {}", object.display()))?;
    }
    println!("    kernel object: {} ({profile})", object.display());
    Ok(object)
}
