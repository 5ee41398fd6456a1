//! Sandboxes for testing the datapath with real sockets on the real kernel.
//!
//! A [`world::World`] is a small network of its own: a router namespace, a client namespace
//! whose processes run in a dedicated cgroup v2 (where the agent attaches the socket hooks),
//! and backend namespaces running `lb-probe` servers. None of the namespaces has a route out,
//! so traffic that escapes translation fails inside the sandbox (ENETUNREACH) instead of
//! leaving the machine. Every piece removes itself on drop, also when a test panics, and a
//! new world first sweeps what killed runs left behind.
//!
//! Everything here needs root; [`require_privileges`] says so clearly.

pub mod apiserver;
pub mod bench;
pub mod cluster;
pub mod fixture;
pub mod kubeproxy;
pub mod manifest;
pub mod netns;
pub mod packet;
pub mod probe;
pub mod process;
pub mod world;
pub mod xdpgen;

use std::{
    fs, io,
    path::{Path, PathBuf},
    process::Command,
};

/// Prefix of every namespace, cgroup, pin directory and temp directory the sandboxes make,
/// followed by the creating process's pid (so stale ones can be recognised and swept).
pub const PREFIX: &str = "lbt";

/// One HTTP/1.0 GET of `path` from `addr` (from the calling thread's network namespace): the
/// status code and the body.
pub use lb_userspace::agent::health::get as http_get;

/// The value of the Prometheus sample `series` (name and labels exactly as exposed, e.g.
/// `lb_syncs_total` or `lb_map_entries{map="lb_svc_v2"}`) in `text`.
pub fn metric(text: &str, series: &str) -> Option<f64> {
    text.lines().filter(|l| !l.starts_with('#')).find_map(|l| {
        l.strip_prefix(series)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// Fails test `test` at once, saying why, unless it runs as root: it creates network
/// namespaces and a cgroup and loads BPF programs. The tests that call it are
/// `#[ignore]`d, so a plain `cargo test` reports them as ignored (skipped) and
/// `cargo xtask test` runs them (`--include-ignored`).
pub fn require_privileges(test: &str) {
    // SAFETY: geteuid has no preconditions.
    assert!(
        unsafe { libc::geteuid() } == 0,
        "{test} needs root: it creates network namespaces and a cgroup and loads BPF programs. \
         Run the tests as root: sudo cargo xtask test."
    );
}

/// Runs a command; its stdout, or an error with its stderr.
pub fn run(program: &str, args: &[&str]) -> io::Result<String> {
    let out = Command::new(program).args(args).output()?;
    if !out.status.success() {
        return Err(io::Error::other(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The directory holding the workspace's built binaries (`lb-agent`, `lbctl`, `lb-probe`):
/// the directory of the running executable or its parent (tests run from `deps/`).
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the running executable has a path");
    exe.ancestors()
        .skip(1)
        .take(2)
        .find(|d| d.join("lb-agent").is_file() && d.join("lb-probe").is_file())
        .map_or_else(
            || {
                panic!(
                    "lb-agent and lb-probe are not built next to {}: run \
                 `cargo build -p lb-userspace -p lb-tests` (cargo xtask test does)",
                    exe.display()
                )
            },
            Path::to_path_buf,
        )
}

/// The log file a test's agent writes (stdout and stderr) in the test's directory.
pub struct AgentLog(PathBuf);

impl AgentLog {
    /// The log in `dir`.
    pub fn in_dir(dir: &Path) -> Self {
        Self(dir.join("agent.log"))
    }

    /// The file opened for appending, for an agent's stdout and stderr.
    pub fn open(&self) -> fs::File {
        fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.0)
            .expect("agent log")
    }

    /// Everything logged so far.
    pub fn read(&self) -> String {
        fs::read_to_string(&self.0).unwrap_or_default()
    }

    /// Prints what a failed test's reader needs: the errors and warnings, then the last
    /// `last` lines.
    pub fn print_for_failure(&self, tag: &str, last: usize) {
        let log = self.read();
        let lines: Vec<&str> = log.lines().collect();
        let notable = lines
            .iter()
            .filter(|l| l.contains("panicked") || l.contains(" ERROR ") || l.contains(" WARN "));
        eprintln!("--- agent log of {tag}: errors and warnings ---");
        for line in notable.take(30) {
            eprintln!("{line}");
        }
        eprintln!("--- agent log of {tag}: last lines ---");
        for line in &lines[lines.len().saturating_sub(last)..] {
            eprintln!("{line}");
        }
    }
}

/// Writes manifest `file` into `dir` atomically (a hidden temp file renamed into place), so
/// the agent's file source never reads half a file.
pub fn write_manifest(dir: &Path, file: &str, yaml: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, yaml).expect("writing a manifest");
    std::fs::rename(&tmp, dir.join(file)).expect("renaming a manifest");
}

/// Runs `lbctl --pin-dir PINS ARGS`: its stdout, or its stderr as the error.
pub fn lbctl(bins: &Path, pins: &Path, args: &[&str]) -> Result<String, String> {
    let out = Command::new(bins.join("lbctl"))
        .arg("--pin-dir")
        .arg(pins)
        .args(args)
        .output()
        .map_err(|e| format!("running lbctl: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Runs `lbctl -o json ARGS`, parsed; `None` while lbctl fails (e.g. nothing pinned yet).
pub fn lbctl_json<T: serde::de::DeserializeOwned>(
    bins: &Path,
    pins: &Path,
    args: &[&str],
) -> Option<T> {
    let mut all = vec!["-o", "json"];
    all.extend_from_slice(args);
    lbctl(bins, pins, &all)
        .ok()
        .map(|s| serde_json::from_str(&s).expect("lbctl JSON"))
}

/// Runs an `lb-probe` command to completion; its attempts.
pub fn run_probe(mut cmd: Command, args: &[&str]) -> Vec<probe::Attempt> {
    let out = cmd.args(args).output().expect("running lb-probe");
    assert!(
        out.status.success(),
        "lb-probe {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    probe::Attempt::parse_all(&String::from_utf8_lossy(&out.stdout))
}

/// Polls `done` every 20 ms until it holds; panics after `timeout` with `what`. Returns how
/// long it took.
pub fn wait_until(
    what: &str,
    timeout: std::time::Duration,
    mut done: impl FnMut() -> bool,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    while !done() {
        assert!(
            start.elapsed() < timeout,
            "timed out after {timeout:?} waiting until {what}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    start.elapsed()
}

/// Whether a process with this pid exists.
pub fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

/// The pid in a sandbox name made by [`PREFIX`] + pid + `x` + ..., if it is one.
pub fn owner_pid(name: &str) -> Option<u32> {
    let rest = name.strip_prefix(PREFIX)?;
    rest.split('x').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_pids() {
        assert_eq!(owner_pid("lbt1234x5-c"), Some(1234));
        assert_eq!(owner_pid("lbt1234x5"), Some(1234));
        assert_eq!(owner_pid("other"), None);
        assert_eq!(owner_pid("lbtx"), None);
    }
}
