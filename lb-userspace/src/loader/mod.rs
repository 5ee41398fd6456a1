//! Loading the kernel object, pinning its maps and links, and removing them again.
//!
//! Everything lives under one bpffs directory ([`PinLayout`]): `maps/<name>` and
//! `links/<program>`. Pinned maps are reused by a restarted agent, after checking that their
//! type and layout are what this build expects (aya would reuse them unchecked). Pinned links
//! keep the programs attached while no agent runs; a new agent (once its maps are written)
//! attaches its programs first and then renames the new link pins over the old ones, so
//! there is never a moment without a program on the cgroup.

pub mod host;

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::{
            ffi::OsStrExt as _,
            fs::{DirBuilderExt as _, PermissionsExt as _},
        },
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, Map, MapData, MapError},
    programs::{
        CgroupAttachMode, CgroupSock, CgroupSockAddr, LinkOrder, ProgramError, SchedClassifier,
        TcAttachType, TestRun as _, TestRunOptions, Xdp, XdpMode,
        links::{FdLink, PinnedLink},
        tc::{SchedClassifierLink, TcAttachOptions},
        xdp::XdpLink,
    },
};
use lb_common::{
    maps::{self, MapSpec},
    ns::{self, CtTimeouts, XDP_DRY_RUN},
};
use tracing::info;

use crate::{EBPF_OBJECT, datapath::bpf::BpfDatapath};

/// Attaches program `$prog` through the link pinned at `$pin`, replacing its program in
/// place, or, when there is none (or its device is gone), with `$attach`; then pins the link
/// there. Evaluates to whether the pinned link was reused. A macro, because the program
/// types share these methods by name, not through a trait.
macro_rules! attach_pinned {
    ($prog:expr, $link:ty, $name:expr, $pin:expr, |$p:ident| $attach:expr) => {{
        let prog = $prog;
        let perr = |source| LoadError::Program {
            name: $name,
            source,
        };
        let reused = match adopt_link($pin)? {
            Some(old) => <$link>::try_from(old)
                .ok()
                .and_then(|l| prog.attach_to_link(l).ok()),
            None => None,
        };
        let replaced = reused.is_some();
        let id = match reused {
            Some(id) => id,
            None => {
                let $p = &mut *prog;
                $attach.map_err(perr)?
            }
        };
        let link: FdLink = prog
            .take_link(id)
            .map_err(perr)?
            .try_into()
            .map_err(|source| LoadError::Link {
                name: $name,
                source,
            })?;
        pin_over(link, $pin, $name)?;
        replaced
    }};
}

/// The socket programs of the object, by name; each is pinned as `links/<name>`.
pub const PROGRAMS: [&str; 8] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
];

/// The cgroup program that forgets a closing UDP socket's connected-socket entry
/// ([`maps::UDP_SOCKETS`]); pinned as `links/sock_release`.
pub const RELEASE_PROGRAM: &str = "sock_release";

/// The XDP program for traffic from outside the node, on each external device.
pub const XDP_PROGRAM: &str = "xdp_lb";
/// The tc egress program (reverse translation of local backends' replies), on each external
/// device.
pub const TC_PROGRAM: &str = "tc_egress";
/// The tc ingress program (reverse translation of SNATed flows' replies), on each overlay
/// device (VXLAN, Geneve) through which backends on other nodes are reached.
pub const OVERLAY_PROGRAM: &str = "tc_overlay";
/// An XDP program that passes everything (a veth delivers frames redirected to it only while
/// its peer runs an XDP program; benchmarks use it as the empty baseline).
pub const XDP_PASS_PROGRAM: &str = "xdp_pass";

/// Prefix of the link pins of XDP on a device (`xdp-<ifname>`).
const XDP_LINK_PREFIX: &str = "xdp-";
/// Prefix of the link pins of tc egress on a device (`tc-<ifname>`).
const TC_LINK_PREFIX: &str = "tc-";
/// Prefix of the link pins of the overlay program on a device (`overlay-<ifname>`).
const OVERLAY_LINK_PREFIX: &str = "overlay-";

/// What the north-south programs do on a device.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DeviceKind {
    /// An external device: XDP at ingress, tc egress.
    Xdp,
    /// An overlay device (VXLAN, Geneve): tc ingress only, where replies of SNATed flows to
    /// backends on other nodes arrive.
    Overlay,
}

impl DeviceKind {
    /// The prefix of the device's first link pin, which tells what it runs.
    fn link_prefix(self) -> &'static str {
        match self {
            Self::Xdp => XDP_LINK_PREFIX,
            Self::Overlay => OVERLAY_LINK_PREFIX,
        }
    }
}

/// Where the pins live.
#[derive(Clone, Debug)]
pub struct PinLayout {
    root: PathBuf,
}

impl PinLayout {
    /// The layout under `root` (a directory on bpffs).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// The root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The directory of map pins.
    pub fn maps(&self) -> PathBuf {
        self.root.join(maps::PIN_MAPS_SUBDIR)
    }

    /// The directory of link pins.
    pub fn links(&self) -> PathBuf {
        self.root.join(maps::PIN_LINKS_SUBDIR)
    }

    /// The pin of a map.
    pub fn map(&self, name: &str) -> PathBuf {
        self.maps().join(name)
    }

