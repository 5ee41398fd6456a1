//! What a sync did ([`SyncReport`]): writes, refusals, conflicts, stale UDP sockets.

use lb_common::{Endpoint, ServiceKey};

use crate::{datapath::DatapathError, k8s::ObjectRef, model::Rejection};

/// A frontend two services claim; the first (by namespace and name) programs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Conflict {
    /// The frontend.
    pub frontend: ServiceKey,
    /// The service that programs it.
    pub winner: ObjectRef,
    /// The service that is ignored for it.
    pub loser: ObjectRef,
}

/// A frontend change refused because a map would overflow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MapFull {
    /// The service.
    pub service: ObjectRef,
    /// The frontend, which keeps what it had.
    pub frontend: ServiceKey,
    /// The map that is too small.
    pub map: &'static str,
    /// Its capacity.
    pub capacity: u32,
}

/// What one sync did.
#[derive(Debug, Default)]
pub struct SyncReport {
    /// Map writes performed.
    pub writes: usize,
    /// Frontends added, changed or removed.
    pub frontends_changed: usize,
    /// Services that could not be programmed; what they had is kept.
    pub rejected: Vec<(ObjectRef, Rejection)>,
    /// Parts of services that were skipped, and why.
    pub notes: Vec<(ObjectRef, String)>,
    /// Frontends claimed by more than one service.
    pub conflicts: Vec<Conflict>,
    /// External IPs services claim that are not honoured, and why.
    pub refused: Vec<(ObjectRef, String)>,
    /// Service ports over the per-service backend limit, served by a stable subset.
    pub limited: Vec<(ObjectRef, String)>,
    /// Frontend changes refused for lack of map space.
    pub full: Vec<MapFull>,
    /// Writes that failed; their frontends are retried on the next sync.
    pub errors: Vec<DatapathError>,
    /// UDP backends that left a frontend: connected sockets the hooks pointed at them are
    /// stale (see [`crate::agent::sockets`]).
    pub stale_udp: Vec<StaleUdp>,
}

impl SyncReport {
    /// Adds what `other` did to this report.
    pub fn merge(&mut self, other: SyncReport) {
        self.writes += other.writes;
        self.frontends_changed += other.frontends_changed;
        self.rejected.extend(other.rejected);
        self.notes.extend(other.notes);
        self.conflicts.extend(other.conflicts);
        self.refused.extend(other.refused);
        self.limited.extend(other.limited);
        self.full.extend(other.full);
        self.errors.extend(other.errors);
        self.stale_udp.extend(other.stale_udp);
    }
}

/// A backend that no longer serves a UDP frontend.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct StaleUdp {
    /// The frontend (VIP and port).
    pub frontend: Endpoint,
    /// The backend that left it.
    pub backend: Endpoint,
}

/// A write failed: the maps hold what they held before it, its error is in the sync's
/// [`SyncReport::errors`], and what it was for is retried on the next sync.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct WriteFailed;
