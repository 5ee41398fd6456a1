//! A sandboxed two-node cluster for north-south traffic: an external client, node A running
//! the agent with XDP on its external and peer devices, a pod on node A, and node B with two
//! pods.
//!
//! ```text
//!  client ns                node-a ns (agent, XDP on n-ext and n-peer)       node-b ns
//!  eth0 203.0.113.2/24 ---- n-ext 203.0.113.1/24                              eth0 10.0.0.2/24
//!                           n-peer 10.0.0.1/24 ------------------------------ (forwarding)
//!                           n-pod 10.244.1.1/24 -- pod-a eth0 10.244.1.10   p1 -- pod-b1 10.244.2.10
//!                                                                            p2 -- pod-b2 10.244.3.10
//! ```
//!
//! The client routes only the load-balancer range 198.51.100.0/24 (to node A); node B has
//! no route to the client at all, so a reply that skipped the SNAT back through node A is
//! lost inside the sandbox. No namespace has a route out of it.
//!
//! [`Cluster::with_overlay`] routes the pod networks between the nodes over a VXLAN overlay
//! instead (`vx0` on each node, 10.250.0.0/24 and fd00:250::/64, carried between n-peer and
//! node B's eth0), as flannel's or Cilium's tunnel mode do: node A reaches node B's pods
//! through a device that runs no XDP.

use std::{fs, net::SocketAddr, path::PathBuf, process::Command, thread, time::Duration};

use crate::{
    bin_dir,
    netns::{Netns, veth},
    probe::Attempt,
    process::{Cgroup, Proc, command_in},
    world::{Held, new_tag, pin_dir_of},
};

/// The client's address.
pub const CLIENT: &str = "203.0.113.2";
/// Node A's external address (serves node ports).
pub const NODE_A: &str = "203.0.113.1";
/// Node A's address towards node B (the SNAT source for backends there).
pub const NODE_A_PEER: &str = "10.0.0.1";
/// The pod on node A.
pub const POD_A: &str = "10.244.1.10";
/// The pods on node B.
pub const POD_B: [&str; 2] = ["10.244.2.10", "10.244.3.10"];
/// The client's IPv6 address.
pub const CLIENT6: &str = "2001:db8:c::2";
/// Node A's external IPv6 address (serves node ports).
pub const NODE_A6: &str = "2001:db8:c::1";
/// Node A's IPv6 address towards node B (the SNAT source for backends there).
pub const NODE_A_PEER6: &str = "fd00:10::1";
/// The pod on node A, IPv6.
pub const POD_A6: &str = "fd00:244:1::10";
/// The pods on node B, IPv6.
pub const POD_B6: [&str; 2] = ["fd00:244:2::10", "fd00:244:3::10"];
/// Where the client routes load-balancer IPv6 addresses (via node A).
pub const LB_NET6: &str = "2001:db8:51::/64";
/// Node A's address on the VXLAN overlay of [`Cluster::with_overlay`] (the SNAT source for
/// backends on node B there).
pub const NODE_A_OVERLAY: &str = "10.250.0.1";
/// Node A's IPv6 address on the VXLAN overlay.
pub const NODE_A_OVERLAY6: &str = "fd00:250::1";
/// The agent's health and metrics endpoint, on node A's own loopback.
pub const NODE_METRICS_ADDR: &str = "127.0.0.1:10249";

/// The sandbox. Drops processes, then pins, then namespaces.
pub struct Cluster {
    tag: String,
    /// `xdp_pass` on the peers of node A's XDP devices (native mode on veth delivers frames
    /// redirected or sent back to a veth only when its peer runs XDP, as a NIC's driver
    /// always would).
    peers: Vec<aya::Ebpf>,
    bins: PathBuf,
    dir: PathBuf,
    pin_dir: PathBuf,
    servers: Vec<Proc>,
    agent: Option<Proc>,
    cgroup: Cgroup,
    client: Netns,
    node_a: Netns,
    pod_a: Netns,
    node_b: Netns,
    pods_b: Vec<Netns>,
}

impl Cluster {
    /// Builds the namespaces and starts `lb-probe serve` in every pod (named `pod-a`,
    /// `pod-b1`, `pod-b2`) on TCP and UDP `port`. Panics, after cleaning up, on failure.
    pub fn new(port: u16) -> Self {
        Self::build(port, false)
    }

