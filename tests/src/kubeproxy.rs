//! kube-proxy's rule layouts for the benchmarks' baselines, generated for a set of ClusterIP
//! services, some with a node port: the iptables mode (`KUBE-SERVICES` → `KUBE-SVC-*` → `KUBE-SEP-*` with
//! statistic-random DNAT, loaded with `iptables-restore`) and the nftables mode (a
//! `service-ips` verdict map into per-service chains with `numgen random` DNAT, loaded with
//! `nft -f`); node ports through `KUBE-NODEPORTS` and `KUBE-EXT-*` chains, or the
//! `service-nodeports` map, for the node's local addresses. Masquerade marking is included as kube-proxy writes it (cluster CIDR
//! 10.244.0.0/16), so the per-connection work is what a kube-proxy user's node does.

use std::{fmt::Write as _, net::SocketAddrV4};

/// The cluster CIDR the rules treat as pod traffic.
pub const CLUSTER_CIDR: &str = "10.244.0.0/16";

/// A ClusterIP service port with its endpoints.
#[derive(Clone, Debug)]
pub struct Service {
    /// `namespace/name:port`, for comments.
    pub name: String,
    /// The frontend: cluster IP and port.
    pub frontend: SocketAddrV4,
    /// `tcp` or `udp`.
    pub protocol: &'static str,
    /// The endpoints.
    pub endpoints: Vec<SocketAddrV4>,
    /// The node port (NodePort services), served on the node's local addresses.
    pub node_port: Option<u16>,
}

/// An iptables chain name (at most 28 characters) for service `i`, endpoint `j`.
fn chain(kind: &str, i: usize, j: Option<usize>) -> String {
    match j {
        None => format!("KUBE-{kind}-{i:016X}"),
        Some(j) => format!("KUBE-{kind}-{i:012X}{j:04X}"),
    }
}

/// The `iptables-restore` input for `services`, in order: the first is matched first in
/// `KUBE-SERVICES`, so the last one is the worst case a packet can meet.
pub fn iptables(services: &[Service]) -> String {
    let mut out = String::from("*nat\n");
    for c in [
        "KUBE-SERVICES",
        "KUBE-NODEPORTS",
        "KUBE-POSTROUTING",
        "KUBE-MARK-MASQ",
    ] {
        let _ = writeln!(out, ":{c} - [0:0]");
    }
    for (i, s) in services.iter().enumerate() {
        let _ = writeln!(out, ":{} - [0:0]", chain("SVC", i, None));
        if s.node_port.is_some() {
            let _ = writeln!(out, ":{} - [0:0]", chain("EXT", i, None));
        }
        for j in 0..s.endpoints.len() {
            let _ = writeln!(out, ":{} - [0:0]", chain("SEP", i, Some(j)));
        }
    }
    out.push_str(
        "-A PREROUTING -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A OUTPUT -m comment --comment \"kubernetes service portals\" -j KUBE-SERVICES\n\
         -A POSTROUTING -m comment --comment \"kubernetes postrouting rules\" -j KUBE-POSTROUTING\n\
         -A KUBE-MARK-MASQ -j MARK --set-xmark 0x4000/0x4000\n\
         -A KUBE-POSTROUTING -m mark ! --mark 0x4000/0x4000 -j RETURN\n\
         -A KUBE-POSTROUTING -j MARK --set-xmark 0x4000/0x0\n\
         -A KUBE-POSTROUTING -m comment --comment \"kubernetes service traffic requiring SNAT\" -j MASQUERADE --random-fully\n",
    );
    for (i, s) in services.iter().enumerate() {
        let (vip, port, p) = (s.frontend.ip(), s.frontend.port(), s.protocol);
        let svc = chain("SVC", i, None);
        let _ = writeln!(
            out,
            "-A KUBE-SERVICES -d {vip}/32 -p {p} -m comment --comment \"{} cluster IP\" -m {p} --dport {port} -j {svc}",
            s.name
        );
        let _ = writeln!(
            out,
            "-A {svc} ! -s {CLUSTER_CIDR} -d {vip}/32 -p {p} -m comment --comment \"{} cluster IP\" -m {p} --dport {port} -j KUBE-MARK-MASQ",
            s.name
        );
        if let Some(np) = s.node_port {
            let ext = chain("EXT", i, None);
            let _ = writeln!(
                out,
                "-A KUBE-NODEPORTS -p {p} -m comment --comment \"{}\" -m {p} --dport {np} -j {ext}",
                s.name
            );
            let _ = writeln!(
                out,
                "-A {ext} -m comment --comment \"masquerade traffic for {} external destinations\" -j KUBE-MARK-MASQ\n-A {ext} -j {svc}",
                s.name
            );
        }
        let n = s.endpoints.len();
        for (j, ep) in s.endpoints.iter().enumerate() {
            let sep = chain("SEP", i, Some(j));
            if j + 1 < n {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"{} -> {ep}\" -m statistic --mode random --probability {:.10} -j {sep}",
                    s.name,
                    1.0 / (n - j) as f64
                );
            } else {
                let _ = writeln!(
                    out,
                    "-A {svc} -m comment --comment \"{} -> {ep}\" -j {sep}",
                    s.name
                );
            }
            let _ = writeln!(
                out,
                "-A {sep} -s {}/32 -m comment --comment \"{}\" -j KUBE-MARK-MASQ",
                ep.ip(),
                s.name
            );
            let _ = writeln!(
                out,
                "-A {sep} -p {p} -m comment --comment \"{}\" -m {p} -j DNAT --to-destination {ep}",
                s.name
            );
        }
    }
    out.push_str(
        "-A KUBE-SERVICES -m comment --comment \"kubernetes service nodeports; NOTE: this must be the last rule in this chain\" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\n\
         COMMIT\n",
    );
    out
}

