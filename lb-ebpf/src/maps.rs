//! Every map of the object, declared once. Names, capacities and layouts come from
//! `lb_common::maps`, which documents each map; a test in lb-userspace checks this object
//! against it (the `#[map]` attribute takes only a literal name).

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, LruHashMap, PerCpuArray},
};
use lb_common::{
    AffinityKey, AffinityMatchKey, AffinityValue, Backend, Endpoint, RevNatKey, ServiceInfo,
    ServiceKey, ServiceValue, SlotKey, UdpSocket,
    external::{
        CtEntry, ExternalAffinityKey, ExternalAffinityMatchKey, ExternalAffinityValue,
        ExternalCounters, ExternalService, FlowKey, FlowRevNat, SourceRange,
    },
    maps::{
        DEFAULT_MAX_AFFINITY, DEFAULT_MAX_BACKENDS, DEFAULT_MAX_EXTERNAL, DEFAULT_MAX_FLOWS,
        DEFAULT_MAX_NEW_FLOWS, DEFAULT_MAX_REV_NAT, DEFAULT_MAX_SERVICES, DEFAULT_MAX_SLOTS,
        DEFAULT_MAX_SOURCE_RANGES, DEFAULT_TABLE_ENTRIES, F_MMAPABLE, F_NO_PREALLOC,
        MAX_XDP_DEVICES, SCRATCH_SIZE, TABLE_LANES, TablePair,
    },
    stats,
};

/// Service frontends. See `lb_common::maps::SERVICES`.
#[map(name = "lb_svc_v2")]
pub static SERVICES: HashMap<ServiceKey, ServiceValue> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, F_NO_PREALLOC);

/// Per-service backend slots. See `lb_common::maps::SLOTS`.
#[map(name = "lb_slot_v2")]
pub static SLOTS: HashMap<SlotKey, u32> = HashMap::pinned(DEFAULT_MAX_SLOTS, F_NO_PREALLOC);

/// Backends by id. See `lb_common::maps::BACKENDS`.
#[map(name = "lb_be_v1")]
pub static BACKENDS: HashMap<u32, Backend> = HashMap::pinned(DEFAULT_MAX_BACKENDS, F_NO_PREALLOC);

/// Service names, for userspace only; declared here so the loader creates and pins it with
/// the others. See `lb_common::maps::SERVICE_INFO`.
#[map(name = "lb_svcinfo_v1")]
pub static SERVICE_INFO: HashMap<u32, ServiceInfo> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, F_NO_PREALLOC);

/// Frontends to restore on replies and peer names. See `lb_common::maps::REV_NAT`.
#[map(name = "lb_revnat_v1")]
pub static REV_NAT: LruHashMap<RevNatKey, Endpoint> = LruHashMap::pinned(DEFAULT_MAX_REV_NAT, 0);

/// Where connected UDP sockets were translated, by cookie. See
/// `lb_common::maps::UDP_SOCKETS`.
#[map(name = "lb_udpsock_v1")]
pub static UDP_SOCKETS: HashMap<u64, UdpSocket> =
    HashMap::pinned(DEFAULT_MAX_REV_NAT, F_NO_PREALLOC);

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

/// Per socket-level frontend counters. See `lb_common::maps::SVC_STATS`.
#[map(name = "lb_svcstat_v1")]
pub static SVC_STATS: Array<stats::SocketCounters> = Array::pinned(DEFAULT_MAX_SERVICES + 1, 0);

/// Per backend counters. See `lb_common::maps::BE_STATS`.
#[map(name = "lb_bestat_v1")]
pub static BE_STATS: Array<u64> = Array::pinned(DEFAULT_MAX_BACKENDS + 1, 0);

/// North-south frontends. See `lb_common::maps::EXTERNAL_SERVICES`.
#[map(name = "lb_nssvc_v1")]
pub static EXTERNAL_SERVICES: HashMap<ServiceKey, ExternalService> =
    HashMap::pinned(DEFAULT_MAX_SERVICES, F_NO_PREALLOC);