    /// As [`Cluster::new`], the nodes' pod networks routed over a VXLAN overlay.
    pub fn with_overlay(port: u16) -> Self {
        Self::build(port, true)
    }

    fn build(port: u16, overlay: bool) -> Self {
        let tag = new_tag();
        let dir = std::env::temp_dir().join(&tag);
        fs::create_dir_all(dir.join("manifests")).expect("temp dir");
        let ns = |role: &str| Netns::create(&format!("{tag}-{role}")).expect("ip netns add");
        let mut c = Self {
            peers: Vec::new(),
            bins: bin_dir(),
            pin_dir: pin_dir_of(&tag),
            cgroup: Cgroup::create(&tag).expect("cgroup"),
            servers: Vec::new(),
            agent: None,
            dir,
            client: ns("cl"),
            node_a: ns("na"),
            pod_a: ns("pa"),
            node_b: ns("nb"),
            pods_b: vec![ns("pb1"), ns("pb2")],
            tag,
        };
        c.wire(overlay).expect("wiring the cluster");
        for (name, pod) in [("pod-a", 0), ("pod-b1", 1), ("pod-b2", 2)] {
            let ns = match pod {
                0 => &c.pod_a,
                i => &c.pods_b[i - 1],
            };
            let mut cmd = command_in(&c.bins.join("lb-probe"), ns, None).expect("pod namespace");
            cmd.args(["serve", "--name", name, "--port", &port.to_string()]);
            let server = Proc::spawn(cmd).expect("spawning lb-probe serve");
            c.servers.push(server);
        }
        c
    }

    fn wire(&self, overlay: bool) -> std::io::Result<()> {
        let (cl, a, b) = (&self.client, &self.node_a, &self.node_b);
        for node in [a, b] {
            node.sysctl("net/ipv4/ip_forward", "1")?;
            node.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        }
        veth(cl, "eth0", a, "n-ext")?;
        cl.addr("eth0", &format!("{CLIENT}/24"))?;
        a.addr("n-ext", &format!("{NODE_A}/24"))?;
        cl.route("198.51.100.0/24", NODE_A)?;
        cl.addr("eth0", &format!("{CLIENT6}/64"))?;
        a.addr("n-ext", &format!("{NODE_A6}/64"))?;
        cl.route(LB_NET6, NODE_A6)?;

        veth(a, "n-peer", b, "eth0")?;
        a.addr("n-peer", &format!("{NODE_A_PEER}/24"))?;
        b.addr("eth0", "10.0.0.2/24")?;
        a.addr("n-peer", &format!("{NODE_A_PEER6}/64"))?;
        b.addr("eth0", "fd00:10::2/64")?;

        // Each pod's network is its address with the last part 1 (the gateway, on the
        // node) in a /24 (IPv4) or /64 (IPv6).
        let gateway = |ip: &str| -> (String, String) {
            if ip.contains(':') {
                let net = ip.rsplit_once("::").map(|(n, _)| n).expect("IPv6");
                (format!("{net}::1"), format!("{net}::/64"))
            } else {
                let net = ip.rsplit_once('.').map(|(n, _)| n).expect("IPv4");
                (format!("{net}.1"), format!("{net}.0/24"))
            }
        };
        let pod = |node: &Netns, dev: &str, pod: &Netns, ips: [&str; 2]| -> std::io::Result<()> {
            veth(node, dev, pod, "eth0")?;
            for ip in ips {
                let (gw, net) = gateway(ip);
                let prefix = net.rsplit_once('/').map(|(_, p)| p).expect("a prefix");
                node.addr(dev, &format!("{gw}/{prefix}"))?;
                pod.addr("eth0", &format!("{ip}/{prefix}"))?;
                let family = if ip.contains(':') { "-6" } else { "-4" };
                pod.ip(&[family, "route", "add", "default", "via", &gw])?;
            }
            Ok(())
        };
        pod(a, "n-pod", &self.pod_a, [POD_A, POD_A6])?;
        pod(b, "p1", &self.pods_b[0], [POD_B[0], POD_B6[0]])?;
        pod(b, "p2", &self.pods_b[1], [POD_B[1], POD_B6[1]])?;
        // How each node reaches the other's pods: the peer link, or the overlay across it.
        let (via_b, via_b6, via_a, via_a6) = if overlay {
            for (node, dev, local, remote, v4, v6) in [
                (
                    a,
                    "n-peer",
                    NODE_A_PEER,
                    "10.0.0.2",
                    NODE_A_OVERLAY,
                    NODE_A_OVERLAY6,
                ),
                (
                    b,
                    "eth0",
                    "10.0.0.2",
                    NODE_A_PEER,
                    "10.250.0.2",
                    "fd00:250::2",
                ),
            ] {
                node.ip(&[
                    "link", "add", "vx0", "type", "vxlan", "id", "42", "local", local, "remote",
                    remote, "dstport", "4789", "dev", dev,
                ])?;
                node.addr("vx0", &format!("{v4}/24"))?;
                node.addr("vx0", &format!("{v6}/64"))?;
                node.ip(&["link", "set", "vx0", "up"])?;
            }
            ("10.250.0.2", "fd00:250::2", NODE_A_OVERLAY, NODE_A_OVERLAY6)
        } else {
            ("10.0.0.2", "fd00:10::2", NODE_A_PEER, NODE_A_PEER6)
        };
        for p in POD_B {
            a.route(&gateway(p).1, via_b)?;
        }
        for p in POD_B6 {
            a.route(&gateway(p).1, via_b6)?;
        }
        b.route(&gateway(POD_A6).1, via_a6)?;
        b.route("10.244.1.0/24", via_a)
    }

