//! The agent's health, metrics and explain endpoints.
//!
//! As kube-proxy's, health and metrics on two ports:
//! - the health endpoint (`--healthz-bind-address`, `0.0.0.0:10256`), for the DaemonSet's
//!   probes and load balancers, which tells nothing of the services:
//!   - `/livez`: 200 while programming is fresh, that is, no update from the source has
//!     waited longer than `--stale-after` to reach the maps (a stuck or failing sync), 503
//!     after.
//!   - `/healthz`: the same, and 503 while this node is being deleted (its Node object has a
//!     deletion timestamp or the cluster autoscaler's `ToBeDeletedByClusterAutoscaler`
//!     taint), so that load balancers stop sending to it. The body is kube-proxy's JSON:
//!     `lastUpdated`, `currentTime`, `nodeEligible`.
//!   - `/readyz`: 200 once the first complete sync is written and the programs attached, and
//!     503 while the source has been unable to reach its objects (an API server outage) for
//!     longer than `--stale-after`: the datapath keeps serving its last state, and the body
//!     says since when.
//! - the metrics endpoint (`--metrics-bind-address`, `127.0.0.1:10249`): `/metrics`,
//!   Prometheus text format (see [`crate::agent::metrics`]), which names every service and backend,
//!   and the health paths. The maps are read at most once per
//!   [`crate::agent::metrics::READ_EVERY`]: concurrent and repeated scrapes share one reading.
//! - the explain endpoint, on a Unix socket only root reaches ([`explain_socket`]):
//!   `/explain/NAMESPACE/NAME`, why each endpoint of the service does or does not get new
//!   connections on this node, as JSON (`lbctl explain` asks it); and `/shares`, each
//!   namespace's use of the maps against its share (`lbctl capacity` asks it).
//!
//! Each endpoint serves a bounded number of connections at once ([`Routes::connections`]:
//! many on the health port, whose answers cost nothing and which any pod of the node
//! reaches, so that idle connections cannot crowd out the kubelet's probes; few on the
//! others), and drops one that has not sent its request's headers within
//! [`HEADER_TIMEOUT`].

use std::{
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::HeaderValue, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use crate::{agent::metrics::Metrics, k8s::ObjectRef};

/// The state the health endpoints report, shared by the agent loop, the source and the
/// servers.
#[derive(Clone, Debug)]
pub struct Health {
    state: Arc<Mutex<State>>,
    stale_after: Duration,
}

/// What the agent has told the health endpoints.
#[derive(Clone, Debug, Default)]
pub struct State {
    /// The first complete sync has been written.
    pub synced: bool,
    /// This build's programs are attached (after the first sync).
    pub serving: bool,
    /// When the maps last became equal to what the source says (wall clock, for the body).
    pub last_updated: Option<jiff::Timestamp>,
    /// When the oldest update that has not reached the maps yet was received.
    pub pending_since: Option<Instant>,
    /// Since when the source has been unable to reach its objects; `None` while it can.
    pub source_down_since: Option<Instant>,
    /// This node is being deleted.
    pub node_deleting: bool,
}

/// One endpoint's answer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Answer {
    /// The status code.
    pub status: StatusCode,
    /// The body.
    pub body: String,
    /// Whether the body is JSON.
    pub json: bool,
}

impl Answer {
    fn text(status: StatusCode, body: impl Into<String>) -> Self {
        Self {
            status,
            body: body.into(),
            json: false,
        }
    }
}

impl State {
    /// Whether programming is fresh at `now`: nothing received has waited `stale_after`.
    pub fn fresh(&self, now: Instant, stale_after: Duration) -> bool {
        self.pending_since
            .is_none_or(|since| now.saturating_duration_since(since) < stale_after)
    }

