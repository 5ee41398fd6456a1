//! North-south (XDP and tc) keys and values: traffic that arrives at the node from outside
//! for a NodePort, a LoadBalancer ingress IP or an external IP.
//!
//! How a packet goes: the XDP program builds a [`FlowKey`] from the packet. A reply of a
//! translated flow matches the reverse-NAT map (`FlowKey` of the reply -> [`FlowRevNat`]) and gets
//! its addresses restored. A new packet for a frontend ([`crate::ServiceKey`] ->
//! [`ExternalService`]) first looks up the conntrack map (`FlowKey` -> [`CtEntry`]), which pins an
//! established flow to its backend; a new flow picks its backend from the service's Maglev
//! ring (a region of the ring array) by [`flow_hash`].

use crate::{
    addr::Addr6,
    service::{Backend, Endpoint},
};

/// The service's traffic policy is Local: only this node's endpoints are in its ring, the
/// client address is kept (no SNAT), and without local endpoints packets are dropped.
pub const EXTERNAL_F_LOCAL: u16 = 1;
/// The frontend is a LoadBalancer IP with `loadBalancerSourceRanges`: sources outside them
/// are dropped.
pub const EXTERNAL_F_SOURCE_RANGES: u16 = 2;

/// The service has `sessionAffinity: ClientIP`: a client's new flows go to the backend its
/// last one went to, while [`ExternalAffinityMatchKey`] names that backend with a timeout not yet
/// run out.
pub const EXTERNAL_F_AFFINITY: u16 = 4;

/// What the north-south service map holds for a frontend.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExternalService {
    /// North-south service id: index of its counters, first field of its source ranges.
    pub id: u32,
    /// Start of its Maglev ring in the ring array.
    pub table_off: u32,
    /// Size of its ring (a prime); zero when it has no backends (packets are dropped).
    pub table_size: u32,
    /// `EXTERNAL_F_*` flags.
    pub flags: u16,
    /// Zero.
    pub _pad: u16,
}

const _: () = assert!(core::mem::size_of::<ExternalService>() == 16);

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
    /// Sets every field in place, the padding zeroed: a BPF program builds keys in its
    /// scratch memory this way rather than on its short stack.
    #[inline(always)]
    pub fn set(&mut self, saddr: &Addr6, daddr: &Addr6, sport_be: u16, dport_be: u16, proto: u8) {
        self.saddr = *saddr;
        self.daddr = *daddr;
        self.sport_be = sport_be;
        self.dport_be = dport_be;
        self.proto = proto;
        self._pad = [0; 3];
    }

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

/// TCP header flag FIN.
pub const TCP_FIN: u8 = 0x01;
/// TCP header flag SYN.
pub const TCP_SYN: u8 = 0x02;
/// TCP header flag RST.
pub const TCP_RST: u8 = 0x04;
/// TCP header flag ACK.
pub const TCP_ACK: u8 = 0x10;
/// Not a TCP flag: set in a direction's flags of a [`CtEntry`] once any packet went that way.
pub const CT_SEEN: u8 = 0x80;
/// Not a TCP flag (the bit of ECE, which is not kept): set in a direction's flags of a
/// [`CtEntry`] once the other side sent a packet after this direction's FIN, so the FIN was
/// answered. A flow whose two FINs are answered is over at both ends (see [`ct_over`]).
pub const CT_FIN_ANSWERED: u8 = 0x40;
/// The TCP flags a [`CtEntry`] keeps per direction (with [`CT_SEEN`]).
pub const CT_FLAGS: u8 = TCP_FIN | TCP_SYN | TCP_RST | TCP_ACK | CT_SEEN;

/// A TCP flow whose client sent a SYN and has not yet acknowledged the backend's answer.
pub const CT_TCP_SYN: usize = 0;
/// A TCP flow past its handshake: the backend answered and the client acknowledged.
pub const CT_TCP_ESTABLISHED: usize = 1;
/// A TCP flow one side of which sent a FIN (the other may still send: a half-closed
/// connection, conntrack's CLOSE_WAIT).
pub const CT_TCP_CLOSE_WAIT: usize = 2;
/// A TCP flow that is closing for good: a FIN went both ways, or a RST either way. The
/// entry stays a little longer for the last packets; its SNAT port may be taken by a new
/// flow once the flow is over ([`ct_over`]).
pub const CT_TCP_CLOSED: usize = 3;
/// A UDP flow whose backend has not answered.
pub const CT_UDP: usize = 4;
/// A UDP flow with packets both ways (conntrack's UDP "stream").
pub const CT_UDP_STREAM: usize = 5;
/// Number of flow states.
pub const CT_STATES: usize = 6;
/// State names for display, indexed like the `CT_*` states.
pub const CT_STATE_NAMES: [&str; CT_STATES] = [
    "syn",
    "established",
    "close_wait",
    "closed",
    "udp",
    "udp_stream",
];

