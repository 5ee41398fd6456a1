//! `healthCheckNodePort` servers: a LoadBalancer service with `externalTrafficPolicy: Local`
//! has a node port that cloud load balancers probe to learn which nodes have endpoints of it.
//! As kube-proxy does, the agent answers on that port (any path) with 200 and the count of
//! this node's ready endpoints when there are any, and 503 otherwise, with a JSON body naming
//! the service.

use std::{
    collections::BTreeMap,
    convert::Infallible,
    net::{Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
};

use http_body_util::Full;
use hyper::{
    Request, Response, StatusCode, body::Bytes, header::HeaderValue, server::conn::http1,
    service::service_fn,
};
use hyper_util::rt::TokioIo;
use tokio::{net::TcpListener, task::JoinHandle};
use tracing::{debug, info, warn};

use crate::{agent::health::Health, k8s::ObjectRef, model::HealthCheck};

/// What one health check port answers for.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Answering {
    service: ObjectRef,
    local_endpoints: usize,
}

/// The status and body kube-proxy answers with.
fn answer(a: &Answering, proxy_healthy: bool) -> (StatusCode, String) {
    let status = if a.local_endpoints > 0 && proxy_healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let body = serde_json::json!({
        "service": {"namespace": a.service.namespace, "name": a.service.name},
        "localEndpoints": a.local_endpoints,
        "serviceProxyHealthy": proxy_healthy,
    });
    let body = serde_json::to_string_pretty(&body).unwrap_or_default();
    (status, body)
}

struct Server {
    state: Arc<Mutex<Answering>>,
    task: JoinHandle<()>,
}

impl Drop for Server {
    fn drop(&mut self) {
        // Dropping the task's listener closes the port.
        self.task.abort();
    }
}

/// The health check servers, one per port.
pub struct HealthCheckServers {
    servers: BTreeMap<u16, Server>,
    health: Health,
}

impl HealthCheckServers {
    /// No servers yet; `health` says whether the proxy is healthy (`serviceProxyHealthy`).
    pub fn new(health: Health) -> Self {
        Self {
            servers: BTreeMap::new(),
            health,
        }
    }

    /// The ports served.
    pub fn ports(&self) -> Vec<u16> {
        self.servers.keys().copied().collect()
    }

    /// Serves exactly the health checks in `checks` (the first service by namespace/name
    /// when two claim a port): opens new ports, updates the counts of open ones and closes
    /// the others. A port that cannot be opened is logged and tried again on the next call.
    pub fn update(&mut self, checks: &BTreeMap<ObjectRef, HealthCheck>) {
        let mut wanted: BTreeMap<u16, Answering> = BTreeMap::new();
        for (service, check) in checks {
            wanted.entry(check.port).or_insert_with(|| Answering {
                service: service.clone(),
                local_endpoints: check.local_endpoints,
            });
        }
        self.servers.retain(|port, _| wanted.contains_key(port));
        for (port, answering) in wanted {
            if let Some(server) = self.servers.get(&port) {
                let mut state = server
                    .state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                *state = answering;
                continue;
            }
            match bind(port) {
                Ok(listener) => {
                    info!(port, service = %answering.service, local_endpoints = answering.local_endpoints,
                          "serving the health check node port");
                    let state = Arc::new(Mutex::new(answering));
                    let task = tokio::spawn(serve(listener, state.clone(), self.health.clone()));
                    self.servers.insert(port, Server { state, task });
                }
                Err(e) => warn!(port, service = %answering.service, error = %e,
                                "cannot serve the health check node port; trying again later"),
            }
        }
    }
}

/// A listener on every address: IPv6 and IPv4 when the node has IPv6, else IPv4.
fn bind(port: u16) -> std::io::Result<TcpListener> {
    let any6 = SocketAddr::from((Ipv6Addr::UNSPECIFIED, port));
    let socket = match std::net::TcpListener::bind(any6) {
        Ok(s) => s,
        Err(_) => std::net::TcpListener::bind(SocketAddr::from((Ipv4Addr::UNSPECIFIED, port)))?,
    };
    socket.set_nonblocking(true)?;
    TcpListener::from_std(socket)
}

