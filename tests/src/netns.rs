//! Network namespaces and veth pairs, removed on drop.

use std::{io, path::PathBuf};

use crate::run;

/// A named network namespace (`ip netns add`), deleted on drop with its interfaces.
#[derive(Debug)]
pub struct Netns {
    name: String,
}

impl Netns {
    /// Creates the namespace with loopback up and IPv6 duplicate address detection off (for
    /// link-local addresses too), so interfaces are usable as soon as they are up.
    pub fn create(name: &str) -> io::Result<Self> {
        run("ip", &["netns", "add", name])?;
        let ns = Self {
            name: name.to_owned(),
        };
        for conf in ["all", "default"] {
            ns.sysctl(&format!("net/ipv6/conf/{conf}/accept_dad"), "0")?;
        }
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// Its name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The file to `setns()` into.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// Runs `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> io::Result<String> {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        run("ip", &all)
    }

    /// Writes a sysctl of this namespace, e.g. `net/ipv4/ip_forward`.
    pub fn sysctl(&self, key: &str, value: &str) -> io::Result<()> {
        let script = format!("echo {value} > /proc/sys/{key}");
        run("ip", &["netns", "exec", &self.name, "sh", "-c", &script]).map(drop)
    }

    /// Adds an address to an interface.
    pub fn addr(&self, dev: &str, cidr: &str) -> io::Result<()> {
        self.ip(&["addr", "add", cidr, "dev", dev]).map(drop)
    }

    /// Adds a route `dest via gateway`.
    pub fn route(&self, dest: &str, gateway: &str) -> io::Result<()> {
        let family = if dest.contains(':') { "-6" } else { "-4" };
        self.ip(&[family, "route", "add", dest, "via", gateway])
            .map(drop)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Err(e) = run("ip", &["netns", "del", &self.name]) {
            eprintln!("cleanup: {e}");
        }
    }
}

/// Connects `a` and `b` with a veth pair named `a_dev` in `a` and `b_dev` in `b`, both up.
pub fn veth(a: &Netns, a_dev: &str, b: &Netns, b_dev: &str) -> io::Result<()> {
    a.ip(&[
        "link",
        "add",
        a_dev,
        "type",
        "veth",
        "peer",
        "name",
        b_dev,
        "netns",
        b.name(),
    ])?;
    a.ip(&["link", "set", a_dev, "up"])?;
    b.ip(&["link", "set", b_dev, "up"]).map(drop)
}

/// Deletes the namespaces of sandboxes whose creating process is gone.
pub fn sweep_stale() {
    let Ok(list) = run("ip", &["netns", "list"]) else {
        return;
    };
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        if crate::owner_pid(name).is_some_and(|pid| !crate::alive(pid)) {
            for pid in run("ip", &["netns", "pids", name])
                .unwrap_or_default()
                .lines()
            {
                if let Ok(pid) = pid.trim().parse::<i32>() {
                    // SAFETY: plain signal to a process left in a stale sandbox.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
            let _ = run("ip", &["netns", "del", name]);
        }
    }
}
