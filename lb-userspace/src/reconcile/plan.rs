//! The planning step ([`Planner`]): from a service in the store to what it should have (the
//! model, its namespace's share, its health-check node port); and how the reconciler takes
//! a plan in (the agent's own API address kept reachable, what a rejected service keeps).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use lb_common::{Backend, ServiceKey};

use crate::{
    datapath::{Capacities, Datapath},
    k8s::{Age, ObjectRef, store::Store},
    model::{
        self, Claim, DesiredFrontend, ExternalGroup, HealthCheck, Limits, Rejection, Slice,
        share::{Shares, Usage},
    },
};

use super::{Reconciler, external::Touched, report::SyncReport};

/// What a service should have, as the planning step decides it.
pub(super) enum Plan {
    /// It was deleted: its frontends go.
    Gone,
    /// Valid, and its namespace has room.
    Desired {
        /// Socket-level frontends.
        frontends: Vec<DesiredFrontend>,
        /// North-south groups.
        external: Vec<ExternalGroup>,
    },
    /// Rejected: it keeps what it had, but only backends whose address is still one of its
    /// endpoints (`live`).
    Rejected {
        /// The addresses of its endpoints, whatever their conditions.
        live: BTreeSet<IpAddr>,
    },
}

/// The planning step before the reconciler: runs the model on a service, charges its
/// namespace's share, and keeps the health-check node ports services ask for. It reads the
/// store only; what is programmed is the reconciler's.
pub struct Planner {
    limits: Limits,
    /// What each namespace's services take from the maps, against its share.
    shares: Shares,
    /// Health check node ports of services, with their local endpoint counts.
    health_checks: BTreeMap<ObjectRef, HealthCheck>,
}

impl Planner {
    /// A planner with `limits`, and shares of `percent` of each of the maps of `caps`.
    pub fn new(limits: Limits, caps: &Capacities, percent: u32) -> Self {
        Self {
            limits,
            shares: Shares::new(caps, percent),
            health_checks: BTreeMap::new(),
        }
    }

    /// Each namespace's use of the maps, against its share.
    pub fn shares(&self) -> &Shares {
        &self.shares
    }

    /// The health check node ports of the services that have one.
    pub fn health_checks(&self) -> &BTreeMap<ObjectRef, HealthCheck> {
        &self.health_checks
    }

    /// What `owner` should have, from `store`: what the model makes of it if it is valid and
    /// its namespace has room; its notes, refusals and rejection go into `report`.
    pub(super) fn plan(
        &mut self,
        store: &Store,
        owner: &ObjectRef,
        report: &mut SyncReport,
    ) -> Plan {
        let Some(svc) = store.service(owner) else {
            self.health_checks.remove(owner);
            self.shares.release(owner);
            return Plan::Gone;
        };
        let planned = model::desired(svc, store.slices_of(owner), store.node(), &self.limits)
            .and_then(|d| {
                let usage = Usage::of(&d.frontends, &d.external, &self.limits);
                match self.shares.admit(owner, usage) {
                    Ok(()) => Ok(d),
                    Err(e) => Err(Rejection::NamespaceShare {
                        map: e.map,
                        used: e.used,
                        share: e.share,
                    }),
                }
            });
        let d = match planned {
            Ok(d) => d,
            Err(rejection) => {
                report.rejected.push((owner.clone(), rejection));
                let live = store.slices_of(owner).flat_map(Slice::addresses).collect();
                return Plan::Rejected { live };
            }
        };
        let tag = |n| (owner.clone(), n);
        report.notes.extend(d.notes.into_iter().map(tag));
        report.refused.extend(d.refused.into_iter().map(tag));
        report.limited.extend(d.limited.into_iter().map(tag));
        match d.health_check {
            Some(h) => self.health_checks.insert(owner.clone(), h),
            None => self.health_checks.remove(owner),
        };
        Plan::Desired {
            frontends: d.frontends,
            external: d.external,
        }
    }

    /// Charges `owner` for what an earlier run programmed for it (adopted while it is
    /// rejected), without checking its share.
    pub(super) fn hold(
        &mut self,
        owner: &ObjectRef,
        frontends: &[DesiredFrontend],
        groups: &[ExternalGroup],
    ) {
        self.shares
            .hold(owner, Usage::of(frontends, groups, &self.limits));
    }

    /// The services refused for their namespace's share where it freed room since the
    /// last call: to be planned again.
    pub(super) fn take_retries(&mut self) -> BTreeSet<ObjectRef> {
        self.shares.take_retries()
    }
}

