//! The agent's health endpoint, for the DaemonSet's probes: `/healthz` answers 200 while the
//! agent runs, `/readyz` answers 200 once the first complete sync has been written (503
//! before).

use std::{
    convert::Infallible,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use http_body_util::Full;
use hyper::{Request, Response, StatusCode, body::Bytes, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;
use tracing::{debug, info};

/// Whether the agent is ready, shared with the health server.
#[derive(Clone, Debug, Default)]
pub struct Readiness(Arc<AtomicBool>);

impl Readiness {
    /// Marks the agent ready.
    pub fn set_ready(&self) {
        self.0.store(true, Ordering::Relaxed);
    }

    /// Whether the agent is ready.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// The answer to one request.
fn answer(path: &str, ready: &Readiness) -> (StatusCode, &'static str) {
    match path {
        "/healthz" | "/livez" => (StatusCode::OK, "ok\n"),
        "/readyz" if ready.is_ready() => (StatusCode::OK, "ok\n"),
        "/readyz" => (StatusCode::SERVICE_UNAVAILABLE, "not synced yet\n"),
        _ => (StatusCode::NOT_FOUND, "not found\n"),
    }
}

/// Serves the endpoints on `addr` until the runtime stops.
pub async fn serve(addr: SocketAddr, ready: Readiness) -> std::io::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    info!(%addr, "health endpoint listening");
    loop {
        let (stream, _) = listener.accept().await?;
        let ready = ready.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<hyper::body::Incoming>| {
                let (status, body) = answer(req.uri().path(), &ready);
                let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                *resp.status_mut() = status;
                async move { Ok::<_, Infallible>(resp) }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_after_the_first_sync() {
        let ready = Readiness::default();
        assert_eq!(answer("/healthz", &ready).0, StatusCode::OK);
        assert_eq!(answer("/readyz", &ready).0, StatusCode::SERVICE_UNAVAILABLE);
        ready.set_ready();
        assert_eq!(answer("/readyz", &ready).0, StatusCode::OK);
        assert_eq!(answer("/other", &ready).0, StatusCode::NOT_FOUND);
    }
}
