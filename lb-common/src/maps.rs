//! Names, kinds, sizes and default capacities of every map, in one place.
//!
//! The kernel programs declare the maps (`lb-ebpf/src/maps.rs`) with these names and
//! capacities; a test in `lb-userspace` checks the built object against [`ALL`]. Names are
//! versioned: a change of layout takes a new name, so an old pinned map is never read with a
//! new layout. The kernel truncates map names to 15 bytes; these are checked to fit.

use core::mem::size_of;

use crate::{
    external::{
        CtEntry, ExternalAffinityKey, ExternalAffinityMatchKey, ExternalAffinityValue,
        ExternalCounters, ExternalService, FlowKey, FlowRevNat, SourceRange,
    },
    service::{
        AffinityKey, AffinityMatchKey, AffinityValue, Backend, Endpoint, RevNatKey, ServiceInfo,
        ServiceKey, ServiceValue, SlotKey, UdpSocket,
    },
};

/// `BPF_MAP_TYPE_HASH`.
pub const TYPE_HASH: u32 = 1;
/// `BPF_MAP_TYPE_PERCPU_ARRAY`.
pub const TYPE_PERCPU_ARRAY: u32 = 6;
/// `BPF_MAP_TYPE_ARRAY`.
pub const TYPE_ARRAY: u32 = 2;
/// `BPF_MAP_TYPE_LRU_HASH`.
pub const TYPE_LRU_HASH: u32 = 9;
/// `BPF_MAP_TYPE_LPM_TRIE`.
pub const TYPE_LPM_TRIE: u32 = 11;
/// `BPF_F_NO_PREALLOC`: entries are allocated on insert, so a mostly empty map costs little.
pub const F_NO_PREALLOC: u32 = 1;
/// `BPF_F_MMAPABLE`: an array userspace can map into memory, to read and write it without a
/// system call per entry.
pub const F_MMAPABLE: u32 = 1 << 10;

/// Default directory (on bpffs) under which the agent pins maps and program links.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/lb";
/// Subdirectory of the pin directory holding the maps.
pub const PIN_MAPS_SUBDIR: &str = "maps";
/// Subdirectory of the pin directory holding the program links.
pub const PIN_LINKS_SUBDIR: &str = "links";

/// Service map: [`ServiceKey`] -> [`ServiceValue`]. Written by the agent, read by the socket
/// hooks. Rebuildable from the Kubernetes objects, adopted across agent restarts. v2: the
/// value's flags name the generation of the service's slots ([`crate::service::SVC_F_GEN1`]).
pub const SERVICES: &str = "lb_svc_v2";
/// Slot map: [`SlotKey`] -> backend id (`u32`). Written by the agent, read by the hooks. v2:
/// the slot number carries the generation bit ([`crate::service::SLOT_GEN1`]).
pub const SLOTS: &str = "lb_slot_v2";
/// Maps of earlier layouts whose entries are valid entries of a current map, old name first.
/// An agent that finds the old map pinned and not the new one copies the entries over before
/// its first sync, so services keep their ids (and with them their affinity entries and
/// counters) across the upgrade. v1 services and slots are v2 ones of generation 0.
pub const MIGRATIONS: [(&str, &str); 2] = [("lb_svc_v1", SERVICES), ("lb_slot_v1", SLOTS)];

