//! Keys and values of the service, slot, backend, service-info and reverse-NAT maps.
//!
//! How a lookup goes: the socket hook builds a [`ServiceKey`] from the destination of a
//! `connect()`/`sendmsg()`, finds the [`ServiceValue`] (the service's id and backend count),
//! picks a slot in `0..count`, reads the backend id at [`SlotKey`] `(id, slot)` (with the
//! generation bit the value names) and the backend's [`Endpoint`] by that id. Slots are per
//! service, so changing one service's backends writes only that service's slots.

use crate::addr::Addr6;

/// A service frontend: (virtual IP, port, protocol). Key of the service map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// The virtual IP, IPv4 v4-mapped.
    pub addr: Addr6,
    /// The port, network byte order (the value of `sin_port`).
    pub port_be: u16,
    /// IANA protocol number ([`crate::proto`]).
    pub proto: u8,
    /// Zero.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);
const _: () = assert!(core::mem::offset_of!(ServiceKey, port_be) == 16);
const _: () = assert!(core::mem::offset_of!(ServiceKey, proto) == 18);

impl ServiceKey {
    /// A key with its padding zeroed.
    #[inline(always)]
    pub const fn new(addr: Addr6, port_be: u16, proto: u8) -> Self {
        Self {
            addr,
            port_be,
            proto,
            _pad: 0,
        }
    }
}

/// What the service map holds for a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ServiceValue {
    /// The service id: first half of its [`SlotKey`]s and key of its [`ServiceInfo`].
    pub id: u32,
    /// Number of backends, i.e. of slots `0..count`. Zero means the service exists but has no
    /// backends: connects are refused.
    pub count: u16,
    /// [`SVC_F_GEN1`]: the service's slots are those of generation 1 (else 0).
    pub flags: u16,
    /// Session affinity (`ClientIP`) timeout in seconds; zero when the service has none.
    pub affinity_timeout_s: u32,
}

const _: () = assert!(core::mem::size_of::<ServiceValue>() == 12);

/// [`ServiceValue::flags`] bit: the service's slots are those of generation 1.
///
/// A service's slots come in two generations. A change of its backends writes the new slots
/// in the generation not in use and then switches the service entry to it in one write, so
/// a lookup sees the old table or the new one, never a mix; the old slots are deleted once no
/// program can still be reading them.
pub const SVC_F_GEN1: u16 = 1;

/// The bit of [`SlotKey::slot`] that marks a slot of generation 1.
pub const SLOT_GEN1: u32 = 1 << 31;

impl ServiceValue {
    /// The flags that name slot generation `generation` ([`SLOT_GEN1`] or zero): the inverse
    /// of [`Self::slot_gen`].
    #[inline(always)]
    pub const fn gen_flags(generation: u32) -> u16 {
        if generation == SLOT_GEN1 {
            SVC_F_GEN1
        } else {
            0
        }
    }

    /// The generation bit of the service's slots ([`SLOT_GEN1`] or zero).
    #[inline(always)]
    pub const fn slot_gen(&self) -> u32 {
        if self.flags & SVC_F_GEN1 != 0 {
            SLOT_GEN1
        } else {
            0
        }
    }
}

/// One backend slot of one service. Key of the slot map; the value is a backend id (`u32`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// The service id ([`ServiceValue::id`]).
    pub svc_id: u32,
    /// The slot, `0..ServiceValue::count`, with the generation bit ([`SLOT_GEN1`]).
    pub slot: u32,
}

const _: () = assert!(core::mem::size_of::<SlotKey>() == 8);

impl SlotKey {
    /// Slot `index` of generation `gen` ([`SLOT_GEN1`] or zero) of service `svc_id`.
    #[inline(always)]
    pub const fn new(svc_id: u32, generation: u32, index: u32) -> Self {
        Self {
            svc_id,
            slot: generation | index,
        }
    }

    /// The slot's position in its table.
    #[inline(always)]
    pub const fn index(&self) -> u32 {
        self.slot & !SLOT_GEN1
    }

    /// The slot's generation bit.
    #[inline(always)]
    pub const fn generation(&self) -> u32 {
        self.slot & SLOT_GEN1
    }
}

/// An address and port: a backend's (see [`Backend`]) or a service frontend to restore
/// (value of the reverse-NAT map).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Endpoint {
    /// The address, IPv4 v4-mapped.
    pub addr: Addr6,
    /// The port, network byte order.
    pub port_be: u16,
    /// Zero.
    pub _pad: [u8; 2],
}

