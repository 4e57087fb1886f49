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
//!
//! **The endpoint survives its clients** ([`Limits`]), so a health probe always gets in:
//!
//! - A request's header must arrive whole within 5 s of the endpoint starting to wait for it
//!   — from the connection's start, and on a kept-alive connection from the end of the last
//!   response (hyper's `header_read_timeout`, which covers both): a connection that sends
//!   nothing, or a header a byte at a time, is closed.
//! - A connection that moves no byte either way and has no request being answered for 30 s
//!   is closed (a client that stops reading its response, for one).
//! - At most `telemetry.max_connections` connections (default 1024) are held: at the cap, the
//!   connection idle longest (no request being answered) is closed to admit the new one; when
//!   every held connection is answering a request, the new one is closed at once.
//! - The soft limit on open files (`RLIMIT_NOFILE`) is raised to the hard limit when the
//!   endpoint starts (once per process), as Go's runtime does: the default soft limit of
//!   1024 would otherwise cap the process's sockets below the connection cap.
//! - When accepting fails (out of file descriptors: EMFILE), the endpoint closes its
//!   connection idle longest (if any) and backs off 10 ms, doubling up to 100 ms, instead of
//!   retrying at once in a busy loop; the failure is logged once until an accept succeeds.

use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use hipvisor_core::sync::lock;
use http_body_util::Full;
use hyper::body::{Bytes, Incoming};
use hyper::{Request, Response, StatusCode};
use opentelemetry::metrics::MeterProvider;
use opentelemetry_sdk::metrics::SdkMeterProvider;
use ractor::ActorStatus;
use serde_json::json;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};

use crate::metrics::BucketHistograms;
use crate::shared::Shared;
use crate::state::DeviceState;

/// The dashboard page (no external assets).
const DASHBOARD: &str = include_str!("dashboard.html");

/// hipvisor's own meter provider with the Prometheus exporter.
pub(crate) struct Exporter {
    pub(crate) provider: SdkMeterProvider,
    pub(crate) registry: prometheus::Registry,
    /// The histograms served from their bucket counts (see [`BucketHistograms`]).
    pub(crate) histograms: BucketHistograms,
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
        Ok(Exporter {
            provider,
            registry,
            histograms: BucketHistograms::new(),
        })
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
    registry: Option<(prometheus::Registry, BucketHistograms)>,
}

/// Binds `addr` (port 0 picks a free port) and serves the routes, with the connection
/// limits of the module docs (`telemetry.max_connections` from the runtime's config).
pub(crate) async fn serve(
    addr: SocketAddr,
    shared: Arc<Shared>,
    registry: Option<(prometheus::Registry, BucketHistograms)>,
) -> std::io::Result<Endpoint> {
    raise_open_files_limit();
    let listener = TcpListener::bind(addr).await?;
    let addr = listener.local_addr()?;
    let limits = Limits::new(shared.config.telemetry.max_connections);
    let state = Arc::new(State { shared, registry });
    let (task, _) = start(listener, limits, move |req| route(state.clone(), req));
    Ok(Endpoint { addr, task })
}

/// How the endpoint treats its connections (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// A request's header must arrive whole within this long of the endpoint starting to
    /// wait for it (hyper's `header_read_timeout`).
    pub(crate) header_read_timeout: Duration,
    /// A connection with no byte moving either way and no request being answered for this
    /// long is closed.
    pub(crate) idle_timeout: Duration,
    /// Connections held at most.
    pub(crate) max_connections: usize,
}

impl Limits {
    /// The header read timeout.
    pub(crate) const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(5);
    /// The idle timeout.
    pub(crate) const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

    /// The endpoint's limits with `max_connections` (at least 1).
    pub(crate) fn new(max_connections: u32) -> Limits {
        Limits {
            header_read_timeout: Limits::HEADER_READ_TIMEOUT,
            idle_timeout: Limits::IDLE_TIMEOUT,
            max_connections: (max_connections as usize).max(1),
        }
    }
}

