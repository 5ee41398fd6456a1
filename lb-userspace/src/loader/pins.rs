//! The pin directory ([`PinLayout`]), map capacities ([`MapSizes`]), and opening, checking and
//! replacing what is pinned.

use std::{
    ffi::CString,
    fs, io,
    os::{
        fd::{FromRawFd as _, OwnedFd},
        unix::ffi::OsStrExt as _,
    },
    path::{Path, PathBuf},
};

use aya::{
    maps::MapData,
    programs::links::{FdLink, PinnedLink},
};
use lb_common::maps::{self, MapSpec};

use super::LoadError;

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

pub(super) fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LoadError + '_ {
    move |source| LoadError::Io {
        path: path.to_owned(),
        source,
    }
}

/// `BPF_OBJ_GET` with `BPF_F_RDONLY`, which aya does not offer: the CLI never writes.
pub(super) fn obj_get_read_only(path: &Path) -> io::Result<OwnedFd> {
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
pub(super) fn check(path: &Path, data: &MapData, spec: &MapSpec) -> Result<u32, LoadError> {
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

/// Pins `link` at `path`, atomically replacing what was pinned there (whose link detaches
/// when its pin goes, unless it is this very link, updated in place).
pub(super) fn pin_over(link: FdLink, path: &Path, name: &'static str) -> Result<(), LoadError> {
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
pub(super) fn adopt_link(path: &Path) -> Result<Option<FdLink>, LoadError> {
    if !path.exists() {
        return Ok(None);
    }
    match PinnedLink::from_pin(path) {
        Ok(link) => Ok(Some(link.into())),
        // Not a link (or unreadable): attaching anew pins over it.
        Err(_) => Ok(None),
    }
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
