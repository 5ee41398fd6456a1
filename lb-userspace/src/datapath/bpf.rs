//! The datapath as BPF maps: written by the agent, read by the agent at start and by the CLI.

use std::{
    collections::BTreeMap,
    io,
    os::fd::{AsFd as _, AsRawFd as _},
    ptr::NonNull,
};

use aya::{
    Ebpf,
    maps::{
        Array, HashMap, Map, MapData, MapError, PerCpuArray, PerCpuValues,
        lpm_trie::{Key, LpmTrie},
    },
};
use lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, Endpoint, RevNatKey, ServiceInfo,
    ServiceKey, ServiceValue, SlotKey,
    external::{
        CtEntry, ExternalAffinityKey, ExternalAffinityMatchKey, ExternalAffinityValue,
        ExternalCounters, ExternalService, FlowKey, FlowRevNat, SourceRange,
    },
    maps,
    stats::{self, SocketCounters},
};

use super::{Capacities, Contents, Datapath, DatapathError, Op, rcu::Grace};
use crate::loader::{LoadError, PinLayout, open_pinned};

/// The maps the agent writes.
pub struct MapSet {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    info: HashMap<MapData, u32, ServiceInfo>,
    affinity_match: HashMap<MapData, AffinityMatchKey, u8>,
    external: HashMap<MapData, ServiceKey, ExternalService>,
    external_info: HashMap<MapData, u32, ServiceInfo>,
    ranges: LpmTrie<MapData, SourceRange, u8>,
    external_match: HashMap<MapData, ExternalAffinityMatchKey, u32>,
    counters: PerCpuArray<MapData, ExternalCounters>,
    svc_stats: Array<MapData, SocketCounters>,
    be_stats: Array<MapData, u64>,
    tables: Tables,
}

/// The lookup table array. The agent maps it into memory (the map is `BPF_F_MMAPABLE`) and
/// writes whole regions without a system call per entry. The CLI, whose read-only map file
/// cannot be mapped shared, reads entries by lookup.
pub struct Tables {
    entries: usize,
    access: Access,
}

enum Access {
    Mapped(Mapping),
    Lookup(Array<MapData, maps::TablePair>),
}

/// A shared, writable mapping of the array. Its elements are pairs of entries, 8 bytes each
/// with no padding, so the mapping is one dense array of `u32` entries.
struct Mapping {
    _data: MapData,
    ptr: NonNull<u32>,
    bytes: usize,
}

const LANES: usize = maps::TABLE_LANES as usize;

// SAFETY: the mapping is owned by this value and only accessed through `&self`/`&mut self`.
unsafe impl Send for Mapping {}

impl Mapping {
    fn new(name: &'static str, data: MapData, entries: usize) -> Result<Self, LoadError> {
        // SAFETY: sysconf has no preconditions.
        let page = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096);
        let bytes = (entries * 4).div_ceil(page) * page;
        // SAFETY: mapping a BPF array's fd as the kernel documents for BPF_F_MMAPABLE maps;
        // the length is the array's data rounded up to a page.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                data.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(LoadError::Map {
                name,
                source: MapError::SyscallError(aya::sys::SyscallError {
                    call: "mmap",
                    io_error: io::Error::last_os_error(),
                }),
            });
        }
        Ok(Self {
            _data: data,
            ptr: NonNull::new(ptr.cast()).expect("mmap never returns null on success"),
            bytes,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.bytes) };
    }
}

impl Tables {
    fn open(name: &'static str, data: MapData, writable: bool) -> Result<Self, LoadError> {
        let entries = capacity(name, &data)? as usize * LANES;
        let access = if writable {
            Access::Mapped(Mapping::new(name, data, entries)?)
        } else {
            Access::Lookup(
                Array::try_from(Map::Array(data))
                    .map_err(|source| LoadError::Map { name, source })?,
            )
        };
        Ok(Self { entries, access })
    }

