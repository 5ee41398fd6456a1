//! Datapath counters: indexes into the per-CPU stats map ([`crate::maps::STATS`]).
//!
//! Counters, not logs, are the production signal: every outcome of a hook that translated,
//! refused or failed to translate has one.

/// A connect() to a service was translated to a backend.
pub const CONNECT_TRANSLATED: u32 = 0;
/// A UDP sendmsg() to a service was translated to a backend.
pub const SENDMSG_TRANSLATED: u32 = 1;
/// A connect() or sendmsg() to a service with no backends was refused (ECONNREFUSED).
pub const REFUSED_NO_BACKEND: u32 = 2;
/// A received datagram's source or a socket's peer was restored to the service address.
pub const REVERSED: u32 = 3;
/// A service's slot was missing (the agent was mid-update or the maps are inconsistent); the
/// socket was left untranslated.
pub const ERR_SLOT_MISSING: u32 = 4;
/// A slot named a backend that does not exist; the socket was left untranslated.
pub const ERR_BACKEND_MISSING: u32 = 5;
/// A backend's address family did not fit the socket; the socket was left untranslated.
pub const ERR_FAMILY_MISMATCH: u32 = 6;
/// The reverse-NAT entry could not be written: the reply source or peer name will show the
/// backend rather than the service.
pub const ERR_REV_NAT_UPDATE: u32 = 7;
/// A connection of a client with session affinity went to its remembered backend.
pub const AFFINITY_HIT: u32 = 8;
/// The affinity entry could not be written: the client's next connection may pick anew.
pub const ERR_AFFINITY_UPDATE: u32 = 9;
/// XDP: a packet for a north-south frontend was translated to a backend.
pub const XDP_TRANSLATED: u32 = 10;
/// XDP: a reply of a translated flow got its addresses restored.
pub const XDP_REVERSED: u32 = 11;
/// tc egress: a reply of a local backend got its source restored.
pub const TC_REVERSED: u32 = 12;
/// XDP: a translated packet went out by redirect or XDP_TX.
pub const XDP_REDIRECTED: u32 = 13;
/// XDP: a translated packet went to the stack (the destination is local, or the FIB lookup
/// could not resolve the next hop).
pub const XDP_TO_STACK: u32 = 14;
/// XDP: dropped, the service has Local policy and no local backend.
pub const XDP_DROP_NO_BACKEND: u32 = 15;
/// XDP: dropped, the source is outside `loadBalancerSourceRanges`.
pub const XDP_DROP_SOURCE_RANGE: u32 = 16;
/// XDP: dropped, no free SNAT port for the flow.
pub const XDP_DROP_NO_SNAT_PORT: u32 = 17;
/// XDP: an IP fragment (of any destination) went to the stack untranslated; fragments of
/// north-south flows are not load balanced (the stack answers them as the node).
pub const XDP_PASS_FRAGMENT: u32 = 18;
/// XDP: a TCP or UDP packet (of any destination) with IPv4 options or IPv6 extension headers
/// went to the stack untranslated.
pub const XDP_PASS_IP_OPTIONS: u32 = 19;
/// XDP: a truncated or malformed IP packet went to the stack untouched.
pub const XDP_PASS_MALFORMED: u32 = 20;
/// XDP: dropped, a TCP packet without SYN (or with SYN and ACK) for a frontend, of no live
/// flow: one that expired, was evicted or closed, or a spoofed one. A new TCP flow starts
/// only with a SYN.
pub const XDP_DROP_NO_FLOW: u32 = 21;
/// XDP or tc: a packet to an SNAT port, or from a backend, whose reverse entry belongs to no
/// live flow (expired, closed and taken over): passed on untranslated.
pub const STALE_REPLY: u32 = 22;
/// XDP: a new flow took over the SNAT port of an ended or expired flow (no free port was
/// found among those tried first).
pub const SNAT_PORT_REUSED: u32 = 23;
/// XDP: an IPv6 packet with an IPv4-mapped source or destination went to the stack
/// untranslated (such addresses never appear on the wire; they must not match IPv4
/// frontends).
pub const XDP_PASS_V4_MAPPED: u32 = 24;
/// XDP: a new flow of a client with session affinity went to its remembered backend.
pub const XDP_AFFINITY_HIT: u32 = 25;
/// XDP: a new flow for a Cluster-policy frontend with no backend was answered with an ICMP
/// port unreachable (as kube-proxy's REJECT), not delivered.
pub const XDP_REJECT_NO_BACKEND: u32 = 26;
/// XDP: an ICMP error about a translated flow (fragmentation needed, packet too big,
/// unreachable, time exceeded) was translated and sent on to the flow's other side.
pub const XDP_ICMP_TRANSLATED: u32 = 27;
/// XDP: a packet too big for the route it was translated onto (IPv4 with "don't fragment",
/// or IPv6) was answered with a "fragmentation needed" or "packet too big" to its sender.
pub const XDP_TOO_BIG: u32 = 28;
/// tc ingress on an overlay device: a reply of an SNATed flow was reversed and sent on
/// towards the client.
pub const OVERLAY_REVERSED: u32 = 29;
/// XDP: a new flow to a backend on another node was SNATed onto a route through a device
/// that no north-south program runs on, so its replies are not reversed: that device should
/// be an XDP or overlay device.
pub const XDP_SNAT_UNWATCHED_DEVICE: u32 = 30;
/// tc: an ICMP error about a translated flow, sent by a pod of this node (egress) or
/// arriving on an overlay device, was translated for the client.
pub const TC_ICMP_TRANSLATED: u32 = 31;
/// connect: a translated UDP socket could not be written to the connected-UDP-socket map
/// (full): should its backend leave, it is found through the reverse-NAT map only, whose
/// entry other connections may evict.
pub const ERR_UDP_SOCKET_UPDATE: u32 = 32;
/// Number of counters.
pub const COUNT: u32 = 33;

/// Counter names for display, indexed like the constants.
pub const NAMES: [&str; COUNT as usize] = [
    "connect_translated",
    "sendmsg_translated",
    "refused_no_backend",
    "reversed",
    "err_slot_missing",
    "err_backend_missing",
    "err_family_mismatch",
    "err_rev_nat_update",
    "affinity_hit",
    "err_affinity_update",
    "xdp_translated",
    "xdp_reversed",
    "tc_reversed",
    "xdp_redirected",
    "xdp_to_stack",
    "xdp_drop_no_backend",
    "xdp_drop_source_range",
    "xdp_drop_no_snat_port",
    "xdp_pass_fragment",
    "xdp_pass_ip_options",
    "xdp_pass_malformed",
    "xdp_drop_no_flow",
    "stale_reply",
    "snat_port_reused",
    "xdp_pass_v4_mapped",
    "xdp_affinity_hit",
    "xdp_reject_no_backend",
    "xdp_icmp_translated",
    "xdp_too_big",
    "overlay_reversed",
    "xdp_snat_unwatched_device",
    "tc_icmp_translated",
    "err_udp_socket_update",
];

/// Connections of one socket-level frontend (a service id's entry of
/// [`crate::maps::SVC_STATS`]), counted with atomic adds across CPUs.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct SocketCounters {
    /// connect() calls and unconnected UDP datagrams translated to a backend.
    pub translated: u64,
    /// connect() and sendmsg() calls refused because the frontend had no backend.
    pub refused: u64,
}

const _: () = assert!(core::mem::size_of::<SocketCounters>() == 16);
