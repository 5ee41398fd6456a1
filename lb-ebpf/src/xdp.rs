//! XDP on the node's external devices: north-south load balancing of NodePort, LoadBalancer
//! and external IP frontends, and the reverse translation of replies to SNATed flows.

use aya_ebpf::{bindings::xdp_action, macros::xdp, programs::XdpContext};
use lb_common::{
    ServiceKey,
    external::{
        EXTERNAL_F_AFFINITY, EXTERNAL_F_LOCAL, EXTERNAL_F_SOURCE_RANGES, ExternalService,
        FlowRevNat, XDP_DRY_RUN, flow_hash,
    },
    maps::TABLE_LANES,
    node, proto, stats as st,
};

use crate::{
    affinity, ct, debug, fib, icmp,
    maps::{BACKENDS, EXTERNAL_SERVICES, EXTERNAL_STATS, TABLES},
    nat::{Addr, rewrite},
    pkt::{Pkt, Skip, parse},
    reject,
    scratch::{self, Scratch},
    stats,
};

/// Load balancing of traffic from outside the node.
#[xdp]
pub fn xdp_lb(ctx: XdpContext) -> u32 {
    north_south(&ctx)
}

/// Passes everything: the baseline for benchmarks, and what makes a veth accept frames
/// redirected to it.
#[xdp]
pub fn xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

#[inline(always)]
fn north_south(ctx: &XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let p = match parse(start, end, end - start) {
        Ok(p) => p,
        // Not TCP or UDP: an ICMP error about a translated flow is translated too.
        Err(Skip::Other) => return icmp::translate(ctx),
        Err(Skip::Counted(why)) => {
            stats::inc(why);
            return xdp_action::XDP_PASS;
        }
    };
    // Replies of SNATed flows come to an SNAT port: only those look up the reverse-NAT map.
    // The map also holds the replies of flows that kept the client's address, which leave
    // by tc egress: those are not reversed here.
    // SAFETY (map reads): entries are replaced whole; values are copied at once.
    if ct::is_snat_port(p.key.dport_be)
        && let Some(rev) = ct::reverse_entry(&p.key)
        && let rev = unsafe { &*rev }
        && ct::reverses_snat(rev, &p.key)
    {
        return reverse(ctx, &p, rev);
    }
    let frontend = ServiceKey::new(p.key.daddr, p.key.dport_be, p.key.proto);
    match unsafe { EXTERNAL_SERVICES.get(&frontend) } {
        Some(svc) => forward(ctx, &p, svc),
        None => xdp_action::XDP_PASS,
    }
}

/// Whether this run is a dry run: the metadata before the frame holds
/// [`XDP_DRY_RUN`] (only `BPF_PROG_TEST_RUN` callers such as `lbctl explain` put it there).
#[inline(always)]
fn dry_run(ctx: &XdpContext) -> bool {
    let meta = ctx.metadata();
    if meta + 4 > ctx.metadata_end() {
        return false;
    }
    // SAFETY: four bytes of metadata, checked against its end above.
    unsafe { core::ptr::read_unaligned(meta as *const u32) == XDP_DRY_RUN }
}

/// Counts a packet of service `svc_id` that is not delivered, for reason `why` (a counter).
#[inline(always)]
fn count_drop(svc_id: u32, why: u32) {
    if let Some(c) = EXTERNAL_STATS.get_ptr_mut(svc_id) {
        // SAFETY: this CPU's slot; XDP runs with migration disabled.
        unsafe { (*c).drops += 1 };
    }
    stats::inc(why);
    debug::decision!("xdp_drop service={} counter={}", svc_id, why);
}

/// A packet too big for the route found (`rc`) that may not be fragmented is refused as a
/// router would: its sender hears, about the packet it sent, with the route's MTU (the stack
/// could only answer a translated packet's source, the node itself). Counted for service
/// `svc_id`. The verdict, or `None` to go on.
#[inline(always)]
fn refuse_too_big(ctx: &XdpContext, s: &Scratch, rc: u32, p: &Pkt, svc_id: u32) -> Option<u32> {
    let mtu = fib::too_big(s, rc)?;
    if reject::may_fragment(ctx, p.v6) {
        return None;
    }
    count_drop(svc_id, st::XDP_TOO_BIG);
    Some(reject::too_big(ctx, p.v6, mtu))
}

