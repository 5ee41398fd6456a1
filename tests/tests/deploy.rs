//! The manifests in deploy/ parse into their Kubernetes types, and what they tell the agent
//! agrees with the agent: a typo fails CI. Needs nothing special.

use std::{collections::BTreeSet, path::PathBuf};

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{ConfigMap, Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use lb_userspace::agent::config::AgentArgs;
use serde::Deserialize as _;
use serde_yaml_ng::Value;

fn deploy_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// Every document of a manifest.
fn documents(file: &str) -> Vec<Value> {
    let text =
        std::fs::read_to_string(deploy_dir().join(file)).unwrap_or_else(|e| panic!("{file}: {e}"));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{file}: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The documents of `kind` in a manifest, as their type.
fn objects<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> Vec<T> {
    documents(file)
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| serde_yaml_ng::from_value(d).unwrap_or_else(|e| panic!("{file}: {kind}: {e}")))
        .collect()
}

fn one<T: serde::de::DeserializeOwned>(file: &str, kind: &str) -> T {
    let mut all = objects(file, kind);
    assert_eq!(all.len(), 1, "{file} has one {kind}");
    all.remove(0)
}

#[test]
fn every_manifest_parses_into_its_type() {
    let mut seen = BTreeSet::new();
    for entry in std::fs::read_dir(deploy_dir()).expect("deploy/") {
        let path = entry.expect("entry").path();
        let file = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.extension().and_then(|e| e.to_str()) != Some("yaml") {
            continue;
        }
        for doc in documents(&file) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_owned();
            let parsed = match kind.as_str() {
                "ServiceAccount" => serde_yaml_ng::from_value::<ServiceAccount>(doc).map(drop),
                "ClusterRole" => serde_yaml_ng::from_value::<ClusterRole>(doc).map(drop),
                "ClusterRoleBinding" => {
                    serde_yaml_ng::from_value::<ClusterRoleBinding>(doc).map(drop)
                }
                "ConfigMap" => serde_yaml_ng::from_value::<ConfigMap>(doc).map(drop),
                "DaemonSet" => serde_yaml_ng::from_value::<DaemonSet>(doc).map(drop),
                "Kustomization" => {
                    for r in doc["resources"].as_sequence().expect("resources") {
                        let r = r.as_str().expect("a file name");
                        assert!(deploy_dir().join(r).is_file(), "kustomization lists {r}");
                    }
                    Ok(())
                }
                other => panic!("{file}: unexpected kind {other:?}: add it to this test"),
            };
            parsed.unwrap_or_else(|e| panic!("{file}: {kind}: {e}"));
            seen.insert(kind);
        }
    }
    for kind in [
        "ServiceAccount",
        "ClusterRole",
        "ClusterRoleBinding",
        "DaemonSet",
        "ConfigMap",
    ] {
        assert!(seen.contains(kind), "deploy/ has a {kind}");
    }
}

/// The agent's arguments as its own command line parses them.
fn agent_args(c: &Container) -> AgentArgs {
    let args = c.args.clone().unwrap_or_default();
    let parsed = AgentArgs::try_parse_from(std::iter::once("lb-agent".to_string()).chain(args))
        .unwrap_or_else(|e| panic!("container {}: {e}", c.name));
    parsed
        .validate()
        .unwrap_or_else(|e| panic!("container {}: {e}", c.name));
    parsed
}