/// The state of a flow of protocol `proto` whose client sent `fwd` flags and whose backend
/// sent `rev` (each direction's TCP flags seen, with [`CT_SEEN`]). The same function in the
/// kernel and in userspace.
#[inline(always)]
pub const fn ct_state(proto: u8, fwd: u8, rev: u8) -> usize {
    if proto != crate::proto::TCP {
        return if rev & CT_SEEN != 0 {
            CT_UDP_STREAM
        } else {
            CT_UDP
        };
    }
    if (fwd | rev) & TCP_RST != 0 || (fwd & rev & TCP_FIN) != 0 {
        CT_TCP_CLOSED
    } else if (fwd | rev) & TCP_FIN != 0 {
        CT_TCP_CLOSE_WAIT
    } else if rev & CT_SEEN != 0 && fwd & TCP_ACK != 0 {
        CT_TCP_ESTABLISHED
    } else {
        CT_TCP_SYN
    }
}

/// Whether a flow of protocol `proto` with direction flags `fwd` and `rev` is answered
/// (conntrack's "assured"): its backend sent a packet and, for TCP, the client acknowledged
/// one, without a RST. Only such flows leave the map of new flows for the main one, so a
/// flood of new flows that are never answered (spoofed SYNs) cannot evict them.
#[inline(always)]
pub const fn ct_assured(proto: u8, fwd: u8, rev: u8) -> bool {
    rev & CT_SEEN != 0
        && (proto != crate::proto::TCP || (fwd & TCP_ACK != 0 && (fwd | rev) & TCP_RST == 0))
}

/// Whether a flow of protocol `proto` with direction flags `fwd` and `rev` is over at both
/// ends, so that its SNAT port may serve a new flow before the entry expires: a TCP flow
/// that saw a RST, or whose two FINs were answered. Until the last FIN is answered, the side
/// that sent it still holds the connection (LAST_ACK), and a new SYN from the same port
/// would meet it and stall. UDP flows are never over before they expire.
#[inline(always)]
pub const fn ct_over(proto: u8, fwd: u8, rev: u8) -> bool {
    proto == crate::proto::TCP && ((fwd | rev) & TCP_RST != 0 || (fwd & rev & CT_FIN_ANSWERED) != 0)
}

/// The lifetime of an entry in each state, in seconds: how long after its last packet it
/// expires. The agent sets them in the kernel programs at load time (globals named
/// [`CT_TIMEOUTS_GLOBAL`]); the defaults follow kube-proxy's conntrack settings.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtTimeouts {
    /// Seconds per `CT_*` state.
    pub secs: [u32; CT_STATES],
}

const _: () = assert!(core::mem::size_of::<CtTimeouts>() == 4 * CT_STATES);

impl CtTimeouts {
    /// Defaults: SYN 60 s; established 24 h (kube-proxy's
    /// `--conntrack-tcp-timeout-established`); half-closed 1 h (its
    /// `--conntrack-tcp-timeout-close-wait`); closed 10 s; UDP 30 s, 120 s once answered
    /// (Linux's `nf_conntrack_udp_timeout` and `_stream`).
    pub const DEFAULT: Self = Self {
        secs: [60, 86_400, 3_600, 10, 30, 120],
    };
}

/// The XDP metadata word (native byte order, just before the frame) that makes a run of
/// the XDP program a dry run, as `lbctl explain` asks: the program decides and rewrites the
/// frame as for a real packet, but records no flow, takes no SNAT port (the rewritten
/// source port of an SNATed new flow is 0) and refreshes no flow. Only a
/// `BPF_PROG_TEST_RUN` caller, or another XDP program before ours, can put metadata there.
pub const XDP_DRY_RUN: u32 = 0x4c42_4452;