/// Whether a new flow (under Cluster policy) to the backend in `s.chosen`, on the route
/// found (`rc`), is SNATed to this node so that its replies come back through it: always
/// when the backend runs on another node, whatever device the route takes (an overlay, a
/// second NIC); never when it runs on this one (its replies are reversed at tc egress). When
/// where it runs is not known (an endpoint without `nodeName`), when the route leaves
/// through a device the north-south programs run on.
#[inline(always)]
fn snat_needed(s: &Scratch, rc: u32) -> bool {
    match s.chosen.ep.node {
        node::LOCAL => false,
        node::REMOTE => {
            if !fib::forwarded(rc) {
                return false;
            }
            if !fib::leaves_by_our_device(s, rc) {
                stats::inc(st::XDP_SNAT_UNWATCHED_DEVICE);
            }
            true
        }
        _ => fib::leaves_by_our_device(s, rc),
    }
}

#[inline(always)]
fn drop_for(svc_id: u32, why: u32) -> u32 {
    count_drop(svc_id, why);
    xdp_action::XDP_DROP
}

/// A reply of a translated flow: restore the frontend as source and the client as
/// destination, while the flow is alive (a stale reverse entry passes the packet on to the
/// stack untranslated, which answers it as the node). A function of its own (not inlined),
/// so its stack is not added to `forward`'s: the BPF stack is 512 bytes.
#[inline(never)]
fn reverse(ctx: &XdpContext, p: &Pkt, rev: &FlowRevNat) -> u32 {
    let Some(s) = scratch::get() else {
        return xdp_action::XDP_PASS;
    };
    let now = ct::now();
    let Some(flow) = ct::reply_flow(rev, &p.key, &mut s.fwd, now) else {
        stats::inc(st::STALE_REPLY);
        return xdp_action::XDP_PASS;
    };
    let dry = dry_run(ctx);
    if !dry {
        ct::touch(flow.entry, p.key.proto, p.tcp_flags, true, now);
    }
    let rc = fib::lookup(ctx, s, p, &rev.src, &rev.dst);
    if let Some(verdict) = refuse_too_big(ctx, s, rc, p, rev.svc_id) {
        return verdict;
    }
    s.rw.src = Addr {
        ip: rev.src,
        port_be: rev.sport_be,
    };
    s.rw.dst = Addr {
        ip: rev.dst,
        port_be: rev.dport_be,
    };
    if rewrite(ctx.data(), ctx.data_end(), p, &s.rw).is_none() {
        return xdp_action::XDP_PASS;
    }
    stats::north_south(rev.svc_id, p.len, false);
    stats::inc(st::XDP_REVERSED);
    // Last: an answered flow's entries leave the maps of new flows, where `rev` may be.
    if flow.new && !dry {
        ct::settle(flow.entry, &s.fwd, &p.key);
    }
    fib::send(ctx, s, rc)
}

