//! An in-process Kubernetes API server for the resources the agent watches.
//!
//! No kube-apiserver binary can be installed on these machines, so this fixture speaks the
//! real protocol over HTTP for Services, EndpointSlices and Nodes (and takes the Events the
//! agent creates and patches): lists carrying a
//! resourceVersion, label and field selectors, watch streams (one JSON event per line) with
//! ADDED, MODIFIED, DELETED and BOOKMARK events from a given resourceVersion, `410 Gone` for a
//! resourceVersion older than the retained history, cut connections, and outages (the server
//! unreachable). The agent's real kube client reaches it through a kubeconfig on
//! 127.0.0.1.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use futures::StreamExt as _;
use http_body_util::{BodyExt, Full, StreamBody, combinators::UnsyncBoxBody};
use hyper::{
    Request, Response, StatusCode,
    body::{Bytes, Frame, Incoming},
    server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio::sync::{broadcast, watch};

type Body = UnsyncBoxBody<Bytes, Infallible>;

/// A resource the fixture serves.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Resource {
    /// `/api/v1/services`
    Services,
    /// `/apis/discovery.k8s.io/v1/endpointslices`
    EndpointSlices,
    /// `/api/v1/nodes`
    Nodes,
}

impl Resource {
    const ALL: [Self; 3] = [Self::Services, Self::EndpointSlices, Self::Nodes];

    fn path(self) -> &'static str {
        match self {
            Self::Services => "/api/v1/services",
            Self::EndpointSlices => "/apis/discovery.k8s.io/v1/endpointslices",
            Self::Nodes => "/api/v1/nodes",
        }
    }

    fn kind(self) -> &'static str {
        match self {
            Self::Services => "Service",
            Self::EndpointSlices => "EndpointSlice",
            Self::Nodes => "Node",
        }
    }

    fn api_version(self) -> &'static str {
        match self {
            Self::EndpointSlices => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }

    fn of_kind(kind: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.kind() == kind)
    }
}

#[derive(Clone, Debug)]
struct Change {
    rv: u64,
    resource: Resource,
    kind: &'static str,
    object: Value,
}

/// Requests served, per resource: (lists, watches).
pub type Requests = BTreeMap<Resource, (u32, u32)>;

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Resource, String, String), Value>,
    history: Vec<Change>,
    /// Watches from a resourceVersion below this get 410 Gone.
    oldest: u64,
    down: bool,
    /// Accepts connections and requests but answers nothing (a stopped process).
    hung: bool,
    requests: Requests,
    /// Events (events.k8s.io/v1) by namespace and name, as created and patched.
    events: BTreeMap<(String, String), Value>,
}