    /// The pin of a program's link.
    pub fn link(&self, program: &str) -> PathBuf {
        self.links().join(program)
    }
}

/// Capacities to create maps with. Maps that are already pinned keep theirs.
#[derive(Clone, Copy, Debug)]
pub struct MapSizes {
    /// Service map and service-info map.
    pub services: u32,
    /// Slot map.
    pub slots: u32,
    /// Backend map.
    pub backends: u32,
    /// Reverse-NAT map.
    pub rev_nat: u32,
    /// Affinity map.
    pub affinity: u32,
    /// North-south frontend map.
    pub external: u32,
    /// North-south services (ids); their info and counter maps hold one more (id 0).
    pub external_ids: u32,
    /// Lookup table array entries.
    pub table_entries: u32,
    /// Conntrack and north-south reverse-NAT maps of answered flows.
    pub flows: u32,
    /// Conntrack and north-south reverse-NAT maps of new flows.
    pub new_flows: u32,
    /// Source-ranges trie.
    pub source_ranges: u32,
}

impl MapSizes {
    fn of(&self, name: &str) -> Option<u32> {
        match name {
            maps::SERVICES | maps::SERVICE_INFO => Some(self.services),
            // A service with affinity has one match entry per slot.
            maps::SLOTS | maps::AFFINITY_MATCH => Some(self.slots),
            maps::BACKENDS => Some(self.backends),
            // Ids start at 1.
            maps::SVC_STATS => Some(self.services + 1),
            maps::BE_STATS => Some(self.backends + 1),
            maps::REV_NAT | maps::UDP_SOCKETS => Some(self.rev_nat),
            maps::AFFINITY | maps::NS_AFFINITY => Some(self.affinity),
            // As many backends of services with affinity as the socket hooks' match map.
            maps::NS_AFFINITY_MATCH => Some(self.slots),
            maps::NS_SERVICES => Some(self.external),
            maps::NS_INFO | maps::NS_STATS => Some(self.external_ids + 1),
            maps::RINGS => Some(self.table_entries.div_ceil(maps::RING_LANES)),
            maps::CONNTRACK | maps::NAT_REV => Some(self.flows),
            maps::CT_NEW | maps::NAT_REV_NEW => Some(self.new_flows),
            maps::SOURCE_RANGES => Some(self.source_ranges),
            // A build with more counters makes the array anew (the counts start again).
            maps::STATS => Some(lb_common::stats::COUNT),
            _ => None,
        }
    }
}

/// Loading, attaching or removing failed.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// A pinned map has another type or layout than this build uses.
    #[error(
        "pinned map {path} is {found}, but this build expects {expected}; it was made by an \
         incompatible version: remove it with `lb-agent --cleanup` (this drops the datapath)"
    )]
    Incompatible {
        /// The pin.
        path: PathBuf,
        /// What it is.
        found: String,
        /// What it should be.
        expected: String,
    },
    /// The object could not be loaded.
    #[error("loading the kernel object: {0}")]
    Ebpf(#[from] aya::EbpfError),
    /// A program could not be loaded or attached.
    #[error("program {name}: {source}")]
    Program {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: ProgramError,
    },
    /// A program's link could not be taken over.
    #[error("program {name}: {source}")]
    Link {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::programs::links::LinkError,
    },
    /// A program's link could not be pinned.
    #[error("program {name}: pinning its link: {source}")]
    Pin {
        /// The program.
        name: &'static str,
        /// Why.
        #[source]
        source: aya::pin::PinError,
    },
    /// The object lacks something this build needs.
    #[error("the kernel object has no {0}; it does not match this agent (rebuild both)")]
    Missing(String),
    /// A map operation failed.
    #[error("map {name}: {source}")]
    Map {
        /// The map.
        name: &'static str,
        /// Why.
        #[source]
        source: MapError,
    },
    /// A file operation under the pin directory or on the cgroup failed.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `BPF_OBJ_GET` with `BPF_F_RDONLY`, which aya does not offer: the CLI never writes.
fn obj_get_read_only(path: &Path) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct ObjGetAttr {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    const BPF_OBJ_GET: libc::c_long = 7;
    const BPF_F_RDONLY: u32 = 1 << 3;
    let c = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let attr = ObjGetAttr {
        pathname: c.as_ptr() as u64,
        bpf_fd: 0,
        file_flags: BPF_F_RDONLY,
        path_fd: 0,
        _pad: 0,
    };
    // SAFETY: a valid bpf_attr prefix for BPF_OBJ_GET whose path outlives the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_OBJ_GET,
            &attr as *const ObjGetAttr,
            size_of::<ObjGetAttr>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Checks a map against what this build expects of it.
fn check(path: &Path, data: &MapData, spec: &MapSpec) -> Result<u32, LoadError> {
    let info = data.info().map_err(|source| LoadError::Map {
        name: spec.name,
        source,
    })?;
    // An unknown type (from a newer kernel) shows as u32::MAX and never matches.
    let map_type = info.map_type().map_or(u32::MAX, |t| t as u32);
    let found = (map_type, info.key_size(), info.value_size());
    let expected = (spec.map_type, spec.key_size, spec.value_size);
    if found != expected {
        let show =
            |(t, k, v): (u32, u32, u32)| format!("type {t} with {k}-byte keys and {v}-byte values");
        return Err(LoadError::Incompatible {
            path: path.to_owned(),
            found: show(found),
            expected: show(expected),
        });
    }
    Ok(info.max_entries())
}

/// Opens the pinned map `spec` read-only, checking its layout; `None` when it is not pinned.
pub fn open_pinned(layout: &PinLayout, spec: &MapSpec) -> Result<Option<MapData>, LoadError> {
    let path = layout.map(spec.name);
    let fd = match obj_get_read_only(&path) {
        Ok(fd) => fd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io_err(&path)(e)),
    };
    let data = MapData::from_fd(fd).map_err(|source| LoadError::Map {
        name: spec.name,
        source,
    })?;
    check(&path, &data, spec)?;
    Ok(Some(data))
}

/// Opens the pinned map `name` for writing, checking its layout.
pub fn open_writable(layout: &PinLayout, name: &'static str) -> Result<MapData, LoadError> {
    let spec = maps::ALL
        .iter()
        .find(|s| s.name == name)
        .ok_or_else(|| LoadError::Missing(format!("map {name}")))?;
    let path = layout.map(name);
    let data = MapData::from_pin(&path).map_err(|source| LoadError::Map { name, source })?;
    check(&path, &data, spec)?;
    Ok(data)
}

/// The loaded object: maps created or adopted, programs verified and loaded.
pub struct Loaded {
    ebpf: Ebpf,
    layout: PinLayout,
    settings: Settings,
    devices: HashMap<MapData, u32, u8>,
    /// Maps created anew at another capacity, whose old maps the running programs still
    /// use until [`Loaded::attach`].
    resized: Vec<&'static str>,
    /// Maps of an older layout being converted ([`maps::CONVERSIONS`]): the running
    /// programs still write them until [`Loaded::attach`].
    converting: Vec<(&'static str, &'static str)>,
}

/// What one [`Loaded::test_run`] gave.
#[derive(Clone, Debug)]
pub struct TestRunOutput {
    /// The program's return value (XDP action, or tc verdict such as -1 for TCX_NEXT).
    pub verdict: i32,
    /// The frame as the program left it.
    pub frame: Vec<u8>,
    /// Mean time per run, as the kernel measured it.
    pub duration: std::time::Duration,
}

/// A device running the north-south programs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Device {
    /// Interface name.
    pub name: String,
    /// Interface index.
    pub ifindex: u32,
}