/// A packet for a frontend: to its flow's backend, or, for the first packet of a flow (a
/// TCP SYN, any UDP datagram), to the client's remembered backend (session affinity) or one
/// picked from the Maglev table. A TCP packet of no live flow that is not a SYN is dropped:
/// it belongs to a flow that ended, expired or was evicted (or is spoofed), and another
/// backend would only reset it. A new flow of a service without backends is refused with an
/// ICMP port unreachable (Cluster policy) or dropped (Local). In a dry run nothing is
/// recorded. Not inlined, like `reverse`.
#[inline(never)]
fn forward(ctx: &XdpContext, p: &Pkt, svc: &ExternalService) -> u32 {
    let Some(s) = scratch::get() else {
        return xdp_action::XDP_PASS;
    };
    if svc.flags & EXTERNAL_F_SOURCE_RANGES != 0 && !ct::source_allowed(s, svc.id, &p.key.saddr) {
        return drop_for(svc.id, st::XDP_DROP_SOURCE_RANGE);
    }
    let now = ct::now();
    let tcp = p.key.proto == proto::TCP;
    let syn = tcp && ct::is_syn(p.tcp_flags);
    s.dry = u32::from(dry_run(ctx));
    let new_flow = if let Some(flow) = ct::live(&p.key, svc.id, syn, now) {
        if s.dry == 0 {
            ct::touch(flow.entry, p.key.proto, p.tcp_flags, false, now);
        }
        // SAFETY: a live LRU value, copied field by field.
        let e = unsafe { &*flow.entry };
        s.rw.dst.ip = e.backend.addr;
        s.rw.dst.port_be = e.backend.port_be;
        if e.is_snat() {
            s.rw.src.ip = e.snat_addr;
            s.rw.src.port_be = e.snat_port_be;
        } else {
            s.rw.src.ip = p.key.saddr;
            s.rw.src.port_be = p.key.sport_be;
        }
        // Last: an answered flow's entry leaves the map of new flows.
        if flow.new && s.dry == 0 {
            ct::settle_from_client(s, flow.entry, &p.key);
        }
        false
    } else {
        if tcp && !syn {
            return drop_for(svc.id, st::XDP_DROP_NO_FLOW);
        }
        if svc.table_size == 0 {
            // No backend: refused as kube-proxy does under Cluster policy; under Local
            // policy (no backend on this node) dropped, as kube-proxy does too.
            if svc.flags & EXTERNAL_F_LOCAL == 0 {
                count_drop(svc.id, st::XDP_REJECT_NO_BACKEND);
                return reject::port_unreachable(ctx, p.v6);
            }
            return drop_for(svc.id, st::XDP_DROP_NO_BACKEND);
        }
        if svc.flags & EXTERNAL_F_AFFINITY == 0 || !affinity::recall(s, svc.id, &p.key.saddr, now) {
            let index = svc.table_off + flow_hash(&p.key) % svc.table_size;
            let id = match TABLES.get(index / TABLE_LANES) {
                Some(pair) => pair[(index % TABLE_LANES) as usize],
                None => return drop_for(svc.id, st::XDP_DROP_NO_BACKEND),
            };
            let Some(backend) = BACKENDS.get_ptr(&id) else {
                stats::inc(st::ERR_BACKEND_MISSING);
                return xdp_action::XDP_PASS;
            };
            // SAFETY: see `north_south`; copied into the scratch entry.
            unsafe { s.chosen.ep = *backend };
            s.chosen.svc_id = svc.id;
            s.chosen.id = id;
        }
        s.rw.dst.ip = s.chosen.ep.addr;
        s.rw.dst.port_be = s.chosen.ep.port_be;
        true
    };
    let rc = fib::lookup_to_backend(ctx, s, p);
    if let Some(verdict) = refuse_too_big(ctx, s, rc, p, svc.id) {
        return verdict;
    }
    if new_flow {
        let snat =
            (svc.flags & EXTERNAL_F_LOCAL == 0 && snat_needed(s, rc)).then(|| fib::source(s, p.v6));
        if s.dry != 0 {
            ct::preview(s, &p.key, &snat);
        } else if !ct::create(s, &p.key, &snat, p.tcp_flags, now) {
            return drop_for(svc.id, st::XDP_DROP_NO_SNAT_PORT);
        } else if svc.flags & EXTERNAL_F_AFFINITY != 0 {
            affinity::remember(s, now);
        }
        debug::decision!("xdp_new_flow service={} backend={}", svc.id, s.chosen.id);
    }
    if rewrite(ctx.data(), ctx.data_end(), p, &s.rw).is_none() {
        return xdp_action::XDP_PASS;
    }
    stats::north_south(svc.id, p.len, new_flow);
    stats::inc(st::XDP_TRANSLATED);
    fib::send(ctx, s, rc)
}
