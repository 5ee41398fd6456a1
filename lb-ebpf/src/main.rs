//! Kernel programs: socket-level load balancing of Kubernetes services.
//!
//! One file per hook, each a thin entry point; the logic sits in small helper modules:
//! - `connect`: connect4/connect6 translate a connect() to a service into a backend;
//! - `sendmsg`: sendmsg4/sendmsg6 do the same per datagram for unconnected UDP;
//! - `recvmsg`: recvmsg4/recvmsg6 restore the service as the source of replies;
//! - `getpeername`: getpeername4/getpeername6 report the service as the peer;
//! - `release`: sock_release forgets a closing UDP socket's connected-socket entry;
//! - `xdp`: north-south load balancing on the external devices (xdp_lb), and xdp_pass;
//! - `tc`: tc_egress restores the frontend on replies of local backends;
//! - `overlay`: tc_overlay reverses replies of SNATed flows arriving on overlay devices;
//! - `xlate` (service lookup), `select` (backend choice, session affinity), `revnat` (what to
//!   restore), `family` (IPv4 and IPv6 views of the socket address), `maps`, `stats`; and for
//!   the packet programs `pkt` (parsing), `csum`, `nat`, `fib` (forwarding), `ct`
//!   (conntrack, SNAT ports, source ranges), `skb` (what the tc programs share).
#![no_std]
#![no_main]
// The socket hooks' per-service counters are shared by all CPUs: atomic adds (BPF_ATOMIC),
// which core's atomics do not offer on the BPF target (it has no compare-and-swap).
#![feature(core_intrinsics)]
#![expect(
    internal_features,
    reason = "core_intrinsics, for the atomic adds above"
)]
// aya-ebpf's map calls take `impl Borrow<K>`. A key passed by value is copied onto the
// 512-byte BPF stack; keys built in the per-CPU scratch area are borrowed where they lie.
#![expect(
    clippy::needless_borrows_for_generic_args,
    reason = "keys are borrowed in place so they are not copied to the BPF stack"
)]

mod affinity;
mod csum;
mod ct;
mod debug;
mod family;
mod fib;
mod icmp;
mod maps;
mod nat;
mod pkt;
mod reject;
mod revnat;
mod scratch;
mod select;
mod skb;
mod stats;
mod xlate;

mod connect;
mod getpeername;
mod overlay;
mod recvmsg;
mod release;
mod sendmsg;
mod tc;
mod xdp;

/// The licence of the object. GPL-compatible, as some helpers require.
#[unsafe(no_mangle)]
#[unsafe(link_section = "license")]
pub static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    // Unreachable in a verified program: the verifier rejects any path that could get here.
    loop {}
}