    /// Entries `start..start + len`, if inside the array.
    fn read(&self, start: u32, len: u32) -> Option<Vec<u32>> {
        if (start as usize).checked_add(len as usize)? > self.entries {
            return None;
        }
        match &self.access {
            // SAFETY: inside the mapping; u32 reads of memory the kernel may update
            // concurrently are done as volatile reads.
            Access::Mapped(m) => Some(
                (start as usize..(start + len) as usize)
                    .map(|i| unsafe { m.ptr.as_ptr().add(i).read_volatile() })
                    .collect(),
            ),
            Access::Lookup(array) => (start..start + len)
                .map(|i| {
                    let pair = array.get(&(i / maps::TABLE_LANES), 0).ok()?;
                    Some(pair[i as usize % LANES])
                })
                .collect(),
        }
    }

    /// Writes `values` from index `start` on. Each entry is one aligned 32-bit store, so the
    /// kernel reads either the old or the new backend id.
    fn write(&mut self, start: u32, values: impl ExactSizeIterator<Item = u32>) -> io::Result<()> {
        let start = start as usize;
        let Access::Mapped(m) = &mut self.access else {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                "the table array is open read-only",
            ));
        };
        if start + values.len() > self.entries {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "entries {start}..{} are outside the table array of {}",
                    start + values.len(),
                    self.entries
                ),
            ));
        }
        for (i, v) in values.enumerate() {
            // SAFETY: inside the writable mapping, checked above.
            unsafe { m.ptr.as_ptr().add(start + i).write_volatile(v) };
        }
        Ok(())
    }
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    data: MapData,
) -> Result<HashMap<MapData, K, V>, LoadError> {
    HashMap::try_from(Map::HashMap(data)).map_err(|source| LoadError::Map { name, source })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, LoadError> {
    match ebpf.take_map(name) {
        Some(
            Map::HashMap(data)
            | Map::LruHashMap(data)
            | Map::PerCpuArray(data)
            | Map::Array(data)
            | Map::LpmTrie(data),
        ) => Ok(data),
        Some(_) | None => Err(LoadError::Missing(format!("map {name}"))),
    }
}

/// The map `name` pinned under `layout`, opened read-only and checked against its spec; an
/// error saying so when it is not pinned.
pub fn pinned(layout: &PinLayout, name: &'static str) -> Result<MapData, LoadError> {
    let spec = maps::ALL
        .iter()
        .find(|s| s.name == name)
        .expect("every map has a spec");
    open_pinned(layout, spec)?.ok_or_else(|| LoadError::Io {
        path: layout.map(name),
        source: io::Error::new(
            io::ErrorKind::NotFound,
            "not pinned: is the agent installed, and is this the pin directory it uses?",
        ),
    })
}

/// The pinned map `name` as the typed map `M` (`kind` says which [`Map`] variant it is).
fn open_as<M: TryFrom<Map, Error = MapError>>(
    layout: &PinLayout,
    name: &'static str,
    kind: fn(MapData) -> Map,
) -> Result<M, LoadError> {
    M::try_from(kind(pinned(layout, name)?)).map_err(|source| LoadError::Map { name, source })
}

fn read_all<K: aya::Pod + Ord, V: aya::Pod>(
    name: &'static str,
    map: &HashMap<MapData, K, V>,
) -> Result<std::collections::BTreeMap<K, V>, DatapathError> {
    map.iter()
        .collect::<Result<_, MapError>>()
        .map_err(|e| DatapathError::Read {
            map: name,
            source: e.into(),
        })
}

fn capacity(name: &'static str, data: &MapData) -> Result<u32, LoadError> {
    data.info()
        .map(|i| i.max_entries())
        .map_err(|source| LoadError::Map { name, source })
}

impl MapSet {
    /// The maps, and the capacities of those the agent writes.
    fn from_data(
        mut get: impl FnMut(&'static str) -> Result<MapData, LoadError>,
        writable: bool,
    ) -> Result<(Self, Capacities), LoadError> {
        let (services, slots) = (get(maps::SERVICES)?, get(maps::SLOTS)?);
        let (backends, info) = (get(maps::BACKENDS)?, get(maps::SERVICE_INFO)?);
        let affinity_match = get(maps::AFFINITY_MATCH)?;
        let (external, external_info) = (get(maps::EXTERNAL_SERVICES)?, get(maps::EXTERNAL_INFO)?);
        let (ranges, counters) = (get(maps::SOURCE_RANGES)?, get(maps::EXTERNAL_STATS)?);
        let external_match = get(maps::EXTERNAL_AFFINITY_MATCH)?;
        let tables = Tables::open(maps::TABLES, get(maps::TABLES)?, writable)?;
        let (svc_stats, be_stats) = (get(maps::SVC_STATS)?, get(maps::BE_STATS)?);
        // Ids run from 1 to the capacity: the counter arrays hold one more entry.
        let caps = Capacities {
            services: capacity(maps::SERVICES, &services)?
                .min(capacity(maps::SERVICE_INFO, &info)?)
                .min(capacity(maps::SVC_STATS, &svc_stats)?.saturating_sub(1)),
            slots: capacity(maps::SLOTS, &slots)?,
            backends: capacity(maps::BACKENDS, &backends)?
                .min(capacity(maps::BE_STATS, &be_stats)?.saturating_sub(1)),
            affinity_match: capacity(maps::AFFINITY_MATCH, &affinity_match)?,
            external: capacity(maps::EXTERNAL_SERVICES, &external)?,
            // Id 0 is never used: the maps hold ids 1..capacity.
            external_ids: capacity(maps::EXTERNAL_INFO, &external_info)?
                .min(capacity(maps::EXTERNAL_STATS, &counters)?)
                .saturating_sub(1),
            table_entries: tables.entries as u32,
            ranges: capacity(maps::SOURCE_RANGES, &ranges)?,
            external_match: capacity(maps::EXTERNAL_AFFINITY_MATCH, &external_match)?,
        };
        let map_err = |name| move |source| LoadError::Map { name, source };
        let set = Self {
            services: hash_map(maps::SERVICES, services)?,
            slots: hash_map(maps::SLOTS, slots)?,
            backends: hash_map(maps::BACKENDS, backends)?,
            info: hash_map(maps::SERVICE_INFO, info)?,
            affinity_match: hash_map(maps::AFFINITY_MATCH, affinity_match)?,
            external: hash_map(maps::EXTERNAL_SERVICES, external)?,
            external_info: hash_map(maps::EXTERNAL_INFO, external_info)?,
            ranges: LpmTrie::try_from(Map::LpmTrie(ranges))
                .map_err(map_err(maps::SOURCE_RANGES))?,
            external_match: hash_map(maps::EXTERNAL_AFFINITY_MATCH, external_match)?,
            counters: PerCpuArray::try_from(Map::PerCpuArray(counters))
                .map_err(map_err(maps::EXTERNAL_STATS))?,
            svc_stats: Array::try_from(Map::Array(svc_stats)).map_err(map_err(maps::SVC_STATS))?,
            be_stats: Array::try_from(Map::Array(be_stats)).map_err(map_err(maps::BE_STATS))?,
            tables,
        };
        Ok((set, caps))
    }

    /// Opens the pinned maps read-only (the CLI).
    pub fn open_pinned(layout: &PinLayout) -> Result<Self, LoadError> {
        Self::open_pinned_with_capacities(layout).map(|(set, _)| set)
    }

    /// Opens the pinned maps read-only, with the capacities of those the agent writes.
    pub fn open_pinned_with_capacities(
        layout: &PinLayout,
    ) -> Result<(Self, Capacities), LoadError> {
        Self::from_data(|name| pinned(layout, name), false)
    }

    /// Everything the maps hold. Entries removed while reading are skipped.
    pub fn read(&self) -> Result<Contents, DatapathError> {
        let external = read_all(maps::EXTERNAL_SERVICES, &self.external)?;
        let mut tables = BTreeMap::new();
        for v in external.values().filter(|v| v.table_size > 0) {
            if let Some(t) = self.tables.read(v.table_off, v.table_size) {
                tables.insert(v.table_off, t);
            }
        }
        let ranges = self
            .ranges
            .keys()
            .map(|k| k.map(|k| (k.prefix_len(), k.data())))
            .collect::<Result<_, MapError>>()
            .map_err(|e| DatapathError::Read {
                map: maps::SOURCE_RANGES,
                source: e.into(),
            })?;
        Ok(Contents {
            services: read_all(maps::SERVICES, &self.services)?,
            slots: read_all(maps::SLOTS, &self.slots)?,
            backends: read_all(maps::BACKENDS, &self.backends)?,
            info: read_all(maps::SERVICE_INFO, &self.info)?,
            affinity_match: read_all(maps::AFFINITY_MATCH, &self.affinity_match)?
                .into_keys()
                .collect(),
            external,
            tables,
            external_info: read_all(maps::EXTERNAL_INFO, &self.external_info)?,
            ranges,
            external_match: read_all(maps::EXTERNAL_AFFINITY_MATCH, &self.external_match)?,
        })
    }

    /// The counters of north-south service `id`, summed over CPUs.
    pub fn counters(&self, id: u32) -> Result<ExternalCounters, MapError> {
        sum_counters(&self.counters, id)
    }

    /// Lookup table entries `start..start + len`, if inside the array.
    pub fn table(&self, start: u32, len: u32) -> Option<Vec<u32>> {
        self.tables.read(start, len)
    }
}

/// Up to `limit` entries of the LRU map `name` (the conntrack map, the affinity maps; entries
/// evicted or replaced while reading are skipped).
pub fn read_lru<K: aya::Pod, V: aya::Pod>(
    layout: &PinLayout,
    name: &'static str,
    limit: usize,
) -> Result<Vec<(K, V)>, LoadError> {
    let map: HashMap<MapData, K, V> = open_as(layout, name, Map::LruHashMap)?;
    Ok(map.iter().filter_map(Result::ok).take(limit).collect())
}

/// Up to `limit` tracked north-south flows: the answered ones, then the new ones (a flow
/// being answered while this reads may show in both: the answered entry is kept).
pub fn read_flows(layout: &PinLayout, limit: usize) -> Result<Vec<(FlowKey, CtEntry)>, LoadError> {
    let mut flows: Vec<(FlowKey, CtEntry)> = read_lru(layout, maps::CONNTRACK, limit)?;
    let answered: std::collections::HashSet<FlowKey> = flows.iter().map(|(k, _)| *k).collect();
    let left = limit.saturating_sub(flows.len());
    let new: Vec<(FlowKey, CtEntry)> = read_lru(layout, maps::CT_NEW, left)?;
    flows.extend(new.into_iter().filter(|(k, _)| !answered.contains(k)));
    Ok(flows)
}

/// The clock the hooks stamp affinity entries with (`bpf_ktime_get_coarse_ns`: the coarse
/// monotonic clock), now, in nanoseconds.
pub fn coarse_now_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64) * 1_000_000_000 + ts.tv_nsec as u64
}