struct Shared {
    state: Mutex<State>,
    changes: broadcast::Sender<Change>,
    /// Bumped to end every open watch stream.
    cut: watch::Sender<u64>,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running fixture; stops when dropped.
pub struct ApiServer {
    addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
}

impl ApiServer {
    /// Starts serving on 127.0.0.1 on a free port.
    pub fn start() -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .expect("a runtime");
        let shared = Arc::new(Shared {
            state: Mutex::new(State::default()),
            changes: broadcast::channel(4096).0,
            cut: watch::channel(0).0,
        });
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))
            .expect("binding 127.0.0.1");
        let addr = listener.local_addr().expect("bound");
        let serving = shared.clone();
        runtime.spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                if serving.lock().down {
                    continue; // closed at once: the server is unreachable
                }
                let shared = serving.clone();
                let mut cut = serving.cut.subscribe();
                tokio::spawn(async move {
                    let service = service_fn(move |req| handle(shared.clone(), req));
                    let conn =
                        http1::Builder::new().serve_connection(TokioIo::new(stream), service);
                    tokio::select! {
                        _closed = conn => {}
                        _ = cut.changed() => {}
                    }
                });
            }
        });
        Self {
            addr,
            shared,
            runtime: Some(runtime),
        }
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// Its URL.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Writes a kubeconfig pointing at the fixture.
    pub fn write_kubeconfig(&self, path: &Path) {
        let config = json!({
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fixture", "cluster": {"server": self.url()}}],
            "users": [{"name": "agent", "user": {"token": "fixture-token"}}],
            "contexts": [{"name": "fixture", "context": {"cluster": "fixture", "user": "agent"}}],
            "current-context": "fixture",
        });
        std::fs::write(path, config.to_string()).expect("writing the kubeconfig");
    }

    /// Creates or replaces the objects of a manifest (JSON or YAML-as-JSON documents
    /// separated by `---`); returns the resourceVersion of the last change.
    pub fn apply(&self, manifest: &str) -> u64 {
        let mut rv = 0;
        for doc in manifest.split("\n---\n").filter(|d| !d.trim().is_empty()) {
            let object: Value = serde_json::from_str(doc).expect("fixture manifests are JSON");
            rv = self.apply_object(object);
        }
        rv
    }

    fn apply_object(&self, mut object: Value) -> u64 {
        let kind = object["kind"].as_str().unwrap_or_default().to_owned();
        let resource = Resource::of_kind(&kind).unwrap_or_else(|| panic!("unserved kind {kind}"));
        let mut st = self.shared.lock();
        st.rv += 1;
        let rv = st.rv;
        if resource != Resource::Nodes && object["metadata"]["namespace"].is_null() {
            object["metadata"]["namespace"] = json!("default");
        }
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        let key = key_of(resource, &object);
        if object["metadata"]["uid"].is_null() {
            object["metadata"]["uid"] =
                json!(format!("uid-{}-{}-{}", resource.kind(), key.1, key.2));
        }
        let kind = if st.objects.insert(key, object.clone()).is_some() {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.record(
            &mut st,
            Change {
                rv,
                resource,
                kind,
                object,
            },
        );
        rv
    }

    /// Deletes an object.
    pub fn delete(&self, kind: &str, namespace: &str, name: &str) {
        let resource = Resource::of_kind(kind).expect("served kind");
        let ns = if resource == Resource::Nodes {
            ""
        } else {
            namespace
        };
        let mut st = self.shared.lock();
        let Some(mut object) = st
            .objects
            .remove(&(resource, ns.to_owned(), name.to_owned()))
        else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        self.record(
            &mut st,
            Change {
                rv,
                resource,
                kind: "DELETED",
                object,
            },
        );
    }

    fn record(&self, st: &mut State, change: Change) {
        st.history.push(change.clone());
        let _no_watchers = self.shared.changes.send(change);
    }

    /// Cuts every open connection, watch streams included (a network blip): clients resume
    /// watching from their last resourceVersion.
    pub fn drop_watches(&self) {
        self.shared.cut.send_modify(|g| *g += 1);
    }

    /// Forgets the history (as etcd compaction does) and drops the watches: clients get
    /// 410 Gone when they resume, and list again.
    pub fn expire_history(&self) {
        {
            // Every resourceVersion so far becomes too old; new lists start past them.
            let mut st = self.shared.lock();
            st.rv += 1;
            st.oldest = st.rv;
            st.history.clear();
        }
        self.drop_watches();
    }

    /// Starts or ends an outage: while down the server is unreachable (open connections are
    /// cut, new ones closed at once).
    pub fn set_down(&self, down: bool) {
        self.shared.lock().down = down;
        if down {
            self.drop_watches();
        }
    }

    /// Starts or ends a hang: while hung the server accepts connections and reads requests
    /// but answers none (as when stopped with SIGSTOP); open watches stay open, silent.
    pub fn set_hung(&self, hung: bool) {
        self.shared.lock().hung = hung;
    }

    /// Requests served so far.
    pub fn requests(&self) -> Requests {
        self.shared.lock().requests.clone()
    }

    /// The Events (events.k8s.io/v1) clients created, with their patches applied.
    pub fn events(&self) -> Vec<Value> {
        self.shared.lock().events.values().cloned().collect()
    }
}

const EVENTS_PREFIX: &str = "/apis/events.k8s.io/v1/namespaces/";

/// Creates (POST .../namespaces/NS/events) or merge-patches (PATCH .../events/NAME) an Event.
async fn handle_event(shared: &Shared, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let rest = path.strip_prefix(EVENTS_PREFIX).unwrap_or_default();
    let parts: Vec<&str> = rest.split('/').collect();
    let method = req.method().clone();
    let body = match req.into_body().collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return full(StatusCode::BAD_REQUEST, status(400, "BadRequest", "body")),
    };
    let Ok(object) = serde_json::from_slice::<Value>(&body) else {
        return full(
            StatusCode::BAD_REQUEST,
            status(400, "BadRequest", "not JSON"),
        );
    };
    let mut st = shared.lock();
    if st.down {
        return full(
            StatusCode::SERVICE_UNAVAILABLE,
            status(503, "ServiceUnavailable", "the fixture is down"),
        );
    }
    match (method, parts.as_slice()) {
        (hyper::Method::POST, [ns, "events"]) => {
            let name = object["metadata"]["name"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            st.events.insert((ns.to_string(), name), object.clone());
            full(StatusCode::CREATED, object)
        }
        (hyper::Method::PATCH, [ns, "events", name]) => {
            let Some(stored) = st.events.get_mut(&(ns.to_string(), name.to_string())) else {
                return full(
                    StatusCode::NOT_FOUND,
                    status(404, "NotFound", "no such event"),
                );
            };
            if let (Some(stored), Some(patch)) = (stored.as_object_mut(), object.as_object()) {
                for (k, v) in patch {
                    stored.insert(k.clone(), v.clone());
                }
            }
            full(StatusCode::OK, stored.clone())
        }
        _ => full(
            StatusCode::METHOD_NOT_ALLOWED,
            status(405, "MethodNotAllowed", "events: create and patch only"),
        ),
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        if let Some(rt) = self.runtime.take() {
            rt.shutdown_timeout(Duration::from_secs(1));
        }
    }
}

