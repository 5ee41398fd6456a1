//! What the tc programs share: finding the reverse entry of a reply carried by an skb, and
//! rewriting it through the skb helpers, which handle checksums the stack has left to the
//! device (CHECKSUM_PARTIAL).

use aya_ebpf::{
    bindings::{BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    programs::TcContext,
};
use lb_common::{external::FlowRevNat, proto, stats as st};

use crate::{
    ct,
    pkt::{ETH_LEN, Pkt, parse},
    scratch, stats,
};

/// Headers pulled into the linear part of the skb before parsing: Ethernet, IPv6, TCP.
const HEADERS: u32 = (ETH_LEN + 40 + 20) as u32;

/// The reply the skb carries and its reverse entry, while the reply's flow lives (its state
/// and lifetime are then updated). With `snat_only`, only replies of SNATed flows (see
/// [`ct::reverses_snat`]).
#[inline(always)]
pub fn live_reply(ctx: &TcContext, snat_only: bool) -> Option<(Pkt, FlowRevNat)> {
    // The headers must be in the linear part; the payload may stay in fragments.
    let len = ctx.len();
    let _ = ctx.pull_data(HEADERS.min(len));
    let p = parse(ctx.data(), ctx.data_end(), len as usize).ok()?;
    if snat_only && !ct::is_snat_port(p.key.dport_be) {
        return None;
    }
    // SAFETY: LRU entries are replaced whole; the value is copied at once.
    let rev = unsafe { *ct::reverse_entry(&p.key)? };
    if snat_only && !ct::reverses_snat(&rev, &p.key) {
        return None;
    }
    // Only while the flow lives (and the entry is still its own). The flow's key is built
    // in the scratch entry (the stack is short).
    let now = ct::now();
    let s = scratch::get()?;
    let Some(flow) = ct::reply_flow(&rev, &p.key, &mut s.fwd, now) else {
        stats::inc(st::STALE_REPLY);
        return None;
    };
    ct::touch(flow.entry, p.key.proto, p.tcp_flags, true, now);
    if flow.new {
        ct::settle(flow.entry, &s.fwd, &p.key);
    }
    Some((p, rev))
}

/// Adds a reply to its service's counters, and to counter `what`.
#[inline(always)]
pub fn count(rev: &FlowRevNat, p: &Pkt, what: u32) {
    stats::north_south(rev.svc_id, p.len, false);
    stats::inc(what);
}

/// Writes the reply's new source and destination (the entry's) through the skb helpers.
#[inline(always)]
pub fn rewrite(ctx: &TcContext, p: &Pkt, rev: &FlowRevNat) -> Result<(), i64> {
    let l3 = ETH_LEN;
    let check = p.check_off();
    let udp_flag = if p.key.proto == proto::UDP {
        u64::from(BPF_F_MARK_MANGLED_0)
    } else {
        0
    };
    let word = |off: usize, old: u32, new: u32, l3_check: bool| -> Result<(), i64> {
        if old == new {
            return Ok(());
        }
        ctx.l4_csum_replace(
            check,
            u64::from(old),
            u64::from(new),
            u64::from(BPF_F_PSEUDO_HDR) | udp_flag | 4,
        )?;
        if l3_check {
            ctx.l3_csum_replace(l3 + 10, u64::from(old), u64::from(new), 4)?;
        }
        ctx.store(off, &new, 0)
    };
    if p.v6 {
        for i in 0..4 {
            word(
                l3 + 8 + 4 * i,
                p.key.saddr.words[i],
                rev.src.words[i],
                false,
            )?;
            word(
                l3 + 24 + 4 * i,
                p.key.daddr.words[i],
                rev.dst.words[i],
                false,
            )?;
        }
    } else {
        word(l3 + 12, p.key.saddr.v4_be(), rev.src.v4_be(), true)?;
        word(l3 + 16, p.key.daddr.v4_be(), rev.dst.v4_be(), true)?;
    }
    let port = |off: usize, old: u16, new: u16| -> Result<(), i64> {
        if old == new {
            return Ok(());
        }
        ctx.l4_csum_replace(check, u64::from(old), u64::from(new), udp_flag | 2)?;
        ctx.store(off, &new, 0)
    };
    port(p.l4(), p.key.sport_be, rev.sport_be)?;
    port(p.l4() + 2, p.key.dport_be, rev.dport_be)
}