/// Entries and capacity of the maps the programs write (socket reverse NAT, connected UDP
/// sockets and affinity, conntrack and north-south reverse NAT, of answered and of new flows,
/// north-south affinity), their entries counted by walking the keys: map name -> (entries,
/// capacity).
pub fn lru_fill(layout: &PinLayout) -> Result<Vec<(&'static str, u64, u64)>, LoadError> {
    fn count<K: aya::Pod, V: aya::Pod>(
        layout: &PinLayout,
        name: &'static str,
    ) -> Result<(&'static str, u64, u64), LoadError> {
        let data = pinned(layout, name)?;
        let cap = capacity(name, &data)?;
        let map = match name {
            maps::UDP_SOCKETS => Map::HashMap(data),
            _ => Map::LruHashMap(data),
        };
        let map: HashMap<MapData, K, V> =
            HashMap::try_from(map).map_err(|source| LoadError::Map { name, source })?;
        let entries = map.keys().filter(Result::is_ok).count();
        Ok((name, entries as u64, u64::from(cap)))
    }
    Ok(vec![
        count::<RevNatKey, Endpoint>(layout, maps::REV_NAT)?,
        count::<u64, lb_common::UdpSocket>(layout, maps::UDP_SOCKETS)?,
        count::<AffinityKey, AffinityValue>(layout, maps::AFFINITY)?,
        count::<FlowKey, CtEntry>(layout, maps::CONNTRACK)?,
        count::<FlowKey, FlowRevNat>(layout, maps::EXTERNAL_REV_NAT)?,
        count::<FlowKey, CtEntry>(layout, maps::CT_NEW)?,
        count::<FlowKey, FlowRevNat>(layout, maps::EXTERNAL_REV_NAT_NEW)?,
        count::<ExternalAffinityKey, ExternalAffinityValue>(layout, maps::EXTERNAL_AFFINITY)?,
    ])
}