    /// Attaches `xdp_pass` (native mode) to the client's and node B's ends of node A's XDP
    /// devices, so that node A's XDP program can run natively on its veths, and turns off
    /// their transmit checksum offload: a NIC hands XDP frames with whole checksums, while a
    /// veth passes its peer's partial ones, which a frame sent on by XDP_TX or a redirect
    /// keeps.
    pub fn native_peers(&mut self) {
        for ns in [&self.client, &self.node_b] {
            crate::run(
                "ip",
                &[
                    "netns",
                    "exec",
                    ns.name(),
                    "ethtool",
                    "-K",
                    "eth0",
                    "tx",
                    "off",
                ],
            )
            .expect("ethtool -K eth0 tx off");
        }
        let pins = self.pin_dir.with_file_name(format!("{}-peers", self.tag));
        fs::create_dir_all(&pins).expect("pin dir for the peers");
        for ns in [&self.client, &self.node_b] {
            let path = ns.path();
            let pins = pins.clone();
            let ebpf = thread::spawn(move || {
                let file = fs::File::open(&path).expect("netns file");
                // SAFETY: setns on this thread only, with a valid namespace fd.
                let rc = unsafe {
                    libc::setns(std::os::fd::AsRawFd::as_raw_fd(&file), libc::CLONE_NEWNET)
                };
                assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
                let mut loader = aya::EbpfLoader::new();
                loader.default_map_pin_directory(&pins);
                // Only xdp_pass runs, which uses no map: keep the maps minimal.
                for spec in &lb_common::maps::ALL {
                    loader.map_max_entries(spec.name, 1);
                }
                let mut ebpf = loader
                    .load(lb_userspace::EBPF_OBJECT)
                    .expect("the object loads");
                let prog: &mut aya::programs::Xdp = ebpf
                    .program_mut(lb_userspace::loader::XDP_PASS_PROGRAM)
                    .expect("xdp_pass")
                    .try_into()
                    .expect("an XDP program");
                prog.load().expect("xdp_pass loads");
                prog.attach("eth0", aya::programs::XdpMode::Driver)
                    .expect("native XDP on a veth");
                ebpf
            })
            .join()
            .expect("attaching xdp_pass");
            self.peers.push(ebpf);
        }
    }

    /// The external client's namespace.
    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// Node A's namespace (where the agent runs).
    pub fn node_a_ns(&self) -> &Netns {
        &self.node_a
    }

    /// Node B's namespace.
    pub fn node_b_ns(&self) -> &Netns {
        &self.node_b
    }

