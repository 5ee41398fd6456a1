//! North-south (XDP and tc) keys and values: traffic that arrives at the node from outside
//! for a NodePort, a LoadBalancer ingress IP or an external IP.
//!
//! How a packet goes: the XDP program builds a [`FlowKey`] from the packet. A reply of a
//! translated flow matches the reverse-NAT map (`FlowKey` of the reply -> [`NatRev`]) and gets
//! its addresses restored. A new packet for a frontend ([`crate::ServiceKey`] ->
//! [`NsService`]) first looks up the conntrack map (`FlowKey` -> [`CtEntry`]), which pins an
//! established flow to its backend; a new flow picks its backend from the service's Maglev
//! ring (a region of the ring array) by [`flow_hash`].

use crate::addr::Addr6;

/// The service's traffic policy is Local: only this node's endpoints are in its ring, the
/// client address is kept (no SNAT), and without local endpoints packets are dropped.
pub const NS_F_LOCAL: u16 = 1;
/// The frontend is a LoadBalancer IP with `loadBalancerSourceRanges`: sources outside them
/// are dropped.
pub const NS_F_SOURCE_RANGES: u16 = 2;

/// What the north-south service map holds for a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NsService {
    /// North-south service id: index of its counters, first field of its source ranges.
    pub id: u32,
    /// Start of its Maglev ring in the ring array.
    pub ring_off: u32,
    /// Size of its ring (a prime); zero when it has no backends (packets are dropped).
    pub ring_size: u32,
    /// `NS_F_*` flags.
    pub flags: u16,
    /// Zero.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<NsService>() == 16);

/// A flow as the packet carries it: source and destination address and port, protocol.
/// Key of the conntrack map (client to frontend) and of the reverse-NAT map (backend to
/// node or client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowKey {
    /// Source address, IPv4 v4-mapped.
    pub saddr: Addr6,
    /// Destination address, IPv4 v4-mapped.
    pub daddr: Addr6,
    /// Source port, network byte order.
    pub sport_be: u16,
    /// Destination port, network byte order.
    pub dport_be: u16,
    /// IANA protocol number.
    pub proto: u8,
    /// Zero.
    pub _pad: [u8; 3],
}

const _: () = assert!(core::mem::size_of::<FlowKey>() == 40);

impl FlowKey {
    /// A key with its padding zeroed.
    #[inline(always)]
    pub const fn new(saddr: Addr6, daddr: Addr6, sport_be: u16, dport_be: u16, proto: u8) -> Self {
        Self {
            saddr,
            daddr,
            sport_be,
            dport_be,
            proto,
            _pad: [0; 3],
        }
    }
}

/// A conntrack entry: where an established flow goes.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// The backend id.
    pub backend_id: u32,
    /// The north-south service id (for counters).
    pub svc_id: u32,
    /// The source address the flow is SNATed to; all zero when it is not.
    pub snat_addr: Addr6,
    /// The source port it is SNATed to, network byte order; zero when it is not.
    pub snat_port_be: u16,
    /// Zero.
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<CtEntry>() == 32);

/// How to restore a reply: its new source (the frontend) and destination (the client).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct NatRev {
    /// The frontend address, IPv4 v4-mapped.
    pub src: Addr6,
    /// The client address.
    pub dst: Addr6,
    /// The frontend port, network byte order.
    pub sport_be: u16,
    /// The client port, network byte order.
    pub dport_be: u16,
    /// The north-south service id (for counters).
    pub svc_id: u32,
}

const _: () = assert!(core::mem::size_of::<NatRev>() == 40);

/// The data of a source-ranges LPM trie key (the trie's key is a prefix length, 32 bits, then
/// this): a service id then an address. A range is an entry whose prefix length covers the
/// 32 bits of the id plus the range's prefix of the v4-mapped or IPv6 address.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SourceRange {
    /// The north-south service id, big endian so it is the leading bits.
    pub svc_id_be: u32,
    /// The address (IPv4 v4-mapped), network order.
    pub addr: Addr6,
}

const _: () = assert!(core::mem::size_of::<SourceRange>() == 20);

/// Bits of a source-ranges key taken by the service id.
pub const SOURCE_RANGE_ID_BITS: u32 = 32;

/// Per-service counters (per CPU), indexed by north-south service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct NsCounters {
    /// Packets translated to a backend.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// New flows (conntrack entries created).
    pub flows: u64,
    /// Packets dropped for this service (no backend, source range, no SNAT port).
    pub drops: u64,
}

const _: () = assert!(core::mem::size_of::<NsCounters>() == 32);

/// The flow hash that picks a Maglev ring position: a function of the whole 5-tuple, the same
/// in the kernel and in userspace (which uses it to explain where a flow goes).
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    // Murmur3's mixing over the key's words, then its finaliser: cheap, and every input bit
    // reaches every output bit. Written out word by word (no array), to keep a BPF program's
    // stack small.
    let a = &k.saddr.words;
    let b = &k.daddr.words;
    let mut h: u32 = 0x9747_b28c;
    h = mix(h, a[0]);
    h = mix(h, a[1]);
    h = mix(h, a[2]);
    h = mix(h, a[3]);
    h = mix(h, b[0]);
    h = mix(h, b[1]);
    h = mix(h, b[2]);
    h = mix(h, b[3]);
    h = mix(h, (u32::from(k.sport_be) << 16) | u32::from(k.dport_be));
    h = mix(h, u32::from(k.proto));
    h ^= 40;
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
fn mix(h: u32, word: u32) -> u32 {
    let w = word
        .wrapping_mul(0xcc9e_2d51)
        .rotate_left(15)
        .wrapping_mul(0x1b87_3593);
    (h ^ w)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flow_hash_depends_on_every_field() {
        let base = FlowKey::new(Addr6::v4_mapped(1), Addr6::v4_mapped(2), 3, 4, 6);
        let h = flow_hash(&base);
        let variants = [
            FlowKey {
                saddr: Addr6::v4_mapped(9),
                ..base
            },
            FlowKey {
                daddr: Addr6::v4_mapped(9),
                ..base
            },
            FlowKey {
                sport_be: 9,
                ..base
            },
            FlowKey {
                dport_be: 9,
                ..base
            },
            FlowKey { proto: 17, ..base },
        ];
        for v in variants {
            assert_ne!(flow_hash(&v), h, "{v:?}");
        }
        assert_eq!(flow_hash(&base), h, "deterministic");
    }
}