    /// The answer to a GET of `path` at `now` (`wall` is the same moment, for the body).
    pub fn answer(
        &self,
        path: &str,
        now: Instant,
        wall: jiff::Timestamp,
        stale_after: Duration,
    ) -> Answer {
        let fresh = self.fresh(now, stale_after);
        let stale_text = || {
            let waited = self
                .pending_since
                .map(|s| now.saturating_duration_since(s).as_secs())
                .unwrap_or_default();
            format!("stale: an update has waited {waited}s to reach the maps\n")
        };
        match path {
            "/livez" if fresh => Answer::text(StatusCode::OK, "ok\n"),
            "/livez" => Answer::text(StatusCode::SERVICE_UNAVAILABLE, stale_text()),
            "/healthz" => {
                let eligible = !self.node_deleting;
                let body = serde_json::json!({
                    "lastUpdated": self.last_updated.map(|t| t.to_string()).unwrap_or_default(),
                    "currentTime": wall.to_string(),
                    "nodeEligible": eligible,
                    "fresh": fresh,
                });
                Answer {
                    status: if fresh && eligible {
                        StatusCode::OK
                    } else {
                        StatusCode::SERVICE_UNAVAILABLE
                    },
                    body: body.to_string(),
                    json: true,
                }
            }
            "/readyz" if !self.synced || !self.serving => {
                Answer::text(StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n")
            }
            "/readyz" => match self.source_down_since {
                Some(since) if now.saturating_duration_since(since) >= stale_after => {
                    let last = self.last_updated.map(|t| t.to_string()).unwrap_or_default();
                    Answer::text(
                        StatusCode::SERVICE_UNAVAILABLE,
                        format!(
                            "the source has been unreachable for {}s; the datapath serves \
                             the state programmed at {last}\n",
                            now.saturating_duration_since(since).as_secs()
                        ),
                    )
                }
                _ => Answer::text(StatusCode::OK, "ok\n"),
            },
            _ => Answer::text(StatusCode::NOT_FOUND, "not found\n"),
        }
    }
}

impl Health {
    /// Nothing synced yet; programming counts as stale once an update has waited
    /// `stale_after`, and the source as down once it has failed that long.
    pub fn new(stale_after: Duration) -> Self {
        Self {
            state: Arc::new(Mutex::new(State::default())),
            stale_after,
        }
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        f(&mut self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// An update received at `at` is waiting for the maps.
    pub fn received(&self, at: Instant) {
        self.with(|s| {
            s.pending_since = Some(s.pending_since.map_or(at, |p| p.min(at)));
        });
    }

    /// The maps are equal to what the source says.
    pub fn programmed(&self) {
        self.with(|s| {
            s.synced = true;
            s.pending_since = None;
            s.last_updated = Some(jiff::Timestamp::now());
        });
    }

    /// The source can (`true`) or cannot reach its objects.
    pub fn source_up(&self, up: bool) {
        self.with(|s| match (up, s.source_down_since) {
            (true, _) => s.source_down_since = None,
            (false, None) => s.source_down_since = Some(Instant::now()),
            (false, Some(_)) => {}
        });
    }

    /// Whether this node is being deleted.
    pub fn node_deleting(&self, deleting: bool) {
        self.with(|s| s.node_deleting = deleting);
    }

    /// This build's programs are attached.
    pub fn serving(&self) {
        self.with(|s| s.serving = true);
    }

    /// Whether the first sync is done, the programs serve and programming is fresh:
    /// kube-proxy's `serviceProxyHealthy` of the health check node ports.
    pub fn proxy_healthy(&self) -> bool {
        let stale_after = self.stale_after;
        self.with(|s| s.synced && s.serving && s.fresh(Instant::now(), stale_after))
    }

    /// A copy of the state.
    pub fn state(&self) -> State {
        self.with(|s| s.clone())
    }

    fn answer(&self, path: &str) -> Answer {
        self.state().answer(
            path,
            Instant::now(),
            jiff::Timestamp::now(),
            self.stale_after,
        )
    }
}

/// What `lbctl` asks the agent's loop, over the explain socket.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Question {
    /// `/explain/NAMESPACE/NAME`: why each endpoint of the service does or does not get new
    /// connections.
    Explain(ObjectRef),
    /// `/shares`: each namespace's use of the maps against its share.
    Shares,
}

/// A question to the agent's loop, and where its answer (JSON; `None`: no such service)
/// goes.
pub type ExplainRequest = (Question, oneshot::Sender<Option<String>>);

/// Asks the agent's loop the question `path` names.
async fn explain(path: &str, explainer: &mpsc::Sender<ExplainRequest>) -> Answer {
    let question = match path.strip_prefix("/explain/") {
        _ if path == "/shares" => Question::Shares,
        Some(rest) => match rest.split_once('/') {
            Some((ns, name)) => Question::Explain(ObjectRef::new(ns, name)),
            None => return Answer::text(StatusCode::NOT_FOUND, "use /explain/NAMESPACE/NAME\n"),
        },
        None => {
            return Answer::text(
                StatusCode::NOT_FOUND,
                "use /explain/NAMESPACE/NAME or /shares\n",
            );
        }
    };
    let (tx, rx) = oneshot::channel();
    if explainer.send((question.clone(), tx)).await.is_err() {
        return Answer::text(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n");
    }
    match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(Some(json))) => Answer {
            status: StatusCode::OK,
            body: json,
            json: true,
        },
        Ok(Ok(None)) => Answer::text(StatusCode::NOT_FOUND, format!("nothing for {path}\n")),
        _ => Answer::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not answer\n",
        ),
    }
}