    /// This sandbox's tag.
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// Writes the manifest file `file` atomically.
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        crate::write_manifest(&self.dir.join("manifests"), file, yaml);
    }

    /// Starts the agent in node A as `node-a`, with XDP on `n-ext` and `n-peer`, its health and
    /// metrics endpoint on node A's loopback at [`NODE_METRICS_ADDR`].
    pub fn start_agent(&mut self, extra: &[&str]) {
        assert!(self.agent.is_none(), "the agent already runs");
        let log = crate::AgentLog::in_dir(&self.dir).open();
        let mut cmd =
            command_in(&self.bins.join("lb-agent"), &self.node_a, None).expect("node namespace");
        cmd.arg("--source")
            .arg(format!("file:{}", self.dir.join("manifests").display()))
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["--node-name", "node-a", "--xdp-devices", "n-ext,n-peer"])
            .args(["--metrics-bind-address", NODE_METRICS_ADDR])
            .args(extra)
            .env("NO_COLOR", "1")
            .env("RUST_LOG", "info,lb_userspace=debug")
            .stdout(log.try_clone().expect("log"))
            .stderr(log);
        self.agent = Some(Proc::spawn(cmd).expect("spawning lb-agent"));
    }

    /// Kills the agent (SIGKILL), leaving its pins: the datapath keeps running.
    pub fn kill_agent(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
    }

    /// Runs `lb-agent --cleanup` on the pins, in node A; whether it succeeded.
    pub fn cleanup(&self) -> bool {
        command_in(&self.bins.join("lb-agent"), &self.node_a, None)
            .expect("node namespace")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .arg("--cleanup")
            .status()
            .expect("running lb-agent --cleanup")
            .success()
    }

    /// A GET of `path` (`/metrics`, `/healthz`...) on the agent's health endpoint, from inside
    /// node A: the status code and body.
    pub fn agent_http(&self, path: &str) -> Result<(u16, String), String> {
        let mut cmd =
            command_in(&self.bins.join("lb-probe"), &self.node_a, None).expect("node namespace");
        cmd.args(["http-get", NODE_METRICS_ADDR, "--path", path]);
        probe_http_get(cmd)
    }

    /// A GET of `path` on `addr` (`address:port`) from the client, outside the cluster: the
    /// status code and body, or why there is none.
    pub fn client_http(&self, addr: &str, path: &str) -> Result<(u16, String), String> {
        let mut cmd =
            command_in(&self.bins.join("lb-probe"), &self.client, None).expect("client namespace");
        cmd.args(["http-get", addr, "--path", path]);
        probe_http_get(cmd)
    }

    /// Runs `lbctl -o json ARGS` in node A (where the XDP devices are, for `explain`'s run
    /// of the program); its parsed output, or its stderr.
    pub fn lbctl_in_node<T: serde::de::DeserializeOwned>(
        &self,
        args: &[&str],
    ) -> Result<T, String> {
        let mut all = vec!["-o", "json"];
        all.extend_from_slice(args);
        serde_json::from_str(&self.lbctl_text_in_node(&all)?).map_err(|e| e.to_string())
    }

    /// Runs `lbctl ARGS` in node A: its stdout, or its stderr.
    pub fn lbctl_text_in_node(&self, args: &[&str]) -> Result<String, String> {
        let out = command_in(&self.bins.join("lbctl"), &self.node_a, None)
            .expect("node namespace")
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args)
            .output()
            .expect("running lbctl");
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).into_owned());
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Waits until the agent's `/readyz` answers 200: its first sync is written and its
    /// programs attached.
    pub fn wait_ready(&self) {
        self.wait_until("the agent is ready", Duration::from_secs(30), || {
            self.agent_http("/readyz")
                .is_ok_and(|(status, _)| status == 200)
        });
    }

    /// `ip link show DEV` in node A.
    pub fn node_link(&self, dev: &str) -> String {
        self.node_a
            .ip(&["link", "show", dev])
            .expect("ip link show")
    }

    /// Ids of the BPF links attached in node A's namespace (`bpftool net`), for checking
    /// that restarts replace programs in place.
    pub fn node_links(&self) -> String {
        crate::run(
            "ip",
            &[
                "netns",
                "exec",
                self.node_a.name(),
                "bpftool",
                "net",
                "show",
            ],
        )
        .expect("bpftool net show")
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        crate::AgentLog::in_dir(&self.dir).read()
    }

    /// Runs `lbctl ARGS` (table output) on the pins: its stdout, or its stderr.
    pub fn lbctl(&self, args: &[&str]) -> Result<String, String> {
        crate::lbctl(&self.bins, &self.pin_dir, args)
    }

    /// Runs `lbctl -o json ARGS` on the pins; `None` until it succeeds.
    pub fn lbctl_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Option<T> {
        crate::lbctl_json(&self.bins, &self.pin_dir, args)
    }

    /// Polls `done` until it holds; panics after `timeout` with `what`.
    pub fn wait_until(&self, what: &str, timeout: Duration, done: impl FnMut() -> bool) {
        crate::wait_until(what, timeout, done);
    }

    fn client_probe(&self) -> Command {
        command_in(&self.bins.join("lb-probe"), &self.client, None).expect("client namespace")
    }

    /// Runs `lb-probe ARGS` in the client namespace; its attempts.
    pub fn probe(&self, args: &[&str]) -> Vec<Attempt> {
        crate::run_probe(self.client_probe(), args)
    }

    /// `count` short TCP connections to `addr` from the client, one request each.
    pub fn tcp(&self, addr: SocketAddr, count: u32) -> Vec<Attempt> {
        let count = count.to_string();
        self.probe(&[
            "tcp",
            &addr.to_string(),
            "--count",
            &count,
            "--timeout-ms",
            "1000",
        ])
    }

    /// `count` TCP connections to `addr` from the client, each with one request line of
    /// `size` bytes (the answer echoes it).
    pub fn tcp_sized(&self, addr: SocketAddr, count: u32, size: usize) -> Vec<Attempt> {
        self.probe(&[
            "tcp",
            &addr.to_string(),
            "--count",
            &count.to_string(),
            "--timeout-ms",
            "3000",
            "--size",
            &size.to_string(),
        ])
    }

    /// `count` UDP requests to `addr` from the client, each from a socket of its own (so
    /// each is a new flow).
    pub fn udp(&self, addr: SocketAddr, count: u32) -> Vec<Attempt> {
        (0..count)
            .flat_map(|_| self.probe(&["udp", &addr.to_string(), "--timeout-ms", "1000"]))
            .collect()
    }

    /// A TCP connection from the client to `addr` that stays open.
    pub fn hold(&self, addr: SocketAddr) -> Held {
        let mut cmd = self.client_probe();
        cmd.args(["hold", &addr.to_string()]);
        Held::start(cmd)
    }

    /// Starts `lb-probe syn-flood` in the client namespace: spoofed SYNs to `dst`, `rate`
    /// per second, for `seconds` at most. Its output (JSON `{"sent", "seconds"}`) is piped.
    pub fn syn_flood(&self, dst: SocketAddr, seconds: u64, rate: u64) -> Proc {
        let mut cmd = self.client_probe();
        cmd.args([
            "syn-flood",
            &dst.to_string(),
            "--seconds",
            &seconds.to_string(),
            "--count",
            &(seconds * rate).to_string(),
            "--rate",
            &rate.to_string(),
        ]);
        cmd.stdout(std::process::Stdio::piped());
        Proc::spawn(cmd).expect("spawning lb-probe syn-flood")
    }

    /// An HTTP GET from the client to `addr` (a health check node port): the status code
    /// and body.
    pub fn http_get(&self, addr: SocketAddr) -> Result<(u16, String), String> {
        let mut cmd = self.client_probe();
        cmd.args(["http-get", &addr.to_string()]);
        probe_http_get(cmd)
    }
}