/// What the kernel programs are loaded with (their load-time globals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Settings {
    /// The inclusive range of source ports the XDP program SNATs flows to.
    pub snat_ports: (u16, u16),
    /// The kernel's debug events on (see [`Loaded::take_debug_events`]), or off (removed
    /// from the programs by the verifier).
    pub debug: bool,
    /// Lifetimes of the conntrack states.
    pub ct_timeouts: CtTimeouts,
    /// Seconds added to the programs' clock: zero, except in tests that move time forward
    /// (a program loaded with a larger offset over the same maps sees the entries older).
    pub clock_offset: u32,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            snat_ports: (61000, 65535),
            debug: false,
            ct_timeouts: CtTimeouts::DEFAULT,
            clock_offset: 0,
        }
    }
}

impl Loaded {
    /// Loads the embedded object, reusing compatible pinned maps and creating (and pinning)
    /// the others with `sizes`; `snat_ports` is the inclusive range of source ports the XDP
    /// program SNATs flows to. The other settings are the defaults.
    pub fn load(
        layout: &PinLayout,
        sizes: &MapSizes,
        snat_ports: (u16, u16),
    ) -> Result<Self, LoadError> {
        Self::load_with(
            layout,
            sizes,
            &Settings {
                snat_ports,
                ..Settings::default()
            },
        )
    }

    /// [`Self::load`], with all of its settings.
    pub fn load_with(
        layout: &PinLayout,
        sizes: &MapSizes,
        settings: &Settings,
    ) -> Result<Self, LoadError> {
        Self::load_object(EBPF_OBJECT, layout, sizes, settings)
    }