fn sum_counters<T: std::borrow::Borrow<MapData>>(
    map: &PerCpuArray<T, ExternalCounters>,
    id: u32,
) -> Result<ExternalCounters, MapError> {
    let per_cpu = map.get(&id, 0)?;
    Ok(per_cpu
        .iter()
        .fold(ExternalCounters::default(), |a, c| ExternalCounters {
            packets: a.packets + c.packets,
            bytes: a.bytes + c.bytes,
            flows: a.flows + c.flows,
            drops: a.drops + c.drops,
        }))
}

/// The counters of the north-south services `ids`, summed over CPUs (ids outside the map
/// are skipped).
pub fn read_ns_counters(
    layout: &PinLayout,
    ids: &[u32],
) -> Result<BTreeMap<u32, ExternalCounters>, LoadError> {
    let map: PerCpuArray<MapData, ExternalCounters> =
        open_as(layout, maps::EXTERNAL_STATS, Map::PerCpuArray)?;
    Ok(ids
        .iter()
        .filter_map(|id| sum_counters(&map, *id).ok().map(|c| (*id, c)))
        .collect())
}

/// The names of the north-south services by id (the info map).
pub fn read_ns_info(layout: &PinLayout) -> Result<BTreeMap<u32, ServiceInfo>, LoadError> {
    let map: HashMap<MapData, u32, ServiceInfo> =
        open_as(layout, maps::EXTERNAL_INFO, Map::HashMap)?;
    Ok(map.iter().filter_map(Result::ok).collect())
}