/// Name of the kernel programs' [`CtTimeouts`] global.
pub const CT_TIMEOUTS_GLOBAL: &str = "CT_TIMEOUTS";
/// Name of the kernel programs' clock offset global (`u32` seconds added to the monotonic
/// clock): zero in production; tests load the programs with an offset to move time forward.
pub const CT_CLOCK_OFFSET_GLOBAL: &str = "CT_CLOCK_OFFSET";
/// Name of the lowest SNAT port global (`u16`).
pub const SNAT_PORT_MIN_GLOBAL: &str = "SNAT_PORT_MIN";
/// Name of the highest SNAT port global (`u16`).
pub const SNAT_PORT_MAX_GLOBAL: &str = "SNAT_PORT_MAX";

/// A conntrack entry: where a flow goes, its SNAT source, and how long it lives.
///
/// The backend is named by address and port, not by id: an id freed and given to another
/// service's backend can never redirect a flow. The entry is the one record of the flow's
/// state; its reverse entry ([`FlowRevNat`]) only finds it again from a reply.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntry {
    /// The backend.
    pub backend: Endpoint,
    /// The source address the flow is SNATed to; all zero when it is not.
    pub snat_addr: Addr6,
    /// The north-south service id (for counters, and to tell a reprogrammed frontend).
    pub svc_id: u32,
    /// When the entry expires: seconds of the monotonic clock (`CLOCK_MONOTONIC_COARSE`, plus
    /// the programs' clock offset). An expired entry counts as absent.
    pub expires: u32,
    /// When the flow started, on the same clock.
    pub created: u32,
    /// The source port it is SNATed to, network byte order; zero when it is not.
    pub snat_port_be: u16,
    /// TCP flags the client sent, and [`CT_SEEN`].
    pub fwd_flags: u8,
    /// TCP flags the backend sent, and [`CT_SEEN`] once it answered.
    pub rev_flags: u8,
    /// When the flags last changed: the low 32 bits of the same clock in milliseconds. It
    /// wraps every 49 days, so it is only compared over short spans (see
    /// [`CtEntry::frees_port`]).
    pub changed_ms: u32,
}

const _: () = assert!(core::mem::size_of::<CtEntry>() == 56);

/// How long a flow must have been over before its SNAT port serves a new flow, in
/// milliseconds. The old flow's last packets may still be crossing, reordered behind the
/// new flow's SYN on another CPU or link; a SYN that reaches the backend first meets the
/// old connection there and is lost. Linux's own port reuse (`tcp_tw_reuse`) waits too.
pub const CT_PORT_GRACE_MS: u32 = 10;

impl CtEntry {
    /// The flow's state (a `CT_*` state) for protocol `proto`.
    #[inline(always)]
    pub const fn state(&self, proto: u8) -> usize {
        ct_state(proto, self.fwd_flags, self.rev_flags)
    }

    /// Whether the flow is over at both ends: see [`ct_over`].
    #[inline(always)]
    pub const fn is_over(&self, proto: u8) -> bool {
        ct_over(proto, self.fwd_flags, self.rev_flags)
    }

    /// Whether the entry has expired at `now` (seconds). It lives through the second its
    /// expiry names, so on the coarse clock a lifetime of n seconds lasts at least n.
    #[inline(always)]
    pub const fn expired(&self, now: u32) -> bool {
        now > self.expires
    }

    /// Whether the flow's SNAT port may serve a new flow at `now` (seconds) and `now_ms`
    /// (the low bits of the clock in milliseconds): the entry expired, or the flow has been
    /// over at both ends for [`CT_PORT_GRACE_MS`].
    #[inline(always)]
    pub const fn frees_port(&self, proto: u8, now: u32, now_ms: u32) -> bool {
        self.expired(now)
            || (self.is_over(proto) && now_ms.wrapping_sub(self.changed_ms) >= CT_PORT_GRACE_MS)
    }

    /// Whether the flow is SNATed.
    #[inline(always)]
    pub const fn is_snat(&self) -> bool {
        self.snat_port_be != 0
    }