/// Backend map: backend id (`u32`) -> [`Backend`]. Written by the agent, read by the hooks.
pub const BACKENDS: &str = "lb_be_v1";
/// Service-info map: service id (`u32`) -> [`ServiceInfo`]. Written and read by userspace
/// only: names services for the CLI and tells a restarted agent who owns what.
pub const SERVICE_INFO: &str = "lb_svcinfo_v1";
/// Reverse-NAT map (LRU): [`RevNatKey`] -> [`Endpoint`] (the frontend). Written by the
/// connect/sendmsg hooks, read by recvmsg/getpeername. State worth keeping: open sockets
/// depend on it, so it stays pinned across agent restarts.
pub const REV_NAT: &str = "lb_revnat_v1";
/// Connected-UDP-socket map: socket cookie (`u64`) -> [`UdpSocket`]. Written by the connect
/// hooks when they translate a UDP socket's connect, deleted by the sock_release hook when
/// the socket closes: not an LRU, so no amount of other connections evicts the entry of a
/// long-lived socket. The agent reads it to find the sockets connected to a backend that
/// left (see `lb_userspace::sockets`). Sized like the reverse-NAT map; a socket that finds
/// it full is counted and found through the reverse-NAT map only.
pub const UDP_SOCKETS: &str = "lb_udpsock_v1";
/// Affinity map (LRU): [`AffinityKey`] -> [`AffinityValue`]. Written by the connect/sendmsg
/// hooks for services with session affinity. State worth keeping across agent restarts.
pub const AFFINITY: &str = "lb_aff_v1";
/// Affinity-match map: [`AffinityMatchKey`] -> `u8`. Written by the agent for the backends of
/// services with session affinity, read by the hooks. Rebuildable.
pub const AFFINITY_MATCH: &str = "lb_affmatch_v1";
/// North-south service map: [`ServiceKey`] -> [`ExternalService`]: NodePort, LoadBalancer and
/// external IP frontends for traffic from outside the node. Written by the agent, read by
/// the XDP program. Rebuildable.
pub const EXTERNAL_SERVICES: &str = "lb_nssvc_v1";
/// Maglev lookup tables: an array of [`TablePair`]s, read as one dense array of backend ids
/// (`u32`); each north-south service with backends has a region of it, sized from its backend
/// count. Memory-mapped by the agent, which writes every new table to a free region and then
/// switches the frontends to it (the old region is cleared after a grace period); read by
/// XDP. Rebuildable.
pub const TABLES: &str = "lb_ring_v2";
/// North-south service info: id -> [`ServiceInfo`] (namespace, name, port name), for the CLI
/// and for a restarted agent to adopt ids. Written by the agent. Rebuildable.
pub const EXTERNAL_INFO: &str = "lb_nsinfo_v1";
/// Conntrack of answered flows (LRU): [`FlowKey`] (client to frontend) -> [`CtEntry`]. A
/// flow enters it from [`CT_NEW`] once answered (`external::ct_assured`); written by XDP and the
/// tc programs (flags and lifetime of both directions), swept of expired entries by the
/// agent. State worth keeping: it pins flows to their backends across agent restarts. v2:
/// the backend by address, TCP state and lifetime.
pub const CONNTRACK: &str = "lb_ct_v2";
/// Conntrack of new flows (LRU), as [`CONNTRACK`]: every flow starts here, and stays until
/// answered (TCP handshakes, one-way UDP). Apart, so that a flood of new flows (spoofed
/// SYNs) evicts only new flows, never answered ones (as Linux's conntrack drops unassured
/// entries first).
pub const CT_NEW: &str = "lb_ctnew_v1";
/// Maps of an earlier layout whose entries are converted (not copied) into a current map,
/// old name first: `lb_ct_v1` entries name their backend by id, looked up in [`BACKENDS`].
/// Converted at load and again just before the new programs take over, like a resize.
pub const CONVERSIONS: [(&str, &str); 1] = [("lb_ct_v1", CONNTRACK)];
/// Reverse NAT of north-south flows (LRU): [`FlowKey`] of a reply -> [`FlowRevNat`]. Written by
/// XDP with the conntrack entry, read by XDP (replies to SNATed flows) and tc egress
/// (replies of local backends), which honour it only while the flow's conntrack entry is
/// alive and points back to it. An SNATed flow's entry is what holds its SNAT port. Swept
/// with the conntrack entries. State worth keeping.
pub const EXTERNAL_REV_NAT: &str = "lb_natrev_v1";
/// Reverse NAT of new flows (LRU), as [`EXTERNAL_REV_NAT`], beside [`CT_NEW`]; an entry moves to
/// [`EXTERNAL_REV_NAT`] with its flow. An SNAT port is taken when its reply key is in either.
pub const EXTERNAL_REV_NAT_NEW: &str = "lb_natrevnew_v1";
/// North-south affinity (LRU): [`ExternalAffinityKey`] (service id, client address) ->
/// [`ExternalAffinityValue`] (its last backend and when). Written by XDP for each new flow of a
/// service with session affinity. State worth keeping across agent restarts.
pub const EXTERNAL_AFFINITY: &str = "lb_nsaff_v1";
/// North-south affinity match: [`ExternalAffinityMatchKey`] (service id, backend) -> the service's
/// affinity timeout in seconds (`u32`). Written by the agent for the backends of the table of
/// a service with session affinity, read by XDP. Rebuildable.
pub const EXTERNAL_AFFINITY_MATCH: &str = "lb_nsaffm_v1";
/// `loadBalancerSourceRanges` (LPM trie): a prefix length (`u32`) and a [`SourceRange`] ->
/// `u8`. Written by the agent. Rebuildable.
pub const SOURCE_RANGES: &str = "lb_srcrange_v1";
/// Per north-south service counters: per-CPU array of [`ExternalCounters`]. Disposable.
pub const EXTERNAL_STATS: &str = "lb_nsstat_v1";
/// Devices the north-south programs run on (ifindex `u32` -> [`DEVICE_XDP`] or
/// [`DEVICE_OVERLAY`]). Written by the agent.
pub const XDP_DEVICES: &str = "lb_xdpdev_v1";
/// [`XDP_DEVICES`] value of a device running the XDP program (and tc egress): translated
/// packets may be redirected to it; to others they go through the stack.
pub const DEVICE_XDP: u8 = 1;
/// [`XDP_DEVICES`] value of an overlay device (VXLAN, Geneve), which runs tc ingress only:
/// replies of SNATed flows that arrive on it are reversed there.
pub const DEVICE_OVERLAY: u8 = 2;
/// Per-CPU scratch space of the packet programs (one entry), for values too large for the
/// 512-byte BPF stack. Disposable.
pub const SCRATCH: &str = "lb_scratch_v1";
/// Size of one scratch entry (the kernel programs assert their layout fits it).
pub const SCRATCH_SIZE: u32 = 512;
/// Counters: per-CPU array of `u64` indexed by [`crate::stats`] constants. Written by the
/// hooks, read by the CLI. Disposable.
pub const STATS: &str = "lb_stats_v1";
/// Per socket-level frontend counters: array of [`crate::stats::SocketCounters`] indexed by
/// service id (ids start at 1), added to atomically by the socket hooks. The agent zeroes an
/// id's entry before giving the id to a new frontend. Disposable.
pub const SVC_STATS: &str = "lb_svcstat_v1";
/// Per backend counters: array of `u64` (connections and unconnected datagrams translated to
/// it) indexed by backend id, added to atomically by the socket hooks; zeroed like
/// [`SVC_STATS`]. Disposable.
pub const BE_STATS: &str = "lb_bestat_v1";
/// aya-log's ring buffer of the programs' log lines (`--kernel-debug`), named by aya-log.
/// Each load makes its own and the agent that loaded it reads it, so it is not pinned and
/// not in [`ALL`].
pub const KERNEL_LOG: &str = "AYA_LOGS";

