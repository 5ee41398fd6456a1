//! Services, EndpointSlices and this node's Node from the Kubernetes API.
//!
//! One kube-runtime watcher per kind: an initial list, then a watch resumed from the last
//! resourceVersion; when the API answers 410 Gone (or the watch cannot be resumed) the
//! watcher lists again, and that relist reaches the store as a diff, never as a flush. Errors
//! (the API server unreachable, a dropped stream) are retried with exponential backoff while
//! the datapath keeps its last state.
//!
//! Like kube-proxy, Services and EndpointSlices labelled
//! `service.kubernetes.io/service-proxy-name` (another proxy's) or
//! `service.kubernetes.io/headless` are filtered out by the API server already.
//!
//! Bootstrap: the agent must reach the API server without depending on its own translation of
//! the `kubernetes` service (which may not be programmed yet, or lose its endpoints). Give it
//! the API server's real address: `--api-server`, a kubeconfig, or `KUBERNETES_SERVICE_HOST`
//! and `KUBERNETES_SERVICE_PORT` set explicitly in the pod spec (they override the injected
//! ClusterIP ones).

use std::{
    collections::{BTreeMap, BTreeSet},
    path::PathBuf,
};

use futures::{StreamExt as _, stream::BoxStream};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{WatchStreamExt as _, watcher},
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Source, SourceError, SourceTask, SourceUp, Stamped};
use crate::{
    k8s::object::{HEADLESS_LABEL, SERVICE_PROXY_NAME_LABEL},
    k8s::store::{Kind, Object, Snapshot, Update},
};

/// Turns watcher events of several kinds into store updates. The initial lists of all kinds
/// are held back and sent together as one complete snapshot (the first sync must see
/// everything); after that, relists become per-kind [`Update::Relist`]s and events pass on.
#[derive(Debug)]
pub struct Translator {
    kinds: BTreeSet<Kind>,
    /// Objects of the list in progress, per kind.
    listing: BTreeMap<Kind, Vec<Object>>,
    /// Until the first snapshot: the kinds whose initial list is done, kept up to date.
    initial: Option<BTreeMap<Kind, Vec<Object>>>,
}

impl Translator {
    /// A translator expecting watches of these kinds.
    pub fn new(kinds: impl IntoIterator<Item = Kind>) -> Self {
        Self {
            kinds: kinds.into_iter().collect(),
            listing: BTreeMap::new(),
            initial: Some(BTreeMap::new()),
        }
    }

    /// The update an event leads to, if any.
    pub fn on(&mut self, kind: Kind, event: watcher::Event<Object>) -> Option<Update> {
        match event {
            watcher::Event::Init => {
                self.listing.insert(kind, Vec::new());
                None
            }
            watcher::Event::InitApply(o) => {
                self.listing.entry(kind).or_default().push(o);
                None
            }
            watcher::Event::InitDone => {
                let objects = self.listing.remove(&kind).unwrap_or_default();
                let Some(initial) = &mut self.initial else {
                    return Some(Update::Relist(kind, objects));
                };
                initial.insert(kind, objects);
                if !self.kinds.iter().all(|k| initial.contains_key(k)) {
                    return None;
                }
                let done = self.initial.take().unwrap_or_default();
                Some(Update::Snapshot(snapshot(done)))
            }
            watcher::Event::Apply(o) => {
                match self.initial.as_mut().and_then(|i| i.get_mut(&kind)) {
                    Some(list) => {
                        list.retain(|x| x.id() != o.id());
                        list.push(o);
                        None
                    }
                    None => Some(Update::Apply(o)),
                }
            }
            watcher::Event::Delete(o) => match self.initial.as_mut().and_then(|i| i.get_mut(&kind))
            {
                Some(list) => {
                    list.retain(|x| x.id() != o.id());
                    None
                }
                None => Some(Update::Delete(o)),
            },
        }
    }
}

fn snapshot(mut by_kind: BTreeMap<Kind, Vec<Object>>) -> Snapshot {
    let mut take = |kind| by_kind.remove(&kind).unwrap_or_default().into_iter();
    Snapshot {
        services: take(Kind::Service)
            .filter_map(|o| match o {
                Object::Service(s) => Some(*s),
                _ => None,
            })
            .collect(),
        slices: take(Kind::EndpointSlice)
            .filter_map(|o| match o {
                Object::EndpointSlice(s) => Some(*s),
                _ => None,
            })
            .collect(),
        nodes: take(Kind::Node)
            .filter_map(|o| match o {
                Object::Node(n) => Some(*n),
                _ => None,
            })
            .collect(),
    }
}

