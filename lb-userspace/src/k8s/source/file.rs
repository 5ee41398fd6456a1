//! Services and EndpointSlices from a directory of manifests, re-read when it changes.
//!
//! Every `*.yaml`, `*.yml` and `*.json` file directly in the directory (hidden files aside) is
//! read as YAML documents; `v1` Services, `discovery.k8s.io/v1` EndpointSlices, `v1` Nodes (for
//! this node's zone) and `v1` Lists of them are used, other kinds are ignored. The directory is
//! watched with inotify, and a burst of changes is coalesced into one rescan.
//!
//! Bad input never takes working services down: a file that is not valid YAML keeps the
//! objects it had at its last good read, and a document that is not a valid object keeps that
//! object's last good version (found by kind, namespace and name). Both are logged with the
//! file and the object's name.

use std::{
    collections::{BTreeMap, BTreeSet},
    fs, io,
    path::{Path, PathBuf},
    time::Duration,
};

use k8s_openapi::api::core::v1::Node;
use notify::Watcher as _;
use serde::Deserialize as _;
use serde_yaml_ng::Value;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::{Source, SourceError, SourceTask, SourceUp, Stamped};
use crate::{
    k8s::ObjectRef,
    k8s::store::{Kind, Object, Snapshot, Update},
};

/// How long the directory must be quiet before a rescan.
const DEBOUNCE: Duration = Duration::from_millis(50);

/// One document of a manifest.
#[derive(Debug)]
pub enum Document {
    /// A valid Service or EndpointSlice.
    Object(Object),
    /// A Service, EndpointSlice or Node that does not deserialize.
    Invalid {
        /// Its kind.
        kind: Kind,
        /// Its identity, when its metadata has a name.
        id: Option<ObjectRef>,
        /// Why it is invalid.
        error: DecodeError,
    },
    /// Any other kind, ignored.
    Other {
        /// Its `apiVersion` and `kind`.
        kind: String,
    },
}

/// Why a document of a known kind is not a valid object of it.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Its YAML does not deserialize into the kind.
    #[error(transparent)]
    Yaml(#[from] serde_yaml_ng::Error),
    /// Its JSON does not deserialize into the kind.
    #[error(transparent)]
    Json(#[from] serde_json::Error),
}

/// Parses every document of a manifest. Fails only when the text is not YAML.
pub fn parse_manifest(text: &str) -> Result<Vec<Document>, serde_yaml_ng::Error> {
    let mut out = Vec::new();
    // JSON (what `kubectl get -o json` writes) is YAML too, but a JSON parser reads it many
    // times faster; anything it does not take whole is read as YAML.
    if text.trim_start().starts_with(['{', '[']) {
        let docs: Result<Vec<serde_json::Value>, _> = serde_json::Deserializer::from_str(text)
            .into_iter::<serde_json::Value>()
            .collect();
        if let Ok(docs) = docs {
            for value in docs.into_iter().filter(|v| !v.is_null()) {
                classify(value, &mut out);
            }
            return Ok(out);
        }
    }
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        let value = Value::deserialize(doc)?;
        if !value.is_null() {
            classify(value, &mut out);
        }
    }
    Ok(out)
}

/// A parsed document: YAML's or JSON's value tree.
trait Tree: Sized {
    /// The string at `key` of a mapping.
    fn text(&self, key: &str) -> Option<&str>;
    /// The value at `key` of a mapping.
    fn child(&self, key: &str) -> Option<&Self>;
    /// The sequence at `key`, taken out.
    fn take_seq(&mut self, key: &str) -> Vec<Self>;
    /// The typed object.
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, DecodeError>;
}

impl Tree for Value {
    fn text(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(Value::as_str)
    }
    fn child(&self, key: &str) -> Option<&Self> {
        self.get(key)
    }
    fn take_seq(&mut self, key: &str) -> Vec<Self> {
        match self.get_mut(key).map(std::mem::take) {
            Some(Value::Sequence(items)) => items,
            _ => Vec::new(),
        }
    }
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, DecodeError> {
        Ok(serde_yaml_ng::from_value(self)?)
    }
}