/// Default capacity of the service map (frontends: VIP x port x protocol).
pub const DEFAULT_MAX_SERVICES: u32 = 65_536;
/// Default capacity of the slot map (sum over services of their backend counts).
pub const DEFAULT_MAX_SLOTS: u32 = 262_144;
/// Default capacity of the backend map (distinct backend address and port pairs).
pub const DEFAULT_MAX_BACKENDS: u32 = 65_536;
/// Default capacity of the reverse-NAT map (translated sockets remembered).
pub const DEFAULT_MAX_REV_NAT: u32 = 262_144;
/// Default capacity of the affinity map (clients remembered per service).
pub const DEFAULT_MAX_AFFINITY: u32 = 65_536;
/// Default largest Maglev lookup table (a prime): a service gets the smallest table size with
/// [`DEFAULT_MAGLEV_ENTRIES_PER_BACKEND`] entries per backend, up to this.
pub const DEFAULT_MAGLEV_TABLE_SIZE: u32 = 16_381;
/// Default entries of a Maglev table per backend of its service: 100, as the Maglev paper
/// advises for an even spread.
pub const DEFAULT_MAGLEV_ENTRIES_PER_BACKEND: u32 = 100;
/// Default number of north-south services (service port and address family with a node port,
/// load-balancer IP or external IP), each with a lookup table when it has backends.
pub const DEFAULT_MAX_EXTERNAL: u32 = 4096;
/// Default size of the lookup table array in entries (4 bytes each; 8 MiB): 128 tables of the
/// largest size, or 2048 of services with up to 10 backends.
pub const DEFAULT_TABLE_ENTRIES: u32 = 1 << 21;
/// Backend ids per element of the lookup table array: array elements are 8-byte aligned, so
/// a pair of ids fills one without padding.
pub const TABLE_LANES: u32 = 2;
/// An element of the lookup table array: two consecutive table entries.
pub type TablePair = [u32; TABLE_LANES as usize];
/// Default capacity of the conntrack and north-south reverse-NAT maps.
pub const DEFAULT_MAX_FLOWS: u32 = 262_144;
/// Capacity of the maps of new flows (not yet answered), each.
pub const DEFAULT_MAX_NEW_FLOWS: u32 = 65_536;
/// Capacity of the source-ranges trie.
pub const DEFAULT_MAX_SOURCE_RANGES: u32 = 16_384;
/// Capacity of the XDP device map.
pub const MAX_XDP_DEVICES: u32 = 64;
/// Most backends one service can have: its backend count is a `u16`.
pub const MAX_BACKENDS_PER_SERVICE_LIMIT: u32 = u16::MAX as u32;

/// What a map is: enough to check a pinned map before reusing it and to check the built
/// object against this module.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MapSpec {
    /// The map's name, also its pin file name.
    pub name: &'static str,
    /// `BPF_MAP_TYPE_*`.
    pub map_type: u32,
    /// Key size in bytes.
    pub key_size: u32,
    /// Value size in bytes (per CPU for per-CPU maps).
    pub value_size: u32,
    /// Default capacity.
    pub max_entries: u32,
    /// `BPF_F_*` creation flags.
    pub flags: u32,
}

