//! `lbctl affinity`: session affinity entries of both paths.

use std::{collections::BTreeMap, net::SocketAddr};

use lb_common::ServiceKey;
use serde::{Deserialize, Serialize};

use super::{external::info_text, table::table};
use crate::{
    addr::{frontend_string, to_ip, to_socket_addr},
    datapath::Contents,
};

/// A client kept on a backend by session affinity, as `lbctl affinity` lists it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AffinityRow {
    /// The frontend (`address:port/PROTO`), if the service id is still programmed.
    pub frontend: Option<String>,
    /// `namespace/name`.
    pub service: String,
    /// `socket` (connections made on this node) or `north-south` (traffic from outside).
    pub path: String,
    /// The client: on the socket path its network namespace's cookie, `netns:<cookie>`
    /// (`ClientIP` affinity is kept per network namespace: a pod, or the node); north-south
    /// its address.
    pub client: String,
    /// The backend it is kept on.
    pub backend: Option<SocketAddr>,
    /// Seconds since its last connection.
    pub idle_s: u64,
    /// Seconds until the entry expires (0: expired; the next connection picks anew).
    pub expires_in_s: u64,
    /// Whether the backend still serves the service (an entry naming a removed backend is
    /// ignored).
    pub honoured: bool,
}

/// The affinity entries `entries`, at `now_ns` on the hooks' coarse monotonic clock.
pub fn affinity(
    c: &Contents,
    entries: &[(lb_common::AffinityKey, lb_common::AffinityValue)],
    now_ns: u64,
) -> Vec<AffinityRow> {
    let by_id: BTreeMap<u32, &ServiceKey> = c.services.iter().map(|(k, v)| (v.id, k)).collect();
    let mut rows: Vec<AffinityRow> = entries
        .iter()
        .map(|(k, v)| {
            let key = by_id.get(&k.svc_id);
            let timeout = key
                .and_then(|key| c.services.get(key))
                .map_or(0, |s| u64::from(s.affinity_timeout_s));
            let idle_s = now_ns.saturating_sub(v.last_used_ns) / 1_000_000_000;
            let (service, _) = info_text(c.info.get(&k.svc_id));
            AffinityRow {
                frontend: key.map(|key| frontend_string(key)),
                service,
                path: "socket".into(),
                client: format!("netns:{}", k.netns_cookie),
                backend: c.backends.get(&v.backend_id).map(to_socket_addr),
                idle_s,
                expires_in_s: timeout.saturating_sub(idle_s),
                honoured: c.affinity_match.contains(&lb_common::AffinityMatchKey {
                    svc_id: k.svc_id,
                    backend_id: v.backend_id,
                }),
            }
        })
        .collect();
    sort_affinity(&mut rows);
    rows
}

/// The north-south affinity entries `entries` at `now` (seconds of the conntrack clock):
/// one row per client and service port, under the first of its frontends.
pub fn external_affinity(
    c: &Contents,
    entries: &[(
        lb_common::external::ExternalAffinityKey,
        lb_common::external::ExternalAffinityValue,
    )],
    now: u32,
) -> Vec<AffinityRow> {
    let mut by_id: BTreeMap<u32, &ServiceKey> = BTreeMap::new();
    for (k, v) in &c.external {
        by_id.entry(v.id).or_insert(k);
    }
    let mut rows: Vec<AffinityRow> = entries
        .iter()
        .map(|(k, v)| {
            let mark = lb_common::external::ExternalAffinityMatchKey {
                svc_id: k.svc_id,
                backend: v.backend.endpoint(),
            };
            // No mark: the backend left the table, and the entry is not honoured.
            let timeout = c.external_match.get(&mark).copied();
            let idle_s = now.saturating_sub(v.last_used);
            AffinityRow {
                frontend: by_id.get(&k.svc_id).map(|key| frontend_string(key)),
                service: info_text(c.external_info.get(&k.svc_id)).0,
                path: "north-south".into(),
                client: to_ip(k.client).to_string(),
                backend: Some(to_socket_addr(&v.backend.endpoint())),
                idle_s: u64::from(idle_s),
                expires_in_s: u64::from(timeout.unwrap_or(0).saturating_sub(idle_s)),
                honoured: timeout.is_some_and(|t| v.holds(now, t)),
            }
        })
        .collect();
    sort_affinity(&mut rows);
    rows
}

/// Affinity rows by service, frontend, path and client.
pub fn sort_affinity(rows: &mut [AffinityRow]) {
    rows.sort_by(|a, b| {
        (&a.service, &a.frontend, &a.path, &a.client).cmp(&(
            &b.service,
            &b.frontend,
            &b.path,
            &b.client,
        ))
    });
}

/// The affinity entries as a table.
pub fn affinity_table(rows: &[AffinityRow]) -> String {
    table(
        &[
            "FRONTEND",
            "SERVICE",
            "PATH",
            "CLIENT",
            "BACKEND",
            "IDLE",
            "EXPIRES IN",
            "HONOURED",
        ],
        rows.iter().map(|r| {
            vec![
                r.frontend.clone().unwrap_or_else(|| "(gone)".into()),
                r.service.clone(),
                r.path.clone(),
                r.client.clone(),
                r.backend.map_or("?".into(), |b| b.to_string()),
                format!("{}s", r.idle_s),
                format!("{}s", r.expires_in_s),
                if r.honoured { "yes" } else { "no" }.into(),
            ]
        }),
    )
}