/// The first pause after a failed accept; it doubles up to [`ACCEPT_BACKOFF_MAX`].
const ACCEPT_BACKOFF_MIN: Duration = Duration::from_millis(10);
/// The longest pause after failed accepts.
const ACCEPT_BACKOFF_MAX: Duration = Duration::from_millis(100);
/// How long a connection closed to make room may still finish writing a response.
const EVICTION_GRACE: Duration = Duration::from_millis(100);

/// Raises the soft limit on open files to the hard limit, once per process. Where the hard
/// limit is unlimited, Linux refuses it as a soft limit; `fs.nr_open` is the most it takes.
fn raise_open_files_limit() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
        let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
            return;
        };
        if soft >= hard {
            return;
        }
        let mut result = setrlimit(Resource::RLIMIT_NOFILE, hard, hard);
        if result.is_err() && hard == RLIM_INFINITY {
            let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
                .ok()
                .and_then(|s| s.trim().parse().ok());
            if let Some(nr_open) = nr_open.filter(|n| *n > soft) {
                result = setrlimit(Resource::RLIMIT_NOFILE, nr_open, hard);
            }
        }
        match result {
            Ok(()) => tracing::debug!(from = soft, to = hard, "raised the soft limit on open files"),
            Err(e) => tracing::warn!(soft, hard, error = %e, "cannot raise the soft limit on open files"),
        }
    });
}

/// Serves `handler` on `listener` with `limits`, until the returned task is aborted (which
/// closes every connection). The registry tells tests what is held.
fn start<F, Fut>(listener: TcpListener, limits: Limits, handler: F) -> (JoinHandle<()>, Arc<Registry>)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let registry = Arc::new(Registry::new(limits.max_connections));
    let task = tokio::spawn(accept_loop(listener, limits, registry.clone(), handler));
    (task, registry)
}

async fn accept_loop<F, Fut>(listener: TcpListener, limits: Limits, registry: Arc<Registry>, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    // The connections' tasks: aborted with this task, which owns the set.
    let mut tasks = JoinSet::new();
    let mut backoff = ACCEPT_BACKOFF_MIN;
    let (mut failing, mut refusing) = (false, false);
    loop {
        let accepted = tokio::select! {
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                (failing, backoff) = (false, ACCEPT_BACKOFF_MIN);
                let Some(conn) = registry.admit() else {
                    if !refusing {
                        tracing::warn!(
                            max_connections = limits.max_connections,
                            "metrics endpoint: every connection is answering a request; refusing new ones \
                             (logged once until one is admitted)"
                        );
                        refusing = true;
                    }
                    drop(stream);
                    continue;
                };
                refusing = false;
                tasks.spawn(serve_connection(stream, limits, conn, handler.clone()));
            }
            Err(e) => {
                if !failing {
                    tracing::warn!(
                        error = %e,
                        "metrics endpoint: accepting a connection failed; backing off 10-100 ms \
                         (logged once until an accept succeeds)"
                    );
                    failing = true;
                }
                // Out of descriptors with a connection waiting: give one of ours back, so the
                // next accept can take it. (accept4 takes the descriptor before it looks at
                // the queue, so it fails so also when nobody waits — right after the accept
                // that used the last descriptor, for one: evicting then would close that very
                // connection, the idlest since it has not sent its request yet.)
                if is_out_of_descriptors(&e) && connection_waiting(&listener) {
                    registry.evict_idle_longest();
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(ACCEPT_BACKOFF_MAX);
            }
        }
    }
}

/// Whether a connection waits in `listener`'s queue (a poll that does not wait).
fn connection_waiting(listener: &TcpListener) -> bool {
    use nix::poll::{PollFd, PollFlags, PollTimeout, poll};
    use std::os::fd::AsFd;
    let mut fds = [PollFd::new(listener.as_fd(), PollFlags::POLLIN)];
    poll(&mut fds, PollTimeout::ZERO).is_ok_and(|n| n > 0)
}