impl Tree for serde_json::Value {
    fn text(&self, key: &str) -> Option<&str> {
        self.get(key).and_then(serde_json::Value::as_str)
    }
    fn child(&self, key: &str) -> Option<&Self> {
        self.get(key)
    }
    fn take_seq(&mut self, key: &str) -> Vec<Self> {
        match self.get_mut(key).map(serde_json::Value::take) {
            Some(serde_json::Value::Array(items)) => items,
            _ => Vec::new(),
        }
    }
    fn decode<T: serde::de::DeserializeOwned>(self) -> Result<T, DecodeError> {
        Ok(serde_json::from_value(self)?)
    }
}

fn classify<V: Tree>(mut value: V, out: &mut Vec<Document>) {
    let api_version = value.text("apiVersion").unwrap_or_default().to_owned();
    let kind = value.text("kind").unwrap_or_default().to_owned();
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            for item in value.take_seq("items") {
                classify(item, out);
            }
        }
        ("v1", "Service") => out.push(typed(value, Kind::Service, Object::Service)),
        ("discovery.k8s.io/v1", "EndpointSlice") => {
            out.push(typed(value, Kind::EndpointSlice, Object::EndpointSlice));
        }
        ("v1", "Node") => out.push(typed::<V, Node>(value, Kind::Node, Object::Node)),
        _ => out.push(Document::Other {
            kind: format!("{api_version}/{kind}"),
        }),
    }
}

fn typed<V: Tree, T: serde::de::DeserializeOwned>(
    value: V,
    kind: Kind,
    wrap: fn(Box<T>) -> Object,
) -> Document {
    let id = value.child("metadata").and_then(|m| {
        let name = m.text("name")?;
        let ns = m.text("namespace").unwrap_or("default");
        Some(ObjectRef::new(ns, name))
    });
    match value.decode::<T>() {
        Ok(obj) => Document::Object(wrap(Box::new(obj))),
        Err(error) => Document::Invalid { kind, id, error },
    }
}

/// Whether a directory entry is a manifest to read.
fn is_manifest(path: &Path) -> bool {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or(".");
    let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
    !name.starts_with('.') && matches!(ext, "yaml" | "yml" | "json") && path.is_file()
}

/// The file source.
pub struct FileSource {
    dir: PathBuf,
    /// The objects of each file at its last good read.
    last_good: BTreeMap<PathBuf, Vec<Object>>,
}

impl FileSource {
    /// A source reading `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Self {
            dir: dir.into(),
            last_good: BTreeMap::new(),
        }
    }

    /// Reads the directory and returns every object in it.
    pub fn scan(&mut self) -> Result<Snapshot, SourceError> {
        let entries = fs::read_dir(&self.dir).map_err(|e| self.path_error(e))?;
        let mut files: Vec<PathBuf> = entries
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| is_manifest(p))
            .collect();
        files.sort();
        let mut next = BTreeMap::new();
        for path in files {
            let previous = self.last_good.get(&path);
            let objects = match fs::read_to_string(&path) {
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => {
                    warn!(file = %path.display(), error = %e, "cannot read; keeping its last good objects");
                    previous.cloned().unwrap_or_default()
                }
                Ok(text) => match parse_manifest(&text) {
                    Err(e) => {
                        warn!(file = %path.display(), error = %e, "not valid YAML; keeping its last good objects");
                        previous.cloned().unwrap_or_default()
                    }
                    Ok(docs) => resolve(&path, docs, previous),
                },
            };
            next.insert(path, objects);
        }
        self.last_good = next;
        Ok(self.snapshot())
    }

    /// Every object of every file; an object defined twice is taken from the first file.
    fn snapshot(&self) -> Snapshot {
        let mut seen = BTreeSet::new();
        let mut snap = Snapshot::default();
        for (path, objects) in &self.last_good {
            for obj in objects {
                let key = (obj.kind(), obj.id());
                if !seen.insert(key) {
                    warn!(file = %path.display(), kind = ?obj.kind(), object = ?obj.id().map(|i| i.to_string()),
                          "defined again; the first definition is used");
                    continue;
                }
                match obj.clone() {
                    Object::Service(s) => snap.services.push(*s),
                    Object::EndpointSlice(s) => snap.slices.push(*s),
                    Object::Node(n) => snap.nodes.push(*n),
                }
            }
        }
        snap
    }

    fn path_error(&self, e: impl ToString) -> SourceError {
        SourceError::Path {
            path: self.dir.clone(),
            message: e.to_string(),
        }
    }
}