/// The API connection settings.
#[derive(Clone, Debug, Default)]
pub struct Settings {
    /// A kubeconfig file; otherwise in-cluster configuration (or `KUBECONFIG`).
    pub kubeconfig: Option<PathBuf>,
    /// The API server URL, overriding the one configured.
    pub api_server: Option<String>,
    /// This node's name: its Node object is watched for topology labels.
    pub node_name: Option<String>,
    /// How often the API server is asked for its version, each answer awaited as long: a
    /// server that accepts connections and answers nothing (stopped, overloaded, behind a
    /// broken proxy) leaves the watches silent for minutes, which looks like no change.
    pub probe_every: std::time::Duration,
}

/// The Kubernetes source.
pub struct KubeSource {
    settings: Settings,
}

impl KubeSource {
    /// A source with these settings; it connects when it runs.
    pub fn new(settings: Settings) -> Self {
        Self { settings }
    }
}

fn api_error(e: impl std::fmt::Display) -> SourceError {
    SourceError::Api(e.to_string())
}

async fn config(settings: &Settings) -> Result<Config, SourceError> {
    let mut config = match &settings.kubeconfig {
        Some(path) => {
            let kubeconfig = Kubeconfig::read_from(path)
                .map_err(|e| api_error(format!("{}: {e}", path.display())))?;
            Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .map_err(api_error)?
        }
        None => Config::infer().await.map_err(api_error)?,
    };
    if let Some(url) = &settings.api_server {
        config.cluster_url = url
            .parse()
            .map_err(|e| api_error(format!("--api-server {url}: {e}")))?;
    }
    Ok(config)
}

/// A client of the API with these settings.
pub async fn client(settings: &Settings) -> Result<Client, SourceError> {
    let config = config(settings).await?;
    info!(api_server = %config.cluster_url, "connecting to the Kubernetes API");
    Client::try_from(config).map_err(api_error)
}

/// The API server's address, when the configuration names it by IP (as the in-cluster
/// `kubernetes` ClusterIP is): the agent protects that frontend from losing every backend.
pub async fn api_address(settings: &Settings) -> Option<std::net::SocketAddr> {
    let url = config(settings).await.ok()?.cluster_url;
    let host = url.host()?.trim_start_matches('[').trim_end_matches(']');
    let ip: std::net::IpAddr = host.parse().ok()?;
    let port = url
        .port_u16()
        .unwrap_or(if url.scheme_str() == Some("http") {
            80
        } else {
            443
        });
    Some((ip, port).into())
}

/// Asks `client`'s API server for its version every `every`, waiting as long for each
/// answer; sends whether it answered (any HTTP answer counts: the server is there).
fn probes(client: Client, every: std::time::Duration) -> mpsc::Receiver<bool> {
    let (tx, rx) = mpsc::channel(1);
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            let answered = matches!(
                tokio::time::timeout(every, client.apiserver_version()).await,
                Ok(Ok(_) | Err(kube::Error::Api(_)))
            );
            if tx.send(answered).await.is_err() {
                return;
            }
        }
    });
    rx
}

/// One kind's watch as a stream of (kind, event), retried with backoff.
fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    kind: Kind,
    wrap: fn(Box<K>) -> Object,
) -> BoxStream<'static, (Kind, Result<watcher::Event<Object>, watcher::Error>)>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    watcher(api, config)
        .default_backoff()
        .map(move |r| (kind, r.map(|e| wrap_event(e, wrap))))
        .boxed()
}

fn wrap_event<K>(event: watcher::Event<K>, wrap: fn(Box<K>) -> Object) -> watcher::Event<Object> {
    use watcher::Event::{Apply, Delete, Init, InitApply, InitDone};
    match event {
        Init => Init,
        InitApply(o) => InitApply(wrap(Box::new(o))),
        InitDone => InitDone,
        Apply(o) => Apply(wrap(Box::new(o))),
        Delete(o) => Delete(wrap(Box::new(o))),
    }
}

