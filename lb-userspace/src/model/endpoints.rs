//! Which endpoints get new connections from this node: kube-proxy's `CategorizeEndpoints`
//! (pkg/proxy/topology.go), rule by rule, as one pure function.
//!
//! - **Cluster** traffic policy: ready endpoints, narrowed by topology hints when they apply;
//!   if there are none, endpoints that are serving and terminating (without topology).
//! - **Local** traffic policy: ready endpoints on this node; if there are none, serving and
//!   terminating endpoints on this node. Topology does not apply.
//! - **Topology** (from the hints the EndpointSlice controller writes for `trafficDistribution`
//!   and the topology-mode annotation): node hints are used when every ready endpoint has one
//!   and one names this node; otherwise zone hints, when every ready endpoint has one and one
//!   names this node's zone; otherwise none. So hints never leave a service without endpoints.

use std::{collections::BTreeSet, net::IpAddr};

use lb_common::Backend;

use crate::addr::to_endpoint;

/// This node, as topology, traffic policy and node ports need it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeInfo {
    /// Its name (`--node-name`); Local policy selects nothing without it.
    pub name: Option<String>,
    /// Its `topology.kubernetes.io/zone` label.
    pub zone: Option<String>,
    /// Its addresses that serve node ports.
    pub addresses: Vec<IpAddr>,
    /// All its addresses (its interfaces', its Node object's): no external IP may claim
    /// them.
    pub own_addresses: Vec<IpAddr>,
    /// The external IPs it honours (`--external-ip-cidrs`; empty: any).
    pub external_ip_cidrs: Vec<ipnet::IpNet>,
}

/// One endpoint (address and port) as the rules see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate {
    /// Its address.
    pub ip: IpAddr,
    /// Its port.
    pub port: u16,
    /// `conditions.ready` (unset means true).
    pub ready: bool,
    /// `conditions.serving` (unset means the value of ready).
    pub serving: bool,
    /// `conditions.terminating` (unset means false).
    pub terminating: bool,
    /// `nodeName`.
    pub node_name: Option<String>,
    /// `hints.forZones`.
    pub zone_hints: BTreeSet<String>,
    /// `hints.forNodes`.
    pub node_hints: BTreeSet<String>,
}

impl Candidate {
    fn serving_terminating(&self) -> bool {
        self.serving && self.terminating
    }

    fn local(&self, node: &NodeInfo) -> bool {
        node.name.is_some() && self.node_name == node.name
    }

    /// The backend it is for the datapath: its address and port, and where it runs as
    /// `lb_common::node` says (unknown without its `nodeName` or this node's name).
    pub fn backend(&self, node: &NodeInfo) -> Backend {
        let at = match (&self.node_name, &node.name) {
            (Some(_), Some(_)) if self.local(node) => lb_common::node::LOCAL,
            (Some(_), Some(_)) => lb_common::node::REMOTE,
            _ => lb_common::node::UNKNOWN,
        };
        Backend::new(to_endpoint((self.ip, self.port).into()), at)
    }
}

/// A traffic policy (`internalTrafficPolicy` for traffic from this node).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TrafficPolicy {
    /// Endpoints anywhere.
    #[default]
    Cluster,
    /// Endpoints on this node only.
    Local,
}

/// Which endpoints topology hints restrict a service to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Topology {
    /// No restriction.
    Any,
    /// Endpoints hinted for this node.
    SameNode,
    /// Endpoints hinted for this node's zone.
    SameZone,
}

/// The topology that applies to a service with these endpoints on this node.
pub fn topology(endpoints: &[Candidate], node: &NodeInfo) -> Topology {
    let ready: Vec<&Candidate> = endpoints.iter().filter(|c| c.ready).collect();
    if ready.is_empty() {
        return Topology::Any;
    }
    let all_have =
        |hints: fn(&Candidate) -> &BTreeSet<String>| ready.iter().all(|c| !hints(c).is_empty());
    let any_for = |hints: fn(&Candidate) -> &BTreeSet<String>, name: &Option<String>| {
        name.as_ref()
            .is_some_and(|n| ready.iter().any(|c| hints(c).contains(n)))
    };
    if all_have(|c| &c.node_hints) && any_for(|c| &c.node_hints, &node.name) {
        return Topology::SameNode;
    }
    if all_have(|c| &c.zone_hints) && any_for(|c| &c.zone_hints, &node.zone) {
        return Topology::SameZone;
    }
    Topology::Any
}