fn is_out_of_descriptors(e: &std::io::Error) -> bool {
    use nix::errno::Errno;
    let code = e.raw_os_error();
    [Errno::EMFILE, Errno::ENFILE, Errno::ENOBUFS, Errno::ENOMEM]
        .iter()
        .any(|errno| code == Some(*errno as i32))
}

/// One held connection, as its task sees it.
struct Admitted {
    id: u64,
    activity: Arc<Activity>,
    close: oneshot::Receiver<()>,
    registry: Arc<Registry>,
}

/// Forgets the connection when its task ends, however it ends.
impl Drop for Admitted {
    fn drop(&mut self) {
        self.registry.remove(self.id);
    }
}

async fn serve_connection<F, Fut>(stream: TcpStream, limits: Limits, mut conn: Admitted, handler: F)
where
    F: Fn(Request<Incoming>) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Response<Full<Bytes>>> + Send + 'static,
{
    let activity = conn.activity.clone();
    let io = hyper_util::rt::TokioIo::new(Tracked {
        inner: stream,
        activity: activity.clone(),
    });
    let answering = activity.clone();
    let service = hyper::service::service_fn(move |req| {
        let busy = Busy::new(answering.clone());
        let response = handler(req);
        async move {
            let response = response.await;
            drop(busy);
            Ok::<_, Infallible>(response)
        }
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    let mut http = pin!(builder.serve_connection(io, service));
    let mut grace: Option<tokio::time::Instant> = None;
    loop {
        let wake = grace.unwrap_or_else(|| activity.idle_deadline(limits.idle_timeout));
        tokio::select! {
            _ = http.as_mut() => return,
            // Closed to make room (or the registry is gone): finish what is being written.
            _ = &mut conn.close, if grace.is_none() => {
                http.as_mut().graceful_shutdown();
                grace = Some(tokio::time::Instant::now() + EVICTION_GRACE);
            }
            _ = tokio::time::sleep_until(wake) => {
                if grace.is_some() || activity.idle_deadline(limits.idle_timeout) <= tokio::time::Instant::now() {
                    return;
                }
            }
        }
    }
}

/// When a connection last moved a byte or began or finished answering a request, and how
/// many requests it is answering.
struct Activity {
    origin: Instant,
    /// Milliseconds after `origin`.
    last_ms: AtomicU64,
    busy: AtomicU32,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            origin: Instant::now(),
            last_ms: AtomicU64::new(0),
            busy: AtomicU32::new(0),
        }
    }

    fn touch(&self) {
        let ms = self.origin.elapsed().as_millis() as u64;
        self.last_ms.fetch_max(ms, Ordering::Relaxed);
    }

    fn last(&self) -> Instant {
        self.origin + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }

    /// Since when the connection has been idle, if it is (answering no request).
    fn idle_since(&self) -> Option<Instant> {
        (self.busy.load(Ordering::Acquire) == 0).then(|| self.last())
    }

    /// When the connection reaches the idle timeout if nothing happens (a timeout away
    /// while it answers a request: checked again then).
    fn idle_deadline(&self, idle_timeout: Duration) -> tokio::time::Instant {
        let from = self.idle_since().unwrap_or_else(Instant::now);
        tokio::time::Instant::from_std(from + idle_timeout)
    }
}

/// A request being answered.
struct Busy(Arc<Activity>);

impl Busy {
    fn new(activity: Arc<Activity>) -> Busy {
        activity.busy.fetch_add(1, Ordering::AcqRel);
        activity.touch();
        Busy(activity)
    }
}

impl Drop for Busy {
    fn drop(&mut self) {
        self.0.touch();
        self.0.busy.fetch_sub(1, Ordering::AcqRel);
    }
}

/// A socket that records when it last moved a byte.
struct Tracked {
    inner: TcpStream,
    activity: Arc<Activity>,
}