    /// [`Self::load_with`] of the kernel object `object` instead of the embedded one (a test
    /// loads what `cargo xtask build-ebpf` builds without `--release`).
    pub fn load_object(
        object: &[u8],
        layout: &PinLayout,
        sizes: &MapSizes,
        settings: &Settings,
    ) -> Result<Self, LoadError> {
        // Only root reads or writes the maps and links, also when the directories existed.
        for dir in [layout.root().to_owned(), layout.maps(), layout.links()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(&dir))?;
            fs::set_permissions(&dir, fs::Permissions::from_mode(0o700)).map_err(io_err(&dir))?;
        }
        // Maps of an earlier layout whose entries this build can take over: copied once its
        // maps exist.
        let migrations: Vec<(&'static str, &'static str)> = maps::MIGRATIONS
            .into_iter()
            .filter(|(old, new)| layout.map(old).exists() && !layout.map(new).exists())
            .collect();
        let converting: Vec<(&'static str, &'static str)> = maps::CONVERSIONS
            .into_iter()
            .filter(|(old, new)| layout.map(old).exists() && !layout.map(new).exists())
            .collect();
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(layout.maps());
        for spec in &maps::ALL {
            match open_pinned(layout, spec)? {
                Some(data) => {
                    let pinned = data.info().map(|i| i.max_entries()).unwrap_or_default();
                    match sizes.of(spec.name) {
                        Some(want) if want != pinned => {
                            // A new capacity: this build's object creates the map anew, its
                            // entries are copied over from the old one (set aside), and the
                            // running programs keep the old map until they are replaced.
                            let old = resize_pin(layout, spec.name);
                            fs::rename(layout.map(spec.name), &old).map_err(io_err(&old))?;
                            loader.map_max_entries(spec.name, want);
                            info!(
                                map = spec.name,
                                pinned,
                                configured = want,
                                "resizing the map: entries are copied into a new one"
                            );
                        }
                        _ => info!(map = spec.name, capacity = pinned, "adopting pinned map"),
                    }
                }
                None => {
                    if let Some(size) = sizes.of(spec.name) {
                        loader.map_max_entries(spec.name, size);
                    }
                }
            }
        }
        loader.override_global(ns::SNAT_PORT_MIN_GLOBAL, &settings.snat_ports.0, true);
        loader.override_global(ns::SNAT_PORT_MAX_GLOBAL, &settings.snat_ports.1, true);
        loader.override_global(ns::CT_TIMEOUTS_GLOBAL, &settings.ct_timeouts, true);
        loader.override_global(ns::CT_CLOCK_OFFSET_GLOBAL, &settings.clock_offset, true);
        let debug = u8::from(settings.debug);
        loader.override_global("DEBUG", &debug, true);
        let mut ebpf = loader.load(object)?;
        for name in PROGRAMS {
            program::<CgroupSockAddr>(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        program::<CgroupSock>(&mut ebpf, RELEASE_PROGRAM)?
            .load()
            .map_err(|source| LoadError::Program {
                name: RELEASE_PROGRAM,
                source,
            })?;
        for name in [XDP_PROGRAM, XDP_PASS_PROGRAM] {
            program::<Xdp>(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        for name in [TC_PROGRAM, OVERLAY_PROGRAM] {
            program::<SchedClassifier>(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        // Maps being resized (also those an interrupted resize left): fill the new ones.
        let resized: Vec<&'static str> = maps::ALL
            .iter()
            .map(|s| s.name)
            .filter(|name| resize_pin(layout, name).exists())
            .collect();
        for name in &resized {
            let copied = copy_map(&resize_pin(layout, name), layout, name)?;
            info!(map = name, entries = copied, "map resized: entries copied");
        }
        for (old, new) in migrations {
            let copied = copy_map(&layout.map(old), layout, new)?;
            info!(
                from = old,
                to = new,
                entries = copied,
                "map layout migrated"
            );
        }
        for (old, new) in &converting {
            let converted = crate::datapath::conntrack::convert_v1_map(
                &layout.map(old),
                layout,
                &settings.ct_timeouts,
                settings.clock_offset,
            )?;
            info!(
                from = old,
                to = new,
                entries = converted,
                "map converted to the new layout"
            );
        }
        let devices = ebpf
            .take_map(maps::XDP_DEVICES)
            .ok_or_else(|| LoadError::Missing(format!("map {}", maps::XDP_DEVICES)))?;
        let devices = HashMap::try_from(devices).map_err(|source| LoadError::Map {
            name: maps::XDP_DEVICES,
            source,
        })?;
        Ok(Self {
            ebpf,
            layout: layout.clone(),
            settings: *settings,
            devices,
            resized,
            converting,
        })
    }

    /// Runs the packet program `name` ([`XDP_PROGRAM`], [`XDP_PASS_PROGRAM`], [`TC_PROGRAM`]
    /// or [`OVERLAY_PROGRAM`]) on `frame` with `BPF_PROG_TEST_RUN`, `repeat` times, as if it arrived
    /// on (XDP) or left by (tc) device `ifindex` (0: loopback) of the calling thread's
    /// network namespace. Returns what the program returned, the frame as it left it and
    /// the kernel's mean time per run. For tests and benchmarks.
    pub fn test_run(
        &mut self,
        name: &'static str,
        frame: &[u8],
        ifindex: u32,
        repeat: u32,
    ) -> Result<TestRunOutput, LoadError> {
        let mut out = vec![0u8; frame.len() + 256];
        let perr = |source| LoadError::Program { name, source };
        // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
        // egress_ifindex; struct __sk_buff is only passed for its ifindex at offset 40.
        let mut ctx = Vec::new();
        let result = if name == TC_PROGRAM || name == OVERLAY_PROGRAM {
            let mut skb = [0u8; 192];
            skb[40..44].copy_from_slice(&ifindex.to_ne_bytes());
            ctx.extend_from_slice(&skb);
            let opts = TestRunOptions {
                data_in: Some(frame),
                data_out: Some(&mut out),
                ctx_in: (ifindex != 0).then_some(&ctx[..]),
                repeat,
                ..Default::default()
            };
            program::<SchedClassifier>(&mut self.ebpf, name)?
                .test_run(opts)
                .map_err(perr)?
        } else {
            return run_xdp(
                program::<Xdp>(&mut self.ebpf, name)?,
                frame,
                ifindex,
                repeat,
                false,
            )
            .map_err(perr);
        };
        out.truncate(result.data_size_out as usize);
        Ok(TestRunOutput {
            verdict: result.return_value as i32,
            frame: out,
            duration: result.duration,
        })
    }

    /// The devices the north-south programs are attached to as `kind` (from the link pins,
    /// so a restarted agent sees its predecessor's).
    pub fn attached_devices(&self, kind: DeviceKind) -> Result<Vec<String>, LoadError> {
        attached_devices(&self.layout, kind)
    }

    /// Attaches the north-south programs to `device` (XDP in `mode` at ingress, tc egress),
    /// or replaces the programs on it with this build's when a link is pinned already (in
    /// place: the device is never without a program); then marks it as a device the XDP
    /// program may redirect to. Returns whether both links were replaced in place.
    pub fn attach_device(&mut self, device: &Device, mode: XdpMode) -> Result<bool, LoadError> {
        let links = self.layout.links();
        let xdp_pin = links.join(format!("{XDP_LINK_PREFIX}{}", device.name));
        let xdp = attach_pinned!(
            program::<Xdp>(&mut self.ebpf, XDP_PROGRAM)?,
            XdpLink,
            XDP_PROGRAM,
            &xdp_pin,
            |p| p.attach_to_if_index(device.ifindex, mode)
        );
        let tc_pin = links.join(format!("{TC_LINK_PREFIX}{}", device.name));
        let tc = attach_pinned!(
            program::<SchedClassifier>(&mut self.ebpf, TC_PROGRAM)?,
            SchedClassifierLink,
            TC_PROGRAM,
            &tc_pin,
            |p| p.attach_with_options(
                &device.name,
                TcAttachType::Egress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        );
        self.mark_device(device, maps::DEVICE_XDP)?;
        Ok(xdp && tc)
    }

    /// Attaches the overlay program to `device` at tc ingress (or replaces it in place, as
    /// [`Self::attach_device`]), then marks it as an overlay device, through which flows to
    /// backends on other nodes may leave SNATed. For Ethernet devices (VXLAN, Geneve): the
    /// program parses Ethernet frames. Returns whether the link was replaced in place.
    pub fn attach_overlay(&mut self, device: &Device) -> Result<bool, LoadError> {
        let pin = self
            .layout
            .links()
            .join(format!("{OVERLAY_LINK_PREFIX}{}", device.name));
        let replaced = attach_pinned!(
            program::<SchedClassifier>(&mut self.ebpf, OVERLAY_PROGRAM)?,
            SchedClassifierLink,
            OVERLAY_PROGRAM,
            &pin,
            |p| p.attach_with_options(
                &device.name,
                TcAttachType::Ingress,
                TcAttachOptions::TcxOrder(LinkOrder::default()),
            )
        );
        self.mark_device(device, maps::DEVICE_OVERLAY)?;
        Ok(replaced)
    }

    /// Records in the device map that `device` runs the programs of `kind`.
    fn mark_device(&mut self, device: &Device, kind: u8) -> Result<(), LoadError> {
        self.devices
            .insert(device.ifindex, kind, 0)
            .map_err(|source| LoadError::Map {
                name: maps::XDP_DEVICES,
                source,
            })
    }

    /// Detaches the north-south programs from the device called `name` (its link pins go)
    /// and forgets every device index not in `keep`.
    pub fn detach_device(&mut self, name: &str, keep: &[u32]) -> Result<(), LoadError> {
        let stale: Vec<u32> = self
            .devices
            .keys()
            .filter_map(Result::ok)
            .filter(|i| !keep.contains(i))
            .collect();
        for ifindex in stale {
            match self.devices.remove(&ifindex) {
                Ok(()) | Err(MapError::KeyNotFound) => {}
                Err(source) => {
                    return Err(LoadError::Map {
                        name: maps::XDP_DEVICES,
                        source,
                    });
                }
            }
        }
        for prefix in [XDP_LINK_PREFIX, TC_LINK_PREFIX, OVERLAY_LINK_PREFIX] {
            let pin = self.layout.links().join(format!("{prefix}{name}"));
            match fs::remove_file(&pin) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(io_err(&pin)(e)),
                _ => {}
            }
        }
        Ok(())
    }

    /// Takes the maps the agent writes.
    pub fn datapath(&mut self) -> Result<BpfDatapath, LoadError> {
        BpfDatapath::take(&mut self.ebpf)
    }

    /// The size in bytes of program `name` as the verifier left it (dead code removed).
    pub fn translated_size(&self, name: &str) -> Option<u32> {
        self.ebpf.program(name)?.info().ok()?.size_translated()
    }

    /// The ring buffer of the kernel's debug events (written only when loaded with them on).
    pub fn take_debug_events(&mut self) -> Result<aya::maps::RingBuf<MapData>, LoadError> {
        let name = maps::DEBUG_EVENTS;
        let map = self
            .ebpf
            .take_map(name)
            .ok_or_else(|| LoadError::Missing(format!("map {name}")))?;
        aya::maps::RingBuf::try_from(map).map_err(|source| LoadError::Map { name, source })
    }

    /// Attaches every program to the cgroup at `cgroup` and pins the links, replacing the
    /// links of an earlier run only once the new ones are attached.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), LoadError> {
        // What the running programs wrote into the old maps of resized ones since the copy
        // at load (flows, reverse NAT, affinity) is copied again, just before they go.
        for name in std::mem::take(&mut self.resized) {
            if written_by_programs(name) {
                copy_map(&resize_pin(&self.layout, name), &self.layout, name)?;
            }
        }
        for (old, _) in std::mem::take(&mut self.converting) {
            crate::datapath::conntrack::convert_v1_map(
                &self.layout.map(old),
                &self.layout,
                &self.settings.ct_timeouts,
                self.settings.clock_offset,
            )?;
        }
        let cg = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let links = self.layout.links();
        for name in PROGRAMS {
            let prog = program::<CgroupSockAddr>(&mut self.ebpf, name)?;
            let perr = |source| LoadError::Program { name, source };
            let id = prog.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
            let link = prog.take_link(id).map_err(perr)?;
            let link: FdLink = link
                .try_into()
                .map_err(|source| LoadError::Link { name, source })?;
            pin_over(link, &links.join(name), name)?;
        }
        let name = RELEASE_PROGRAM;
        let prog = program::<CgroupSock>(&mut self.ebpf, name)?;
        let perr = |source| LoadError::Program { name, source };
        let id = prog.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
        let link: FdLink = prog
            .take_link(id)
            .map_err(perr)?
            .try_into()
            .map_err(|source| LoadError::Link { name, source })?;
        pin_over(link, &links.join(name), name)
    }
}

/// The devices with the programs of `kind` attached (a pinned link) under `layout`, by name.
pub fn attached_devices(layout: &PinLayout, kind: DeviceKind) -> Result<Vec<String>, LoadError> {
    let dir = layout.links();
    let mut names = Vec::new();
    for entry in fs::read_dir(&dir).map_err(io_err(&dir))? {
        let name = entry.map_err(io_err(&dir))?.file_name();
        if let Some(dev) = name
            .to_str()
            .and_then(|n| n.strip_prefix(kind.link_prefix()))
        {
            names.push(dev.to_owned());
        }
    }
    names.sort();
    Ok(names)
}

/// Runs `prog` on `frame` with `BPF_PROG_TEST_RUN`, as if it arrived on device `ifindex`;
/// a dry run ([`XDP_DRY_RUN`] in the frame's metadata) when `dry`.
fn run_xdp(
    prog: &Xdp,
    frame: &[u8],
    ifindex: u32,
    repeat: u32,
    dry: bool,
) -> Result<TestRunOutput, ProgramError> {
    let meta = if dry {
        XDP_DRY_RUN.to_ne_bytes().to_vec()
    } else {
        Vec::new()
    };
    let data = [&meta[..], frame].concat();
    let mut out = vec![0u8; data.len() + 256];
    // struct xdp_md: data, data_end, data_meta, ingress_ifindex, rx_queue_index,
    // egress_ifindex; `data` is the metadata's length (offsets into `data_in`).
    let mut ctx = Vec::new();
    for word in [meta.len() as u32, data.len() as u32, 0, ifindex, 0, 0] {
        ctx.extend_from_slice(&word.to_ne_bytes());
    }
    let opts = TestRunOptions {
        data_in: Some(&data),
        data_out: Some(&mut out),
        ctx_in: Some(&ctx),
        repeat,
        ..Default::default()
    };
    let result = prog.test_run(opts)?;
    // The frame comes back after its metadata.
    out.truncate(result.data_size_out as usize);
    out.drain(..meta.len().min(out.len()));
    Ok(TestRunOutput {
        verdict: result.return_value as i32,
        frame: out,
        duration: result.duration,
    })
}

/// Runs the XDP program attached to `device` (through its pinned link) once on `frame`, as
/// if the frame arrived on that device: the datapath's own answer to where a packet goes.
/// A dry run ([`XDP_DRY_RUN`]): the program decides as for a packet but records no flow,
/// takes no SNAT port (an SNATed source shows port 0) and refreshes no flow; the global and
/// per-service counters count it like a packet.
pub fn run_attached_xdp(
    layout: &PinLayout,
    device: &str,
    ifindex: u32,
    frame: &[u8],
) -> Result<TestRunOutput, LoadError> {
    let name = XDP_PROGRAM;
    let pin = layout.links().join(format!("{XDP_LINK_PREFIX}{device}"));
    let link: FdLink = PinnedLink::from_pin(&pin)
        .map_err(|source| LoadError::Link { name, source })?
        .into();
    let id = link
        .info()
        .map_err(|source| LoadError::Link { name, source })?
        .program_id();
    let perr = |source| LoadError::Program { name, source };
    let info = aya::programs::loaded_programs()
        .filter_map(Result::ok)
        .find(|p| p.id() == id)
        .ok_or_else(|| perr(ProgramError::NotLoaded))?;
    let prog = Xdp::from_program_info(
        info,
        name.into(),
        aya_obj::programs::XdpAttachType::Interface,
    )
    .map_err(perr)?;
    run_xdp(&prog, frame, ifindex, 1, true).map_err(perr)
}

/// Where the old map of a map being resized is pinned until the new programs replace the
/// running ones (then [`remove_stale_map_pins`] removes it).
fn resize_pin(layout: &PinLayout, name: &str) -> PathBuf {
    layout.map(&format!("{name}-old"))
}

/// Whether the programs write map `name` (flows, reverse NAT, affinity, connected UDP
/// sockets), so that a copy made at load misses what they wrote since.
fn written_by_programs(name: &str) -> bool {
    name == maps::UDP_SOCKETS
        || maps::ALL
            .iter()
            .any(|s| s.name == name && s.map_type == maps::TYPE_LRU_HASH)
}

/// Copies the entries of the map pinned at `from` (set aside by a resize, or of an earlier
/// layout that [`maps::MIGRATIONS`] names) into map `name`; returns how many. Entries beyond a
/// smaller new capacity are left out (the agent then refuses what does not fit, as for any
/// full map). Per-CPU counters start from zero.
fn copy_map(from: &Path, layout: &PinLayout, name: &'static str) -> Result<usize, LoadError> {
    use aya::maps::{Array, lpm_trie::LpmTrie};
    use lb_common::{
        AffinityKey, AffinityMatchKey, AffinityValue, Backend, Endpoint, RevNatKey, ServiceInfo,
        ServiceKey, ServiceValue, SlotKey, UdpSocket,
        maps::RingPair,
        ns::{
            CtEntry, FlowKey, NatRev, NsAffinityKey, NsAffinityMatchKey, NsAffinityValue,
            NsService, SourceRange,
        },
        stats::SocketCounters,
    };
    let merr = move |source| LoadError::Map { name, source };
    let old = MapData::from_pin(from).map_err(merr)?;
    let new = MapData::from_pin(layout.map(name)).map_err(merr)?;
    fn hash<K: aya::Pod, V: aya::Pod>(
        old: Map,
        new: Map,
        merr: impl Fn(MapError) -> LoadError,
    ) -> Result<usize, LoadError> {
        let from: HashMap<MapData, K, V> = HashMap::try_from(old).map_err(&merr)?;
        let mut to: HashMap<MapData, K, V> = HashMap::try_from(new).map_err(&merr)?;
        let mut n = 0;
        for (k, v) in from.iter().filter_map(Result::ok) {
            if to.insert(k, v, 0).is_ok() {
                n += 1;
            }
        }
        Ok(n)
    }
    fn array<V: aya::Pod + PartialEq + Default>(
        old: MapData,
        new: MapData,
        merr: impl Fn(MapError) -> LoadError,
    ) -> Result<usize, LoadError> {
        let from: Array<MapData, V> = Array::try_from(Map::Array(old)).map_err(&merr)?;
        let mut to: Array<MapData, V> = Array::try_from(Map::Array(new)).map_err(&merr)?;
        let mut n = 0;
        for i in 0..from.len().min(to.len()) {
            let v = from.get(&i, 0).map_err(&merr)?;
            if v != V::default() {
                to.set(i, v, 0).map_err(&merr)?;
                n += 1;
            }
        }
        Ok(n)
    }
    let (h, l) = (Map::HashMap, Map::LruHashMap);
    match name {
        maps::SERVICES => hash::<ServiceKey, ServiceValue>(h(old), h(new), merr),
        maps::SLOTS => hash::<SlotKey, u32>(h(old), h(new), merr),
        maps::BACKENDS => hash::<u32, Backend>(h(old), h(new), merr),
        maps::SERVICE_INFO | maps::NS_INFO => hash::<u32, ServiceInfo>(h(old), h(new), merr),
        maps::AFFINITY_MATCH => hash::<AffinityMatchKey, u8>(h(old), h(new), merr),
        maps::NS_SERVICES => hash::<ServiceKey, NsService>(h(old), h(new), merr),
        maps::REV_NAT => hash::<RevNatKey, Endpoint>(l(old), l(new), merr),
        maps::UDP_SOCKETS => hash::<u64, UdpSocket>(h(old), h(new), merr),
        maps::AFFINITY => hash::<AffinityKey, AffinityValue>(l(old), l(new), merr),
        maps::CONNTRACK | maps::CT_NEW => hash::<FlowKey, CtEntry>(l(old), l(new), merr),
        maps::NAT_REV | maps::NAT_REV_NEW => hash::<FlowKey, NatRev>(l(old), l(new), merr),
        maps::NS_AFFINITY => hash::<NsAffinityKey, NsAffinityValue>(l(old), l(new), merr),
        maps::NS_AFFINITY_MATCH => hash::<NsAffinityMatchKey, u32>(h(old), h(new), merr),
        maps::RINGS => array::<RingPair>(old, new, merr),
        maps::SVC_STATS => array::<SocketCounters>(old, new, merr),
        maps::BE_STATS => array::<u64>(old, new, merr),
        maps::SOURCE_RANGES => {
            let from: LpmTrie<MapData, SourceRange, u8> =
                LpmTrie::try_from(Map::LpmTrie(old)).map_err(&merr)?;
            let mut to: LpmTrie<MapData, SourceRange, u8> =
                LpmTrie::try_from(Map::LpmTrie(new)).map_err(&merr)?;
            let mut n = 0;
            for (k, v) in from.iter().filter_map(Result::ok) {
                if to.insert(&k, v, 0).is_ok() {
                    n += 1;
                }
            }
            Ok(n)
        }
        _ => Ok(0),
    }
}

/// Pins `link` at `path`, atomically replacing what was pinned there (whose link detaches
/// when its pin goes, unless it is this very link, updated in place).
fn pin_over(link: FdLink, path: &Path, name: &'static str) -> Result<(), LoadError> {
    // bpffs refuses names with a dot.
    let mut tmp = path.as_os_str().to_owned();
    tmp.push("-new");
    let tmp = PathBuf::from(tmp);
    let _stale = fs::remove_file(&tmp);
    link.pin(&tmp)
        .map_err(|source| LoadError::Pin { name, source })?;
    fs::rename(&tmp, path).map_err(io_err(path))
}

/// The link pinned at `path`, if any.
fn adopt_link(path: &Path) -> Result<Option<FdLink>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(link.into())),
        // Not a link (or unreadable): attaching anew pins over it.
        Err(_) => Ok(None),
    }
}

fn program<'a, P>(ebpf: &'a mut Ebpf, name: &'static str) -> Result<&'a mut P, LoadError>
where
    &'a mut P: TryFrom<&'a mut aya::programs::Program, Error = ProgramError>,
{
    ebpf.program_mut(name)
        .ok_or_else(|| LoadError::Missing(format!("program {name}")))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
}

/// Removes the pins of maps this build does not use: older layouts, whose names carry an
/// older version. Called once this build's programs are attached: a program still attached
/// keeps its maps alive, so no lookup fails. Returns the names removed.
pub fn remove_stale_map_pins(layout: &PinLayout) -> Result<Vec<String>, LoadError> {
    let dir = layout.maps();
    let entries = match fs::read_dir(&dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io_err(&dir)(e)),
    };
    let mut removed = Vec::new();
    for entry in entries {
        let path = entry.map_err(io_err(&dir))?.path();
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        if maps::ALL.iter().any(|spec| spec.name == name) {
            continue;
        }
        fs::remove_file(&path).map_err(io_err(&path))?;
        removed.push(name);
    }
    removed.sort();
    Ok(removed)
}