/// How long a connection may take to send its request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);

/// `/metrics`: encoded off the runtime's threads (reading the maps makes system calls).
async fn scrape(metrics: &Arc<Metrics>) -> Answer {
    let metrics = metrics.clone();
    match tokio::task::spawn_blocking(move || metrics.encode()).await {
        Ok(Ok(text)) => Answer::text(StatusCode::OK, text),
        _ => Answer::text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "cannot encode the metrics\n",
        ),
    }
}

/// What an endpoint serves.
#[derive(Clone)]
enum Routes {
    /// The health paths.
    Health(Health),
    /// `/metrics` and the health paths.
    Metrics(Health, Arc<Metrics>),
    /// `/explain/...`.
    Explain(mpsc::Sender<ExplainRequest>),
}

impl Routes {
    /// Most connections the endpoint serves at once; more wait to be accepted.
    fn connections(&self) -> usize {
        match self {
            Self::Health(_) => 1024,
            Self::Metrics(..) => 32,
            Self::Explain(_) => 8,
        }
    }

    async fn answer(&self, path: &str) -> (Answer, bool) {
        match self {
            Self::Metrics(_, metrics) if path == "/metrics" => (scrape(metrics).await, true),
            Self::Health(health) | Self::Metrics(health, ..) => (health.answer(path), false),
            Self::Explain(explainer) => (explain(path, explainer).await, false),
        }
    }
}

/// Serves `routes` on connections from `listener` until the runtime stops: at most
/// [`Routes::connections`] at once.
async fn serve_on<L: Listener>(listener: L, routes: Routes) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(routes.connections()));
    loop {
        let slot = slots
            .clone()
            .acquire_owned()
            .await
            .map_err(std::io::Error::other)?;
        let stream = listener.next().await?;
        let routes = routes.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let routes = routes.clone();
                async move {
                    let (answer, metrics) = routes.answer(req.uri().path()).await;
                    Ok::<_, Infallible>(response(answer, metrics))
                }
            });
            if let Err(e) = http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HEADER_TIMEOUT)
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "endpoint connection ended");
            }
            drop(slot);
        });
    }
}

/// Where connections come from: TCP or a Unix socket.
trait Listener {
    type Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static;
    async fn next(&self) -> std::io::Result<Self::Stream>;
}