/// Maglev rings, two entries per element. See `lb_common::maps::TABLES`.
#[map(name = "lb_ring_v2")]
pub static TABLES: Array<TablePair> =
    Array::pinned(DEFAULT_TABLE_ENTRIES / TABLE_LANES, F_MMAPABLE);

/// North-south service info (read by the CLI only). See `lb_common::maps::EXTERNAL_INFO`.
#[map(name = "lb_nsinfo_v1")]
pub static EXTERNAL_INFO: HashMap<u32, ServiceInfo> =
    HashMap::pinned(DEFAULT_MAX_EXTERNAL + 1, F_NO_PREALLOC);

/// Conntrack of answered flows. See `lb_common::maps::CONNTRACK`.
#[map(name = "lb_ct_v2")]
pub static CONNTRACK: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(DEFAULT_MAX_FLOWS, 0);

/// Reverse NAT of answered north-south flows. See `lb_common::maps::EXTERNAL_REV_NAT`.
#[map(name = "lb_natrev_v1")]
pub static EXTERNAL_REV_NAT: LruHashMap<FlowKey, FlowRevNat> =
    LruHashMap::pinned(DEFAULT_MAX_FLOWS, 0);

/// Conntrack of new flows. See `lb_common::maps::CT_NEW`.
#[map(name = "lb_ctnew_v1")]
pub static CT_NEW: LruHashMap<FlowKey, CtEntry> = LruHashMap::pinned(DEFAULT_MAX_NEW_FLOWS, 0);

/// Reverse NAT of new flows. See `lb_common::maps::EXTERNAL_REV_NAT_NEW`.
#[map(name = "lb_natrevnew_v1")]
pub static EXTERNAL_REV_NAT_NEW: LruHashMap<FlowKey, FlowRevNat> =
    LruHashMap::pinned(DEFAULT_MAX_NEW_FLOWS, 0);

/// North-south affinity. See `lb_common::maps::EXTERNAL_AFFINITY`.
#[map(name = "lb_nsaff_v1")]
pub static EXTERNAL_AFFINITY: LruHashMap<ExternalAffinityKey, ExternalAffinityValue> =
    LruHashMap::pinned(DEFAULT_MAX_AFFINITY, 0);

/// North-south affinity match. See `lb_common::maps::EXTERNAL_AFFINITY_MATCH`.
#[map(name = "lb_nsaffm_v1")]
pub static EXTERNAL_AFFINITY_MATCH: HashMap<ExternalAffinityMatchKey, u32> =
    HashMap::pinned(DEFAULT_MAX_SLOTS, F_NO_PREALLOC);

/// `loadBalancerSourceRanges`. See `lb_common::maps::SOURCE_RANGES`.
#[map(name = "lb_srcrange_v1")]
pub static SOURCE_RANGES: LpmTrie<SourceRange, u8> = LpmTrie::pinned(DEFAULT_MAX_SOURCE_RANGES, 0);

/// Per north-south service counters. See `lb_common::maps::EXTERNAL_STATS`.
#[map(name = "lb_nsstat_v1")]
pub static EXTERNAL_STATS: PerCpuArray<ExternalCounters> =
    PerCpuArray::pinned(DEFAULT_MAX_EXTERNAL + 1, 0);

/// Devices running the XDP program. See `lb_common::maps::XDP_DEVICES`.
#[map(name = "lb_xdpdev_v1")]
pub static XDP_DEVICES: HashMap<u32, u8> = HashMap::pinned(MAX_XDP_DEVICES, 0);

/// Scratch space of the packet programs. See `lb_common::maps::SCRATCH` and `Scratch`.
#[map(name = "lb_scratch_v1")]
pub static SCRATCH: PerCpuArray<[u8; SCRATCH_SIZE as usize]> = PerCpuArray::pinned(1, 0);