/// The objects of one file: its valid documents, and for an invalid document with a name,
/// that object's version from the file's previous read.
fn resolve(path: &Path, docs: Vec<Document>, previous: Option<&Vec<Object>>) -> Vec<Object> {
    let mut objects = Vec::new();
    for doc in docs {
        match doc {
            Document::Object(obj) if obj.id().is_some() => objects.push(obj),
            Document::Object(obj) => {
                warn!(file = %path.display(), kind = ?obj.kind(), "has no metadata.name; skipped");
            }
            Document::Invalid { kind, id, error } => {
                let kept = id.as_ref().and_then(|id| {
                    previous?
                        .iter()
                        .find(|o| o.kind() == kind && o.id().as_ref() == Some(id))
                });
                let object = id.map_or_else(|| "(no name)".into(), |i| i.to_string());
                if let Some(obj) = kept {
                    warn!(file = %path.display(), ?kind, object, %error, "invalid; keeping its last good version");
                    objects.push(obj.clone());
                } else {
                    warn!(file = %path.display(), ?kind, object, %error, "invalid; skipped");
                }
            }
            Document::Other { kind } => {
                debug!(file = %path.display(), kind, "not a Service or EndpointSlice; ignored");
            }
        }
    }
    objects
}

impl Source for FileSource {
    fn describe(&self) -> String {
        format!("file:{}", self.dir.display())
    }

    // A directory cannot become unreachable the way an API server can: errors reading it are
    // logged per file, and `_up` never changes.
    fn run(mut self: Box<Self>, out: mpsc::Sender<Stamped>, _up: SourceUp) -> SourceTask {
        Box::pin(async move {
            let (tx, mut events) = mpsc::unbounded_channel();
            let mut watcher =
                notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
                    // Reading the files (our own scans among them) only opens them: no change.
                    if event.as_ref().is_ok_and(|e| e.kind.is_access()) {
                        return;
                    }
                    // Any other event, or an error such as a queue overflow, means: look again.
                    let _closed = tx.send(());
                })
                .map_err(|e| self.path_error(format!("cannot watch: {e}")))?;
            watcher
                .watch(&self.dir, notify::RecursiveMode::NonRecursive)
                .map_err(|e| self.path_error(format!("cannot watch: {e}")))?;

            let mut last = self.scan()?;
            info!(dir = %self.dir.display(), services = last.services.len(), slices = last.slices.len(), "manifests read");
            if out
                .send(Stamped::now(Update::Snapshot(last.clone())))
                .await
                .is_err()
            {
                return Ok(());
            }
            while events.recv().await.is_some() {
                // Coalesce a burst (an editor's write and rename, a copy of many files).
                while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, events.recv()).await {}
                match self.scan() {
                    Ok(snap) if snap != last => {
                        debug!(
                            services = snap.services.len(),
                            slices = snap.slices.len(),
                            "manifests changed"
                        );
                        if out
                            .send(Stamped::now(Update::Snapshot(snap.clone())))
                            .await
                            .is_err()
                        {
                            return Ok(());
                        }
                        last = snap;
                    }
                    Ok(_) => debug!("manifests re-read, nothing changed"),
                    Err(e) => {
                        warn!(error = %e, "cannot read the manifest directory; keeping the last objects");
                    }
                }
            }
            Err(self.path_error("the directory watch stopped"))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_manifests_take_the_fast_path_with_the_same_result() {
        let json = r#"{"apiVersion": "v1", "kind": "List", "items": [
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web", "namespace": "prod"},
             "spec": {"clusterIP": "10.96.0.1", "ports": [{"name": "http", "port": 80}]}},
            {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "bad"}, "spec": {"ports": "x"}}]}"#;
        let docs = parse_manifest(json).unwrap();
        assert!(
            matches!(&docs[0], Document::Object(Object::Service(s)) if s.metadata.name.as_deref() == Some("web"))
        );
        assert!(matches!(
            &docs[1],
            Document::Invalid {
                kind: Kind::Service,
                ..
            }
        ));
        // JSON-looking text that is not JSON is still read as YAML.
        let flow_yaml = "{apiVersion: v1, kind: Service, metadata: {name: web}}";
        assert!(matches!(
            &parse_manifest(flow_yaml).unwrap()[0],
            Document::Object(_)
        ));
    }

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: prod}
spec:
  clusterIP: 10.96.0.1
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata:
  name: web-1
  namespace: prod
  labels: {kubernetes.io/service-name: web}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- addresses: [10.0.0.1]
  conditions: {ready: true}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
