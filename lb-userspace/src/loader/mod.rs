//! Loading the kernel object, pinning its maps and links, and removing them again.
//!
//! Everything lives under one bpffs directory ([`PinLayout`]): `maps/<name>` and
//! `links/<program>`. Pinned maps are reused by a restarted agent, after checking that their
//! type and layout are what this build expects (aya would reuse them unchecked). Pinned links
//! keep the programs attached while no agent runs; a new agent (once its maps are written)
//! attaches its programs first and then renames the new link pins over the old ones, so
//! there is never a moment without a program on the cgroup.
//!
//! The files: this one loads the object ([`Loaded`]); `pins` (the layout, capacities,
//! opening and checking pins), `migrate` (resized maps and earlier layouts), `attach` (the
//! cgroup and the devices), `test_run` (`BPF_PROG_TEST_RUN`), `cleanup`, and [`host`] (bpffs
//! and cgroup2 on the node).

pub mod host;

mod attach;
mod cleanup;
mod migrate;
mod pins;
mod test_run;

use self::{
    migrate::{copy_map, resize_pin},
    pins::io_err,
};
pub use attach::attached_devices;
pub use cleanup::{Cleanup, cleanup};
pub use pins::{MapSizes, PinLayout, open_pinned, open_writable, remove_stale_map_pins};
pub use test_run::{TestRunOutput, run_attached_xdp};

use std::{
    fs, io,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::PathBuf,
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{HashMap, MapData, MapError},
    programs::{CgroupSock, CgroupSockAddr, ProgramError, SchedClassifier, Xdp},
};
use lb_common::{
    external::{self, CtTimeouts},
    maps,
};
use tracing::info;

use crate::{EBPF_OBJECT, datapath::bpf::BpfDatapath, datapath::catalogue};

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
    /// aya-log's ring buffer could not be opened.
    #[error("the programs' log: {0}")]
    Log(#[source] aya_log::Error),
    /// The overlay program parses Ethernet frames; this device carries none.
    #[error(
        "{device} is not an Ethernet device (hardware type {hardware_type:?}): the overlay \
         program parses Ethernet frames, so replies arriving on an L3 device (WireGuard, \
         IPIP) cannot be reversed"
    )]
    NotEthernet {
        /// The device.
        device: String,
        /// Its ARPHRD_* type, if it could be read.
        hardware_type: Option<u16>,
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
    /// The programs log their decisions (see [`Loaded::kernel_log`]), or not (the logging
    /// code is then removed by the verifier).
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
                    match catalogue::size_of(spec.name, sizes) {
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
                    if let Some(size) = catalogue::size_of(spec.name, sizes) {
                        loader.map_max_entries(spec.name, size);
                    }
                }
            }
        }
        loader.override_global(external::SNAT_PORT_MIN_GLOBAL, &settings.snat_ports.0, true);
        loader.override_global(external::SNAT_PORT_MAX_GLOBAL, &settings.snat_ports.1, true);
        loader.override_global(external::CT_TIMEOUTS_GLOBAL, &settings.ct_timeouts, true);
        loader.override_global(
            external::CT_CLOCK_OFFSET_GLOBAL,
            &settings.clock_offset,
            true,
        );
        // Nothing is logged unless asked for: the verifier then removes the logging code.
        let log_level: u8 = if settings.debug {
            aya_log::Level::Debug.into()
        } else {
            0
        };
        loader.override_global(aya_log::LEVEL, &log_level, true);
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

    /// Takes the maps the agent writes.
    pub fn datapath(&mut self) -> Result<BpfDatapath, LoadError> {
        BpfDatapath::take(&mut self.ebpf)
    }

    /// The size in bytes of program `name` as the verifier left it (dead code removed).
    pub fn translated_size(&self, name: &str) -> Option<u32> {
        self.ebpf.program(name)?.info().ok()?.size_translated()
    }

    /// The programs' log lines (written only when loaded with `debug`), handed to `logger`
    /// as they are read from the ring (see [`aya_log::EbpfLogger::flush`]).
    pub fn kernel_log<T: log::Log>(
        &mut self,
        logger: T,
    ) -> Result<aya_log::EbpfLogger<T>, LoadError> {
        aya_log::EbpfLogger::init_with_logger(&mut self.ebpf, logger).map_err(LoadError::Log)
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

#[cfg(test)]
mod tests {
    use lb_common::maps::MapSpec;

    use super::*;

    #[test]
    fn stale_map_pins_are_removed_and_current_ones_kept() {
        let root = std::env::temp_dir().join(format!("lb-stale-pins-{}", std::process::id()));
        let layout = PinLayout::new(&root);
        fs::create_dir_all(layout.maps()).unwrap();
        for name in [maps::TABLES, "lb_ring_v1", "lb_old_v0"] {
            fs::write(layout.map(name), b"").unwrap();
        }
        assert_eq!(
            remove_stale_map_pins(&layout).unwrap(),
            ["lb_old_v0", "lb_ring_v1"]
        );
        assert!(layout.map(maps::TABLES).exists());
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
        names.sort_unstable();
        let mut expected: Vec<&str> = maps::ALL.iter().map(|s| s.name).collect();
        // aya-log's ring, made per load and not pinned.
        expected.push(maps::KERNEL_LOG);
        expected.sort_unstable();
        assert_eq!(
            names, expected,
            "the object declares exactly the specified maps"
        );
        assert!(
            matches!(
                obj.maps[maps::KERNEL_LOG].pinning(),
                aya_obj::maps::PinningType::None
            ),
            "the log ring is the loading agent's alone"
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
        names.sort_unstable();
        let mut expected = PROGRAMS.to_vec();
        expected.extend([
            RELEASE_PROGRAM,
            XDP_PROGRAM,
            XDP_PASS_PROGRAM,
            TC_PROGRAM,
            OVERLAY_PROGRAM,
        ]);
        expected.sort_unstable();
        assert_eq!(names, expected);
    }

    #[test]
    fn cleanup_of_nothing_succeeds() {
        let layout = PinLayout::new(std::env::temp_dir().join("lb-cleanup-nothing-here"));
        let done = cleanup(&layout).unwrap();
        assert_eq!((done.links, done.maps), (0, 0));
    }
}