/// The socket-level frontends with their service ids and names, and the backends by id:
/// what the per-service and per-backend counters are labelled with.
#[derive(Debug)]
pub struct SocketLabels {
    /// Frontend, service id, and the info of that id.
    pub frontends: Vec<(ServiceKey, u32, Option<ServiceInfo>)>,
    /// Backends by id.
    pub backends: BTreeMap<u32, Backend>,
}

/// Reads [`SocketLabels`] from the pinned maps (entries changing meanwhile are skipped).
pub fn read_socket_labels(layout: &PinLayout) -> Result<SocketLabels, LoadError> {
    let services: HashMap<_, ServiceKey, ServiceValue> =
        open_as(layout, maps::SERVICES, Map::HashMap)?;
    let info: HashMap<_, u32, ServiceInfo> = open_as(layout, maps::SERVICE_INFO, Map::HashMap)?;
    let backends: HashMap<_, u32, Backend> = open_as(layout, maps::BACKENDS, Map::HashMap)?;
    let names: BTreeMap<u32, ServiceInfo> = info.iter().filter_map(Result::ok).collect();
    Ok(SocketLabels {
        frontends: services
            .iter()
            .filter_map(Result::ok)
            .map(|(k, v)| (k, v.id, names.get(&v.id).copied()))
            .collect(),
        backends: backends.iter().filter_map(Result::ok).collect(),
    })
}

/// Socket-level counters: per frontend by service id, and per backend by backend id.
pub type SocketCounts = (BTreeMap<u32, SocketCounters>, BTreeMap<u32, u64>);

/// The socket-level counters of the frontends (by service id) and backends (by backend id)
/// asked for; ids outside the arrays are skipped.
pub fn read_socket_counters(
    layout: &PinLayout,
    services: &[u32],
    backends: &[u32],
) -> Result<SocketCounts, LoadError> {
    let svc: Array<MapData, SocketCounters> = open_as(layout, maps::SVC_STATS, Map::Array)?;
    let be: Array<MapData, u64> = open_as(layout, maps::BE_STATS, Map::Array)?;
    Ok((
        services
            .iter()
            .filter_map(|id| svc.get(id, 0).ok().map(|c| (*id, c)))
            .collect(),
        backends
            .iter()
            .filter_map(|id| be.get(id, 0).ok().map(|c| (*id, c)))
            .collect(),
    ))
}

/// Per-counter totals over all CPUs, indexed like `lb_common::stats`.
pub fn read_stats(layout: &PinLayout) -> Result<Vec<u64>, LoadError> {
    let map: PerCpuArray<MapData, u64> = open_as(layout, maps::STATS, Map::PerCpuArray)?;
    (0..stats::COUNT)
        .map(|i| {
            map.get(&i, 0)
                .map(|per_cpu| per_cpu.iter().sum())
                .map_err(|source| LoadError::Map {
                    name: maps::STATS,
                    source,
                })
        })
        .collect()
}