"#;

    fn kinds(docs: &[Document]) -> Vec<String> {
        docs.iter()
            .map(|d| match d {
                Document::Object(o) => format!("{:?}", o.kind()),
                Document::Invalid { kind, .. } => format!("invalid {kind:?}"),
                Document::Other { kind } => format!("other {kind}"),
            })
            .collect()
    }

    #[test]
    fn parses_several_documents() {
        let docs = parse_manifest(GOOD).unwrap();
        assert_eq!(
            kinds(&docs),
            ["Service", "EndpointSlice", "other apps/v1/Deployment"]
        );
        let Document::Object(Object::Service(svc)) = &docs[0] else {
            panic!()
        };
        assert_eq!(
            svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.1")
        );
    }

    #[test]
    fn parses_nodes() {
        let text = "apiVersion: v1\nkind: Node\nmetadata: {name: n1, labels: {topology.kubernetes.io/zone: a}}\n";
        assert_eq!(kinds(&parse_manifest(text).unwrap()), ["Node"]);
    }

    #[test]
    fn parses_lists_and_skips_empty_documents() {
        let text = "---\n---\napiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Service\n  metadata: {name: a}\n";
        assert_eq!(kinds(&parse_manifest(text).unwrap()), ["Service"]);
    }

    #[test]
    fn an_invalid_object_keeps_its_name() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web, namespace: prod}\nspec: {ports: [{port: abc}]}\n";
        let docs = parse_manifest(text).unwrap();
        let Document::Invalid { id, .. } = &docs[0] else {
            panic!("{docs:?}")
        };
        assert_eq!(id, &Some(ObjectRef::new("prod", "web")));
    }

    #[test]
    fn broken_yaml_is_an_error() {
        assert!(parse_manifest("apiVersion: v1\nkind: [unclosed\n").is_err());
    }

    fn dir(files: &[(&str, &str)]) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "lb-file-source-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        fs::create_dir_all(&d).unwrap();
        for (name, text) in files {
            fs::write(d.join(name), text).unwrap();
        }
        d
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[test]
    fn bad_edits_keep_the_last_good_objects() {
        let d = dir(&[
            ("web.yaml", GOOD),
            ("notes.txt", "not a manifest"),
            (".hidden.yaml", "x: ["),
        ]);
        let mut src = FileSource::new(&d);
        let first = src.scan().unwrap();
        assert_eq!((first.services.len(), first.slices.len()), (1, 1));

        // Broken YAML: everything from that file stays.
        fs::write(d.join("web.yaml"), "kind: [").unwrap();
        assert_eq!(src.scan().unwrap(), first);

        // A valid file with an invalid Service: the Service keeps its last version, the
        // slice is taken from the new text.
        let edited = GOOD
            .replace("clusterIP: 10.96.0.1", "clusterIP: [1, 2]")
            .replace("10.0.0.1", "10.0.0.2");
        fs::write(d.join("web.yaml"), edited).unwrap();
        let third = src.scan().unwrap();
        assert_eq!(third.services, first.services);
        assert_ne!(third.slices, first.slices);

        // Removing the file removes its objects.
        fs::remove_file(d.join("web.yaml")).unwrap();
        assert_eq!(src.scan().unwrap(), Snapshot::default());
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_missing_directory_is_an_error() {
        let mut src = FileSource::new("/nonexistent/lb-manifests");
        assert!(src.scan().is_err());
    }

    #[tokio::test]
    async fn changes_are_sent_after_a_watch_event() {
        let d = dir(&[("web.yaml", GOOD)]);
        let (tx, mut rx) = mpsc::channel(4);
        let task = tokio::spawn(Box::new(FileSource::new(&d)).run(tx, std::sync::Arc::new(|_| {})));
        let Update::Snapshot(first) = rx.recv().await.unwrap().update else {
            panic!("the first update is a snapshot")
        };
        assert_eq!(first.services.len(), 1);
        fs::remove_file(d.join("web.yaml")).unwrap();
        let second = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a change is reported within 5 s")
            .unwrap();
        assert_eq!(second.update, Update::Snapshot(Snapshot::default()));
        task.abort();
        fs::remove_dir_all(&d).unwrap();
    }
}