const fn spec<K, V>(name: &'static str, map_type: u32, max_entries: u32, flags: u32) -> MapSpec {
    MapSpec {
        name,
        map_type,
        key_size: size_of::<K>() as u32,
        value_size: size_of::<V>() as u32,
        max_entries,
        flags,
    }
}

/// Every map of the kernel object.
pub const ALL: [MapSpec; 24] = [
    spec::<ServiceKey, ServiceValue>(SERVICES, TYPE_HASH, DEFAULT_MAX_SERVICES, F_NO_PREALLOC),
    spec::<SlotKey, u32>(SLOTS, TYPE_HASH, DEFAULT_MAX_SLOTS, F_NO_PREALLOC),
    spec::<u32, Backend>(BACKENDS, TYPE_HASH, DEFAULT_MAX_BACKENDS, F_NO_PREALLOC),
    spec::<u32, ServiceInfo>(SERVICE_INFO, TYPE_HASH, DEFAULT_MAX_SERVICES, F_NO_PREALLOC),
    spec::<RevNatKey, Endpoint>(REV_NAT, TYPE_LRU_HASH, DEFAULT_MAX_REV_NAT, 0),
    spec::<u64, UdpSocket>(UDP_SOCKETS, TYPE_HASH, DEFAULT_MAX_REV_NAT, F_NO_PREALLOC),
    spec::<AffinityKey, AffinityValue>(AFFINITY, TYPE_LRU_HASH, DEFAULT_MAX_AFFINITY, 0),
    spec::<AffinityMatchKey, u8>(AFFINITY_MATCH, TYPE_HASH, DEFAULT_MAX_SLOTS, F_NO_PREALLOC),
    spec::<u32, u64>(STATS, TYPE_PERCPU_ARRAY, crate::stats::COUNT, 0),
    spec::<ServiceKey, ExternalService>(
        EXTERNAL_SERVICES,
        TYPE_HASH,
        DEFAULT_MAX_SERVICES,
        F_NO_PREALLOC,
    ),
    spec::<u32, TablePair>(
        TABLES,
        TYPE_ARRAY,
        DEFAULT_TABLE_ENTRIES / TABLE_LANES,
        F_MMAPABLE,
    ),
    // Ids start at 1.
    spec::<u32, ServiceInfo>(
        EXTERNAL_INFO,
        TYPE_HASH,
        DEFAULT_MAX_EXTERNAL + 1,
        F_NO_PREALLOC,
    ),
    spec::<FlowKey, CtEntry>(CONNTRACK, TYPE_LRU_HASH, DEFAULT_MAX_FLOWS, 0),
    spec::<FlowKey, FlowRevNat>(EXTERNAL_REV_NAT, TYPE_LRU_HASH, DEFAULT_MAX_FLOWS, 0),
    spec::<FlowKey, CtEntry>(CT_NEW, TYPE_LRU_HASH, DEFAULT_MAX_NEW_FLOWS, 0),
    spec::<FlowKey, FlowRevNat>(
        EXTERNAL_REV_NAT_NEW,
        TYPE_LRU_HASH,
        DEFAULT_MAX_NEW_FLOWS,
        0,
    ),
    spec::<ExternalAffinityKey, ExternalAffinityValue>(
        EXTERNAL_AFFINITY,
        TYPE_LRU_HASH,
        DEFAULT_MAX_AFFINITY,
        0,
    ),
    spec::<ExternalAffinityMatchKey, u32>(
        EXTERNAL_AFFINITY_MATCH,
        TYPE_HASH,
        DEFAULT_MAX_SLOTS,
        F_NO_PREALLOC,
    ),
    // The trie's key is a 32-bit prefix length, then the data.
    spec::<(u32, SourceRange), u8>(
        SOURCE_RANGES,
        TYPE_LPM_TRIE,
        DEFAULT_MAX_SOURCE_RANGES,
        F_NO_PREALLOC,
    ),
    spec::<u32, ExternalCounters>(
        EXTERNAL_STATS,
        TYPE_PERCPU_ARRAY,
        DEFAULT_MAX_EXTERNAL + 1,
        0,
    ),
    spec::<u32, u8>(XDP_DEVICES, TYPE_HASH, MAX_XDP_DEVICES, 0),
    spec::<u32, [u8; SCRATCH_SIZE as usize]>(SCRATCH, TYPE_PERCPU_ARRAY, 1, 0),
    // Ids start at 1.
    spec::<u32, crate::stats::SocketCounters>(SVC_STATS, TYPE_ARRAY, DEFAULT_MAX_SERVICES + 1, 0),
    spec::<u32, u64>(BE_STATS, TYPE_ARRAY, DEFAULT_MAX_BACKENDS + 1, 0),
];

const _: () = {
    let mut i = 0;
    while i < ALL.len() {
        assert!(ALL[i].name.len() <= 15, "map names are cut to 15 bytes");
        i += 1;
    }
};
