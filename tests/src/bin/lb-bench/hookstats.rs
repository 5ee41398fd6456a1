//! Benchmark 1 for the socket hooks: the kernel's own run-time statistics (`bpf_stats`,
//! enabled with `BPF_ENABLE_STATS` while the measurement runs) of the cgroup connect4
//! program, under a loop of connects to a ClusterIP: ns per run at each scale.

use std::{
    io,
    os::fd::{FromRawFd as _, OwnedFd},
    path::Path,
};

use lb_tests::run;
use serde_json::Value;

const BPF_ENABLE_STATS: libc::c_long = 32;
const BPF_STATS_RUN_TIME: u32 = 0;

/// Run-time statistics are collected while the returned descriptor is open.
pub fn enable() -> io::Result<OwnedFd> {
    let mut attr = [0u64; 16];
    attr[0] = u64::from(BPF_STATS_RUN_TIME);
    // SAFETY: a zeroed bpf_attr whose first field is the stats type, and its size.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_ENABLE_STATS,
            attr.as_mut_ptr(),
            size_of_val(&attr),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// The id of the program attached to `cgroup` for `attach_type` (e.g. `cgroup_inet4_connect`).
pub fn program(cgroup: &Path, attach_type: &str) -> Option<u64> {
    let shown = run(
        "bpftool",
        &["cgroup", "show", &cgroup.to_string_lossy(), "-j"],
    )
    .ok()?;
    let v: Value = serde_json::from_str(&shown).ok()?;
    v.as_array()?
        .iter()
        .find(|p| p["attach_type"] == attach_type)?["id"]
        .as_u64()
}

/// A program's (run time in ns, runs) so far.
pub fn counters(id: u64) -> (f64, f64) {
    let shown = run("bpftool", &["prog", "show", "id", &id.to_string(), "-j"])
        .unwrap_or_else(|e| panic!("bpftool prog show id {id}: {e}"));
    let v: Value = serde_json::from_str(&shown).expect("bpftool JSON");
    (
        v["run_time_ns"].as_f64().unwrap_or(0.0),
        v["run_cnt"].as_f64().unwrap_or(0.0),
    )
}
