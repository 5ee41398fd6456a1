//! Loading the kernel object, pinning its maps and links, and removing them again.
//!
//! Everything lives under one bpffs directory ([`PinLayout`]): `maps/<name>` and
//! `links/<program>`. Pinned maps are reused by a restarted agent, after checking that their
//! type and layout are what this build expects (aya would reuse them unchecked). Pinned links
//! keep the programs attached while no agent runs; a new agent attaches its programs first and
//! then renames the new link pins over the old ones, so there is never a moment without a
//! program on the cgroup.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::{ffi::OsStrExt as _, fs::DirBuilderExt as _},
    },
    path::{Path, PathBuf},
};

use aya::{
    Ebpf, EbpfLoader,
    maps::{MapData, MapError},
    programs::{CgroupAttachMode, CgroupSockAddr, ProgramError, links::FdLink},
};
use lb_common::maps::{self, MapSpec};
use tracing::{info, warn};

use crate::{EBPF_OBJECT, datapath::bpf::BpfDatapath};

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
}

impl MapSizes {
    fn of(&self, name: &str) -> Option<u32> {
        match name {
            maps::SERVICES | maps::SERVICE_INFO => Some(self.services),
            // A service with affinity has one match entry per slot.
            maps::SLOTS | maps::AFFINITY_MATCH => Some(self.slots),
            maps::BACKENDS => Some(self.backends),
            maps::REV_NAT => Some(self.rev_nat),
            maps::AFFINITY => Some(self.affinity),
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

/// The loaded object: maps created or adopted, programs verified and loaded.
pub struct Loaded {
    ebpf: Ebpf,
    layout: PinLayout,
}

impl Loaded {
    /// Loads the embedded object, reusing compatible pinned maps and creating (and pinning)
    /// the others with `sizes`.
    pub fn load(layout: &PinLayout, sizes: &MapSizes) -> Result<Self, LoadError> {
        for dir in [layout.root().to_owned(), layout.maps(), layout.links()] {
            fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&dir)
                .map_err(io_err(&dir))?;
        }
        let mut loader = EbpfLoader::new();
        loader.default_map_pin_directory(layout.maps());
        for spec in &maps::ALL {
            match open_pinned(layout, spec)? {
                Some(data) => {
                    let pinned = data.info().map(|i| i.max_entries()).unwrap_or_default();
                    match sizes.of(spec.name) {
                        Some(want) if want != pinned => warn!(
                            map = spec.name,
                            pinned,
                            configured = want,
                            "adopting a pinned map whose capacity differs from the configured \
                             one; the pinned capacity applies until the map is recreated"
                        ),
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
        let mut ebpf = loader.load(EBPF_OBJECT)?;
        for name in PROGRAMS {
            program(&mut ebpf, name)?
                .load()
                .map_err(|source| LoadError::Program { name, source })?;
        }
        Ok(Self {
            ebpf,
            layout: layout.clone(),
        })
    }

    /// Takes the maps the agent writes.
    pub fn datapath(&mut self) -> Result<BpfDatapath, LoadError> {
        BpfDatapath::take(&mut self.ebpf)
    }

    /// Attaches every program to the cgroup at `cgroup` and pins the links, replacing the
    /// links of an earlier run only once the new ones are attached.
    pub fn attach(&mut self, cgroup: &Path) -> Result<(), LoadError> {
        let cg = fs::File::open(cgroup).map_err(io_err(cgroup))?;
        let links = self.layout.links();
        for name in PROGRAMS {
            let prog = program(&mut self.ebpf, name)?;
            let perr = |source| LoadError::Program { name, source };
            let id = prog.attach(&cg, CgroupAttachMode::Single).map_err(perr)?;
            let link = prog.take_link(id).map_err(perr)?;
            let link: FdLink = link
                .try_into()
                .map_err(|source| LoadError::Link { name, source })?;
            // bpffs refuses names with a dot.
            let tmp = links.join(format!("{name}-new"));
            let _stale = fs::remove_file(&tmp);
            link.pin(&tmp)
                .map_err(|source| LoadError::Pin { name, source })?;
            // Atomically replaces the old pin; its link detaches when the pin goes.
            let path = self.layout.link(name);
            fs::rename(&tmp, &path).map_err(io_err(&path))?;
        }
        Ok(())
    }
}

fn program<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut CgroupSockAddr, LoadError> {
    ebpf.program_mut(name)
        .ok_or_else(|| LoadError::Missing(format!("program {name}")))?
        .try_into()
        .map_err(|source| LoadError::Program { name, source })
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
    fn the_embedded_object_matches_the_map_specs() {
        let obj = aya_obj::Object::parse(EBPF_OBJECT).expect("the embedded object parses");
        let mut names: Vec<&str> = obj.maps.keys().map(String::as_str).collect();
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