impl Listener for tokio::net::TcpListener {
    type Stream = tokio::net::TcpStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn next(&self) -> std::io::Result<Self::Stream> {
        self.accept().await.map(|(s, _)| s)
    }
}

/// Serves the health paths on `addr` until the runtime stops.
pub async fn serve_health(addr: SocketAddr, health: Health) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "health endpoint listening");
    serve_on(listener, Routes::Health(health)).await
}

/// Serves `/metrics` (and the health paths) on `addr` until the runtime stops.
pub async fn serve_metrics(
    addr: SocketAddr,
    health: Health,
    metrics: Arc<Metrics>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "metrics endpoint listening");
    serve_on(listener, Routes::Metrics(health, metrics)).await
}

/// The explain socket of the agent whose pins are under `pin_root`, unless given:
/// `/run/lb-agent/<pin dir name>.sock`, so agents of different pin directories do not meet.
pub fn explain_socket(pin_root: &Path, given: Option<&Path>) -> PathBuf {
    given.map_or_else(
        || {
            let name = pin_root
                .file_name()
                .map_or_else(|| "lb".into(), |n| n.to_string_lossy().into_owned());
            Path::new(RUN_DIR).join(format!("{name}.sock"))
        },
        Path::to_path_buf,
    )
}

/// Where the explain sockets live by default.
pub const RUN_DIR: &str = "/run/lb-agent";

/// Serves `/explain/...` on the Unix socket at `path` (replacing a stale one; its directory
/// made `0700` if new, the socket `0600`) until the runtime stops.
pub async fn serve_explain(
    path: PathBuf,
    explainer: mpsc::Sender<ExplainRequest>,
) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt as _, PermissionsExt as _};
    if let Some(dir) = path.parent()
        && !dir.exists()
    {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    match std::fs::remove_file(&path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = tokio::net::UnixListener::bind(&path)?;
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
    info!(path = %path.display(), "explain endpoint listening");
    serve_on(listener, Routes::Explain(explainer)).await
}

/// One HTTP/1.0 GET of `path` from `addr` (the agent's endpoints, from the tests): the
/// status code and the body.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    exchange(stream, path)
}

/// [`get`] over the Unix socket at `socket` (the explain endpoint, from `lbctl`).
pub fn get_unix(socket: &Path, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let stream = std::os::unix::net::UnixStream::connect(socket)?;
    stream.set_read_timeout(Some(timeout))?;
    exchange(stream, path)
}

fn exchange(
    mut stream: impl std::io::Read + std::io::Write,
    path: &str,
) -> std::io::Result<(u16, String)> {
    write!(stream, "GET {path} HTTP/1.0\r\nHost: lb-agent\r\n\r\n")?;
    let mut text = String::new();
    stream.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("not an HTTP answer: {text:?}")))?;
    let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
    Ok((status, body.to_owned()))
}

