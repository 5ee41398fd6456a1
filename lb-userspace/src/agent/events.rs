//! Kubernetes Events on Services the agent cannot program, so that an operator sees why with
//! `kubectl describe service`: an invalid object, too many backends, a full map, a frontend
//! another service holds.
//!
//! Events are rate-limited: one per service and reason every [`PER_SERVICE_INTERVAL`] (a
//! service rejected at every sync does not flood the API), and at most [`PER_MINUTE`] in all
//! (thousands of bad services at start do not either); the rest are counted as dropped. They
//! are published off the sync path by a task of their own (kube-runtime's `Recorder`, which
//! turns repeats into an event series), through a bounded queue that drops when full.
//! Every node's agent reports, as `lb-agent` with its node name as the instance.

use std::{
    collections::HashMap,
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::ObjectReference;
use kube::{
    Client, Resource as _,
    runtime::events::{Event, EventType, Recorder, Reporter},
};
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::{addr::frontend_string, k8s::ObjectRef, k8s::store::Store, reconcile::SyncReport};

/// Least time between two events of one service and reason.
pub const PER_SERVICE_INTERVAL: Duration = Duration::from_secs(300);
/// Most events per minute in all.
pub const PER_MINUTE: u32 = 30;
/// Events waiting for the publishing task; more are dropped.
const QUEUE: usize = 64;

/// A warning about one service.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Warning {
    /// The service.
    pub service: ObjectRef,
    /// `PascalCase` reason, as `kubectl describe` shows it.
    pub reason: &'static str,
    /// What happened and what to do.
    pub note: String,
}

/// The warnings a sync's report holds.
pub fn warnings(report: &SyncReport) -> Vec<Warning> {
    let rejected = report.rejected.iter().map(|(service, r)| Warning {
        service: service.clone(),
        reason: r.event_reason(),
        note: format!("not programmed by lb-agent: {r}; what it had before, if anything, is kept"),
    });
    let full = report.full.iter().map(|f| Warning {
        service: f.service.clone(),
        reason: "MapFull",
        note: format!(
            "{} not changed: the datapath map {} is full (capacity {}); it keeps what it had \
             until the map is raised (see lbctl capacity)",
            frontend_string(&f.frontend),
            f.map,
            f.capacity
        ),
    });
    let conflicts = report.conflicts.iter().map(|c| Warning {
        service: c.loser.clone(),
        reason: "FrontendConflict",
        note: format!(
            "{} is also claimed by {}, which programs it (a service's own cluster IP or node \
             port wins over an external or load-balancer IP, then the oldest service)",
            frontend_string(&c.frontend),
            c.winner
        ),
    });
    let refused = report.refused.iter().map(|(service, why)| Warning {
        service: service.clone(),
        reason: "ExternalIPRefused",
        note: why.clone(),
    });
    let limited = report.limited.iter().map(|(service, what)| Warning {
        service: service.clone(),
        reason: "TooManyBackends",
        note: what.clone(),
    });
    rejected
        .chain(full)
        .chain(conflicts)
        .chain(refused)
        .chain(limited)
        .collect()
}

/// Which warnings become events: one per service and reason per interval, and a budget per
/// minute.
#[derive(Debug)]
pub struct Limiter {
    interval: Duration,
    per_minute: u32,
    last: HashMap<(ObjectRef, &'static str), Instant>,
    minute: Option<(Instant, u32)>,
    /// Warnings not published.
    pub dropped: u64,
}

impl Limiter {
    /// A limiter with these limits.
    pub fn new(interval: Duration, per_minute: u32) -> Self {
        Self {
            interval,
            per_minute,
            last: HashMap::new(),
            minute: None,
            dropped: 0,
        }
    }

    /// Whether `w` may be published at `now` (and if so, counts it).
    pub fn allow(&mut self, w: &Warning, now: Instant) -> bool {
        let key = (w.service.clone(), w.reason);
        if self
            .last
            .get(&key)
            .is_some_and(|t| now.saturating_duration_since(*t) < self.interval)
        {
            return false;
        }
        let (start, n) = match self.minute {
            Some((start, n)) if now.saturating_duration_since(start) < Duration::from_secs(60) => {
                (start, n)
            }
            _ => (now, 0),
        };
        if n >= self.per_minute {
            self.minute = Some((start, n));
            self.dropped += 1;
            return false;
        }
        self.minute = Some((start, n + 1));
        self.last.insert(key, now);
        // Forget services quiet for an interval, so the map does not grow without bound.
        if self.last.len() > 4096 {
            let interval = self.interval;
            self.last
                .retain(|_, t| now.saturating_duration_since(*t) < interval);
        }
        true
    }
}

/// Publishes warnings as Events on their Services.
pub struct Events {
    limiter: Limiter,
    queue: mpsc::Sender<(Event, ObjectReference)>,
}

impl Events {
    /// Starts the publishing task, as `lb-agent` on `node`.
    pub fn start(client: Client, node: Option<String>) -> Self {
        let recorder = Recorder::new(
            client,
            Reporter {
                controller: "lb-agent".into(),
                instance: node,
            },
        );
        let (queue, mut rx) = mpsc::channel::<(Event, ObjectReference)>(QUEUE);
        tokio::spawn(async move {
            while let Some((event, regarding)) = rx.recv().await {
                if let Err(e) = recorder.publish(&event, &regarding).await {
                    warn!(service = ?regarding.name, error = %e, "cannot publish an event");
                }
            }
        });
        Self {
            limiter: Limiter::new(PER_SERVICE_INTERVAL, PER_MINUTE),
            queue,
        }
    }

