//! The capabilities the agent keeps, and dropping the rest.
//!
//! The DaemonSet grants the agent [`DAEMONSET`] only; run otherwise (as root, by hand or a
//! unit) it may start with every capability. Before anything else it limits itself to the
//! start-up set ([`startup`]), and
//! once the programs are loaded (before any other thread starts) to [`RUNTIME`]: from the
//! permitted, effective and inheritable sets, the ambient set, and the bounding set (so no
//! exec can regain them). Why each is kept:
//!
//! | capability | for |
//! |---|---|
//! | `CAP_BPF` | map and link operations on the pinned objects |
//! | `CAP_NET_ADMIN` | attaching the programs (after the first sync) and XDP and tc to devices that appear later, destroying stale UDP sockets (`SOCK_DESTROY`), `accept_local` |
//! | `CAP_SYS_ADMIN` | entering pods' network namespaces (`setns`) to find stale UDP sockets; mounting bpffs at start (when the host has not) |
//! | `CAP_SYS_PTRACE` | opening other processes' `/proc/PID/ns/net` (not needed where the runtime pins pods' namespaces in `--netns-dirs`) |
//! | `CAP_NET_BIND_SERVICE` | a health or metrics port or health check node port below 1024 |
//! | `CAP_PERFMON` (start only) | loading programs that read kernel memory and use pointer arithmetic |
//! | `CAP_SYS_RESOURCE` (start only) | raising `RLIMIT_MEMLOCK` on kernels that charge maps to it |
//! | `CAP_SETPCAP` (start only) | dropping the others from the bounding set after start-up |
//!
//! Capabilities are per thread: the drop after start-up applies to the agent's thread (the
//! runtime is single-threaded) and to threads started after it; the runtime's blocking-pool
//! threads limit themselves to [`RUNTIME`] as they start, whenever that is.

use caps::{CapSet, Capability, CapsHashSet};

/// Kept while the agent runs.
pub const RUNTIME: [Capability; 5] = [
    Capability::CAP_BPF,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SYS_PTRACE,
    Capability::CAP_NET_BIND_SERVICE,
];

/// What the DaemonSet grants (deploy/daemonset.yaml, checked by a test; a namespace test
/// runs the agent with these only): loading and attaching the programs, and entering pods'
/// network namespaces to destroy stale UDP sockets. Neither `CAP_SYS_PTRACE` (the
/// namespaces are found where the runtime pins them) nor `CAP_SYS_RESOURCE` (kernels from
/// 5.11 charge maps to the memory cgroup, not `RLIMIT_MEMLOCK`).
pub const DAEMONSET: [Capability; 4] = [
    Capability::CAP_BPF,
    Capability::CAP_PERFMON,
    Capability::CAP_NET_ADMIN,
    Capability::CAP_SYS_ADMIN,
];

/// Kept until the programs are loaded: [`RUNTIME`] and these.
pub const STARTUP_ONLY: [Capability; 3] = [
    Capability::CAP_PERFMON,
    Capability::CAP_SYS_RESOURCE,
    Capability::CAP_SETPCAP,
];

/// The start-up set: [`RUNTIME`] and [`STARTUP_ONLY`].
pub fn startup() -> Vec<Capability> {
    RUNTIME.iter().chain(&STARTUP_ONLY).copied().collect()
}

/// What [`limit`] did.
#[derive(Debug, PartialEq, Eq)]
pub struct Limited {
    /// Capabilities the thread had and has dropped (by name).
    pub dropped: Vec<String>,
    /// Capabilities it keeps (by name).
    pub kept: Vec<String>,
}

fn names(set: &CapsHashSet) -> Vec<String> {
    let mut v: Vec<String> = set.iter().map(std::string::ToString::to_string).collect();
    v.sort();
    v
}

/// Limits the calling thread (and threads it starts later) to `keep`: clears the others from
/// the bounding set (while `CAP_SETPCAP` still allows it), the ambient and inheritable sets,
/// and the permitted and effective sets.
pub fn limit(keep: &[Capability]) -> Result<Limited, caps::errors::CapsError> {
    let keep: CapsHashSet = keep.iter().copied().collect();
    let permitted = caps::read(None, CapSet::Permitted)?;
    if permitted.contains(&Capability::CAP_SETPCAP) {
        for cap in caps::read(None, CapSet::Bounding)?.difference(&keep) {
            caps::drop(None, CapSet::Bounding, *cap)?;
        }
    }
    caps::clear(None, CapSet::Ambient)?;
    caps::clear(None, CapSet::Inheritable)?;
    let kept: CapsHashSet = permitted.intersection(&keep).copied().collect();
    // Effective must stay within permitted: shrink it first.
    caps::set(None, CapSet::Effective, &kept)?;
    caps::set(None, CapSet::Permitted, &kept)?;
    let dropped: CapsHashSet = permitted.difference(&kept).copied().collect();
    Ok(Limited {
        dropped: names(&dropped),
        kept: names(&kept),
    })
}

/// The bitmask of `caps`, as `/proc/PID/status` shows it (`CapEff`).
pub fn mask(caps: &[Capability]) -> u64 {
    caps.iter().fold(0, |m, c| m | c.bitmask())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_runtime_set_is_within_the_startup_set() {
        let startup = startup();
        assert!(RUNTIME.iter().all(|c| startup.contains(c)));
        assert_eq!(startup.len(), RUNTIME.len() + STARTUP_ONLY.len());
        assert_eq!(
            mask(&[Capability::CAP_NET_ADMIN, Capability::CAP_SYS_ADMIN]),
            (1 << 12) | (1 << 21)
        );
    }

    #[test]
    fn limiting_a_thread_drops_what_is_not_kept() {
        // On a thread of its own: capabilities are per thread, and the test harness's other
        // threads keep theirs.
        std::thread::spawn(|| {
            let before = caps::read(None, CapSet::Permitted).unwrap();
            let limited = limit(&RUNTIME).unwrap();
            let after = caps::read(None, CapSet::Effective).unwrap();
            assert!(after.iter().all(|c| RUNTIME.contains(c)), "{after:?}");
            assert!(caps::read(None, CapSet::Inheritable).unwrap().is_empty());
            assert_eq!(limited.kept.len() + limited.dropped.len(), before.len());
            if before.contains(&Capability::CAP_SETPCAP) {
                let bounding = caps::read(None, CapSet::Bounding).unwrap();
                assert!(bounding.iter().all(|c| RUNTIME.contains(c)), "{bounding:?}");
            }
        })
        .join()
        .unwrap();
    }
}