    /// Where the flow's replies go, given the flow's key: the SNAT source, or the client.
    #[inline(always)]
    pub const fn reply_dst<'a>(&'a self, flow: &'a FlowKey) -> (&'a Addr6, u16) {
        if self.is_snat() {
            (&self.snat_addr, self.snat_port_be)
        } else {
            (&flow.saddr, flow.sport_be)
        }
    }

    /// The key of the flow's replies (backend to SNAT source or client), given the flow's
    /// key.
    #[inline(always)]
    pub const fn reply_key(&self, flow: &FlowKey) -> FlowKey {
        let (daddr, dport_be) = self.reply_dst(flow);
        FlowKey::new(
            self.backend.addr,
            *daddr,
            self.backend.port_be,
            dport_be,
            flow.proto,
        )
    }
}

/// A conntrack entry of the first layout (`lb_ct_v1`), which named the backend by id: read
/// only to convert the entries of an older agent's map (see [`crate::maps::CONVERSIONS`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct CtEntryV1 {
    /// The backend id (in `lb_be_v1`).
    pub backend_id: u32,
    /// The north-south service id.
    pub svc_id: u32,
    /// The SNAT address; all zero when not SNATed.
    pub snat_addr: Addr6,
    /// The SNAT port, network byte order; zero when not SNATed.
    pub snat_port_be: u16,
    /// Zero.
    pub _pad: [u8; 6],
}

const _: () = assert!(core::mem::size_of::<CtEntryV1>() == 32);

/// How to restore a reply: its new source (the frontend) and destination (the client). It
/// also names the flow: the conntrack key is (client, frontend, client port, frontend port),
/// so a reply finds its flow's [`CtEntry`] (and the state there) from this.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FlowRevNat {
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

const _: () = assert!(core::mem::size_of::<FlowRevNat>() == 40);

impl FlowRevNat {
    /// The conntrack key of the flow this reverse entry belongs to.
    #[inline(always)]
    pub const fn flow_key(&self, proto: u8) -> FlowKey {
        FlowKey::new(self.dst, self.src, self.dport_be, self.sport_be, proto)
    }

    /// Whether this reverse entry belongs to the flow `flow` (compared field by field, no
    /// key built).
    #[inline(always)]
    pub fn is_of(&self, flow: &FlowKey) -> bool {
        self.dst == flow.saddr
            && self.src == flow.daddr
            && self.dport_be == flow.sport_be
            && self.sport_be == flow.dport_be
    }
}

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

/// Key of the north-south affinity map: a client of a north-south service with session
/// affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExternalAffinityKey {
    /// The north-south service id.
    pub svc_id: u32,
    /// The client's address (IPv4 v4-mapped).
    pub client: Addr6,
}

const _: () = assert!(core::mem::size_of::<ExternalAffinityKey>() == 20);

/// Value of the north-south affinity map: the backend a client's last new flow went to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ExternalAffinityValue {
    /// The backend (where it runs too, for the SNAT decision of the flows it gets).
    pub backend: Backend,
    /// When that flow started: seconds of the conntrack clock (`CtEntry::expires`'s).
    pub last_used: u32,
}

const _: () = assert!(core::mem::size_of::<ExternalAffinityValue>() == 24);

impl ExternalAffinityValue {
    /// Whether a client remembered this way still goes to its backend at `now`, given the
    /// service's affinity timeout: its last new flow started at most `timeout_s` ago (as
    /// kube-proxy, each new flow starts the timeout again).
    #[inline(always)]
    pub const fn holds(&self, now: u32, timeout_s: u32) -> bool {
        now.saturating_sub(self.last_used) <= timeout_s
    }
}

/// Key of the north-south affinity-match map (the value is the service's affinity timeout
/// in seconds, `u32`): a backend of a north-south service with session affinity. Written by
/// the agent for the backends of the service's table, so affinity to a backend that left it
/// is never honoured.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ExternalAffinityMatchKey {
    /// The north-south service id.
    pub svc_id: u32,
    /// The backend.
    pub backend: Endpoint,
}

const _: () = assert!(core::mem::size_of::<ExternalAffinityMatchKey>() == 24);

/// Per-service counters (per CPU), indexed by north-south service id.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ExternalCounters {
    /// Packets translated to a backend.
    pub packets: u64,
    /// Their bytes.
    pub bytes: u64,
    /// New flows (conntrack entries created).
    pub flows: u64,
    /// Packets dropped for this service (no backend, source range, no SNAT port).
    pub drops: u64,
}

const _: () = assert!(core::mem::size_of::<ExternalCounters>() == 32);

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
