//! The metrics endpoint over real HTTP on loopback: exposition, health, readiness, the
//! snapshot and the dashboard; `promtool`, a real Prometheus server and headless Chromium
//! where they are installed (they are skipped with a message otherwise, unless
//! `CI_REQUIRE_TOOLS=1`, which makes their absence a failure).

#![cfg(feature = "prometheus")]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use hipvisor::core::config::Isolation;
use hipvisor::core::fault_plan::FaultSpec;
use hipvisor::{Runtime, RuntimeConfig};

/// A plain HTTP/1.1 GET: (status, body).
fn get(addr: SocketAddr, path: &str) -> (u16, String) {
    get_on(TcpStream::connect(addr).expect("connect"), addr, path)
}

/// `get` on a connection already made.
fn get_on(mut s: TcpStream, addr: SocketAddr, path: &str) -> (u16, String) {
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("an HTTP response");
    let status = head.split_whitespace().nth(1).unwrap().parse().unwrap();
    (status, body.to_string())
}

fn require_tools() -> bool {
    std::env::var("CI_REQUIRE_TOOLS").is_ok_and(|v| v == "1")
}

/// `Some(path)` of an external program, or `None` (skip) — a failure under CI_REQUIRE_TOOLS.
fn tool(name: &str) -> Option<&'static str> {
    let candidates: &[&'static str] = match name {
        "promtool" => &["promtool"],
        "prometheus" => &["prometheus"],
        "chromium" => &["chromium", "chromium-browser"],
        _ => &[],
    };
    for c in candidates {
        if Command::new(c)
            .arg("--version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok()
        {
            return Some(c);
        }
    }
    assert!(
        !require_tools(),
        "{name} is required (CI_REQUIRE_TOOLS=1) but not installed"
    );
    eprintln!("skipped: {name} is not installed");
    None
}

fn config(faults: Vec<FaultSpec>) -> RuntimeConfig {
    let mut c = RuntimeConfig::default();
    c.runtime.isolation = Isolation::Thread;
    c.sim.devices = 2;
    c.sim.memory_bytes = 1 << 20;
    c.retry.initial_delay_ms = 1;
    c.retry.max_delay_ms = 2;
    c.retry.max_retries = 2;
    c.telemetry.flush_interval_ms = 20;
    c.supervisor.lost_probe_interval_ms = 20;
    c.sim.faults = faults;
    c
}

fn transient(p: f64) -> FaultSpec {
    FaultSpec {
        probability: Some(p),
        code: Some(600),
        ..FaultSpec::default()
    }
}

