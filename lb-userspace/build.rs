//! Finds the kernel object that the agent embeds. It is built by `cargo xtask build-ebpf`,
//! with a different compiler than this crate, so this script only locates it.

use std::{env, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=LB_EBPF_OBJECT");
    let path = if let Some(p) = env::var_os("LB_EBPF_OBJECT") {
        PathBuf::from(p)
    } else {
        let manifest = PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("set by cargo"));
        manifest.join("../target/lb-ebpf.o")
    };
    println!("cargo:rerun-if-changed={}", path.display());
    if !path.is_file() {
        panic!(
            "\n\nThe kernel object {} is missing.\n\
             Build it first with:\n\n    cargo xtask build-ebpf --release\n\n\
             (or point LB_EBPF_OBJECT at a built lb-ebpf object).\n",
            path.display()
        );
    }
    let path = path.canonicalize().expect("the object exists");
    println!("cargo:rustc-env=LB_EBPF_OBJECT={}", path.display());
}