impl Tracked {
    fn moved<T>(&self, r: Poll<std::io::Result<T>>, bytes: impl FnOnce(&T) -> bool) -> Poll<std::io::Result<T>> {
        if let Poll::Ready(Ok(v)) = &r
            && bytes(v)
        {
            self.activity.touch();
        }
        r
    }
}

impl AsyncRead for Tracked {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let before = buf.filled().len();
        let r = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = buf.filled().len() > before;
        self.moved(r, |_| read)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write(cx, buf);
        self.moved(r, |n| *n > 0)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.moved(r, |n| *n > 0)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The held connections.
struct Registry {
    max: usize,
    conns: Mutex<Conns>,
}

#[derive(Default)]
struct Conns {
    next_id: u64,
    held: HashMap<u64, Held>,
}

struct Held {
    activity: Arc<Activity>,
    close: oneshot::Sender<()>,
}

impl Registry {
    fn new(max: usize) -> Registry {
        Registry {
            max,
            conns: Mutex::new(Conns::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Conns> {
        lock(&self.conns)
    }

    /// Holds a new connection: at the cap, closes the one idle longest first; `None` when
    /// every held connection is answering a request.
    fn admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut conns = self.lock();
        if conns.held.len() >= self.max && !Registry::evict(&mut conns) {
            return None;
        }
        let id = conns.next_id;
        conns.next_id += 1;
        let activity = Arc::new(Activity::new());
        let (tx, rx) = oneshot::channel();
        conns.held.insert(
            id,
            Held {
                activity: activity.clone(),
                close: tx,
            },
        );
        Some(Admitted {
            id,
            activity,
            close: rx,
            registry: self.clone(),
        })
    }

    /// Closes the connection idle longest, if one is idle.
    fn evict_idle_longest(&self) -> bool {
        Registry::evict(&mut self.lock())
    }

    fn evict(conns: &mut Conns) -> bool {
        let oldest = conns
            .held
            .iter()
            .filter_map(|(id, h)| Some((h.activity.idle_since()?, *id)))
            .min();
        match oldest.and_then(|(_, id)| conns.held.remove(&id)) {
            Some(held) => {
                let _ = held.close.send(());
                true
            }
            None => false,
        }
    }

    fn remove(&self, id: u64) {
        self.lock().held.remove(&id);
    }

    /// Connections held now.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.lock().held.len()
    }

    /// Held connections answering a request now.
    #[cfg(test)]
    fn busy(&self) -> usize {
        self.lock()
            .held
            .values()
            .filter(|h| h.activity.idle_since().is_none())
            .count()
    }
}

fn respond(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", content_type)
        .header("cache-control", "no-store")
        .body(Full::new(body.into()))
        .expect("a valid response")
}

/// `gpu_op_duration_seconds{device,op}` and `gpu_retry_attempt{device}`, the histograms
/// hipvisor serves from their bucket counts: the names, help, labels and buckets the
/// OpenTelemetry exporter would give them.
fn histogram_families(histograms: &BucketHistograms) -> Vec<prometheus::proto::MetricFamily> {
    use prometheus::proto::{Bucket, Histogram, LabelPair, Metric, MetricFamily, MetricType};
    fn metric(labels: &[(&str, String)], bounds: &[f64], counts: &[u64], sum: f64) -> Metric {
        let mut m = Metric::from_label(
            labels
                .iter()
                .map(|(k, v)| {
                    let mut l = LabelPair::default();
                    l.set_name((*k).to_string());
                    l.set_value(v.clone());
                    l
                })
                .collect(),
        );
        let mut h = Histogram::default();
        let mut cumulative = 0;
        h.set_bucket(
            bounds
                .iter()
                .enumerate()
                .map(|(i, bound)| {
                    cumulative += counts.get(i).copied().unwrap_or(0);
                    let mut b = Bucket::default();
                    b.set_upper_bound(*bound);
                    b.set_cumulative_count(cumulative);
                    b
                })
                .collect(),
        );
        h.set_sample_count(counts.iter().sum());
        h.set_sample_sum(sum);
        m.set_histogram(h);
        m
    }
    fn family(name: &str, help: &str, metrics: Vec<Metric>) -> MetricFamily {
        let mut f = MetricFamily::default();
        f.set_name(name.to_string());
        f.set_help(help.to_string());
        f.set_field_type(MetricType::HISTOGRAM);
        f.set_metric(metrics);
        f
    }
    histograms.read(|b| {
        let duration: Vec<Metric> = b
            .duration
            .iter()
            .map(|((device, op), (counts, sum))| {
                let labels = [("device", device.to_string()), ("op", op.as_str().to_string())];
                metric(&labels, &crate::metrics::DURATION_BUCKETS, counts, *sum)
            })
            .collect();
        let attempt: Vec<Metric> = b
            .attempt
            .iter()
            .map(|(device, counts)| {
                // Attempt i succeeded i times over: the sum of the attempts.
                let sum = counts.iter().enumerate().map(|(i, n)| i as f64 * *n as f64).sum();
                // By bucket: (-inf, 1], (1, 2], ... and beyond the last bound.
                let bounds = &b.attempt_bounds;
                let mut by_bound = vec![0; bounds.len() + 1];
                for (attempt, n) in counts.iter().enumerate() {
                    let slot = bounds.iter().position(|b| attempt as f64 <= *b).unwrap_or(bounds.len());
                    by_bound[slot] += n;
                }
                metric(&[("device", device.to_string())], &b.attempt_bounds, &by_bound, sum)
            })
            .collect();
        let mut out = Vec::new();
        if !duration.is_empty() {
            out.push(family(
                "gpu_op_duration_seconds",
                crate::metrics::DURATION_HELP,
                duration,
            ));
        }
        if !attempt.is_empty() {
            out.push(family("gpu_retry_attempt", crate::metrics::ATTEMPT_HELP, attempt));
        }
        out
    })
}

/// The `seconds` of `/api/history?seconds=N` (1 to 901, the samples kept; all of them without it).
fn history_seconds(query: Option<&str>) -> Result<usize, String> {
    let most = crate::history::HISTORY_SAMPLES;
    let mut seconds = most;
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        match pair.split_once('=') {
            Some(("seconds", v)) => {
                seconds = v
                    .parse::<usize>()
                    .ok()
                    .filter(|s| (1..=most).contains(s))
                    .ok_or_else(|| format!("seconds={v}: a whole number of seconds from 1 to {most}"))?;
            }
            _ => return Err(format!("unknown query `{pair}`: /api/history takes seconds=N")),
        }
    }
    Ok(seconds)
}

async fn route(state: Arc<State>, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let shared = &state.shared;
    match req.uri().path() {
        "/metrics" => match &state.registry {
            Some((registry, histograms)) => {
                // The snapshot is a barrier: every delta flushed so far is recorded first.
                let _ = shared.snapshot().await;
                let mut families = registry.gather();
                families.extend(histogram_families(histograms));
                families.sort_by(|a, b| a.name().cmp(b.name()));
                let mut out = Vec::new();
                let encoder = prometheus::TextEncoder::new();
                match prometheus::Encoder::encode(&encoder, &families, &mut out) {
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
                && lock(&shared.supervisor)
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
        "/api/history" => {
            let seconds = match history_seconds(req.uri().query()) {
                Ok(s) => s,
                Err(why) => return respond(StatusCode::BAD_REQUEST, "text/plain", format!("{why}\n")),
            };
            match shared.history(seconds).await {
                // (Serialized here, not in the metrics actor.)
                Ok(h) => respond(
                    StatusCode::OK,
                    "application/json",
                    serde_json::to_vec(&h).unwrap_or_default(),
                ),
                Err(e) => respond(StatusCode::SERVICE_UNAVAILABLE, "text/plain", e.to_string()),
            }
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
    }
}

#[cfg(test)]
mod tests {
    //! The connection limits on loopback, with short timeouts and small caps; the endpoint
    //! with its real limits is tested in tests/endpoint.rs.

    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpStream as Client;
    use tokio::sync::Semaphore;

    /// Set in a child process that runs one test's case (rlimits are per process).
    const CHILD: &str = "HIPVISOR_TELEMETRY_TEST_CHILD";

    /// A server of `limits` whose `/slow` answers only once a permit is added to `release`.
    struct Server {
        addr: SocketAddr,
        registry: Arc<Registry>,
        release: Arc<Semaphore>,
        task: JoinHandle<()>,
        /// Runs the server (dropped last).
        _rt: tokio::runtime::Runtime,
    }

    impl Drop for Server {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn server(limits: Limits) -> Server {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
        let addr = listener.local_addr().unwrap();
        let release = Arc::new(Semaphore::new(0));
        let gate = release.clone();
        let handler = move |req: Request<Incoming>| {
            let gate = gate.clone();
            async move {
                if req.uri().path() == "/slow" {
                    gate.acquire().await.expect("open").forget();
                }
                respond(StatusCode::OK, "text/plain", "ok")
            }
        };
        let (task, registry) = {
            let _in = rt.enter();
            start(listener, limits, handler)
        };
        Server {
            addr,
            registry,
            release,
            task,
            _rt: rt,
        }
    }

    fn limits(header_read_timeout: Duration, idle_timeout: Duration, max_connections: usize) -> Limits {
        Limits {
            header_read_timeout,
            idle_timeout,
            max_connections,
        }
    }

    const LONG: Duration = Duration::from_secs(60);

    fn connect(addr: SocketAddr) -> Client {
        Client::connect(addr).expect("connect")
    }

    /// Sends a GET without `Connection: close`.
    fn send_get(s: &mut Client, path: &str) {
        write!(s, "GET {path} HTTP/1.1\r\nHost: test\r\n\r\n").unwrap();
    }

    /// Reads one response whose body is `ok`: its status.
    fn read_ok_response(s: &mut Client) -> u16 {
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut raw = Vec::new();
        let mut buf = [0u8; 512];
        while !raw.ends_with(b"\r\n\r\nok") {
            let n = s.read(&mut buf).expect("a response");
            assert!(n > 0, "closed before the response: {:?}", String::from_utf8_lossy(&raw));
            raw.extend_from_slice(&buf[..n]);
        }
        let head = String::from_utf8_lossy(&raw);
        head.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A GET on a new connection: its status and how long it took.
    fn get(addr: SocketAddr, path: &str) -> (u16, Duration) {
        let t0 = Instant::now();
        let mut s = connect(addr);
        send_get(&mut s, path);
        (read_ok_response(&mut s), t0.elapsed())
    }

    /// How long after `since` the server closed `s`, if it did within `within` of now.
    fn closed_within(s: &Client, since: Instant, within: Duration) -> Option<Duration> {
        let deadline = Instant::now() + within;
        s.set_read_timeout(Some(Duration::from_millis(20))).unwrap();
        let mut buf = [0u8; 256];
        loop {
            match (&*s).read(&mut buf) {
                Ok(0) => return Some(since.elapsed()),
                Ok(_) => {}
                Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
                    if Instant::now() > deadline {
                        return None;
                    }
                }
                Err(_) => return Some(since.elapsed()),
            }
        }
    }

    /// Whether the server still holds `s` open (nothing to read, no end of file).
    fn is_open(s: &Client) -> bool {
        s.set_nonblocking(true).unwrap();
        let open = matches!((&*s).read(&mut [0u8; 1]), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock);
        s.set_nonblocking(false).unwrap();
        open
    }

    fn wait_until(within: Duration, what: &str, mut cond: impl FnMut() -> bool) {
        let deadline = Instant::now() + within;
        while !cond() {
            assert!(Instant::now() < deadline, "timed out waiting for: {what}");
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn a_header_that_does_not_arrive_in_time_closes_the_connection() {
        let srv = server(limits(Duration::from_millis(300), LONG, 16));
        let t0 = Instant::now();
        let silent = connect(srv.addr);
        let mut partial = connect(srv.addr);
        partial.write_all(b"GET /healthz HTTP/1.1\r\nHost: te").unwrap();
        // A whole request is answered meanwhile.
        assert_eq!(get(srv.addr, "/").0, 200);
        for (what, s) in [("silent", &silent), ("partial header", &partial)] {
            let after = closed_within(s, t0, Duration::from_secs(10)).unwrap_or_else(|| panic!("{what}: still open"));
            assert!(after >= Duration::from_millis(250), "{what}: closed after {after:?}");
        }
        wait_until(Duration::from_secs(5), "no connection held", || srv.registry.len() == 0);
    }

    #[test]
    fn a_connection_idle_for_the_idle_timeout_is_closed() {
        let srv = server(limits(LONG, Duration::from_millis(300), 16));
        let t0 = Instant::now();
        let silent = connect(srv.addr);
        let after = closed_within(&silent, t0, Duration::from_secs(10)).expect("silent: closed");
        assert!(after >= Duration::from_millis(250), "silent: closed after {after:?}");
        // A kept-alive connection, idle after its response; timed from before the request
        // (the server's idle clock starts at its response, after this), and only once the
        // silent one is closed, so that a close right after the response would be seen.
        let mut kept = connect(srv.addr);
        let sent = Instant::now();
        send_get(&mut kept, "/");
        assert_eq!(read_ok_response(&mut kept), 200);
        let after = closed_within(&kept, sent, Duration::from_secs(10)).expect("kept alive: closed");
        assert!(
            after >= Duration::from_millis(250),
            "kept alive: closed after {after:?}"
        );
    }

    #[test]
    fn at_the_cap_the_connection_idle_longest_is_closed_to_admit_a_new_one() {
        let srv = server(limits(LONG, LONG, 3));
        let reg = &srv.registry;
        // The oldest connection is answering a request: it is not idle.
        let mut busy = connect(srv.addr);
        send_get(&mut busy, "/slow");
        wait_until(Duration::from_secs(5), "one busy connection", || {
            reg.len() == 1 && reg.busy() == 1
        });
        let idle_longest = connect(srv.addr);
        wait_until(Duration::from_secs(5), "two connections", || reg.len() == 2);
        let idle = connect(srv.addr);
        wait_until(Duration::from_secs(5), "three connections", || reg.len() == 3);
        // At the cap: a probe gets in, at once.
        let (status, took) = get(srv.addr, "/healthz");
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(1), "answered after {took:?}");
        closed_within(&idle_longest, Instant::now(), Duration::from_secs(5))
            .expect("the connection idle longest was closed");
        assert!(is_open(&idle), "the younger idle connection stays");
        assert!(is_open(&busy), "the busy connection stays");
        srv.release.add_permits(1);
        assert_eq!(
            read_ok_response(&mut busy),
            200,
            "the busy connection's request is answered"
        );
        assert!(reg.len() <= 3);
    }

    #[test]
    fn at_the_cap_with_every_connection_busy_a_new_one_is_refused() {
        let srv = server(limits(LONG, LONG, 1));
        let reg = &srv.registry;
        let mut busy = connect(srv.addr);
        send_get(&mut busy, "/slow");
        wait_until(Duration::from_secs(5), "one busy connection", || reg.busy() == 1);
        let refused = connect(srv.addr);
        let t0 = Instant::now();
        closed_within(&refused, t0, Duration::from_secs(5)).expect("refused: closed at once");
        srv.release.add_permits(1);
        assert_eq!(read_ok_response(&mut busy), 200);
        // Kept alive and idle now: it makes room for the next one.
        assert_eq!(get(srv.addr, "/").0, 200);
        closed_within(&busy, Instant::now(), Duration::from_secs(5)).expect("the idle one made room");
    }

    /// Runs `test`'s case in a child process (with `CHILD` set) and checks that it passed.
    fn in_child(test: &str) {
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", test, "--nocapture", "--test-threads=1"])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let (stdout, stderr) = (
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
        );
        assert!(
            out.status.success() && stdout.contains("child case passed"),
            "{test} in a child: {:?}\n{stdout}\n{stderr}",
            out.status
        );
    }

    fn cpu_time() -> Duration {
        use nix::sys::resource::{UsageWho, getrusage};
        let u = getrusage(UsageWho::RUSAGE_SELF).unwrap();
        let d = |t: nix::sys::time::TimeVal| Duration::new(t.tv_sec() as u64, t.tv_usec() as u32 * 1000);
        d(u.user_time()) + d(u.system_time())
    }

    /// Opens `/dev/null` until the process is out of descriptors, then gives `keep` back.
    fn exhaust_descriptors(keep: usize) -> Vec<std::fs::File> {
        let mut files = Vec::new();
        loop {
            match std::fs::File::open("/dev/null") {
                Ok(f) => files.push(f),
                Err(e) if e.raw_os_error() == Some(nix::errno::Errno::EMFILE as i32) => break,
                Err(e) => panic!("{e}"),
            }
        }
        files.truncate(files.len() - keep);
        files
    }

    #[test]
    fn out_of_descriptors_the_endpoint_backs_off_and_gives_back_an_idle_connection() {
        if std::env::var_os(CHILD).is_none() {
            return in_child(
                "telemetry::tests::out_of_descriptors_the_endpoint_backs_off_and_gives_back_an_idle_connection",
            );
        }
        use nix::sys::resource::{Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(256), hard).unwrap();
        let srv = server(limits(LONG, LONG, 1024));

        // No descriptor left for the server's accept: the connection waits in the backlog.
        let filler = exhaust_descriptors(1);
        let mut waiting = connect(srv.addr);
        write!(
            waiting,
            "GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        let (cpu0, t0) = (cpu_time(), Instant::now());
        // A window to measure the CPU time the failing accepts take (the pass condition is
        // the ratio, whatever the window).
        std::thread::sleep(Duration::from_millis(500));
        let (cpu, wall) = (cpu_time() - cpu0, t0.elapsed());
        assert_eq!(srv.registry.len(), 0, "the accept could not succeed");
        assert!(cpu < wall / 5, "{cpu:?} of CPU in {wall:?}: accept failures spin");
        // Descriptors back: the connection is accepted and answered.
        drop(filler);
        assert_eq!(read_ok_response(&mut waiting), 200);

        // Out of descriptors again, with an idle connection held: the endpoint closes it to
        // take the new one.
        let idle = connect(srv.addr);
        wait_until(Duration::from_secs(5), "the idle connection held", || {
            srv.registry.len() == 1
        });
        let filler = exhaust_descriptors(1);
        let mut probe = connect(srv.addr);
        write!(
            probe,
            "GET /healthz HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n"
        )
        .unwrap();
        assert_eq!(read_ok_response(&mut probe), 200, "the probe got in");
        closed_within(&idle, Instant::now(), Duration::from_secs(5)).expect("the idle connection was closed");
        drop(filler);
        println!("child case passed");
    }

    #[test]
    fn the_soft_limit_on_open_files_is_raised_to_the_hard_limit() {
        if std::env::var_os(CHILD).is_none() {
            return in_child("telemetry::tests::the_soft_limit_on_open_files_is_raised_to_the_hard_limit");
        }
        use nix::sys::resource::{RLIM_INFINITY, Resource, getrlimit, setrlimit};
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        setrlimit(Resource::RLIMIT_NOFILE, hard.min(256), hard).unwrap();
        raise_open_files_limit();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        if hard == RLIM_INFINITY {
            assert!(soft > 256, "raised to fs.nr_open: {soft}");
        } else {
            assert_eq!(soft, hard);
        }
        println!("child case passed");
    }
}