impl<D: Datapath> Reconciler<D> {
    pub(super) fn keep_api_access(
        &self,
        owner: &ObjectRef,
        frontends: &mut [DesiredFrontend],
        report: &mut SyncReport,
    ) {
        let Some(api) = self.api else {
            return;
        };
        let Some(f) = frontends
            .iter_mut()
            .find(|f| f.key == api && f.backends.is_empty())
        else {
            return;
        };
        let kept = self
            .mirror
            .services
            .get(&api)
            .map(|v| self.programmed_backends(v))
            .unwrap_or_default();
        if !kept.is_empty() {
            report.notes.push((
                owner.clone(),
                format!(
                    "{} is the agent's own API server address and lost every endpoint: its last {} backends are kept",
                    crate::addr::frontend_string(&api),
                    kept.len()
                ),
            ));
            f.backends = kept;
        }
    }

    /// Sets the desired frontends of `owner` to what `plan` says: the planned ones (with the
    /// agent's own API address kept reachable), none, or, for a rejected service, what it
    /// had (from the maps, on the first sync) cut to its live endpoints.
    pub(super) fn apply_plan(
        &mut self,
        owner: &ObjectRef,
        plan: Plan,
        first: bool,
        report: &mut SyncReport,
        touched: &mut BTreeSet<ServiceKey>,
        ext_touched: &mut Touched,
    ) {
        match plan {
            Plan::Gone => {
                self.set_desired(owner, None, touched);
                self.ext.set_desired(owner, None, ext_touched);
            }
            Plan::Desired {
                mut frontends,
                external,
            } => {
                self.keep_api_access(owner, &mut frontends, report);
                self.set_desired(owner, Some(frontends), touched);
                self.ext.set_desired(owner, Some(external), ext_touched);
            }
            Plan::Rejected { live } => {
                if first {
                    // Keep what an earlier run programmed for it.
                    let adopted = self.adopt(owner);
                    let adopted_ext = self.adopt_external(owner);
                    self.planner.hold(owner, &adopted, &adopted_ext);
                    if !adopted.is_empty() {
                        self.set_desired(owner, Some(adopted), touched);
                    }
                    if !adopted_ext.is_empty() {
                        self.ext.set_desired(owner, Some(adopted_ext), ext_touched);
                    }
                }
                self.keep_live_backends(owner, &live, touched, ext_touched);
            }
        }
    }

    /// Cuts the backends a rejected service keeps (what it last had programmed) down to
    /// those whose address is still an endpoint in its slices (`live`): its table shrinks as
    /// its pods go, and never sends to an address a deleted pod left, which another
    /// tenant's pod may get next.
    pub(super) fn keep_live_backends(
        &mut self,
        owner: &ObjectRef,
        live: &BTreeSet<IpAddr>,
        touched: &mut BTreeSet<ServiceKey>,
        ext_touched: &mut Touched,
    ) {
        let is_live = |b: &Backend| live.contains(&crate::addr::to_ip(b.addr));
        if let Some(kept) = self.desired.get(owner)
            && kept.iter().any(|f| !f.backends.iter().all(is_live))
        {
            let mut kept = kept.clone();
            for f in &mut kept {
                f.backends.retain(is_live);
            }
            self.set_desired(owner, Some(kept), touched);
        }
        if let Some(kept) = self.ext.desired_of(owner)
            && kept.iter().any(|g| !g.backends.iter().all(is_live))
        {
            let mut kept = kept.clone();
            for g in &mut kept {
                g.backends.retain(is_live);
            }
            self.ext.set_desired(owner, Some(kept), ext_touched);
        }
    }

    /// The frontends the maps hold for `owner`, as desired frontends.
    pub(super) fn adopt(&self, owner: &ObjectRef) -> Vec<DesiredFrontend> {
        let m = &self.mirror;
        m.services
            .iter()
            .filter_map(|(key, value)| {
                let info = m.info.get(&value.id)?;
                if info.namespace()? != owner.namespace || info.name()? != owner.name {
                    return None;
                }
                let backends = self.programmed_backends(value);
                Some(DesiredFrontend {
                    key: *key,
                    // Known from the maps only: after every claim a service makes now.
                    claim: Claim {
                        borrowed: true,
                        age: Age::unknown(),
                    },
                    port_name: info.port_name()?.to_owned(),
                    backends,
                    affinity_timeout_s: value.affinity_timeout_s,
                })
            })
            .collect()
    }
}