fn available(c: &Candidate, topology: Topology, node: &NodeInfo) -> bool {
    let hinted = |hints: &BTreeSet<String>, name: &Option<String>| {
        name.as_ref().is_some_and(|n| hints.contains(n))
    };
    match topology {
        Topology::Any => true,
        Topology::SameNode => hinted(&c.node_hints, &node.name),
        Topology::SameZone => hinted(&c.zone_hints, &node.zone),
    }
}

/// The endpoints that get new connections from this node under `policy`.
pub fn usable<'a>(
    endpoints: &'a [Candidate],
    policy: TrafficPolicy,
    node: &NodeInfo,
) -> Vec<&'a Candidate> {
    let pick = |keep: &dyn Fn(&Candidate) -> bool| -> Vec<&'a Candidate> {
        endpoints.iter().filter(|c| keep(c)).collect()
    };
    match policy {
        TrafficPolicy::Cluster => {
            let topo = topology(endpoints, node);
            let ready = pick(&|c| c.ready && available(c, topo, node));
            if ready.is_empty() {
                pick(&|c| c.serving_terminating())
            } else {
                ready
            }
        }
        TrafficPolicy::Local => {
            let ready = pick(&|c| c.ready && c.local(node));
            if ready.is_empty() {
                pick(&|c| c.serving_terminating() && c.local(node))
            } else {
                ready
            }
        }
    }
}

