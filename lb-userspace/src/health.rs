//! The agent's health and metrics endpoint, for the DaemonSet's probes and Prometheus.
//!
//! Like kube-proxy's, on one port:
//! - `/livez`: 200 while programming is fresh, that is, no update from the source has waited
//!   longer than `--stale-after` to reach the maps (a stuck or failing sync), 503 after.
//! - `/healthz`: the same, and 503 while this node is being deleted (its Node object has a
//!   deletion timestamp or the cluster autoscaler's `ToBeDeletedByClusterAutoscaler` taint), so
//!   that load balancers stop sending to it. The body is kube-proxy's JSON:
//!   `lastUpdated`, `currentTime`, `nodeEligible`.
//! - `/readyz`: 200 once the first complete sync is written and the programs attached, and 503
//!   while the source has been unable to reach its objects (an API server outage) for longer
//!   than `--stale-after`: the datapath keeps serving its last state, and the body says since
//!   when.
//! - `/metrics`: Prometheus text format (see [`crate::metrics`]).
//! - `/explain/NAMESPACE/NAME`, from loopback only: why each endpoint of the service does or
//!   does not get new connections on this node, as JSON (`lbctl explain` asks it).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::HeaderValue, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::sync::{mpsc, oneshot};
use tracing::{debug, info};

use crate::{metrics::Metrics, model::ObjectRef};

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
        f(&mut self.state.lock().unwrap_or_else(|e| e.into_inner()))
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

/// A question to the agent's loop: the explanation of a service (JSON), if it exists.
pub type ExplainRequest = (ObjectRef, oneshot::Sender<Option<String>>);

/// Asks the agent's loop to explain `path`'s service (`/explain/NAMESPACE/NAME`).
async fn explain(path: &str, peer: SocketAddr, explainer: &mpsc::Sender<ExplainRequest>) -> Answer {
    if !peer.ip().to_canonical().is_loopback() {
        return Answer::text(
            StatusCode::FORBIDDEN,
            "explain is served on loopback only\n",
        );
    }
    let Some((ns, name)) = path
        .strip_prefix("/explain/")
        .and_then(|rest| rest.split_once('/'))
    else {
        return Answer::text(StatusCode::NOT_FOUND, "use /explain/NAMESPACE/NAME\n");
    };
    let (tx, rx) = oneshot::channel();
    if explainer
        .send((ObjectRef::new(ns, name), tx))
        .await
        .is_err()
    {
        return Answer::text(StatusCode::SERVICE_UNAVAILABLE, "the agent is stopping\n");
    }
    match tokio::time::timeout(Duration::from_secs(5), rx).await {
        Ok(Ok(Some(json))) => Answer {
            status: StatusCode::OK,
            body: json,
            json: true,
        },
        Ok(Ok(None)) => Answer::text(StatusCode::NOT_FOUND, format!("no service {ns}/{name}\n")),
        _ => Answer::text(
            StatusCode::SERVICE_UNAVAILABLE,
            "the agent did not answer\n",
        ),
    }
}

/// Serves the endpoints on `addr` until the runtime stops.
pub async fn serve(
    addr: SocketAddr,
    health: Health,
    metrics: Arc<Metrics>,
    explainer: mpsc::Sender<ExplainRequest>,
) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "health and metrics endpoint listening");
    loop {
        let (stream, peer) = listener.accept().await?;
        let (health, metrics, explainer) = (health.clone(), metrics.clone(), explainer.clone());
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (health, metrics, explainer) =
                    (health.clone(), metrics.clone(), explainer.clone());
                async move {
                    let answer = if req.uri().path().starts_with("/explain/") {
                        explain(req.uri().path(), peer, &explainer).await
                    } else if req.uri().path() == "/metrics" {
                        // Reading the maps makes system calls: off the runtime's thread.
                        let text = tokio::task::spawn_blocking(move || metrics.encode()).await;
                        match text {
                            Ok(Ok(text)) => Answer::text(StatusCode::OK, text),
                            _ => Answer::text(
                                StatusCode::INTERNAL_SERVER_ERROR,
                                "cannot encode the metrics\n",
                            ),
                        }
                    } else {
                        health.answer(req.uri().path())
                    };
                    Ok::<_, Infallible>(response(answer, req.uri().path() == "/metrics"))
                }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "health connection ended");
            }
        });
    }
}

/// One HTTP/1.0 GET of `path` from `addr` (the agent's endpoint, from `lbctl` and the tests):
/// the status code and the body.
pub fn get(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect_timeout(&addr, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
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
