//! From a service in the store to its desired frontends: the model, its namespace's share,
//! the agent's own API address kept reachable, and what a rejected service keeps.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::{Backend, ServiceKey};

use crate::{
    datapath::Datapath,
    k8s::store::Store,
    k8s::{Age, ObjectRef},
    model::share::Usage,
    model::{self, Claim, DesiredFrontend, Rejection, Slice},
};

use super::{Reconciler, external::Touched, report::SyncReport};

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

    /// Sets the desired frontends of `owner` from `store`: what the model makes of it, if
    /// it is valid and its namespace has room (else what it had, while its endpoints exist).
    pub(super) fn plan(
        &mut self,
        store: &Store,
        owner: ObjectRef,
        first: bool,
        report: &mut SyncReport,
        touched: &mut BTreeSet<ServiceKey>,
        ext_touched: &mut Touched,
    ) {
        let Some(svc) = store.service(&owner) else {
            self.health_checks.remove(&owner);
            self.shares.release(&owner);
            self.set_desired(&owner, None, touched);
            self.ext.set_desired(&owner, None, ext_touched);
            return;
        };
        let planned = model::desired(svc, store.slices_of(&owner), store.node(), &self.limits)
            .and_then(|d| {
                let usage = Usage::of(&d.frontends, &d.external, &self.limits);
                match self.shares.admit(&owner, usage) {
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
                if first {
                    // Keep what an earlier run programmed for it.
                    let adopted = self.adopt(&owner);
                    let adopted_ext = self.adopt_external(&owner);
                    self.shares
                        .hold(&owner, Usage::of(&adopted, &adopted_ext, &self.limits));
                    if !adopted.is_empty() {
                        self.set_desired(&owner, Some(adopted), touched);
                    }
                    if !adopted_ext.is_empty() {
                        self.ext.set_desired(&owner, Some(adopted_ext), ext_touched);
                    }
                }
                let live: BTreeSet<IpAddr> =
                    store.slices_of(&owner).flat_map(Slice::addresses).collect();
                self.keep_live_backends(&owner, &live, touched, ext_touched);
                report.rejected.push((owner, rejection));
                return;
            }
        };
        report
            .notes
            .extend(d.notes.into_iter().map(|n| (owner.clone(), n)));
        report
            .refused
            .extend(d.refused.into_iter().map(|n| (owner.clone(), n)));
        report
            .limited
            .extend(d.limited.into_iter().map(|n| (owner.clone(), n)));
        let mut frontends = d.frontends;
        self.keep_api_access(&owner, &mut frontends, report);
        match d.health_check {
            Some(h) => self.health_checks.insert(owner.clone(), h),
            None => self.health_checks.remove(&owner),
        };
        self.set_desired(&owner, Some(frontends), touched);
        self.ext.set_desired(&owner, Some(d.external), ext_touched);
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
