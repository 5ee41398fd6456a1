//! `cargo xtask setup`: installs what is missing to build and test, on Debian/Ubuntu as root.
//! Idempotent, and quick when everything is present (a few version checks).

use std::{path::Path, process::Command};

use anyhow::{Context as _, Result, bail};

use crate::toolchain::{self, INSTALL_HELP, Route};

/// The bpf-linker release known to work with Debian's LLVM 22 here.
const BPF_LINKER_VERSION: &str = "0.13.0";
const LLVM_PREFIX: &str = "/usr/lib/llvm-22";

fn have(program: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {program}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// Whether a Debian package is installed.
fn installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

fn exec(cmd: &mut Command, what: &str) -> Result<()> {
    let status = cmd.status().with_context(|| what.to_owned())?;
    if !status.success() {
        bail!("{what} failed ({status})");
    }
    Ok(())
}

/// Installs what is missing.
pub fn run() -> Result<()> {
    run_with(&[])
}

/// Installs what is missing, with these (program, package) pairs too.
pub fn run_with(extra: &[(&str, &'static str)]) -> Result<()> {
    let mut packages: Vec<&str> = Vec::new();
    for (program, package) in extra {
        if !have(program) {
            packages.push(package);
        }
    }
    // The namespace tests and the demo use ip(8) and ethtool(8) (veth offloads for native
    // XDP); bpftool is for looking at the datapath.
    for (program, package) in [
        ("ip", "iproute2"),
        ("ethtool", "ethtool"),
        ("bpftool", "bpftool"),
    ] {
        if !have(program) {
            packages.push(package);
        }
    }
    let route = toolchain::route();
    if route.is_none() {
        packages.extend(["rustc-web", "libstd-rust-web-dev-bpf"]);
    }
    // Clippy for the kernel programs must match the compiler that builds them.
    let debian_rustc = match &route {
        None => true,
        Some(Route::Prebuilt { rustc, .. }) => rustc == Path::new("/usr/bin/rustc"),
        Some(Route::Upstream { .. }) => false,
    };
    if debian_rustc && !Path::new("/usr/bin/clippy-driver").is_file() {
        packages.push("rust-web-clippy");
    }
    let linker = toolchain::bpf_linker();
    if linker.is_none() {
        // What building bpf-linker links against; llvm-config alone (package llvm-22) is not.
        packages.extend(
            [
                "llvm-22-dev",
                "libpolly-22-dev",
                "libzstd-dev",
                "zlib1g-dev",
            ]
            .into_iter()
            .filter(|p| !installed(p)),
        );
    }

    if !packages.is_empty() {
        if !is_root() || !have("apt-get") {
            bail!(
                "missing: {} (installing needs root and apt-get).\n\n{INSTALL_HELP}",
                packages.join(" ")
            );
        }
        println!("setup: installing {}", packages.join(" "));
        exec(
            Command::new("apt-get")
                .args(["update", "-q"])
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get update",
        )?;
        exec(
            Command::new("apt-get")
                .args(["install", "-y", "-q"])
                .args(&packages)
                .env("DEBIAN_FRONTEND", "noninteractive"),
            "apt-get install",
        )?;
    }
    if linker.is_none() {
        println!(
            "setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (about a minute)"
        );
        exec(
            Command::new("cargo")
                .args([
                    "install",
                    "bpf-linker",
                    "--version",
                    BPF_LINKER_VERSION,
                    "--locked",
                ])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("LLVM_PREFIX", LLVM_PREFIX),
            "cargo install bpf-linker",
        )?;
    }
    let route = toolchain::route().context(INSTALL_HELP)?;
    let (_, linker) = toolchain::bpf_linker().context(INSTALL_HELP)?;
    println!("setup: ready ({route:?}; {linker})");
    Ok(())
}