/// Runs an `lb-probe http-get` command: the status code and body it printed.
fn probe_http_get(mut cmd: Command) -> Result<(u16, String), String> {
    let out = cmd.output().expect("running lb-probe http-get");
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (status, body) = text.split_once('\n').unwrap_or((&text, ""));
    Ok((
        status.trim().parse().map_err(|_| text.clone())?,
        body.to_owned(),
    ))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
        }
        if thread::panicking() {
            crate::AgentLog::in_dir(&self.dir).print_for_failure(&self.tag, 40);
            for args in [["stats"], ["external"], ["conntrack"]] {
                let out = self.lbctl(&args).unwrap_or_else(|e| e);
                eprintln!("--- lbctl {args:?} ---\n{out}");
            }
        }
        for s in &mut self.servers {
            s.kill();
        }
        self.peers.clear();
        for dir in [
            self.pin_dir.clone(),
            self.pin_dir.with_file_name(format!("{}-peers", self.tag)),
        ] {
            if let Err(e) = fs::remove_dir_all(&dir)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                eprintln!("cleanup: {}: {e}", dir.display());
            }
        }
        let _ = fs::remove_file(lb_userspace::agent::health::explain_socket(
            &self.pin_dir,
            None,
        ));
        let _ = fs::remove_dir_all(&self.dir);
    }
}