fn response(answer: Answer, metrics: bool) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(answer.body)));
    *resp.status_mut() = answer.status;
    let content_type = match (answer.json, metrics) {
        (true, _) => "application/json",
        (false, true) => "application/openmetrics-text; version=1.0.0; charset=utf-8",
        (false, false) => "text/plain; charset=utf-8",
    };
    let h = resp.headers_mut();
    h.insert("content-type", HeaderValue::from_static(content_type));
    h.insert(
        "x-content-type-options",
        HeaderValue::from_static("nosniff"),
    );
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    const STALE: Duration = Duration::from_secs(60);

    fn status(s: &State, path: &str, now: Instant) -> StatusCode {
        s.answer(path, now, jiff::Timestamp::now(), STALE).status
    }

    #[test]
    fn ready_only_after_the_first_sync() {
        let now = Instant::now();
        let mut s = State::default();
        assert_eq!(status(&s, "/healthz", now), StatusCode::OK);
        assert_eq!(status(&s, "/livez", now), StatusCode::OK);
        assert_eq!(status(&s, "/readyz", now), StatusCode::SERVICE_UNAVAILABLE);
        s.synced = true;
        assert_eq!(status(&s, "/readyz", now), StatusCode::SERVICE_UNAVAILABLE);
        s.serving = true;
        assert_eq!(status(&s, "/readyz", now), StatusCode::OK);
        assert_eq!(status(&s, "/other", now), StatusCode::NOT_FOUND);
    }

    #[test]
    fn an_update_waiting_too_long_is_stale() {
        let t0 = Instant::now();
        let s = State {
            synced: true,
            serving: true,
            pending_since: Some(t0),
            ..State::default()
        };
        assert_eq!(status(&s, "/livez", t0 + STALE / 2), StatusCode::OK);
        assert_eq!(status(&s, "/healthz", t0 + STALE / 2), StatusCode::OK);
        let late = t0 + STALE + Duration::from_secs(1);
        assert_eq!(status(&s, "/livez", late), StatusCode::SERVICE_UNAVAILABLE);
        let healthz = s.answer("/healthz", late, jiff::Timestamp::now(), STALE);
        assert_eq!(healthz.status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&healthz.body).unwrap();
        assert_eq!(body["fresh"], false);
        assert_eq!(body["nodeEligible"], true);
        // Readiness is about the source, not the sync.
        assert_eq!(status(&s, "/readyz", late), StatusCode::OK);
    }

    #[test]
    fn a_node_being_deleted_fails_healthz_only() {
        let now = Instant::now();
        let s = State {
            synced: true,
            serving: true,
            node_deleting: true,
            last_updated: Some(jiff::Timestamp::UNIX_EPOCH),
            ..State::default()
        };
        let healthz = s.answer("/healthz", now, jiff::Timestamp::UNIX_EPOCH, STALE);
        assert_eq!(healthz.status, StatusCode::SERVICE_UNAVAILABLE);
        let body: serde_json::Value = serde_json::from_str(&healthz.body).unwrap();
        assert_eq!(body["nodeEligible"], false);
        assert_eq!(body["lastUpdated"], "1970-01-01T00:00:00Z");
        assert_eq!(body["currentTime"], "1970-01-01T00:00:00Z");
        assert_eq!(status(&s, "/livez", now), StatusCode::OK);
        assert_eq!(status(&s, "/readyz", now), StatusCode::OK);
    }

    #[test]
    fn a_long_source_outage_makes_the_agent_unready_not_unhealthy() {
        let t0 = Instant::now();
        let s = State {
            synced: true,
            serving: true,
            source_down_since: Some(t0),
            ..State::default()
        };
        assert_eq!(status(&s, "/readyz", t0 + STALE / 2), StatusCode::OK);
        let late = t0 + STALE + Duration::from_secs(5);
        let readyz = s.answer("/readyz", late, jiff::Timestamp::now(), STALE);
        assert_eq!(readyz.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            readyz.body.contains("unreachable for 65s"),
            "{}",
            readyz.body
        );
        assert_eq!(status(&s, "/healthz", late), StatusCode::OK);
        assert_eq!(status(&s, "/livez", late), StatusCode::OK);
    }

    #[test]
    fn the_oldest_pending_update_counts() {
        let h = Health::new(STALE);
        let t0 = Instant::now();
        h.received(t0 + Duration::from_secs(5));
        h.received(t0);
        h.received(t0 + Duration::from_secs(9));
        assert_eq!(h.state().pending_since, Some(t0));
        assert!(!h.proxy_healthy(), "not synced yet");
        h.programmed();
        assert_eq!(h.state().pending_since, None);
        assert!(!h.proxy_healthy(), "not serving yet");
        h.serving();
        assert!(h.proxy_healthy());
        h.source_up(false);
        let down = h.state().source_down_since;
        h.source_up(false);
        assert_eq!(
            h.state().source_down_since,
            down,
            "the first failure counts"
        );
        h.source_up(true);
        assert_eq!(h.state().source_down_since, None);
    }
}
