//! A sandboxed network with a client, backends and the agent.
//!
//! ```text
//!   client ns (in the world's cgroup)          backend ns i (lb-probe servers)
//!   eth0 10.244.0.2/24  fd00:244::2/64         eth0 10.244.<i+1>.2/24  fd00:244:<i+1>::2/64
//!        |                                          |
//!        +--- c  router ns (forwarding)  b<i> ------+
//! ```
//!
//! Routes cover 10.244.0.0/16 and fd00:244::/32 only: service VIPs (10.96.0.0/12,
//! fd00:96::/64) are unroutable, so an untranslated connect fails with ENETUNREACH.

use std::{
    fs,
    io::{BufRead as _, BufReader},
    net::{Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    process::{ChildStdout, Command, Stdio},
    sync::{
        Once,
        atomic::{AtomicU32, Ordering},
    },
    thread,
    time::Duration,
};

use lb_userspace::cli::{BackendRow, CapacityRow, ServiceDetail, ServiceRow};

use crate::{
    PREFIX,
    apiserver::ApiServer,
    bin_dir,
    netns::{self, Netns, veth},
    probe::Attempt,
    process::{Cgroup, Proc, command_in, kill_mentioning, sweep_stale_cgroups},
};

/// Where the worlds' pin directories go (on bpffs).
const BPFFS: &str = "/sys/fs/bpf";

/// Removes what sandboxes of dead processes left: processes, namespaces, cgroups, pins and
/// temp dirs.
fn sweep_stale() {
    if let Ok(entries) = fs::read_dir(std::env::temp_dir()) {
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if crate::owner_pid(&name).is_some_and(|pid| !crate::alive(pid)) {
                // The agent's command line names the sandbox's manifest directory.
                kill_mentioning(&format!("/{name}/"));
            }
        }
    }
    netns::sweep_stale();
    sweep_stale_cgroups();
    for dir in [Path::new(BPFFS).to_owned(), std::env::temp_dir()] {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if crate::owner_pid(&name).is_some_and(|pid| !crate::alive(pid)) {
                let _ = fs::remove_dir_all(entry.path());
            }
        }
    }
}

