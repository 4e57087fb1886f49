//! The metrics endpoint (feature `prometheus`, on by default): the OpenTelemetry SDK with
//! the Prometheus exporter, served with hyper.
//!
//! Routes: `/metrics` (Prometheus text exposition), `/healthz` (200 while the runtime's
//! actors are alive), `/readyz` (200 when at least one device is ready, else 503; JSON body
//! with every device's state), `/api/snapshot` (the metrics actor's snapshot as JSON), `/`
//! (a self-contained HTML dashboard that polls the snapshot).
//!
//! Nothing is served unless asked (`RuntimeBuilder::serve_metrics` or `telemetry.listen`).
//! When the application passes its own meter (`RuntimeBuilder::meter`), hipvisor's
//! instruments go to the application's provider and exporter; `/metrics` then says so
//! instead of serving an empty registry, and the other routes work as usual.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Request, Response, StatusCode};
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use ractor::ActorStatus;
use serde_json::json;
use tokio::task::JoinHandle;

use crate::runtime::Shared;
use crate::state::DeviceState;

/// The dashboard page (no external assets).
const DASHBOARD: &str = include_str!("dashboard.html");

/// hipvisor's own meter provider with the Prometheus exporter.
pub(crate) struct Exporter {
    pub(crate) provider: SdkMeterProvider,
    pub(crate) registry: prometheus::Registry,
}

impl Exporter {
    /// A provider whose metrics are gathered into a registry of their own, without
    /// `otel_scope_*` labels on every series and without `target_info`.
    pub(crate) fn new() -> Result<Exporter, String> {
        let registry = prometheus::Registry::new();
        let exporter = opentelemetry_prometheus::exporter()
            .with_registry(registry.clone())
            .scope_info_enabled(false)
            .without_target_info()
            .build()
            .map_err(|e| e.to_string())?;
        let provider = SdkMeterProvider::builder().with_reader(exporter).build();
        Ok(Exporter { provider, registry })
    }

    pub(crate) fn meter(&self) -> opentelemetry::metrics::Meter {
        self.provider.meter("hipvisor")
    }
}

/// A running endpoint.
pub(crate) struct Endpoint {
    pub(crate) addr: SocketAddr,
    task: JoinHandle<()>,
}

impl Drop for Endpoint {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct State {
    shared: Arc<Shared>,
    registry: Option<prometheus::Registry>,
}

/// Binds `addr` (port 0 picks a free port) and serves the routes.
pub(crate) async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    registry: Option<prometheus::Registry>,
) -> std::io::Result<Endpoint> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let state = Arc::new(State { shared, registry });
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let state = state.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req| route(state.clone(), req));
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(Endpoint { addr, task })
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("a valid response")
}

async fn route(state: Arc<State>, req: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let shared = &state.shared;
    Ok(match req.uri().path() {
        "/metrics" => match &state.registry {
            Some(registry) => {
                // The snapshot is a barrier: every delta flushed so far is recorded first.
                let _ = shared.snapshot().await;
                let mut out = Vec::new();
                let encoder = prometheus::TextEncoder::new();
                match prometheus::Encoder::encode(&encoder, &registry.gather(), &mut out) {
                    Ok(()) => respond(StatusCode::OK, prometheus::TEXT_FORMAT, out),
                    Err(e) => respond(StatusCode::INTERNAL_SERVER_ERROR, "text/plain", e.to_string()),
                }
            }
            None => respond(
                StatusCode::NOT_FOUND,
                "text/plain",
                "hipvisor's instruments are recorded on the application's meter provider; scrape its exporter\n",
            ),
        },
        "/healthz" => {
            let alive = shared.metrics.get_status() == ActorStatus::Running
                && shared
                    .supervisor
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .as_ref()
                    .is_some_and(|s| s.get_status() == ActorStatus::Running);
            if alive {
                respond(StatusCode::OK, "text/plain", "ok\n")
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "the runtime's actors are not running\n",
                )
            }
        }
        "/readyz" => {
            let devices: Vec<_> = shared
                .cores
                .iter()
                .map(|c| json!({"id": c.index, "state": c.state.get().as_str(), "reason": c.reason()}))
                .collect();
            let ready = shared.cores.iter().any(|c| c.state.get() == DeviceState::Ready);
            let status = if ready {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            respond(
                status,
                "application/json",
                json!({"ready": ready, "devices": devices}).to_string(),
            )
        }
        "/api/snapshot" => match shared.snapshot().await {
            Ok(s) => respond(
                StatusCode::OK,
                "application/json",
                serde_json::to_vec(&s).unwrap_or_default(),
            ),
            Err(e) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", e.to_string()),
        },
        "/" | "/index.html" => respond(StatusCode::OK, "text/html; charset=utf-8", DASHBOARD),
        _ => respond(StatusCode::NOT_FOUND, "text/plain", "not found\n"),
    })
}