const _: () = assert!(core::mem::size_of::<Endpoint>() == 20);

impl Endpoint {
    /// An endpoint with its padding zeroed.
    #[inline(always)]
    pub const fn new(addr: Addr6, port_be: u16) -> Self {
        Self {
            addr,
            port_be,
            _pad: [0; 2],
        }
    }
}

/// Where a backend runs, as its EndpointSlice's `nodeName` says ([`Backend::node`]).
pub mod node {
    /// Not known: the endpoint names no node (or the agent does not know its own). Zero, so
    /// entries written before the field existed read as unknown.
    pub const UNKNOWN: u8 = 0;
    /// On this node.
    pub const LOCAL: u8 = 1;
    /// On another node.
    pub const REMOTE: u8 = 2;
}

/// A backend (value of the backend map, keyed by backend id): its address and port, and
/// where it runs. North-south flows under `externalTrafficPolicy: Cluster` to a backend on
/// another node are SNATed to this node, whatever device the route takes, so that their
/// replies come back through it.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Backend {
    /// The address, IPv4 v4-mapped.
    pub addr: Addr6,
    /// The port, network byte order.
    pub port_be: u16,
    /// Where it runs: one of [`node`]'s values.
    pub node: u8,
    /// Zero.
    pub _pad: u8,
}

const _: () = assert!(core::mem::size_of::<Backend>() == 20);

impl Backend {
    /// The backend at `ep`, running where `node` (one of [`node`]'s values) says.
    #[inline(always)]
    pub const fn new(ep: Endpoint, node: u8) -> Self {
        Self {
            addr: ep.addr,
            port_be: ep.port_be,
            node,
            _pad: 0,
        }
    }

    /// Its address and port, as keys and flow entries name it.
    #[inline(always)]
    pub const fn endpoint(&self) -> Endpoint {
        Endpoint::new(self.addr, self.port_be)
    }
}

impl From<Backend> for Endpoint {
    #[inline(always)]
    fn from(b: Backend) -> Self {
        b.endpoint()
    }
}

/// Key of the reverse-NAT map: a socket (by cookie) and the backend it was sent to. The value
/// is the service frontend ([`Endpoint`]) to report instead: as the source of datagrams
/// received from that backend (`recvmsg`) and as the peer of the socket (`getpeername`).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct RevNatKey {
    /// `bpf_get_socket_cookie()` of the socket.
    pub cookie: u64,
    /// The backend address, IPv4 v4-mapped.
    pub addr: Addr6,
    /// The backend port, network byte order.
    pub port_be: u16,
    /// Zero.
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<RevNatKey>() == 32);
const _: () = assert!(core::mem::align_of::<RevNatKey>() == 8);

impl RevNatKey {
    /// A key with its padding zeroed.
    #[inline(always)]
    pub const fn new(cookie: u64, backend: &Endpoint) -> Self {
        Self {
            cookie,
            addr: backend.addr,
            port_be: backend.port_be,
            _pad: [0; 6],
        }
    }
}

/// Where a connected UDP socket was translated: value of the connected-UDP-socket map
/// ([`crate::maps::UDP_SOCKETS`]), keyed by the socket's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct UdpSocket {
    /// The service frontend the socket connected to.
    pub frontend: Endpoint,
    /// The backend its connect was translated to.
    pub backend: Endpoint,
}

const _: () = assert!(core::mem::size_of::<UdpSocket>() == 40);

/// A client of a service with session affinity. Key of the affinity map (LRU).
///
/// At the socket layer the client's address is not known yet when it connects, so the client
/// is its network namespace: one per pod, hence one per pod IP, which is what `ClientIP`
/// affinity means.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityKey {
    /// The service id.
    pub svc_id: u32,
    /// Zero.
    pub _pad: u32,
    /// `bpf_get_netns_cookie()` of the client's socket.
    pub netns_cookie: u64,
}

const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

impl AffinityKey {
    /// A key with its padding zeroed.
    #[inline(always)]
    pub const fn new(svc_id: u32, netns_cookie: u64) -> Self {
        Self {
            svc_id,
            _pad: 0,
            netns_cookie,
        }
    }
}

/// The backend a client is kept on, and when it last used it. Value of the affinity map.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct AffinityValue {
    /// The backend id.
    pub backend_id: u32,
    /// Zero.
    pub _pad: u32,
    /// `bpf_ktime_get_coarse_ns()` at the last connection.
    pub last_used_ns: u64,
}