fn key_of(resource: Resource, object: &Value) -> (Resource, String, String) {
    let meta = &object["metadata"];
    let ns = if resource == Resource::Nodes {
        String::new()
    } else {
        meta["namespace"].as_str().unwrap_or("default").to_owned()
    };
    (
        resource,
        ns,
        meta["name"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A decoded query string.
fn query(req: &Request<Incoming>) -> BTreeMap<String, String> {
    let decode = |s: &str| {
        let b = s.as_bytes();
        let mut out = Vec::with_capacity(b.len());
        let mut i = 0;
        while i < b.len() {
            match (b[i], b.get(i + 1..i + 3)) {
                (b'%', Some(hex)) => {
                    let hex = std::str::from_utf8(hex).unwrap_or("");
                    out.push(u8::from_str_radix(hex, 16).unwrap_or(b'?'));
                    i += 3;
                }
                (b'+', _) => {
                    out.push(b' ');
                    i += 1;
                }
                (c, _) => {
                    out.push(c);
                    i += 1;
                }
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    };
    req.uri()
        .query()
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            (decode(k), decode(v))
        })
        .collect()
}

/// Whether an object matches `labelSelector` and `fieldSelector` (the forms `key`, `!key`,
/// `key=value`, `key==value` and `key!=value`, comma-separated).
fn selected(object: &Value, q: &BTreeMap<String, String>) -> bool {
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let label = |k: &str| text(&object["metadata"]["labels"][k]);
    let field = |k: &str| match k {
        "metadata.name" => text(&object["metadata"]["name"]),
        "metadata.namespace" => text(&object["metadata"]["namespace"]),
        _ => None,
    };
    holds(q.get("labelSelector"), &label) && holds(q.get("fieldSelector"), &field)
}

/// Whether every term of a selector holds for the values `get` returns.
fn holds(selector: Option<&String>, get: &dyn Fn(&str) -> Option<String>) -> bool {
    let terms = selector
        .into_iter()
        .flat_map(|s| s.split(','))
        .filter(|t| !t.is_empty());
    terms.into_iter().all(|term| {
        if let Some((k, v)) = term.split_once("!=") {
            get(k).as_deref() != Some(v)
        } else if let Some((k, v)) = term.split_once('=') {
            get(k).as_deref() == Some(v.trim_start_matches('='))
        } else if let Some(k) = term.strip_prefix('!') {
            get(k).is_none()
        } else {
            get(term).is_some()
        }
    })
}

fn full(status: StatusCode, body: Value) -> Response<Body> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())).boxed_unsync());
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("valid"));
    resp
}

fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Status", "status": "Failure", "code": code,
           "reason": reason, "message": message, "metadata": {}})
}

fn with_type(resource: Resource, mut object: Value) -> Value {
    object["apiVersion"] = json!(resource.api_version());
    object["kind"] = json!(resource.kind());
    object
}

fn event(kind: &str, object: Value) -> Bytes {
    let mut line = json!({"type": kind, "object": object}).to_string();
    line.push('\n');
    Bytes::from(line)
}

