//! Every map of the object, declared once. Names, capacities and layouts come from
//! `lb_common::maps`, which documents each map; a test in lb-userspace checks this object
//! against it (the `#[map]` attribute takes only a literal name).

use aya_ebpf::{
    macros::map,
    maps::{HashMap, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Endpoint, RevNatKey, ServiceInfo, ServiceKey,
    ServiceValue, SlotKey,
    maps::{
        DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_REV_NAT, DEFAULT_MAX_SERVICES,
        DEFAULT_MAX_SLOTS, F_NO_PREALLOC,
    },
    stats,
};

/// Service frontends. See `lb_common::maps::SERVICES`.
#[map(name = "lb_svc_v1")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, F_NO_PREALLOC);

/// Per-service backend slots. See `lb_common::maps::SLOTS`.
#[map(name = "lb_slot_v1")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(DEFAULT_MAX_SLOTS, F_NO_PREALLOC);

/// Backends by id. See `lb_common::maps::BACKENDS`.
#[map(name = "lb_be_v1")]
pub static BACKENDS: HashMap<u32, Endpoint> = HashMap::pinned(DEFAULT_MAX_BACKENDS, F_NO_PREALLOC);

/// Service names, for userspace only; declared here so the loader creates and pins it with
/// the others. See `lb_common::maps::SERVICE_INFO`.
#[map(name = "lb_svcinfo_v1")]
pub static SERVICE_INFO: HashMap<u32, ServiceInfo> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, F_NO_PREALLOC);

/// Frontends to restore on replies and peer names. See `lb_common::maps::REV_NAT`.
#[map(name = "lb_revnat_v1")]
pub static REV_NAT: LruHashMap<RevNatKey, Endpoint> = LruHashMap::pinned(DEFAULT_MAX_REV_NAT, 0);

/// Clients kept on a backend by session affinity. See `lb_common::maps::AFFINITY`.
#[map(name = "lb_aff_v1")]
pub static AFFINITY: LruHashMap<AffinityKey, AffinityValue> =
    LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

/// Backends of services with session affinity. See `lb_common::maps::AFFINITY_MATCH`.
#[map(name = "lb_affmatch_v1")]
pub static AFFINITY_MATCH: HashMap<AffinityMatchKey, u8> =
    HashMap::pinned(DEFAULT_MAX_SLOTS, F_NO_PREALLOC);

/// Counters. See `lb_common::maps::STATS`.
#[map(name = "lb_stats_v1")]
pub static STATS: PerCpuArray<u64> = PerCpuArray::pinned(stats::COUNT, 0);