impl Source for KubeSource {
    fn describe(&self) -> String {
        match (&self.settings.api_server, &self.settings.kubeconfig) {
            (Some(url), _) => format!("kubernetes ({url})"),
            (None, Some(path)) => format!("kubernetes (kubeconfig {})", path.display()),
            (None, None) => "kubernetes (in-cluster)".into(),
        }
    }

    fn api(&self) -> Option<&Settings> {
        Some(&self.settings)
    }

    fn run(self: Box<Self>, out: mpsc::Sender<Stamped>, up: SourceUp) -> SourceTask {
        Box::pin(async move {
            let client = client(&self.settings).await?;
            let probe_client = client.clone();
            let ours = format!("!{SERVICE_PROXY_NAME_LABEL},!{HEADLESS_LABEL}");
            let selected = watcher::Config::default().labels(&ours);
            let mut streams = vec![
                watch(
                    Api::<Service>::all(client.clone()),
                    selected.clone(),
                    Kind::Service,
                    Object::Service,
                ),
                watch(
                    Api::<EndpointSlice>::all(client.clone()),
                    selected,
                    Kind::EndpointSlice,
                    Object::EndpointSlice,
                ),
            ];
            let mut kinds = vec![Kind::Service, Kind::EndpointSlice];
            if let Some(node) = &self.settings.node_name {
                let this_node = watcher::Config::default().fields(&format!("metadata.name={node}"));
                streams.push(watch(
                    Api::<Node>::all(client),
                    this_node,
                    Kind::Node,
                    Object::Node,
                ));
                kinds.push(Kind::Node);
            }
            let mut translator = Translator::new(kinds);
            let mut events = futures::stream::select_all(streams);
            let mut failing: BTreeSet<Kind> = BTreeSet::new();
            let mut probes = probes(probe_client, self.settings.probe_every);
            // Whether the last probe was answered.
            let mut answering = true;
            loop {
                let (kind, event) = tokio::select! {
                    next = events.next() => match next {
                        Some(next) => next,
                        None => break,
                    },
                    Some(answered) = probes.recv() => {
                        if answered != answering {
                            answering = answered;
                            if answered {
                                info!("the API server answers again");
                            } else {
                                warn!(every = ?self.settings.probe_every, "the API server does not answer; the datapath keeps its state");
                            }
                            if failing.is_empty() {
                                up(answered);
                            }
                        }
                        continue;
                    }
                };
                let event = match event {
                    Ok(event) => {
                        if failing.remove(&kind) {
                            info!(?kind, "watch recovered");
                            if failing.is_empty() && answering {
                                up(true);
                            }
                        }
                        event
                    }
                    Err(e) => {
                        if failing.is_empty() && answering {
                            up(false);
                        }
                        if failing.insert(kind) {
                            warn!(?kind, error = %e, "watch failed; retrying with backoff, the datapath keeps its state");
                        } else {
                            debug!(?kind, error = %e, "watch still failing");
                        }
                        continue;
                    }
                };
                if let Some(update) = translator.on(kind, event) {
                    if let Update::Relist(kind, objects) = &update {
                        info!(
                            ?kind,
                            objects = objects.len(),
                            "relisted; applying the difference"
                        );
                    }
                    if out.send(Stamped::now(update)).await.is_err() {
                        return Ok(());
                    }
                }
            }
            Err(api_error("the watches ended"))
        })
    }
}

#[cfg(test)]
mod tests {
    use watcher::Event;

    use super::*;
    use crate::testutil;

    fn svc(name: &str) -> Object {
        Object::Service(Box::new(testutil::service("ns", name, &["10.0.0.1"], &[])))
    }

    fn slice(name: &str) -> Object {
        Object::EndpointSlice(Box::new(testutil::slice("ns", name, "a", "IPv4", &[], &[])))
    }

    fn names(s: &Snapshot) -> (Vec<String>, Vec<String>) {
        let n = |m: &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta| {
            m.name.clone().unwrap()
        };
        (
            s.services.iter().map(|x| n(&x.metadata)).collect(),
            s.slices.iter().map(|x| n(&x.metadata)).collect(),
        )
    }