    /// Publishes what `report` warns about, within the limits; returns how many were queued.
    pub fn report(&mut self, report: &SyncReport, store: &Store) -> usize {
        let now = Instant::now();
        let mut queued = 0;
        for w in warnings(report) {
            if !self.limiter.allow(&w, now) {
                continue;
            }
            // The object as the API knows it (with its uid); gone services get no event.
            let Some(regarding) = store.service(&w.service).map(|s| s.object_ref(&())) else {
                continue;
            };
            let event = Event {
                type_: EventType::Warning,
                reason: w.reason.into(),
                note: Some(w.note),
                action: "Program".into(),
                secondary: None,
            };
            if let Ok(()) = self.queue.try_send((event, regarding)) {
                queued += 1;
            } else {
                self.limiter.dropped += 1;
                debug!(service = %w.service, "event queue full; event dropped");
            }
        }
        queued
    }

    /// Warnings not published (rate limit or full queue).
    pub fn dropped(&self) -> u64 {
        self.limiter.dropped
    }
}

#[cfg(test)]
mod tests {
    use lb_common::{ServiceKey, proto};

    use super::*;
    use crate::model::Rejection;
    use crate::{
        addr::to_addr6,
        reconcile::{Conflict, MapFull},
    };

    fn report() -> SyncReport {
        let key = ServiceKey::new(
            to_addr6("10.96.0.1".parse().unwrap()),
            80u16.to_be(),
            proto::TCP,
        );
        SyncReport {
            rejected: vec![(
                ObjectRef::new("ns", "bad"),
                Rejection::InvalidPort { port: 70000 },
            )],
            full: vec![MapFull {
                service: ObjectRef::new("ns", "big"),
                frontend: key,
                map: lb_common::maps::SLOTS,
                capacity: 10,
            }],
            conflicts: vec![Conflict {
                frontend: key,
                winner: ObjectRef::new("a", "first"),
                loser: ObjectRef::new("b", "second"),
            }],
            ..SyncReport::default()
        }
    }

    #[test]
    fn a_report_warns_about_each_service_it_could_not_program() {
        let w = warnings(&report());
        let got: Vec<(String, &str)> = w
            .iter()
            .map(|w| (w.service.to_string(), w.reason))
            .collect();
        assert_eq!(
            got,
            [
                ("ns/bad".to_string(), "InvalidService"),
                ("ns/big".to_string(), "MapFull"),
                ("b/second".to_string(), "FrontendConflict"),
            ]
        );
        assert!(
            w[0].note.contains("port 70000 is out of range"),
            "{}",
            w[0].note
        );
        assert!(
            w[1].note.contains("lb_slot_v2 is full (capacity 10)"),
            "{}",
            w[1].note
        );
        assert!(w[2].note.contains("claimed by a/first"), "{}", w[2].note);
    }

    #[test]
    fn events_are_limited_per_service_and_per_minute() {
        let t0 = Instant::now();
        let mut l = Limiter::new(Duration::from_secs(300), 3);
        let w = |name: &str| Warning {
            service: ObjectRef::new("ns", name),
            reason: "InvalidService",
            note: String::new(),
        };
        assert!(l.allow(&w("a"), t0));
        assert!(
            !l.allow(&w("a"), t0 + Duration::from_secs(10)),
            "same service again"
        );
        assert!(l.allow(&w("b"), t0));
        assert!(l.allow(&w("c"), t0));
        assert!(!l.allow(&w("d"), t0), "over the budget of the minute");
        assert_eq!(l.dropped, 1);
        assert!(
            l.allow(&w("d"), t0 + Duration::from_secs(61)),
            "a new minute"
        );
        assert!(
            l.allow(&w("a"), t0 + Duration::from_secs(301)),
            "after the interval"
        );
    }
}