/// A new sandbox tag (`lbt<pid>x<seq>`), unique in this machine, for namespaces, cgroups,
/// pin directories and temp dirs; the first call sweeps what dead test processes left and
/// mounts bpffs when needed.
pub fn new_tag() -> String {
    static SWEEP: Once = Once::new();
    static SEQ: AtomicU32 = AtomicU32::new(0);
    SWEEP.call_once(sweep_stale);
    lb_userspace::loader::host::ensure_bpffs(Path::new(BPFFS)).expect("bpffs is available");
    format!(
        "{PREFIX}{}x{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// The pin directory of a sandbox.
pub fn pin_dir_of(tag: &str) -> PathBuf {
    Path::new(BPFFS).join(tag)
}

/// A held TCP connection (`lb-probe hold`): one request at connect, more on demand.
pub struct Held {
    out: BufReader<ChildStdout>,
    proc: Proc,
    /// The answer to the request made right after connecting.
    pub first: Attempt,
}

impl Held {
    /// Runs `cmd` (an `lb-probe hold`) and waits for its first answer.
    pub fn start(mut cmd: Command) -> Self {
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped());
        let mut proc = Proc::spawn(cmd).expect("spawning lb-probe hold");
        let mut out = BufReader::new(proc.child().stdout.take().expect("piped"));
        let first = read_attempt(&mut out);
        Self { out, proc, first }
    }

    /// Sends a request over the held connection and returns the answer.
    pub fn ping(&mut self) -> Attempt {
        self.proc.send_line("ping").expect("the holder runs");
        read_attempt(&mut self.out)
    }

    /// The next attempt the holder reports on its own (a UDP holder's retry after an error).
    pub fn next_report(&mut self) -> Attempt {
        read_attempt(&mut self.out)
    }
}

fn read_attempt(out: &mut BufReader<ChildStdout>) -> Attempt {
    let mut line = String::new();
    out.read_line(&mut line).expect("reading lb-probe");
    assert!(!line.is_empty(), "lb-probe exited without answering");
    Attempt::parse_all(&line).remove(0)
}

/// The sandbox. Dropping it removes everything it made.
pub struct World {
    tag: String,
    bins: PathBuf,
    dir: PathBuf,
    pin_dir: PathBuf,
    /// Agents started so far.
    starts: usize,
    servers: Vec<Proc>,
    agent: Option<Proc>,
    // Fields drop in order: processes first, then the cgroup (detaching the programs), then
    // the namespaces.
    cgroup: Cgroup,
    client: Netns,
    backends: Vec<Netns>,
    router: Netns,
}

impl World {
    /// A world with `n` backend namespaces. Panics, after cleaning up, if it cannot be built.
    pub fn new(n: usize) -> Self {
        let tag = new_tag();
        let dir = std::env::temp_dir().join(&tag);
        fs::create_dir_all(dir.join("manifests")).expect("temp dir");
        let ns = |role: &str| Netns::create(&format!("{tag}-{role}")).expect("ip netns add");
        let (router, client) = (ns("r"), ns("c"));
        let backends: Vec<Netns> = (0..n).map(|i| ns(&format!("b{i}"))).collect();
        let world = Self {
            bins: bin_dir(),
            pin_dir: pin_dir_of(&tag),
            starts: 0,
            cgroup: Cgroup::create(&tag).expect("cgroup"),
            servers: Vec::new(),
            agent: None,
            dir,
            tag,
            client,
            backends,
            router,
        };
        world.wire().expect("wiring the namespaces");
        world
    }

    /// A world with `n` backends, each serving TCP and UDP on `port` as `b0`, `b1`...
    pub fn with_backends(n: usize, port: u16) -> Self {
        let mut w = Self::new(n);
        for i in 0..n {
            w.serve(i, &format!("b{i}"), port);
        }
        w
    }

    fn wire(&self) -> std::io::Result<()> {
        let r = &self.router;
        r.sysctl("net/ipv4/ip_forward", "1")?;
        r.sysctl("net/ipv6/conf/all/forwarding", "1")?;
        let link = |ns: &Netns, dev: &str, subnet4: String, subnet6: String| {
            veth(r, dev, ns, "eth0")?;
            r.addr(dev, &format!("{subnet4}.1/24"))?;
            r.addr(dev, &format!("{subnet6}::1/64"))?;
            ns.addr("eth0", &format!("{subnet4}.2/24"))?;
            ns.addr("eth0", &format!("{subnet6}::2/64"))?;
            ns.route("10.244.0.0/16", &format!("{subnet4}.1"))?;
            ns.route("fd00:244::/32", &format!("{subnet6}::1"))
        };
        link(&self.client, "c", "10.244.0".into(), "fd00:244:0".into())?;
        for (i, b) in self.backends.iter().enumerate() {
            let k = i + 1;
            link(
                b,
                &format!("b{i}"),
                format!("10.244.{k}"),
                format!("fd00:244:{k}"),
            )?;
        }
        Ok(())
    }

    /// This world's unique tag (also its cgroup's and pin directory's name).
    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The IPv4 address of backend `i`.
    pub fn backend_v4(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, (i + 1) as u8, 2)
    }

    /// The IPv6 address of backend `i`.
    pub fn backend_v6(&self, i: usize) -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x244, (i + 1) as u16, 0, 0, 0, 0, 2)
    }

    /// The pin directory the agent uses.
    pub fn pin_dir(&self) -> &Path {
        &self.pin_dir
    }

    /// The cgroup the client runs in and the agent attaches to.
    pub fn cgroup(&self) -> &Path {
        self.cgroup.path()
    }

    /// Starts `lb-probe serve` in backend `i`, answering as `name` on TCP and UDP `port`.
    pub fn serve(&mut self, i: usize, name: &str, port: u16) {
        let mut cmd = command_in(&self.bins.join("lb-probe"), &self.backends[i], None)
            .expect("backend namespace");
        cmd.args(["serve", "--name", name, "--port", &port.to_string()]);
        self.servers
            .push(Proc::spawn(cmd).expect("spawning lb-probe serve"));
    }

    /// Starts `lb-probe serve` in the client namespace itself (a pod that is its own
    /// service's backend), answering as `name`.
    pub fn serve_in_client(&mut self, name: &str, port: u16) {
        let mut cmd =
            command_in(&self.bins.join("lb-probe"), &self.client, None).expect("client namespace");
        cmd.args(["serve", "--name", name, "--port", &port.to_string()]);
        self.servers
            .push(Proc::spawn(cmd).expect("spawning lb-probe serve"));
    }

    /// The client namespace.
    pub fn client_ns(&self) -> &Netns {
        &self.client
    }

    /// Backend `i`'s namespace.
    pub fn backend_ns(&self, i: usize) -> &Netns {
        &self.backends[i]
    }

    /// `lb-probe` in the client namespace, in the world's cgroup (where the socket hooks
    /// run) or outside it.
    pub fn client_command(&self, in_cgroup: bool) -> Command {
        command_in(
            &self.bins.join("lb-probe"),
            &self.client,
            in_cgroup.then_some(&self.cgroup),
        )
        .expect("client namespace")
    }

    /// The agent's process id, while it runs.
    pub fn agent_pid(&mut self) -> Option<u32> {
        self.agent.as_mut().map(|a| a.child().id())
    }

    /// The client's own IPv4 address.
    pub fn client_v4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, 244, 0, 2)
    }

    /// The datapath counters (`lbctl stats`), by name.
    pub fn stats(&self) -> std::collections::BTreeMap<String, u64> {
        self.lbctl_json(&["stats"]).unwrap_or_default()
    }

    /// The manifest directory the agent reads.
    pub fn manifests(&self) -> PathBuf {
        self.dir.join("manifests")
    }

    /// Writes a manifest atomically (a hidden temp file renamed into place).
    pub fn write_manifest(&self, file: &str, yaml: &str) {
        crate::write_manifest(&self.manifests(), file, yaml);
    }

    /// Removes a manifest.
    pub fn remove_manifest(&self, file: &str) {
        fs::remove_file(self.manifests().join(file)).expect("removing a manifest");
    }

    /// Starts the agent on this world's manifests (the file source), cgroup and pin directory.
    pub fn start_agent(&mut self, extra: &[&str]) {
        let source = format!("file:{}", self.manifests().display());
        self.spawn_agent(&["--source", &source], extra);
    }

    /// [`Self::start_agent`], with no capabilities but `caps` (names as `setpriv` takes
    /// them: `bpf`, `net_admin`...), as a container granted only those runs it.
    pub fn start_agent_confined(&mut self, caps: &[&str], extra: &[&str]) {
        let source = format!("file:{}", self.manifests().display());
        let bounding: String = std::iter::once("-all".to_owned())
            .chain(caps.iter().map(|c| format!("+{c}")))
            .collect::<Vec<_>>()
            .join(",");
        let mut cmd = Command::new("setpriv");
        cmd.args(["--inh-caps=-all", "--ambient-caps=-all"])
            .arg(format!("--bounding-set={bounding}"))
            .arg("--")
            .arg(self.bins.join("lb-agent"));
        self.spawn(cmd, &["--source", &source], extra);
    }

    /// Starts the agent on the Kubernetes source, reaching `api` through a kubeconfig.
    pub fn start_agent_kube(&mut self, api: &ApiServer, extra: &[&str]) {
        let kubeconfig = self.dir.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig);
        let kubeconfig = kubeconfig.display().to_string();
        self.spawn_agent(
            &["--source", "kubernetes", "--kubeconfig", &kubeconfig],
            extra,
        );
    }

    fn spawn_agent(&mut self, source: &[&str], extra: &[&str]) {
        // LB_TEST_AGENT_WRAPPER runs the agent under a tool (a profiler such as heaptrack).
        let cmd = match std::env::var_os("LB_TEST_AGENT_WRAPPER") {
            Some(wrapper) => {
                let mut cmd = Command::new(wrapper);
                cmd.arg(self.bins.join("lb-agent"));
                cmd
            }
            None => Command::new(self.bins.join("lb-agent")),
        };
        self.spawn(cmd, source, extra);
    }

    /// Runs `cmd` (the agent, or a tool running it) with this world's settings.
    fn spawn(&mut self, mut cmd: Command, source: &[&str], extra: &[&str]) {
        assert!(self.agent.is_none(), "the agent already runs");
        let log = crate::AgentLog::in_dir(&self.dir).open();
        // Agents of parallel tests share the host namespace: no fixed health or metrics
        // port unless the test names one.
        for flag in ["--healthz-bind-address", "--metrics-bind-address"] {
            if !extra.contains(&flag) {
                cmd.args([flag, "off"]);
            }
        }
        cmd.args(source)
            .arg("--cgroup")
            .arg(self.cgroup.path())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(extra)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("LB_TEST_AGENT_LOG").unwrap_or("info".into()),
            )
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log);
        self.agent = Some(Proc::spawn(cmd).expect("spawning lb-agent"));
        self.starts += 1;
    }

    /// Kills the agent with SIGKILL (a crash).
    pub fn kill_agent(&mut self) {
        self.agent.take().expect("the agent runs").kill();
    }

    /// Stops the agent with SIGTERM and checks it exits cleanly.
    pub fn stop_agent(&mut self) {
        let status = self
            .agent
            .take()
            .expect("the agent runs")
            .terminate(Duration::from_secs(5));
        assert!(
            status.is_some_and(|s| s.success()),
            "agent exit: {status:?}"
        );
    }

    /// The agent's log so far.
    pub fn agent_log(&self) -> String {
        crate::AgentLog::in_dir(&self.dir).read()
    }

    /// Runs `lb-agent` to completion with these arguments (e.g. `--cleanup`); its output.
    pub fn run_agent(&self, args: &[&str]) -> std::process::Output {
        Command::new(self.bins.join("lb-agent"))
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(args)
            .env("NO_COLOR", "1")
            .output()
            .expect("running lb-agent")
    }

    /// Runs `lbctl` against this world's pins; its stdout, or its stderr as the error.
    pub fn lbctl(&self, args: &[&str]) -> Result<String, String> {
        crate::lbctl(&self.bins, &self.pin_dir, args)
    }

    /// Runs `lbctl -o json ARGS` on this world's pins; `None` until it succeeds.
    pub fn lbctl_json<T: serde::de::DeserializeOwned>(&self, args: &[&str]) -> Option<T> {
        crate::lbctl_json(&self.bins, &self.pin_dir, args)
    }

    /// The frontends the pinned maps hold (none if nothing is pinned yet).
    pub fn services(&self) -> Vec<ServiceRow> {
        self.lbctl_json(&["services"]).unwrap_or_default()
    }

    /// How full each map is (`lbctl capacity`).
    pub fn capacity(&self) -> Vec<CapacityRow> {
        self.lbctl_json(&["capacity"]).unwrap_or_default()
    }

    /// The backends the pinned maps hold.
    pub fn backends(&self) -> Vec<BackendRow> {
        self.lbctl_json(&["backends"]).unwrap_or_default()
    }

    /// The frontends of a service with their slots.
    pub fn service(&self, selector: &str) -> Vec<ServiceDetail> {
        self.lbctl_json(&["service", selector]).unwrap_or_default()
    }

    /// Backend count of a frontend (`VIP:port/PROTO`), if it is programmed.
    pub fn backend_count(&self, frontend: &str) -> Option<u16> {
        self.services()
            .into_iter()
            .find(|r| r.frontend == frontend)
            .map(|r| r.backends)
    }

    /// Waits until the last agent started has written its first sync and attached its
    /// programs (it logs `initial sync done` after both).
    pub fn wait_ready(&self) {
        self.wait_until("the agent is ready", Duration::from_secs(60), || {
            self.agent_log().matches("initial sync done").count() >= self.starts
        });
    }

    /// Polls `done` every 20 ms until it holds; panics after `timeout` with `what`.
    pub fn wait_until(
        &self,
        what: &str,
        timeout: Duration,
        done: impl FnMut() -> bool,
    ) -> Duration {
        crate::wait_until(what, timeout, done)
    }

    /// Waits until a frontend is programmed with `backends` backends.
    pub fn wait_for_backends(&self, frontend: &str, backends: u16) -> Duration {
        self.wait_ready();
        self.wait_until(
            &format!("{frontend} has {backends} backends"),
            Duration::from_secs(10),
            || self.backend_count(frontend) == Some(backends),
        )
    }

    /// An `lb-probe` command in the client namespace and cgroup (arguments to add).
    pub fn client_probe(&self) -> Command {
        command_in(
            &self.bins.join("lb-probe"),
            &self.client,
            Some(&self.cgroup),
        )
        .expect("client namespace and cgroup")
    }

    /// Runs `lb-probe` in the client namespace and cgroup; its attempts.
    pub fn probe(&self, args: &[&str]) -> Vec<Attempt> {
        crate::run_probe(self.client_probe(), args)
    }

    /// Opens a TCP connection from the client that stays open.
    pub fn hold(&self, addr: &str) -> Held {
        self.hold_with(&["hold", addr])
    }

    /// Opens a connected UDP socket from the client that stays open (and reconnects after
    /// an error, like a resolver: see `lb-probe hold --udp`).
    pub fn hold_udp(&self, addr: &str) -> Held {
        self.hold_with(&["hold", "--udp", addr])
    }

    fn hold_with(&self, args: &[&str]) -> Held {
        let mut cmd = self.client_probe();
        cmd.args(args);
        Held::start(cmd)
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if let Some(mut agent) = self.agent.take() {
            agent.kill();
            // Under LB_TEST_AGENT_WRAPPER the child is the wrapper; the agent is its child.
            kill_mentioning(&self.pin_dir.to_string_lossy());
        }
        if thread::panicking() {
            crate::AgentLog::in_dir(&self.dir).print_for_failure(&self.tag, 25);
        }
        for s in &mut self.servers {
            s.kill();
        }
        // Unpinning the links detaches the programs; the cgroup's removal would too.
        if let Err(e) = fs::remove_dir_all(&self.pin_dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            eprintln!("cleanup: {}: {e}", self.pin_dir.display());
        }
        let _ = fs::remove_file(lb_userspace::agent::health::explain_socket(
            &self.pin_dir,
            None,
        ));
        let _ = fs::remove_dir_all(&self.dir);
    }
}