/// Why an endpoint does or does not get new connections, as `explain` says it.
pub fn verdicts<'a>(
    endpoints: &'a [Candidate],
    policy: TrafficPolicy,
    node: &NodeInfo,
) -> Vec<(&'a Candidate, Result<&'static str, String>)> {
    let chosen = usable(endpoints, policy, node);
    let fallback = chosen.iter().all(|c| !c.ready) && !chosen.is_empty();
    let topo = topology(endpoints, node);
    let here = node.name.as_deref().unwrap_or("?");
    endpoints
        .iter()
        .map(|c| {
            let verdict = if chosen.iter().any(|x| std::ptr::eq(*x, c)) {
                Ok(if fallback {
                    "serving and terminating: used because no endpoint is ready"
                } else {
                    "ready"
                })
            } else if policy == TrafficPolicy::Local && !c.local(node) {
                Err(format!(
                    "on node {}, not this one ({here}): the traffic policy is Local",
                    c.node_name.as_deref().unwrap_or("(none)")
                ))
            } else if c.ready {
                let (kind, hints, mine) = match topo {
                    Topology::SameNode => ("nodes", &c.node_hints, node.name.as_deref()),
                    _ => ("zones", &c.zone_hints, node.zone.as_deref()),
                };
                Err(format!(
                    "topology: hinted for {kind} {:?}, this node's is {}",
                    hints,
                    mine.unwrap_or("?")
                ))
            } else if c.serving_terminating() {
                Err("serving but terminating: used only while no endpoint is ready".into())
            } else if c.terminating {
                Err("terminating and not serving".into())
            } else {
                Err("not ready".into())
            };
            (c, verdict)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An endpoint written as "10.0.0.<n> <flags>", flags being any of: `unready`,
    /// `serving-terminating` (not ready, serving, terminating), `terminating-not-serving`,
    /// `local` (on this node, "n1"), `zone=<z>[,<z>]`, `node=<n>[,<n>]`.
    fn ep(spec: &str) -> Candidate {
        let mut words = spec.split_whitespace();
        let last: u8 = words.next().unwrap().parse().unwrap();
        let mut c = Candidate {
            ip: IpAddr::from([10, 0, 0, last]),
            port: 80,
            ready: true,
            serving: true,
            terminating: false,
            node_name: None,
            zone_hints: BTreeSet::new(),
            node_hints: BTreeSet::new(),
        };
        for w in words {
            match w.split_once('=') {
                Some(("zone", z)) => c.zone_hints = z.split(',').map(String::from).collect(),
                Some(("node", n)) => c.node_hints = n.split(',').map(String::from).collect(),
                _ => match w {
                    "unready" => (c.ready, c.serving) = (false, false),
                    "serving-terminating" => {
                        (c.ready, c.serving, c.terminating) = (false, true, true);
                    }
                    "terminating-not-serving" => {
                        (c.ready, c.serving, c.terminating) = (false, false, true);
                    }
                    "local" => c.node_name = Some("n1".into()),
                    other => panic!("unknown flag {other}"),
                },
            }
        }
        c
    }

    const ZONE_A: &str = "a";

    /// (case, node zone, policy, endpoints, expected endpoints by last octet)
    type Case = (
        &'static str,
        Option<&'static str>,
        TrafficPolicy,
        &'static [&'static str],
        &'static [u8],
    );
    use TrafficPolicy::{Cluster, Local};

    const CASES: &[Case] = &[
        (
            "no hints: every ready endpoint",
            Some(ZONE_A),
            Cluster,
            &["1", "2", "3 unready"],
            &[1, 2],
        ),
        (
            "zone hints: this zone's endpoints",
            Some(ZONE_A),
            Cluster,
            &["1 zone=a", "2 zone=b", "3 zone=c", "4 zone=a"],
            &[1, 4],
        ),
        (
            "an endpoint without a hint: no filtering",
            Some(ZONE_A),
            Cluster,
            &["1 zone=a", "2 zone=b", "3", "4 zone=a"],
            &[1, 2, 3, 4],
        ),
        (
            "no endpoint for this zone: no filtering",
            Some("b"),
            Cluster,
            &["1 zone=a", "2 zone=c"],
            &[1, 2],
        ),
        (
            "node without a zone label: no filtering",
            None,
            Cluster,
            &["1 zone=a", "2 zone=b"],
            &[1, 2],
        ),
        (
            "unready endpoints do not count for hints",
            Some(ZONE_A),
            Cluster,
            &["1 zone=a", "2 zone=b", "3 unready", "4 zone=a unready"],
            &[1],
        ),
        (
            "only unready endpoints in this zone: no filtering",
            Some(ZONE_A),
            Cluster,
            &["1 zone=a unready", "2 zone=b", "3 zone=c"],
            &[2, 3],
        ),
        (
            "several zones per endpoint",
            Some("c"),
            Cluster,
            &["1 zone=a,b,c", "2 zone=b,c", "3 zone=b,d", "4 zone=c"],
            &[1, 2, 4],
        ),
        (
            "node hints win over zone hints",
            Some(ZONE_A),
            Cluster,
            &["1 zone=a node=n1", "2 zone=a node=n2", "3 zone=b node=n1"],
            &[1, 3],
        ),
        (
            "node hints missing on one endpoint: zone hints",
            Some(ZONE_A),
            Cluster,
            &["1 zone=a node=n1", "2 zone=a", "3 zone=b node=n3"],
            &[1, 2],
        ),
        (
            "no node hint for this node: zone hints",
            Some(ZONE_A),
            Cluster,
            &["1 zone=a node=n2", "2 zone=b node=n3", "3 zone=a node=n4"],
            &[1, 3],
        ),
        (
            "no ready endpoint: serving-terminating ones, topology ignored",
            Some(ZONE_A),
            Cluster,
            &[
                "1 serving-terminating zone=b",
                "2 terminating-not-serving",
                "3 unready",
            ],
            &[1],
        ),
        (
            "ready endpoints hide serving-terminating ones",
            Some(ZONE_A),
            Cluster,
            &["1", "2 serving-terminating"],
            &[1],
        ),
        (
            "nothing usable",
            Some(ZONE_A),
            Cluster,
            &["1 unready", "2 terminating-not-serving"],
            &[],
        ),
        (
            "Local: ready endpoints on this node, topology ignored",
            Some(ZONE_A),
            Local,
            &["1 local zone=b", "2 local zone=a", "3 zone=a"],
            &[1, 2],
        ),
        (
            "Local: only remote endpoints: none",
            Some(ZONE_A),
            Local,
            &["1", "2"],
            &[],
        ),
        (
            "Local: serving-terminating local endpoints when no local one is ready",
            Some(ZONE_A),
            Local,
            &["1 local serving-terminating", "2", "3 local unready"],
            &[1],
        ),
        (
            "Local: a ready local endpoint hides terminating ones",
            Some(ZONE_A),
            Local,
            &["1 local", "2 local serving-terminating"],
            &[1],
        ),
        // kube-proxy's own cases (TestCategorizeEndpoints, pkg/proxy/topology_test.go), by
        // their names there: its cluster endpoints are our Cluster set, its local ones our
        // Local set.
        (
            "should use topology since all endpoints have hints, node has a zone label and \
             there are endpoints for the node's zone",
            Some(ZONE_A),
            Cluster,
            &["3 zone=a", "4 zone=b", "5 zone=c", "6 zone=a"],
            &[3, 6],
        ),
        (
            "externalTrafficPolicy: Local, topology ignored for Local endpoints (cluster)",
            Some(ZONE_A),
            Cluster,
            &["3 local zone=a", "4 local zone=b", "5 zone=c", "6 zone=a"],
            &[3, 6],
        ),
        (
            "externalTrafficPolicy: Local, topology ignored for Local endpoints (local)",
            Some(ZONE_A),
            Local,
            &["3 local zone=a", "4 local zone=b", "5 zone=c", "6 zone=a"],
            &[3, 4],
        ),
        ("empty zone label", None, Cluster, &["3 zone=a"], &[3]),
        (
            "node in different zone, no endpoint filtering",
            Some("b"),
            Cluster,
            &["3 zone=a"],
            &[3],
        ),
        (
            "unready endpoint",
            Some(ZONE_A),
            Cluster,
            &["3 zone=a", "4 zone=b", "5 zone=c", "6 zone=a unready"],
            &[3],
        ),
        (
            "only unready endpoints in same zone (should not filter)",
            Some(ZONE_A),
            Cluster,
            &[
                "3 zone=a unready",
                "4 zone=b",
                "5 zone=c",
                "6 zone=a unready",
            ],
            &[4, 5],
        ),
        (
            "missing hints, no filtering applied",
            Some(ZONE_A),
            Cluster,
            &["3 zone=a", "4 zone=b", "5", "6 zone=a"],
            &[3, 4, 5, 6],
        ),
        (
            "multiple hints per endpoint, filtering includes any endpoint with zone included",
            Some("c"),
            Cluster,
            &["3 zone=a,b,c", "4 zone=b,c", "5 zone=b,d", "6 zone=c"],
            &[3, 4, 6],
        ),
        (
            "conflicting topology and localness require merging allEndpoints (cluster)",
            Some(ZONE_A),
            Cluster,
            &["0 local zone=a", "1 local zone=b", "2 zone=a", "3 zone=b"],
            &[0, 2],
        ),
        (
            "conflicting topology and localness require merging allEndpoints (local)",
            Some(ZONE_A),
            Local,
            &["0 local zone=a", "1 local zone=b", "2 zone=a", "3 zone=b"],
            &[0, 1],
        ),
        (
            "Cluster traffic policy, endpoints not Ready",
            None,
            Cluster,
            &["0 unready", "1 unready"],
            &[],
        ),
        (
            "Cluster traffic policy, some endpoints are Ready",
            None,
            Cluster,
            &["0 unready", "1"],
            &[1],
        ),
        (
            "Cluster traffic policy, all endpoints are terminating",
            None,
            Cluster,
            &["0 local serving-terminating", "1 serving-terminating"],
            &[0, 1],
        ),
        (
            "iTP: Local, eTP: Local, all endpoints remote",
            None,
            Local,
            &["0", "1"],
            &[],
        ),
        (
            "iTP: Local, eTP: Local, all endpoints remote and terminating",
            None,
            Local,
            &["0 serving-terminating", "1 serving-terminating"],
            &[],
        ),
        (
            "iTP: Cluster, eTP: Local, with terminating endpoints (cluster)",
            None,
            Cluster,
            &[
                "0",
                "1 local unready",
                "2 local serving-terminating",
                "3 serving-terminating",
            ],
            &[0],
        ),
        (
            "iTP: Cluster, eTP: Local, with terminating endpoints (local)",
            None,
            Local,
            &[
                "0",
                "1 local unready",
                "2 local serving-terminating",
                "3 serving-terminating",
            ],
            &[2],
        ),
        (
            "iTP: Local, some endpoints are local",
            None,
            Local,
            &["0 local", "1"],
            &[0],
        ),
    ];

    #[test]
    fn categorisation_follows_kube_proxy() {
        for (case, zone, policy, endpoints, expected) in CASES {
            let node = NodeInfo {
                name: Some("n1".into()),
                zone: zone.map(String::from),
                ..NodeInfo::default()
            };
            let cands: Vec<Candidate> = endpoints.iter().map(|s| ep(s)).collect();
            let got: Vec<u8> = usable(&cands, *policy, &node)
                .iter()
                .map(|c| match c.ip {
                    IpAddr::V4(v4) => v4.octets()[3],
                    other => panic!("{other}"),
                })
                .collect();
            assert_eq!(&got, expected, "{case}");
        }
    }

    #[test]
    fn a_backend_knows_where_it_runs_when_both_node_names_are_known() {
        let here = NodeInfo {
            name: Some("n1".into()),
            ..NodeInfo::default()
        };
        let mut remote = ep("2");
        remote.node_name = Some("n2".into());
        for (c, node, want) in [
            (ep("1 local"), &here, lb_common::node::LOCAL),
            (remote, &here, lb_common::node::REMOTE),
            (ep("3"), &here, lb_common::node::UNKNOWN),
            (
                ep("1 local"),
                &NodeInfo::default(),
                lb_common::node::UNKNOWN,
            ),
        ] {
            let b = c.backend(node);
            assert_eq!(b.node, want, "{c:?}");
            assert_eq!(crate::addr::to_socket_addr(&b), (c.ip, c.port).into());
        }
    }

    #[test]
    fn local_policy_needs_the_node_name() {
        let cands = [ep("1 local")];
        assert!(usable(&cands, Local, &NodeInfo::default()).is_empty());
    }

    #[test]
    fn topology_modes() {
        let node = NodeInfo {
            name: Some("n1".into()),
            zone: Some("a".into()),
            ..NodeInfo::default()
        };
        assert_eq!(topology(&[], &node), Topology::Any);
        assert_eq!(topology(&[ep("1 zone=a")], &node), Topology::SameZone);
        assert_eq!(
            topology(&[ep("1 zone=a node=n1")], &node),
            Topology::SameNode
        );
    }

    #[test]
    fn verdicts_say_why_each_endpoint_is_left_out() {
        let node = NodeInfo {
            name: Some("n1".into()),
            zone: Some("a".into()),
            ..NodeInfo::default()
        };
        let eps: Vec<Candidate> = ["1 zone=a", "2 zone=b", "3 unready", "4 serving-terminating"]
            .iter()
            .map(|s| ep(s))
            .collect();
        let got: Vec<(u8, String)> = verdicts(&eps, Cluster, &node)
            .into_iter()
            .map(|(c, v)| {
                let last = match c.ip {
                    IpAddr::V4(ip) => ip.octets()[3],
                    IpAddr::V6(_) => 0,
                };
                (last, v.map_or_else(|e| e, String::from))
            })
            .collect();
        assert_eq!(got[0], (1, "ready".into()));
        assert!(
            got[1].1.starts_with("topology: hinted for zones {\"b\"}"),
            "{got:?}"
        );
        assert_eq!(got[2], (3, "not ready".into()));
        assert!(got[3].1.starts_with("serving but terminating"), "{got:?}");

        // Nothing ready: the serving-terminating one is used, and says why.
        let eps: Vec<Candidate> = ["3 unready", "4 serving-terminating"]
            .iter()
            .map(|s| ep(s))
            .collect();
        let v = verdicts(&eps, Cluster, &node);
        assert_eq!(
            v[1].1,
            Ok("serving and terminating: used because no endpoint is ready")
        );

        // Local: another node's endpoint is named.
        let mut remote = ep("5");
        remote.node_name = Some("n2".into());
        let eps = vec![ep("6 local"), remote];
        let v = verdicts(&eps, Local, &node);
        assert_eq!(v[0].1, Ok("ready"));
        assert_eq!(
            v[1].1,
            Err("on node n2, not this one (n1): the traffic policy is Local".into())
        );
    }
}
