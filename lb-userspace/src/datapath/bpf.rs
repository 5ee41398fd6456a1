//! The datapath as BPF maps: written by the agent, read by the agent at start and by the CLI.

use std::io;

use aya::{
    Ebpf,
    maps::{HashMap, Map, MapData, MapError, PerCpuArray},
};
use lb_common::{
    AffinityMatchKey, Endpoint, ServiceInfo, ServiceKey, ServiceValue, SlotKey, maps, stats,
};

use super::{Capacities, Contents, Datapath, DatapathError, Op};
use crate::loader::{LoadError, PinLayout, open_pinned};

/// The maps the agent writes.
pub struct MapSet {
    services: HashMap<MapData, ServiceKey, ServiceValue>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Endpoint>,
    info: HashMap<MapData, u32, ServiceInfo>,
    affinity_match: HashMap<MapData, AffinityMatchKey, u8>,
}

fn hash_map<K: aya::Pod, V: aya::Pod>(
    name: &'static str,
    data: MapData,
) -> Result<HashMap<MapData, K, V>, LoadError> {
    HashMap::try_from(Map::HashMap(data)).map_err(|source| LoadError::Map { name, source })
}

fn take(ebpf: &mut Ebpf, name: &'static str) -> Result<MapData, LoadError> {
    match ebpf.take_map(name) {
        Some(Map::HashMap(data) | Map::LruHashMap(data) | Map::PerCpuArray(data)) => Ok(data),
        Some(_) | None => Err(LoadError::Missing(format!("map {name}"))),
    }
}

fn pinned(layout: &PinLayout, name: &'static str) -> Result<MapData, LoadError> {
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
    ) -> Result<(Self, Capacities), LoadError> {
        let (services, slots) = (get(maps::SERVICES)?, get(maps::SLOTS)?);
        let (backends, info) = (get(maps::BACKENDS)?, get(maps::SERVICE_INFO)?);
        let affinity_match = get(maps::AFFINITY_MATCH)?;
        let caps = Capacities {
            services: capacity(maps::SERVICES, &services)?
                .min(capacity(maps::SERVICE_INFO, &info)?),
            slots: capacity(maps::SLOTS, &slots)?,
            backends: capacity(maps::BACKENDS, &backends)?,
            affinity_match: capacity(maps::AFFINITY_MATCH, &affinity_match)?,
        };
        let set = Self {
            services: hash_map(maps::SERVICES, services)?,
            slots: hash_map(maps::SLOTS, slots)?,
            backends: hash_map(maps::BACKENDS, backends)?,
            info: hash_map(maps::SERVICE_INFO, info)?,
            affinity_match: hash_map(maps::AFFINITY_MATCH, affinity_match)?,
        };
        Ok((set, caps))
    }

    /// Opens the pinned maps read-only (the CLI).
    pub fn open_pinned(layout: &PinLayout) -> Result<Self, LoadError> {
        Self::from_data(|name| pinned(layout, name)).map(|(set, _)| set)
    }

    /// Everything the maps hold. Entries removed while reading are skipped.
    pub fn read(&self) -> Result<Contents, DatapathError> {
        Ok(Contents {
            services: read_all(maps::SERVICES, &self.services)?,
            slots: read_all(maps::SLOTS, &self.slots)?,
            backends: read_all(maps::BACKENDS, &self.backends)?,
            info: read_all(maps::SERVICE_INFO, &self.info)?,
            affinity_match: read_all(maps::AFFINITY_MATCH, &self.affinity_match)?
                .into_keys()
                .collect(),
        })
    }
}

/// Per-counter totals over all CPUs, indexed like `lb_common::stats`.
pub fn read_stats(layout: &PinLayout) -> Result<Vec<u64>, LoadError> {
    let data = pinned(layout, maps::STATS)?;
    let map: PerCpuArray<MapData, u64> =
        PerCpuArray::try_from(Map::PerCpuArray(data)).map_err(|source| LoadError::Map {
            name: maps::STATS,
            source,
        })?;
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
}

impl BpfDatapath {
    /// Takes the maps out of the loaded object.
    pub fn take(ebpf: &mut Ebpf) -> Result<Self, LoadError> {
        let (maps, caps) = MapSet::from_data(|name| take(ebpf, name))?;
        Ok(Self { maps, caps })
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
        };
        match result {
            Err(e) if !already_gone(&e) => Err(DatapathError::Write {
                op: Box::new(op.clone()),
                source: e.into(),
            }),
            _ => Ok(()),
        }
    }

    fn capacities(&self) -> Capacities {
        self.caps
    }
}