async fn handle(shared: Arc<Shared>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    while shared.lock().hung {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    if req.uri().path().starts_with(EVENTS_PREFIX) {
        return Ok(handle_event(&shared, req).await);
    }
    let Some(resource) = Resource::ALL
        .into_iter()
        .find(|r| r.path() == req.uri().path())
    else {
        return Ok(full(
            StatusCode::NOT_FOUND,
            status(404, "NotFound", "not served by the fixture"),
        ));
    };
    let q = query(&req);
    let watching = q.get("watch").is_some_and(|w| w == "true" || w == "1");
    let mut st = shared.lock();
    if st.down {
        return Ok(full(
            StatusCode::SERVICE_UNAVAILABLE,
            status(503, "ServiceUnavailable", "the fixture is down"),
        ));
    }
    let counts = st.requests.entry(resource).or_default();
    if watching {
        counts.1 += 1;
    } else {
        counts.0 += 1;
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((r, _, _), o)| *r == resource && selected(o, &q))
            .map(|(_, o)| with_type(resource, o.clone()))
            .collect();
        let list = json!({
            "apiVersion": resource.api_version(),
            "kind": format!("{}List", resource.kind()),
            "metadata": {"resourceVersion": st.rv.to_string()},
            "items": items,
        });
        return Ok(full(StatusCode::OK, list));
    }

    // A watch: 410 for an expired resourceVersion, else history after it, then live events.
    let from: u64 = q
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(st.rv);
    const BUFFER: usize = 1024;
    let (tx, rx) = tokio::sync::mpsc::channel::<Bytes>(BUFFER);
    // History the watch's buffer cannot hold is answered as too old, so the client relists
    // (as a real API server does when it cannot serve a resume), rather than losing events.
    let backlog = st
        .history
        .iter()
        .filter(|c| c.resource == resource && c.rv > from && selected(&c.object, &q))
        .count();
    if from < st.oldest || backlog >= BUFFER {
        let gone = status(
            410,
            "Expired",
            &format!("too old resource version: {from} ({})", st.oldest),
        );
        let _full = tx.try_send(event("ERROR", gone));
        drop(tx);
    } else {
        let mut live = shared.changes.subscribe();
        let mut cut = shared.cut.subscribe();
        let mut last = from;
        for c in st
            .history
            .iter()
            .filter(|c| c.resource == resource && c.rv > from)
        {
            if selected(&c.object, &q) {
                let _full = tx.try_send(event(c.kind, with_type(resource, c.object.clone())));
            }
            last = c.rv;
        }
        let bookmarks = q.get("allowWatchBookmarks").is_some_and(|b| b == "true");
        let timeout = q
            .get("timeoutSeconds")
            .and_then(|t| t.parse().ok())
            .unwrap_or(290u64);
        let shared = shared.clone();
        tokio::spawn(async move {
            let end = tokio::time::sleep(Duration::from_secs(timeout));
            tokio::pin!(end);
            let mut tick = tokio::time::interval(Duration::from_millis(500));
            loop {
                tokio::select! {
                                    change = live.recv() => match change {
                                        Ok(c) if c.resource == resource && c.rv > last => {
                                            last = c.rv;
                                            if selected(&c.object, &q)
                                                && tx.send(event(c.kind, with_type(resource, c.object))).await.is_err()
                                            {
                                                return;
                                            }
                                        }
                                        Ok(_) => {}
                                        Err(broadcast::error::RecvError::Lagged(_) |
                broadcast::error::RecvError::Closed) => return,
                                    },
                                    _ = tick.tick(), if bookmarks => {
                                        let rv = shared.lock().rv;
                                        let mark = json!({"apiVersion": resource.api_version(), "kind": resource.kind(),
                                                          "metadata": {"resourceVersion": rv.to_string()}});
                                        if tx.send(event("BOOKMARK", mark)).await.is_err() {
                                            return;
                                        }
                                        last = last.max(rv);
                                    }
                                    _ = cut.changed() => return,
                                    () = &mut end => return,
                                }
            }
        });
    }
    drop(st);
    let frames = futures::stream::unfold(rx, |mut rx| async move {
        let bytes = rx.recv().await?;
        Some((Ok::<_, Infallible>(Frame::data(bytes)), rx))
    });
    let mut resp = Response::new(BodyExt::boxed_unsync(StreamBody::new(frames.boxed())));
    resp.headers_mut()
        .insert("content-type", "application/json".parse().expect("valid"));
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors() {
        let obj = json!({"metadata": {"name": "n1", "labels": {"a": "1"}}});
        let q = |l: &str, f: &str| {
            [
                ("labelSelector".to_string(), l.to_string()),
                ("fieldSelector".to_string(), f.to_string()),
            ]
            .into()
        };
        assert!(selected(&obj, &q("a=1,!b", "metadata.name=n1")));
        assert!(selected(&obj, &q("a", "")));
        assert!(!selected(&obj, &q("!a", "")));
        assert!(!selected(&obj, &q("a!=1", "")));
        assert!(!selected(&obj, &q("", "metadata.name=n2")));
    }
}