async fn start(c: RuntimeConfig) -> Runtime {
    Runtime::builder()
        .config(c)
        .serve_metrics("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap()
}

async fn work(rt: &Runtime, ops: usize) {
    for d in 0..rt.device_count() {
        let gpu = rt.device(d).unwrap();
        for _ in 0..ops {
            let _ = gpu.mem_info().await;
        }
    }
}

/// The sum of a metric's samples in an exposition text.
fn sum(text: &str, name: &str) -> f64 {
    sum_of(text, name, &[])
}

/// The sum of a metric's samples whose labels include each of `labels` (`key="value"`).
fn sum_of(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.split(['{', ' ']).next() == Some(name) && labels.iter().all(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scraped_counters_equal_the_snapshot_and_the_exposition_is_well_formed() {
    let c = config(vec![transient(0.2)]);
    let max_retries = c.retry.max_retries;
    let rt = start(c).await;
    let addr = rt.metrics_addr().expect("an endpoint");
    work(&rt, 200).await;
    let snapshot = rt.snapshot().await.unwrap();
    let (status, text) = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    assert!(
        snapshot.retries.attempts > 0 && snapshot.retries.exhausted > 0,
        "{:?}",
        snapshot.retries
    );
    assert_eq!(sum(&text, "gpu_retry_attempts_total"), snapshot.retries.attempts as f64);
    assert_eq!(sum(&text, "gpu_retry_success_total"), snapshot.retries.succeeded as f64);
    assert_eq!(sum(&text, "gpu_retry_failed_total"), snapshot.retries.exhausted as f64);
    assert_eq!(sum(&text, "gpu_ops_total"), snapshot.ops_total as f64);
    assert_eq!(sum(&text, "gpu_op_duration_seconds_count"), snapshot.ops_total as f64);
    assert_eq!(sum(&text, "gpu_retry_attempt_count"), snapshot.ops_succeeded as f64);
    assert_eq!(sum(&text, "gpu_device_restarts_total"), 0.0);
    assert_eq!(sum(&text, "gpu_device_state"), 2.0, "one current state per device");
    // HELP on every metric; no scope labels; buckets fit for purpose.
    for family in text.lines().filter_map(|l| l.strip_prefix("# TYPE ")) {
        let name = family.split(' ').next().unwrap();
        assert!(text.contains(&format!("# HELP {name} ")), "no HELP for {name}");
    }
    assert!(!text.contains("otel_scope"), "no otel_scope_* labels");
    assert!(
        text.contains("gpu_op_duration_seconds_bucket{") && text.contains("le=\"0.000001\""),
        "µs buckets"
    );
    assert!(
        text.contains("gpu_retry_attempt_bucket{") && text.contains("le=\"3\""),
        "1..max_retries+1"
    );
    // The histograms (served from their bucket counts): every bucket of every op kind, summed
    // over the devices, equals the snapshot's; so do the sums and the attempts.
    let sample = |name: &str, labels: &[&str]| sum_of(&text, name, labels);
    for (op, stats) in &snapshot.durations {
        let op_label = format!("op=\"{}\"", op.as_str());
        for (i, bound) in hipvisor::metrics::DURATION_BUCKETS.iter().enumerate() {
            let le = format!("le=\"{bound}\"");
            assert_eq!(
                sample("gpu_op_duration_seconds_bucket", &[&op_label, &le]),
                stats.buckets[i] as f64,
                "{op_label} {le}"
            );
        }
        let served = sample("gpu_op_duration_seconds_sum", &[&op_label]);
        assert!(
            (served - stats.sum_seconds).abs() <= 1e-9 * stats.count as f64,
            "{op_label}: {served} s"
        );
        assert_eq!(
            sample("gpu_op_duration_seconds_count", &[&op_label]),
            stats.count as f64
        );
    }
    let by_attempt = |a: u32| snapshot.retries.success_by_attempt.get(&a).copied().unwrap_or(0);
    assert!(by_attempt(2) > 0, "{:?}", snapshot.retries.success_by_attempt);
    // Every bound, 1 to max_retries + 1: the ops that succeeded by that attempt.
    for le in 1..=max_retries + 1 {
        assert_eq!(
            sample("gpu_retry_attempt_bucket", &[&format!("le=\"{le}\"")]),
            (0..=le).map(by_attempt).sum::<u64>() as f64,
            "le={le}"
        );
    }
    assert_eq!(
        sample("gpu_retry_attempt_bucket", &["le=\"+Inf\""]),
        snapshot.ops_succeeded as f64
    );
    let attempts: u64 = snapshot
        .retries
        .success_by_attempt
        .iter()
        .map(|(a, n)| u64::from(*a) * n)
        .sum();
    assert_eq!(sample("gpu_retry_attempt_sum", &[]), attempts as f64);
    if let Some(promtool) = tool("promtool") {
        let mut child = Command::new(promtool)
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
        let out = child.wait_with_output().unwrap();
        let report = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "promtool check metrics: {report}");
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_snapshot_and_dashboard_routes() {
    let rt = start(config(vec![])).await;
    let addr = rt.metrics_addr().unwrap();
    work(&rt, 10).await;
    let (h, ready, snap, page, missing) = tokio::task::spawn_blocking(move || {
        (
            get(addr, "/healthz"),
            get(addr, "/readyz"),
            get(addr, "/api/snapshot"),
            get(addr, "/"),
            get(addr, "/nope"),
        )
    })
    .await
    .unwrap();
    assert_eq!(h.0, 200);
    assert_eq!(ready.0, 200);
    let ready: serde_json::Value = serde_json::from_str(&ready.1).unwrap();
    assert_eq!(ready["devices"][1]["state"], "ready");
    let snap: serde_json::Value = serde_json::from_str(&snap.1).unwrap();
    assert_eq!(snap["ops_total"], 20);
    assert_eq!(page.0, 200);
    assert!(page.1.contains("<title>hipvisor</title>"));
    // No external assets: nothing loaded from elsewhere (the SVG namespace is a name).
    for external in ["src=\"http", "href=\"http", "url(http", "@import", "<link"] {
        assert!(!page.1.contains(external), "{external}");
    }
    assert_eq!(missing.0, 404);
    rt.shutdown().await;
}

/// Raises this process's soft limit on open files to its hard limit, which must be at least
/// `need`; the limit, or `None` (the test skips) when the hard limit is lower.
fn open_files_for(need: u64) -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
    if hard < need {
        eprintln!("skipped: the hard limit on open files ({hard}) is below the {need} this test needs");
        return None;
    }
    if soft < hard {
        setrlimit(Resource::RLIMIT_NOFILE, hard, hard).unwrap();
    }
    Some(hard)
}

/// Whether the server has closed `s` (end of file or reset), without waiting.
fn closed(s: &TcpStream) -> bool {
    s.set_nonblocking(true).unwrap();
    let closed = match (&*s).read(&mut [0u8; 64]) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
    };
    s.set_nonblocking(false).unwrap();
    closed
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_1500_idle_connections_open_healthz_answers_within_a_second() {
    const IDLE: usize = 1500;
    // The connections' two ends are both in this process, with the runtime's own files.
    if open_files_for(3000).is_none() {
        return;
    }
    let cap = RuntimeConfig::default().telemetry.max_connections as usize;
    let rt = start(config(vec![])).await;
    let addr = rt.metrics_addr().unwrap();
    tokio::task::spawn_blocking(move || {
        let idle: Vec<TcpStream> = (0..IDLE).map(|_| TcpStream::connect(addr).expect("connect")).collect();
        // Timed from the moment its connection is made: making it can take a second or more
        // while the server is still taking the flood from its accept queue (a full queue
        // drops the SYN, resent a second later), which times the test machine (CI, 2
        // cores), not the endpoint. What follows is the endpoint's: taking the connection
        // at the cap, by closing the one idle longest, and answering it.
        let t0 = Instant::now();
        let connection = TcpStream::connect(addr).expect("connect");
        let connected = t0.elapsed();
        let t1 = Instant::now();
        let (status, body) = get_on(connection, addr, "/healthz");
        let took = t1.elapsed();
        assert_eq!((status, body.as_str()), (200, "ok\n"));
        assert!(
            took < Duration::from_secs(1),
            "/healthz answered {took:?} after its connection was made (in {connected:?})"
        );
        // The endpoint holds at most `cap` of them: it closed the others to admit new ones
        // (which ones, and that they are the oldest idle, is tested in telemetry.rs with a
        // long header timeout; here the 5 s header timeout may have closed some too, when
        // opening took long: a full accept queue makes a connect wait a second for the
        // retransmitted SYN).
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let open = idle.iter().filter(|s| !closed(s)).count();
            if open <= cap {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{open} of {IDLE} idle connections still open, the cap is {cap}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    })
    .await
    .unwrap();
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_partial_header_is_closed_after_the_5_s_header_timeout() {
    let rt = start(config(vec![])).await;
    let addr = rt.metrics_addr().unwrap();
    let after = tokio::task::spawn_blocking(move || {
        let t0 = Instant::now();
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: te").unwrap();
        let deadline = t0 + Duration::from_secs(20);
        while !closed(&s) {
            assert!(Instant::now() < deadline, "still open after {:?}", t0.elapsed());
            std::thread::sleep(Duration::from_millis(20));
        }
        t0.elapsed()
    })
    .await
    .unwrap();
    assert!(
        after >= Duration::from_millis(4500),
        "closed after {after:?}: before the header timeout"
    );
    // The endpoint still answers.
    let (status, _) = tokio::task::spawn_blocking(move || get(addr, "/healthz"))
        .await
        .unwrap();
    assert_eq!(status, 200);
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_is_503_while_every_device_is_lost_and_200_when_one_returns() {
    let mut c = config(vec![FaultSpec {
        after: Some(1),
        code: Some(100),
        // Long enough that the first look below comes while it is gone, even on a loaded
        // machine.
        duration_ms: Some(3_000),
        ..FaultSpec::default()
    }]);
    c.sim.devices = 1;
    let rt = start(c).await;
    let addr = rt.metrics_addr().unwrap();
    let _ = rt.device(0).unwrap().mem_info().await;
    let (lost, _) = tokio::task::spawn_blocking(move || get(addr, "/readyz")).await.unwrap();
    assert_eq!(lost, 503, "the only device is lost");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (status, body) = tokio::task::spawn_blocking(move || get(addr, "/readyz")).await.unwrap();
        if status == 200 {
            assert!(body.contains("\"ready\""));
            break;
        }
        assert!(Instant::now() < deadline, "the device never came back: {body}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    rt.shutdown().await;
}

/// A free port on loopback (bound and released; Prometheus cannot take port 0).
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_real_prometheus_scrapes_the_endpoint() {
    let Some(prometheus) = tool("prometheus") else { return };
    let rt = start(config(vec![transient(0.2)])).await;
    let addr = rt.metrics_addr().unwrap();
    work(&rt, 100).await;
    let dir = std::env::temp_dir().join(format!("hipvisor-prom-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let cfg = dir.join("prometheus.yml");
    std::fs::write(
        &cfg,
        format!("global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: hipvisor\n    static_configs:\n      - targets: ['{addr}']\n"),
    )
    .unwrap();
    let port = free_port();
    let mut server = Command::new(prometheus)
        .arg(format!("--config.file={}", cfg.display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let prom: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let found = loop {
        let answer = tokio::task::spawn_blocking(move || {
            TcpStream::connect(prom)
                .ok()
                .map(|_| get(prom, "/api/v1/query?query=sum(gpu_retry_attempts_total)"))
        })
        .await
        .unwrap();
        if let Some((200, body)) = answer {
            let v: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let value = v["data"]["result"][0]["value"][1]
                .as_str()
                .and_then(|s| s.parse::<f64>().ok());
            if value.is_some_and(|x| x > 0.0) {
                break value.unwrap();
            }
        }
        if Instant::now() >= deadline {
            break 0.0;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let _ = server.kill();
    let _ = server.wait();
    let _ = std::fs::remove_dir_all(&dir);
    assert!(
        found > 0.0,
        "Prometheus's query API never saw gpu_retry_attempts_total > 0"
    );
    rt.shutdown().await;
}

/// A runtime in process isolation, serving its endpoint, whose device 1 meets a sticky fault
/// on its 5th op: its worker is replaced and the device restarted.
async fn restarting_runtime() -> Runtime {
    let sticky = FaultSpec {
        device: Some(1),
        nth: Some(5),
        code: Some(700),
        ..FaultSpec::default()
    };
    let mut c = config(vec![sticky]);
    c.runtime.isolation = Isolation::Process;
    // (The `hipvisor` program is a worker when started as one; this test binary is not.)
    Runtime::builder()
        .config(c)
        .worker(env!("CARGO_BIN_EXE_hipvisor"))
        .serve_metrics("127.0.0.1:0".parse().unwrap())
        .start()
        .await
        .unwrap()
}

/// The DOM headless Chromium renders of `url`, after 5 s of the page's (virtual) time, and
/// what it logged (the page's console among it).
fn rendered_dom(chromium: &str, url: &str) -> (String, String) {
    let profile = std::env::temp_dir().join(format!("hipvisor-chromium-{}", std::process::id()));
    let out = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--enable-logging=stderr",
            "--v=0",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .arg(url)
        .output()
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The value of attribute `name` in the first tag of `dom` that contains `marker`.
fn attr<'a>(dom: &'a str, marker: &str, name: &str) -> Option<&'a str> {
    let at = dom.find(marker)?;
    let tag = &dom[dom[..at].rfind('<')?..at + dom[at..].find('>')?];
    let key = format!("{name}=\"");
    let from = tag.find(&key)? + key.len();
    Some(&tag[from..from + tag[from..].find('"')?])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dashboard_draws_the_history_and_the_restart_in_headless_chromium() {
    let Some(chromium) = tool("chromium") else { return };
    let rt = restarting_runtime().await;
    let addr = rt.metrics_addr().unwrap();
    work(&rt, 20).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while rt.snapshot().await.unwrap().restarts == 0 {
        assert!(Instant::now() < deadline, "the device restarted within 30 s");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // A history of several seconds before the page opens (the page fetches it whole, then
    // only the last seconds and merges them in: what it draws must be all of it).
    let count = move || -> u64 {
        let (_, h) = get(addr, "/api/history?seconds=300");
        serde_json::from_str::<serde_json::Value>(&h).unwrap()["seconds"]
            .as_u64()
            .unwrap()
    };
    let before = loop {
        let n = tokio::task::spawn_blocking(count).await.unwrap();
        if n >= 8 {
            break n;
        }
        assert!(Instant::now() < deadline + Duration::from_secs(15), "8 s of history");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let (dom, console) = tokio::task::spawn_blocking(move || rendered_dom(chromium, &format!("http://{addr}/")))
        .await
        .unwrap();
    let after = tokio::task::spawn_blocking(count).await.unwrap();
    assert!(dom.contains("<p id=\"errors\"></p>"), "no script error:\n{dom}");
    let uncaught: Vec<&str> = console
        .lines()
        .filter(|l| {
            l.contains(":CONSOLE") && (l.contains("Uncaught") || l.contains("Error") || l.contains("Failed to load"))
        })
        .collect();
    assert!(uncaught.is_empty(), "no error in the console: {uncaught:?}");
    assert!(
        dom.contains("<p id=\"status\">updated "),
        "rendered, not unreachable:\n{dom}"
    );
    // Each chart has one point per sample of the history it drew last, which had at least
    // `before` samples and at most `after`; the rate charts leave out the second under way.
    for chart in [
        "chart-ops",
        "chart-failures",
        "chart-retries",
        "chart-latency",
        "timeline",
    ] {
        let marker = format!("id=\"{chart}\"");
        let svg = &dom[dom.find(&marker).unwrap_or_else(|| panic!("{chart} drawn:\n{dom}"))..];
        let svg = &svg[..svg.find("</svg>").unwrap()];
        let drawn: u64 = attr(&dom, &marker, "data-samples").unwrap().parse().unwrap();
        // One second after another, each once (a merge that repeated or lost one fails).
        let from: u64 = attr(&dom, &marker, "data-from").unwrap().parse().unwrap();
        let to: u64 = attr(&dom, &marker, "data-to").unwrap().parse().unwrap();
        assert_eq!(to + 1 - from, drawn, "{chart}: seconds {from} to {to}");
        let partial = u64::from(chart != "timeline");
        assert!(
            (before - partial..=after - partial).contains(&drawn),
            "{chart}: {drawn} samples drawn, the history had {before} to {after}"
        );
        if chart != "chart-latency" && chart != "timeline" {
            // Every series of a rate chart: a point per second (zeros are points), counted
            // in its lines' coordinates.
            let series: Vec<&str> = svg.split("<g class=\"series\"").skip(1).collect();
            assert!(!series.is_empty(), "{chart} has lines");
            for g in series {
                let g = &g[..g.find("</g>").unwrap()];
                let points: usize = g
                    .match_indices(" points=\"")
                    .map(|(i, _)| {
                        let p = &g[i + 9..];
                        p[..p.find('"').unwrap()].split_whitespace().count()
                    })
                    .sum();
                assert_eq!(points as u64, drawn, "{chart}: a point per second in {g}");
            }
        }
    }
    // The page merged later polls into what it drew (it polled several times).
    let merges = &dom[dom.find("data-merges=\"").unwrap_or_else(|| panic!("merged:\n{dom}")) + 13..];
    let merges: u64 = merges[..merges.find('"').unwrap()].parse().unwrap();
    assert!(merges >= 1, "{merges} merges");
    // The restart is on device 1's row of the timeline, and its state changes are bands.
    assert!(dom.contains("class=\"marker restart\" data-device=\"1\""), "{dom}");
    assert!(
        dom.contains("<title>restart on device 1: "),
        "the restart's reason on hover:\n{dom}"
    );
    assert!(dom.contains("class=\"band ready\""), "{dom}");
    // Its restart lasted milliseconds: the second it was in shows it (the worst state).
    assert!(dom.contains("class=\"band restarting\" data-device=\"1\""), "{dom}");
    // The attempt histogram: a bar for the ops that succeeded on the first attempt.
    let first = &dom[dom
        .find("data-attempt=\"1\"")
        .unwrap_or_else(|| panic!("attempt 1 drawn:\n{dom}"))..];
    assert!(first[..first.find("</tr>").unwrap()].contains("class=\"bar\""), "{dom}");
    // The device table as before.
    assert!(dom.contains("data-state=\"ready\""), "{dom}");
    assert!(dom.contains("data-device=\"1\""), "{dom}");
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_grafana_dashboard_queries_only_metrics_the_endpoint_exports() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/grafana-dashboard.json");
    let dashboard: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    let rt = start(config(vec![transient(0.2)])).await;
    let addr = rt.metrics_addr().unwrap();
    work(&rt, 50).await;
    let (_, text) = tokio::task::spawn_blocking(move || get(addr, "/metrics"))
        .await
        .unwrap();
    let mut exprs = Vec::new();
    fn collect(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(e)) = m.get("expr") {
                    out.push(e.clone());
                }
                m.values().for_each(|x| collect(x, out));
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| collect(x, out)),
            _ => {}
        }
    }
    collect(&dashboard, &mut exprs);
    assert!(exprs.len() >= 8, "retry and device panels");
    for e in &exprs {
        for name in e
            .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .filter(|t| t.starts_with("gpu_"))
        {
            assert!(
                text.contains(&format!("\n{name}{{")) || text.contains(&format!("\n{name} ")),
                "{name} (in `{e}`) is not exported"
            );
        }
    }
    rt.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_history_serves_per_second_samples_that_add_up_and_the_restart_with_its_reason() {
    let rt = restarting_runtime().await;
    let addr = rt.metrics_addr().unwrap();
    work(&rt, 20).await;
    let history = |q: &'static str| tokio::task::spawn_blocking(move || get(addr, q));
    let deadline = Instant::now() + Duration::from_secs(30);
    let h = loop {
        let (status, body) = history("/api/history?seconds=120").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let h: serde_json::Value = serde_json::from_str(&body).unwrap();
        let restarted = h["events"].as_array().unwrap().iter().any(|e| e["kind"] == "restart");
        if restarted && rt.states().iter().all(|s| *s == hipvisor::DeviceState::Ready) {
            break h;
        }
        assert!(Instant::now() < deadline, "a restart in the history within 30 s: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let samples = h["samples"].as_array().unwrap();
    assert_eq!(h["seconds"].as_u64().unwrap() as usize, samples.len());
    assert_eq!(h["max_events"], 1000, "the cap the page keeps to: {h}");
    let t: Vec<u64> = samples.iter().map(|s| s["t"].as_u64().unwrap()).collect();
    assert!(t.windows(2).all(|w| w[1] == w[0] + 1), "one sample a second: {t:?}");
    assert!(samples.iter().all(|s| s["devices"].as_array().unwrap().len() == 2));
    // Every answered op is in exactly one second's counts.
    let answered: u64 = samples
        .iter()
        .flat_map(|s| s["ops"].as_object().unwrap().values())
        .map(|n| n.as_u64().unwrap())
        .sum();
    let snap = rt.snapshot().await.unwrap();
    assert_eq!(answered, snap.ops_total);
    assert_eq!(
        samples.iter().map(|s| s["restarts"].as_u64().unwrap()).sum::<u64>(),
        snap.restarts
    );
    assert!(
        h["events"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["kind"] == "state" && e["detail"].as_str().unwrap().starts_with("restarting")),
        "the state change with its reason: {h}"
    );
    // The query is checked.
    for bad in [
        "/api/history?seconds=0",
        "/api/history?seconds=902",
        "/api/history?s=5",
        "/api/history?seconds=x",
    ] {
        let (status, body) = history(bad).await.unwrap();
        assert_eq!(status, 400, "{bad}: {body}");
    }
    // All of it by default (with the run's start: a client merging polls tells another
    // process by it).
    let (status, body) = history("/api/history").await.unwrap();
    assert_eq!(status, 200, "{body}");
    let all: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert!(all["seconds"].as_u64().unwrap() >= samples.len() as u64);
    assert_eq!(all["started_ms"], h["started_ms"]);
    assert!(all["started_ms"].as_u64().unwrap() <= all["now_ms"].as_u64().unwrap());
    rt.shutdown().await;
}