#[test]
fn the_daemonset_runs_the_agent_as_intended() {
    let ds: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let pod = ds.spec.template.spec.expect("pod spec");
    assert_eq!(
        pod.host_network,
        Some(true),
        "node networking, like kube-proxy"
    );
    assert_ne!(
        pod.host_pid,
        Some(true),
        "pods' namespaces are found where the runtime pins them, not through host PIDs"
    );
    assert_eq!(
        pod.dns_policy.as_deref(),
        Some("Default"),
        "the node's resolvers: cluster DNS is a ClusterIP the agent programs itself"
    );
    let sa: ServiceAccount = one("rbac.yaml", "ServiceAccount");
    assert_eq!(pod.service_account_name, sa.metadata.name);

    let agent = &pod.containers[0];
    let args = agent_args(agent);
    assert_eq!(args.source.as_deref(), Some("kubernetes"));
    let health = args.healthz().expect("valid").expect("enabled");
    assert_eq!(health.port(), 10256, "kube-proxy's health port");
    let metrics = args.metrics().expect("valid").expect("enabled");
    assert!(
        metrics.ip().is_loopback(),
        "metrics name every service: loopback only"
    );
    for (probe, path) in [
        (&agent.liveness_probe, "/livez"),
        (&agent.readiness_probe, "/readyz"),
        (&agent.startup_probe, "/livez"),
    ] {
        let get = probe
            .as_ref()
            .and_then(|p| p.http_get.as_ref())
            .expect("an HTTP probe");
        assert_eq!(get.path.as_deref(), Some(path));
        let port = agent
            .ports
            .iter()
            .flatten()
            .find(|p| matches!(&get.port, k8s_openapi::apimachinery::pkg::util::intstr::IntOrString::String(n) if Some(n) == p.name.as_ref()))
            .expect("the probe's named port exists");
        assert_eq!(
            port.container_port,
            i32::from(health.port()),
            "probes reach --healthz-bind-address"
        );
    }

    let env = agent.env.clone().unwrap_or_default();
    let node = env
        .iter()
        .find(|e| e.name == "NODE_NAME")
        .expect("NODE_NAME");
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("downward API");
    assert_eq!(field.field_path, "spec.nodeName");
    // Settings from the ConfigMap: each key exists, and its value is a valid flag value.
    let config: ConfigMap = one("config.yaml", "ConfigMap");
    let data = config.data.clone().unwrap_or_default();
    let mut with_config = agent.args.clone().unwrap_or_default();
    for (var, flag) in [
        ("LB_API_SERVER", "--api-server"),
        ("LB_XDP_DEVICES", "--xdp-devices"),
        ("LB_OVERLAY_DEVICES", "--overlay-devices"),
        ("LB_NODEPORT_ADDRESSES", "--nodeport-addresses"),
        ("LB_EXTERNAL_IP_CIDRS", "--external-ip-cidrs"),
    ] {
        let e = env
            .iter()
            .find(|e| e.name == var)
            .unwrap_or_else(|| panic!("{var} is set"));
        let key = e
            .value_from
            .as_ref()
            .and_then(|v| v.config_map_key_ref.as_ref())
            .expect("from the ConfigMap");
        assert_eq!(Some(&key.name), config.metadata.name.as_ref());
        let value = data
            .get(&key.key)
            .unwrap_or_else(|| panic!("config.yaml has {}", key.key));
        with_config.push(format!("{flag}={value}"));
    }
    let configured = agent_args(&Container {
        args: Some(with_config),
        ..agent.clone()
    });
    assert_eq!(
        configured.xdp_devices(),
        Ok(lb_userspace::agent::config::Devices::Auto),
        "north-south traffic is handled on the node's own devices"
    );
    assert_eq!(
        configured.overlay_devices(),
        Ok(lb_userspace::agent::config::Devices::Auto),
        "replies over VXLAN and Geneve overlays are reversed"
    );

    assert_least_privilege(&pod, agent, "the agent");
    let seccomp = pod
        .security_context
        .as_ref()
        .and_then(|c| c.seccomp_profile.as_ref())
        .map(|p| p.type_.as_str());
    assert_eq!(seccomp, Some("RuntimeDefault"));

    let volumes: BTreeSet<String> = pod
        .volumes
        .iter()
        .flatten()
        .map(|v| v.name.clone())
        .collect();
    let mounts = agent.volume_mounts.clone().unwrap_or_default();
    for m in &mounts {
        assert!(volumes.contains(&m.name), "mount {} has a volume", m.name);
    }
    let mounted = |path: &std::path::Path| mounts.iter().any(|m| path.starts_with(&m.mount_path));
    assert!(
        mounted(&args.bpffs) && mounted(&args.pin_dir),
        "bpffs is mounted from the host"
    );
    assert!(
        mounted(args.cgroup.as_deref().expect("--cgroup")),
        "the cgroup is mounted from the host"
    );
    // What the agent writes, on a read-only root: the host's net sysctls, and the explain
    // socket's directory.
    let writable = |path: &std::path::Path| {
        mounts
            .iter()
            .any(|m| path.starts_with(&m.mount_path) && m.read_only != Some(true))
    };
    let host_path = |mount_path: &std::path::Path| -> Option<String> {
        let m = mounts
            .iter()
            .find(|m| mount_path.starts_with(&m.mount_path))?;
        let v = pod.volumes.iter().flatten().find(|v| v.name == m.name)?;
        Some(v.host_path.as_ref()?.path.clone())
    };
    assert!(writable(&args.proc_sys_net));
    assert_eq!(
        host_path(&args.proc_sys_net).as_deref(),
        Some("/proc/sys/net"),
        "the node's own net sysctls"
    );
    assert!(writable(std::path::Path::new(
        lb_userspace::agent::health::RUN_DIR
    )));
    for dir in args.netns_dirs() {
        assert!(
            host_path(&dir).is_some(),
            "{} is mounted from the host",
            dir.display()
        );
        let m = mounts.iter().find(|m| dir.starts_with(&m.mount_path));
        assert_eq!(
            m.and_then(|m| m.mount_propagation.as_deref()),
            Some("HostToContainer"),
            "namespaces pinned later appear in {}",
            dir.display()
        );
    }
}