/// The agent's datapath: the maps of the loaded object.
pub struct BpfDatapath {
    maps: MapSet,
    caps: Capacities,
    grace: Grace,
}

impl BpfDatapath {
    /// Takes the maps out of the loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        let (maps, caps) = MapSet::from_data(|name| take(ebpf, name), true)?;
        let grace = Grace::new().map_err(|source| LoadError::Map {
            name: "lb_grace",
            source,
        })?;
        Ok(Self { maps, caps, grace })
    }
}

fn write_error(op: &Op, e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> DatapathError {
    DatapathError::Write {
        op: Box::new(op.clone()),
        source: e.into(),
    }
}

/// Whether a failed delete only found the key already gone.
fn already_gone(e: &MapError) -> bool {
    match e {
        MapError::KeyNotFound => true,
        MapError::SyscallError(s) => s.io_error.raw_os_error() == Some(libc::ENOENT),
        _ => false,
    }
}

impl Datapath for BpfDatapath {
    fn read(&self) -> Result<Contents, DatapathError> {
        self.maps.read()
    }

    fn apply(&mut self, op: &Op) -> Result<(), DatapathError> {
        let m = &mut self.maps;
        let result = match op {
            Op::PutBackend(id, ep) => m.backends.insert(id, ep, 0),
            Op::PutSlot(key, backend) => m.slots.insert(key, backend, 0),
            Op::PutInfo(id, info) => m.info.insert(id, info, 0),
            Op::PutService(key, value) => m.services.insert(key, value, 0),
            Op::DeleteService(key) => m.services.remove(key),
            Op::DeleteSlot(key) => m.slots.remove(key),
            Op::DeleteInfo(id) => m.info.remove(id),
            Op::DeleteBackend(id) => m.backends.remove(id),
            Op::PutMatch(key) => m.affinity_match.insert(key, 1, 0),
            Op::DeleteMatch(key) => m.affinity_match.remove(key),
            Op::PutExternal(key, value) => m.external.insert(key, value, 0),
            Op::DeleteExternal(key) => m.external.remove(key),
            Op::PutExternalInfo(id, info) => m.external_info.insert(id, info, 0),
            Op::DeleteExternalInfo(id) => m.external_info.remove(id),
            Op::PutExternalMatch(key, timeout_s) => m.external_match.insert(key, timeout_s, 0),
            Op::DeleteExternalMatch(key) => m.external_match.remove(key),
            Op::PutRange((len, data)) => m.ranges.insert(&Key::new(*len, *data), 1, 0),
            Op::DeleteRange((len, data)) => m.ranges.remove(&Key::new(*len, *data)),
            Op::ResetCounters(id) => aya::util::nr_cpus()
                .map_err(|(_, e)| e)
                .and_then(|n| PerCpuValues::try_from(vec![ExternalCounters::default(); n]))
                .map_err(|io_error| {
                    MapError::SyscallError(aya::sys::SyscallError {
                        call: "nr_cpus",
                        io_error,
                    })
                })
                .and_then(|zero| m.counters.set(*id, zero, 0)),
            Op::ResetServiceCounters(id) => m.svc_stats.set(*id, SocketCounters::default(), 0),
            Op::ResetBackendCounters(id) => m.be_stats.set(*id, 0, 0),
            Op::PutTable { start, at, ids } => {
                return m
                    .tables
                    .write(start + at, ids.iter().copied())
                    .map_err(|e| write_error(op, e));
            }
            Op::ClearTable { start, len } => {
                return m
                    .tables
                    .write(*start, std::iter::repeat_n(0, *len as usize))
                    .map_err(|e| write_error(op, e));
            }
        };
        match result {
            Err(e) if !already_gone(&e) => Err(write_error(op, e)),
            _ => Ok(()),
        }
    }

    fn capacities(&self) -> Capacities {
        self.caps
    }

    fn begin_grace(&mut self) -> u64 {
        self.grace.begin()
    }

    fn graces_ended(&self) -> u64 {
        self.grace.done()
    }

    fn wait_grace(&mut self, n: u64) -> Result<(), DatapathError> {
        self.grace
            .wait(n)
            .map_err(|e| DatapathError::Grace(e.into()))
    }
}