/// The `nft -f` input for `services`: table `ip kube-proxy` as kube-proxy's nftables mode
/// writes it (the parts a ClusterIP connection meets).
pub fn nftables(services: &[Service]) -> String {
    let mut out = String::from(
        "table ip kube-proxy {\n\
         \tchain mark-for-masquerade {\n\t\tmeta mark set meta mark or 0x4000\n\t}\n\
         \tchain masquerading {\n\t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tmeta mark & 0x4000 == 0 return\n\t\tmeta mark set meta mark ^ 0x4000\n\
         \t\tmasquerade fully-random\n\t}\n\
         \tchain nat-output {\n\t\ttype nat hook output priority -100; policy accept;\n\t\tjump services\n\t}\n\
         \tchain nat-prerouting {\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tjump services\n\t}\n",
    );
    for (i, s) in services.iter().enumerate() {
        let (vip, port, p) = (s.frontend.ip(), s.frontend.port(), s.protocol);
        let n = s.endpoints.len();
        let _ = writeln!(out, "\tchain service-{i} {{");
        let _ = writeln!(
            out,
            "\t\tip daddr {vip} {p} dport {port} ip saddr != {CLUSTER_CIDR} jump mark-for-masquerade"
        );
        let targets: Vec<String> = (0..n)
            .map(|j| format!("{j} : goto endpoint-{i}-{j}"))
            .collect();
        let _ = writeln!(
            out,
            "\t\tnumgen random mod {n} vmap {{ {} }}",
            targets.join(", ")
        );
        out.push_str("\t}\n");
        for (j, ep) in s.endpoints.iter().enumerate() {
            let _ = writeln!(
                out,
                "\tchain endpoint-{i}-{j} {{\n\t\tip saddr {} jump mark-for-masquerade\n\t\tmeta l4proto {p} dnat to {ep}\n\t}}",
                ep.ip()
            );
        }
    }
    for (i, s) in services.iter().enumerate() {
        if s.node_port.is_some() {
            let _ = writeln!(
                out,
                "\tchain external-{i} {{\n\t\tjump mark-for-masquerade\n\t\tgoto service-{i}\n\t}}"
            );
        }
    }
    let node_ports: Vec<String> = services
        .iter()
        .enumerate()
        .filter_map(|(i, s)| {
            s.node_port
                .map(|np| format!("{} . {np} : goto external-{i}", s.protocol))
        })
        .collect();
    out.push_str("\tmap service-nodeports {\n\t\ttype inet_proto . inet_service : verdict\n");
    if !node_ports.is_empty() {
        let _ = writeln!(out, "\t\telements = {{ {} }}", node_ports.join(", "));
    }
    out.push_str(
        "\t}\n\tchain nodeports {\n\t\tmeta l4proto . th dport vmap @service-nodeports\n\t}\n",
    );
    out.push_str("\tmap service-ips {\n\t\ttype ipv4_addr . inet_proto . inet_service : verdict\n");
    if !services.is_empty() {
        out.push_str("\t\telements = {\n");
        for (i, s) in services.iter().enumerate() {
            let sep = if i + 1 < services.len() { "," } else { "" };
            let _ = writeln!(
                out,
                "\t\t\t{} . {} . {} : goto service-{i}{sep}",
                s.frontend.ip(),
                s.protocol,
                s.frontend.port()
            );
        }
        out.push_str("\t\t}\n");
    }
    out.push_str(
        "\t}\n\tchain services {\n\t\tip daddr . meta l4proto . th dport vmap @service-ips\n\
         \t\tfib daddr type local ip daddr != 127.0.0.0/8 jump nodeports\n\t}\n}\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn services() -> Vec<Service> {
        (0..3)
            .map(|i| Service {
                name: format!("bench/s{i}:http"),
                frontend: format!("10.96.0.{}:80", i + 1).parse().unwrap(),
                protocol: "tcp",
                endpoints: (0..2)
                    .map(|j| format!("10.244.{i}.{}:8080", j + 2).parse().unwrap())
                    .collect(),
                node_port: (i == 1).then_some(30080),
            })
            .collect()
    }

    #[test]
    fn iptables_layout_is_kube_proxys() {
        let text = iptables(&services());
        assert!(text.starts_with("*nat\n") && text.ends_with("COMMIT\n"));
        let services_rules: Vec<&str> = text
            .lines()
            .filter(|l| l.starts_with("-A KUBE-SERVICES -d"))
            .collect();
        assert_eq!(services_rules.len(), 3);
        assert!(
            services_rules[2].contains("-d 10.96.0.3/32"),
            "the last service is last"
        );
        assert!(text.contains("--probability 0.5000000000"));
        assert!(text.contains("-j DNAT --to-destination 10.244.2.3:8080"));
        assert!(text.contains("-A KUBE-NODEPORTS -p tcp -m comment --comment \"bench/s1:http\" -m tcp --dport 30080 -j KUBE-EXT-0000000000000001\n"));
        assert!(text.contains("-A KUBE-EXT-0000000000000001 -j KUBE-SVC-0000000000000001\n"));
        assert!(text.ends_with("-m addrtype --dst-type LOCAL -j KUBE-NODEPORTS\nCOMMIT\n"));
        assert!(
            text.lines()
                .all(|l| !l.starts_with(':') || l.len() <= 28 + 8)
        );
    }

    #[test]
    fn nftables_layout_has_a_verdict_map_and_random_endpoints() {
        let text = nftables(&services());
        assert!(text.contains("10.96.0.3 . tcp . 80 : goto service-2\n"));
        assert!(
            text.contains(
                "numgen random mod 2 vmap { 0 : goto endpoint-0-0, 1 : goto endpoint-0-1 }"
            )
        );
        assert!(text.contains("dnat to 10.244.1.3:8080"));
        assert!(text.contains("elements = { tcp . 30080 : goto external-1 }"));
        assert!(
            text.contains("chain external-1 {\n\t\tjump mark-for-masquerade\n\t\tgoto service-1\n")
        );
        assert_eq!(text.matches('{').count(), text.matches('}').count());
    }
}