const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);

/// A backend that belongs to a service with session affinity. Key of the affinity-match map
/// (the value is a `u8`, 1): an affinity entry is honoured only while its backend is still one
/// of the service's, so a removed backend is never reused.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AffinityMatchKey {
    /// The service id.
    pub svc_id: u32,
    /// The backend id.
    pub backend_id: u32,
}

const _: () = assert!(core::mem::size_of::<AffinityMatchKey>() == 8);

/// Longest namespace or service name that fits ([`ServiceInfo`]); Kubernetes allows 63.
pub const NAME_MAX: usize = 63;
/// Longest service port name that fits; Kubernetes allows 15.
pub const PORT_NAME_MAX: usize = 15;

/// Which Kubernetes service and port a frontend belongs to. Value of the service-info map,
/// keyed by service id. Only userspace reads it: the agent to adopt what an earlier run
/// programmed, the CLI to name services. Strings are UTF-8, NUL-padded.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServiceInfo {
    /// The namespace.
    pub namespace: [u8; NAME_MAX + 1],
    /// The service name.
    pub name: [u8; NAME_MAX + 1],
    /// The service port's name, empty when unnamed.
    pub port_name: [u8; PORT_NAME_MAX + 1],
}

const _: () = assert!(core::mem::size_of::<ServiceInfo>() == 144);

impl ServiceInfo {
    /// The info for a service port, or `None` when a string is too long to fit.
    pub fn new(namespace: &str, name: &str, port_name: &str) -> Option<Self> {
        Some(Self {
            namespace: padded(namespace)?,
            name: padded(name)?,
            port_name: padded(port_name)?,
        })
    }

    /// The namespace, or `None` when the bytes are not a valid string.
    pub fn namespace(&self) -> Option<&str> {
        unpadded(&self.namespace)
    }

    /// The service name, or `None` when the bytes are not a valid string.
    pub fn name(&self) -> Option<&str> {
        unpadded(&self.name)
    }

    /// The port name, or `None` when the bytes are not a valid string.
    pub fn port_name(&self) -> Option<&str> {
        unpadded(&self.port_name)
    }
}

/// `s` NUL-padded to `N` bytes, keeping at least one NUL; `None` when it does not fit.
fn padded<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    if s.len() >= N || s.as_bytes().contains(&0) {
        return None;
    }
    out[..s.len()].copy_from_slice(s.as_bytes());
    Some(out)
}

/// The string before the first NUL, which must exist.
fn unpadded(b: &[u8]) -> Option<&str> {
    let end = b.iter().position(|&c| c == 0)?;
    core::str::from_utf8(&b[..end]).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_keys_carry_the_generation_the_service_names() {
        let mut v = ServiceValue {
            id: 7,
            count: 3,
            flags: SVC_F_GEN1,
            affinity_timeout_s: 0,
        };
        let k = SlotKey::new(v.id, v.slot_gen(), 2);
        assert_eq!((k.svc_id, k.index(), k.generation()), (7, 2, SLOT_GEN1));
        assert_eq!(ServiceValue::gen_flags(v.slot_gen()), v.flags);
        assert_eq!(ServiceValue::gen_flags(0), 0);
        v.flags = 0;
        let k = SlotKey::new(v.id, v.slot_gen(), 2);
        assert_eq!(
            k,
            SlotKey { svc_id: 7, slot: 2 },
            "generation 0 is the v1 layout"
        );
    }

    #[test]
    fn service_info_round_trip() {
        let info = ServiceInfo::new("kube-system", "kube-dns", "dns-tcp").unwrap();
        assert_eq!(info.namespace(), Some("kube-system"));
        assert_eq!(info.name(), Some("kube-dns"));
        assert_eq!(info.port_name(), Some("dns-tcp"));
    }

    #[test]
    fn service_info_limits() {
        let longest = "a".repeat(NAME_MAX);
        assert!(ServiceInfo::new(&longest, &longest, "p").is_some());
        let too_long = "a".repeat(NAME_MAX + 1);
        assert!(ServiceInfo::new(&too_long, "n", "").is_none());
        assert!(ServiceInfo::new("ns", "n", "sixteen-chars-xx").is_none());
        assert!(ServiceInfo::new("ns", "n\0x", "").is_none());
    }

    #[test]
    fn unpadded_rejects_unterminated() {
        assert_eq!(unpadded(b"abc"), None);
        assert_eq!(unpadded(b"ab\0c"), Some("ab"));
    }
}
