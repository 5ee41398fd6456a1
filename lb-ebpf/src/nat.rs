//! Rewriting a packet's addresses and ports in XDP, with incremental checksum updates
//! (the IPv4 header checksum, and the TCP or UDP checksum over its pseudo-header).

use lb_common::{Addr6, proto};

use crate::{
    csum::Delta,
    pkt::{ETH_LEN, Pkt, at},
};

/// A new address and port (network order).
#[derive(Clone, Copy)]
pub struct Addr {
    /// Address, IPv4 v4-mapped.
    pub ip: Addr6,
    /// Port, network order.
    pub port_be: u16,
}

/// Writes a 32-bit word at `off`, accounting for it in `delta`. Its own BPF function: the
/// IPv6 rewrite calls it eight times.
#[inline(never)]
fn put32(start: usize, end: usize, off: usize, new: u32, delta: &mut Delta) -> Option<()> {
    let p = at::<u32>(start, end, off)?;
    // SAFETY: bounds checked by `at`; packet data may be unaligned.
    unsafe {
        delta.dword(p.read_unaligned(), new);
        p.write_unaligned(new);
    }
    Some(())
}

/// Writes a 16-bit word at `off`, accounting for it in `delta`.
#[inline(always)]
fn put16(start: usize, end: usize, off: usize, new: u16, delta: &mut Delta) -> Option<()> {
    let p = at::<u16>(start, end, off)?;
    // SAFETY: as above.
    unsafe {
        delta.word(p.read_unaligned(), new);
        p.write_unaligned(new);
    }
    Some(())
}

/// A packet's new source and destination.
#[derive(Clone, Copy)]
pub struct Rewrite {
    /// New source.
    pub src: Addr,
    /// New destination.
    pub dst: Addr,
}

/// Rewrites source and destination of the packet in `[start, end)` parsed as `p`.
#[inline(always)]
pub fn rewrite(start: usize, end: usize, p: &Pkt, rw: &Rewrite) -> Option<()> {
    let addrs = if p.v6 {
        addrs_v6(start, end, rw)?
    } else {
        addrs_v4(start, end, rw)?
    };
    ports(start, end, p, rw, addrs)
}

/// IPv4 addresses, and the IPv4 header checksum; returns the adjustment for the L4 checksum.
/// Its own BPF function (like the others here) to keep the stack of any one path small.
#[inline(never)]
fn addrs_v4(start: usize, end: usize, rw: &Rewrite) -> Option<Delta> {
    let l3 = ETH_LEN;
    let mut addrs = Delta::default();
    put32(start, end, l3 + 12, rw.src.ip.v4_be(), &mut addrs)?;
    put32(start, end, l3 + 16, rw.dst.ip.v4_be(), &mut addrs)?;
    let check = at::<u16>(start, end, l3 + 10)?;
    // SAFETY: bounds checked by `at`.
    unsafe { check.write_unaligned(addrs.apply(check.read_unaligned())) };
    Some(addrs)
}

/// IPv6 addresses; returns the adjustment for the L4 checksum.
#[inline(never)]
fn addrs_v6(start: usize, end: usize, rw: &Rewrite) -> Option<Delta> {
    let l3 = ETH_LEN;
    let mut addrs = Delta::default();
    for i in 0..4 {
        put32(start, end, l3 + 8 + 4 * i, rw.src.ip.words[i], &mut addrs)?;
        put32(start, end, l3 + 24 + 4 * i, rw.dst.ip.words[i], &mut addrs)?;
    }
    Some(addrs)
}

/// The ports, and the L4 checksum for ports and addresses (`addrs`).
#[inline(never)]
fn ports(start: usize, end: usize, p: &Pkt, rw: &Rewrite, addrs: Delta) -> Option<()> {
    let mut l4 = addrs;
    put16(start, end, p.l4(), rw.src.port_be, &mut l4)?;
    put16(start, end, p.l4() + 2, rw.dst.port_be, &mut l4)?;
    let check = at::<u16>(start, end, p.check_off())?;
    // SAFETY: bounds checked by `at`.
    let old = unsafe { check.read_unaligned() };
    let udp = p.key.proto == proto::UDP;
    // An IPv4 UDP checksum of zero means "none": keep it so.
    if udp && old == 0 && !p.v6 {
        return Some(());
    }
    let mut new = l4.apply(old);
    if udp && new == 0 {
        new = 0xffff;
    }
    // SAFETY: bounds checked by `at`.
    unsafe { check.write_unaligned(new) };
    Some(())
}
