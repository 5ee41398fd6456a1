//! Resized maps and maps of earlier layouts: their entries copied into the new ones.

use std::path::{Path, PathBuf};

use aya::maps::{HashMap, Map, MapData, MapError};
use lb_common::maps;

use super::{LoadError, pins::PinLayout};

/// Where the old map of a map being resized is pinned until the new programs replace the
/// running ones (then [`remove_stale_map_pins`] removes it).
pub(super) fn resize_pin(layout: &PinLayout, name: &str) -> PathBuf {
    layout.map(&format!("{name}-old"))
}

/// Whether the programs write map `name` (flows, reverse NAT, affinity, connected UDP
/// sockets), so that a copy made at load misses what they wrote since.
pub(super) fn written_by_programs(name: &str) -> bool {
    name == maps::UDP_SOCKETS
        || maps::ALL
            .iter()
            .any(|s| s.name == name && s.map_type == maps::TYPE_LRU_HASH)
}

/// Copies the entries of the map pinned at `from` (set aside by a resize, or of an earlier
/// layout that [`maps::MIGRATIONS`] names) into map `name`; returns how many. Entries beyond a
/// smaller new capacity are left out (the agent then refuses what does not fit, as for any
/// full map). Per-CPU counters start from zero.
pub(super) fn copy_map(
    from: &Path,
    layout: &PinLayout,
    name: &'static str,
) -> Result<usize, LoadError> {
    use aya::maps::{Array, lpm_trie::LpmTrie};
    use lb_common::{
        AffinityKey, AffinityMatchKey, AffinityValue, Backend, Endpoint, RevNatKey, ServiceInfo,
        ServiceKey, ServiceValue, SlotKey, UdpSocket,
        external::{
            CtEntry, ExternalAffinityKey, ExternalAffinityMatchKey, ExternalAffinityValue,
            ExternalService, FlowKey, FlowRevNat, SourceRange,
        },
        maps::TablePair,
        stats::SocketCounters,
    };
    let merr = move |source| LoadError::Map { name, source };
    let old = MapData::from_pin(from).map_err(merr)?;
    let new = MapData::from_pin(layout.map(name)).map_err(merr)?;
    pub(super) fn hash<K: aya::Pod, V: aya::Pod>(
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
    pub(super) fn array<V: aya::Pod + PartialEq + Default>(
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
        maps::SERVICE_INFO | maps::EXTERNAL_INFO => hash::<u32, ServiceInfo>(h(old), h(new), merr),
        maps::AFFINITY_MATCH => hash::<AffinityMatchKey, u8>(h(old), h(new), merr),
        maps::EXTERNAL_SERVICES => hash::<ServiceKey, ExternalService>(h(old), h(new), merr),
        maps::REV_NAT => hash::<RevNatKey, Endpoint>(l(old), l(new), merr),
        maps::UDP_SOCKETS => hash::<u64, UdpSocket>(h(old), h(new), merr),
        maps::AFFINITY => hash::<AffinityKey, AffinityValue>(l(old), l(new), merr),
        maps::CONNTRACK | maps::CT_NEW => hash::<FlowKey, CtEntry>(l(old), l(new), merr),
        maps::EXTERNAL_REV_NAT | maps::EXTERNAL_REV_NAT_NEW => {
            hash::<FlowKey, FlowRevNat>(l(old), l(new), merr)
        }
        maps::EXTERNAL_AFFINITY => {
            hash::<ExternalAffinityKey, ExternalAffinityValue>(l(old), l(new), merr)
        }
        maps::EXTERNAL_AFFINITY_MATCH => {
            hash::<ExternalAffinityMatchKey, u32>(h(old), h(new), merr)
        }
        maps::TABLES => array::<TablePair>(old, new, merr),
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