/// `container` of `pod` runs unprivileged, on a read-only root, with the DaemonSet's
/// capabilities only, and propagates no mount back to the host.
fn assert_least_privilege(
    pod: &k8s_openapi::api::core::v1::PodSpec,
    container: &Container,
    what: &str,
) {
    let sc = container.security_context.clone().unwrap_or_default();
    assert_ne!(sc.privileged, Some(true), "{what} is not privileged");
    assert_eq!(
        sc.read_only_root_filesystem,
        Some(true),
        "{what}: read-only root"
    );
    let caps = sc.capabilities.unwrap_or_default();
    assert_eq!(caps.drop, Some(vec!["ALL".to_owned()]), "{what} drops all");
    let granted: BTreeSet<String> = caps.add.unwrap_or_default().into_iter().collect();
    let daemonset: BTreeSet<String> = lb_userspace::agent::privileges::DAEMONSET
        .iter()
        .map(|c| c.to_string().trim_start_matches("CAP_").to_owned())
        .collect();
    assert_eq!(
        granted, daemonset,
        "{what} gets the capabilities the namespace test runs with"
    );
    assert_ne!(pod.host_pid, Some(true), "{what}: no host PID namespace");
    for m in container.volume_mounts.iter().flatten() {
        assert_ne!(
            m.mount_propagation.as_deref(),
            Some("Bidirectional"),
            "{what}: only privileged containers may propagate mounts back"
        );
    }
}

#[test]
fn the_cluster_role_only_reads_what_the_agent_watches_and_creates_events() {
    let role: ClusterRole = one("rbac.yaml", "ClusterRole");
    let mut granted = BTreeSet::new();
    for rule in role.rules.into_iter().flatten() {
        let resources = rule.resources.clone().unwrap_or_default();
        let groups = rule.api_groups.clone().unwrap_or_default();
        for verb in &rule.verbs {
            let events = resources == ["events"] && groups == ["events.k8s.io"];
            let allowed: &[&str] = if events {
                &["create", "patch"]
            } else {
                &["get", "list", "watch"]
            };
            assert!(allowed.contains(&verb.as_str()), "{verb} on {resources:?}");
        }
        granted.extend(resources);
    }
    let expected: BTreeSet<String> = ["services", "endpointslices", "nodes", "events"]
        .map(String::from)
        .into();
    assert_eq!(granted, expected);
    let binding: ClusterRoleBinding = one("rbac.yaml", "ClusterRoleBinding");
    assert_eq!(Some(binding.role_ref.name), role.metadata.name);
}

#[test]
fn the_cleanup_daemonset_removes_what_the_agent_pins() {
    let agent: DaemonSet = one("daemonset.yaml", "DaemonSet");
    let cleanup: DaemonSet = one("cleanup.yaml", "DaemonSet");
    let pod = |ds: DaemonSet| ds.spec.template.spec.expect("pod spec");
    let agent = agent_args(&pod(agent).containers[0]);
    let cleanup = pod(cleanup);
    let init = cleanup.init_containers.clone().expect("an init container");
    assert_least_privilege(&cleanup, &init[0], "the cleanup");
    let args = agent_args(&init[0]);
    assert!(args.cleanup);
    assert_eq!(args.pin_dir, agent.pin_dir);
}