    #[test]
    fn initial_lists_are_sent_together_with_events_folded_in() {
        let mut t = Translator::new([Kind::Service, Kind::EndpointSlice]);
        assert_eq!(t.on(Kind::Service, Event::Init), None);
        assert_eq!(t.on(Kind::Service, Event::InitApply(svc("a"))), None);
        assert_eq!(t.on(Kind::Service, Event::InitApply(svc("b"))), None);
        assert_eq!(t.on(Kind::Service, Event::InitDone), None);
        // Services change while slices are still listing.
        assert_eq!(t.on(Kind::Service, Event::Delete(svc("a"))), None);
        assert_eq!(t.on(Kind::Service, Event::Apply(svc("c"))), None);
        assert_eq!(t.on(Kind::EndpointSlice, Event::Init), None);
        assert_eq!(
            t.on(Kind::EndpointSlice, Event::InitApply(slice("s1"))),
            None
        );
        let Some(Update::Snapshot(s)) = t.on(Kind::EndpointSlice, Event::InitDone) else {
            panic!("the snapshot comes when every kind is listed")
        };
        assert_eq!(names(&s), (vec!["b".into(), "c".into()], vec!["s1".into()]));
    }

    #[tokio::test]
    async fn a_client_builds_from_a_kubeconfig_with_tls() {
        let path = std::env::temp_dir().join(format!("lb-kubeconfig-{}", std::process::id()));
        let config = r#"{"apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "k", "cluster": {"server": "https://192.0.2.1:6443", "insecure-skip-tls-verify": true}}],
            "users": [{"name": "u", "user": {"token": "t"}}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}"#;
        std::fs::write(&path, config).unwrap();
        let settings = Settings {
            kubeconfig: Some(path.clone()),
            api_server: Some("https://198.51.100.7:6443".into()),
            node_name: None,
            probe_every: std::time::Duration::from_secs(1),
        };
        let built = client(&settings).await;
        std::fs::remove_file(&path).unwrap();
        let client = built.expect("a TLS client builds (a crypto provider is compiled in)");
        assert_eq!(client.default_namespace(), "default");
    }

    #[tokio::test]
    async fn the_api_address_is_known_when_it_is_an_ip() {
        let with = |url: &str| Settings {
            kubeconfig: None,
            api_server: Some(url.into()),
            node_name: None,
            probe_every: std::time::Duration::from_secs(1),
        };
        // api_server overrides whatever else is configured; in-cluster settings may be absent
        // here, so give a kubeconfig too.
        let path = std::env::temp_dir().join(format!("lb-kubeconfig-ip-{}", std::process::id()));
        std::fs::write(
            &path,
            r#"{"apiVersion": "v1", "kind": "Config", "current-context": "c",
            "clusters": [{"name": "k", "cluster": {"server": "https://k8s.example:6443"}}],
            "users": [{"name": "u", "user": {}}],
            "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}]}"#,
        )
        .unwrap();
        let mut s = with("https://10.96.0.1");
        s.kubeconfig = Some(path.clone());
        assert_eq!(
            api_address(&s).await,
            Some("10.96.0.1:443".parse().unwrap())
        );
        s.api_server = Some("https://[fd00::1]:6443".into());
        assert_eq!(
            api_address(&s).await,
            Some("[fd00::1]:6443".parse().unwrap())
        );
        s.api_server = None;
        assert_eq!(api_address(&s).await, None, "a name, not an address");
        std::fs::remove_file(&path).unwrap();
    }

    #[test]
    fn later_events_and_relists_pass_on() {
        let mut t = Translator::new([Kind::Service]);
        t.on(Kind::Service, Event::Init);
        assert!(matches!(
            t.on(Kind::Service, Event::InitDone),
            Some(Update::Snapshot(_))
        ));
        assert_eq!(
            t.on(Kind::Service, Event::Apply(svc("a"))),
            Some(Update::Apply(svc("a")))
        );
        assert_eq!(
            t.on(Kind::Service, Event::Delete(svc("a"))),
            Some(Update::Delete(svc("a")))
        );
        // A relist after 410 Gone: buffered, then one diff.
        assert_eq!(t.on(Kind::Service, Event::Init), None);
        assert_eq!(t.on(Kind::Service, Event::InitApply(svc("b"))), None);
        assert_eq!(
            t.on(Kind::Service, Event::InitDone),
            Some(Update::Relist(Kind::Service, vec![svc("b")]))
        );
    }
}
