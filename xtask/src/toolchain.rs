//! Finding a compiler for the BPF target, and bpf-linker.
//!
//! Two routes build the kernel object:
//! - **prebuilt core**: a rustc whose sysroot ships `core` for `bpfel-unknown-none`
//!   (Debian's `rustc-web` with `libstd-rust-web-dev-bpf`), used with `RUSTC_BOOTSTRAP=1`;
//! - **upstream**: rustup's nightly with the `rust-src` component, building `core` with
//!   `-Z build-std=core`.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

/// The BPF target.
pub const TARGET: &str = "bpfel-unknown-none";

/// How the kernel object gets compiled.
#[derive(Debug)]
pub enum Route {
    /// A rustc with a prebuilt `core` for the target.
    Prebuilt {
        /// The compiler.
        rustc: PathBuf,
        /// Its `--version`.
        version: String,
    },
    /// rustup's nightly with rust-src.
    Upstream {
        /// Its `--version`.
        version: String,
    },
}

fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Whether `sysroot` has a prebuilt `core` for the BPF target.
fn has_prebuilt_core(sysroot: &Path) -> bool {
    let dir = sysroot.join("lib/rustlib").join(TARGET).join("lib");
    std::fs::read_dir(dir).is_ok_and(|entries| {
        entries
            .flatten()
            .any(|e| e.file_name().to_string_lossy().starts_with("libcore-"))
    })
}

fn prebuilt() -> Option<Route> {
    let candidates = env::var_os("LB_BPF_RUSTC")
        .map(PathBuf::from)
        .into_iter()
        .chain([PathBuf::from("/usr/bin/rustc")]);
    for rustc in candidates {
        let Some(sysroot) = output(Command::new(&rustc).args(["--print", "sysroot"])) else {
            continue;
        };
        if has_prebuilt_core(Path::new(&sysroot)) {
            let version = output(Command::new(&rustc).arg("--version")).unwrap_or_default();
            return Some(Route::Prebuilt { rustc, version });
        }
    }
    None
}

fn upstream() -> Option<Route> {
    let sysroot =
        output(Command::new("rustup").args(["run", "nightly", "rustc", "--print", "sysroot"]))?;
    let src = Path::new(&sysroot).join("lib/rustlib/src/rust/library/core");
    if !src.is_dir() {
        return None;
    }
    let version = output(Command::new("rustup").args(["run", "nightly", "rustc", "--version"]))?;
    Some(Route::Upstream { version })
}

/// The first route available: the prebuilt core first (it needs no download).
pub fn route() -> Option<Route> {
    prebuilt().or_else(upstream)
}

/// Whether `route` has a clippy of its own compiler.
pub fn has_clippy(route: &Route) -> bool {
    match route {
        Route::Prebuilt { rustc, .. } => {
            rustc.with_file_name("cargo-clippy").is_file()
                && rustc.with_file_name("clippy-driver").is_file()
        }
        Route::Upstream { .. } => {
            output(Command::new("rustup").args(["run", "nightly", "cargo-clippy", "--version"]))
                .is_some()
        }
    }
}

/// The directory cargo installs binaries into.
pub fn cargo_bin_dir() -> PathBuf {
    env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .unwrap_or_else(|| PathBuf::from("/root/.cargo"))
        .join("bin")
}

/// bpf-linker: its path and version, on PATH or in cargo's bin directory.
pub fn bpf_linker() -> Option<(PathBuf, String)> {
    let in_cargo = cargo_bin_dir().join("bpf-linker");
    [PathBuf::from("bpf-linker"), in_cargo]
        .into_iter()
        .find_map(|p| {
            let version = output(Command::new(&p).arg("--version"))?;
            Some((p, version))
        })
}

/// What to install when no route or no bpf-linker is found.
pub const INSTALL_HELP: &str = "\
The kernel programs need a Rust compiler for bpfel-unknown-none and bpf-linker. Either:
  * Debian 12: `cargo xtask setup` as root installs them, i.e.
      apt-get install rustc-web libstd-rust-web-dev-bpf llvm-22-dev libpolly-22-dev libzstd-dev zlib1g-dev
      LLVM_PREFIX=/usr/lib/llvm-22 cargo install bpf-linker --version 0.13.0 --locked \\
          --no-default-features --features llvm-22
  * rustup (with network access):
      rustup toolchain install nightly --component rust-src
      cargo install bpf-linker
Set LB_BPF_RUSTC to use another rustc that has a prebuilt core for bpfel-unknown-none.";