/// What [`cleanup`] removed.
#[derive(Debug, Default)]
pub struct Cleanup {
    /// Links unpinned (programs detached).
    pub links: usize,
    /// Maps unpinned.
    pub maps: usize,
}

/// Detaches every program and removes every pin under the layout. Links go first, so no
/// program runs against maps being removed. Safe to run when nothing is there.
pub fn cleanup(layout: &PinLayout) -> Result<Cleanup, LoadError> {
    let mut done = Cleanup::default();
    for (dir, count) in [
        (layout.links(), &mut done.links),
        (layout.maps(), &mut done.maps),
    ] {
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(io_err(&dir)(e)),
        };
        for entry in entries {
            let path = entry.map_err(io_err(&dir))?.path();
            fs::remove_file(&path).map_err(io_err(&path))?;
            *count += 1;
        }
        fs::remove_dir(&dir).map_err(io_err(&dir))?;
    }
    match fs::remove_dir(layout.root()) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err(layout.root())(e)),
        _ => Ok(done),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stale_map_pins_are_removed_and_current_ones_kept() {
        let root = std::env::temp_dir().join(format!("lb-stale-pins-{}", std::process::id()));
        let layout = PinLayout::new(&root);
        fs::create_dir_all(layout.maps()).unwrap();
        for name in [maps::RINGS, "lb_ring_v1", "lb_old_v0"] {
            fs::write(layout.map(name), b"").unwrap();
        }
        assert_eq!(
            remove_stale_map_pins(&layout).unwrap(),
            ["lb_old_v0", "lb_ring_v1"]
        );
        assert!(layout.map(maps::RINGS).exists());
        fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_embedded_object_matches_the_map_specs() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        // Global variables live in the object's data sections, which are maps too.
        let mut names: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        let mut expected: Vec<&str> = maps::ALL.iter().map(|s| s.name).collect();
        expected.sort();
        assert_eq!(
            names, expected,
            "the object declares exactly the specified maps"
        );
        for spec in &maps::ALL {
            let m = &obj.maps[spec.name];
            let found = MapSpec {
                name: spec.name,
                map_type: m.map_type(),
                key_size: m.key_size(),
                value_size: m.value_size(),
                max_entries: m.max_entries(),
                flags: m.map_flags(),
            };
            assert_eq!(&found, spec);
            assert!(
                matches!(m.pinning(), aya_obj::maps::PinningType::ByName),
                "{} is pinned by name",
                spec.name
            );
        }
    }

    #[test]
    fn the_embedded_object_has_every_program() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let mut names: Vec<&str> = obj.programs.keys().map(String::as_str).collect();
        names.sort();
        let mut expected = PROGRAMS.to_vec();
        expected.extend([
            RELEASE_PROGRAM,
            XDP_PROGRAM,
            XDP_PASS_PROGRAM,
            TC_PROGRAM,
            OVERLAY_PROGRAM,
        ]);
        expected.sort();
        assert_eq!(names, expected);
    }

    #[test]
    fn cleanup_of_nothing_succeeds() {
        let layout = PinLayout::new(std::env::temp_dir().join("lb-cleanup-nothing-here"));
        let done = cleanup(&layout).unwrap();
        assert_eq!((done.links, done.maps), (0, 0));
    }
}