async fn serve(listener: TcpListener, state: Arc<Mutex<Answering>>, health: Health) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                debug!(error = %e, "health check accept failed");
                continue;
            }
        };
        let (state, health) = (state.clone(), health.clone());
        tokio::spawn(async move {
            let service = service_fn(move |_req: Request<hyper::body::Incoming>| {
                let current = state
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .clone();
                let (status, body) = answer(&current, health.proxy_healthy());
                let mut resp = Response::new(Full::new(Bytes::from(body)));
                *resp.status_mut() = status;
                let h = resp.headers_mut();
                h.insert("content-type", HeaderValue::from_static("application/json"));
                h.insert(
                    "x-content-type-options",
                    HeaderValue::from_static("nosniff"),
                );
                h.insert(
                    "x-load-balancing-endpoint-weight",
                    HeaderValue::from(current.local_endpoints),
                );
                async move { Ok::<_, Infallible>(resp) }
            });
            if let Err(e) = http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await
            {
                debug!(error = %e, "health check connection ended");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answering(n: usize) -> Answering {
        Answering {
            service: ObjectRef::new("shop", "web"),
            local_endpoints: n,
        }
    }

    #[test]
    fn answers_as_kube_proxy_does() {
        let (status, body) = answer(&answering(2), true);
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["service"]["namespace"], "shop");
        assert_eq!(v["service"]["name"], "web");
        assert_eq!(v["localEndpoints"], 2);
        assert_eq!(v["serviceProxyHealthy"], true);
        assert_eq!(
            answer(&answering(0), true).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
        // Not synced yet: unhealthy whatever the count.
        assert_eq!(
            answer(&answering(2), false).0,
            StatusCode::SERVICE_UNAVAILABLE
        );
    }

    #[tokio::test]
    async fn opens_updates_and_closes_ports() {
        let health = Health::new(std::time::Duration::from_secs(60));
        health.programmed();
        health.serving();
        let mut servers = HealthCheckServers::new(health);
        // A free port, found by binding and releasing it.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let svc = ObjectRef::new("shop", "web");
        let mut checks = BTreeMap::from([(
            svc.clone(),
            HealthCheck {
                port,
                local_endpoints: 1,
            },
        )]);
        servers.update(&checks);
        assert_eq!(servers.ports(), [port]);
        assert_eq!(get(port).await, (200, 1));
        checks.get_mut(&svc).unwrap().local_endpoints = 0;
        servers.update(&checks);
        assert_eq!(get(port).await, (503, 0));
        servers.update(&BTreeMap::new());
        assert!(servers.ports().is_empty());
        // The aborted task drops its listener when the runtime next polls it.
        let mut closed = false;
        for _ in 0..100 {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            if tokio::net::TcpStream::connect(("127.0.0.1", port))
                .await
                .is_err()
            {
                closed = true;
                break;
            }
        }
        assert!(closed, "the port is closed once no service needs it");
    }

    /// Status and endpoint-weight header of a GET on loopback.
    async fn get(port: u16) -> (u16, usize) {
        tokio::task::spawn_blocking(move || {
            use std::io::{Read as _, Write as _};
            let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
            s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .unwrap();
            let mut text = String::new();
            s.read_to_string(&mut text).unwrap();
            let status = text[9..12].parse().unwrap();
            let weight = text
                .lines()
                .find_map(|l| {
                    l.to_ascii_lowercase()
                        .strip_prefix("x-load-balancing-endpoint-weight: ")
                        .map(str::to_owned)
                })
                .unwrap()
                .trim()
                .parse()
                .unwrap();
            (status, weight)
        })
        .await
        .unwrap()
    }
}
