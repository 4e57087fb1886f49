//! The short human summaries that `run`, `chaos` and `bench` print without `--json`.
//!
//! Each is rendered from the command's JSON report (the one `--json` prints, so the two
//! cannot disagree) plus, for `run`, what the report does not carry per device. The last line
//! says where the full report is: [`FULL_REPORT`].

use std::fmt::Write;

use hipvisor::Snapshot;
use hipvisor::metrics::Outcome;
use serde_json::Value;

/// The summary's last line: where the JSON report is.
pub(crate) const FULL_REPORT: &str = "full report: rerun with --json";

/// One device's row of the `run` summary, from the runtime's final snapshot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct DeviceRow {
    pub(crate) id: u32,
    pub(crate) state: &'static str,
    /// Why it is in that state (lost and failed devices).
    pub(crate) reason: Option<String>,
    /// Application ops the device answered (the metrics' count).
    pub(crate) ops: u64,
    /// Of which failed with a typed error.
    pub(crate) failed: u64,
    /// Retry attempts on the device.
    pub(crate) retries: u64,
    pub(crate) restarts: u64,
}

/// One row per device of `snapshot`, its ops counted from the metrics.
pub(crate) fn device_rows(snapshot: &Snapshot) -> Vec<DeviceRow> {
    snapshot
        .devices
        .iter()
        .map(|d| {
            let mut row = DeviceRow {
                id: d.id,
                state: d.state.as_str(),
                reason: d.reason.clone(),
                ops: 0,
                failed: 0,
                retries: d.retries,
                restarts: d.restarts,
            };
            for c in snapshot.ops.iter().filter(|c| c.device == d.id) {
                row.ops += c.count;
                if c.outcome != Outcome::Success {
                    row.failed += c.count;
                }
            }
            row
        })
        .collect()
}

fn u(v: &Value) -> u64 {
    v.as_u64().unwrap_or(0)
}

fn f(v: &Value) -> f64 {
    v.as_f64().unwrap_or(f64::NAN)
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("?")
}

/// A figure with as many decimals as its size deserves.
fn figure(x: f64) -> String {
    let a = x.abs();
    if !x.is_finite() {
        "-".into()
    } else if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 10.0 {
        format!("{x:.1}")
    } else {
        format!("{x:.3}")
    }
}

/// The summary of `run` (or `chaos`: `command`) from its report and the device rows.
pub(crate) fn run(command: &str, report: &Value, devices: &[DeviceRow]) -> String {
    let mut out = String::new();
    let ops = &report["ops"];
    let _ = writeln!(
        out,
        "hipvisor {command}: {} backend, {} isolation, {} devices, {:.2} s",
        s(&report["backend"]),
        s(&report["isolation"]),
        u(&report["devices"]),
        f(&report["elapsed_s"]),
    );
    let _ = writeln!(
        out,
        "{:>6}  {:<10} {:>9} {:>9} {:>9} {:>9}",
        "device", "state", "ops", "failed", "retries", "restarts"
    );
    for (i, d) in devices.iter().enumerate() {
        let _ = write!(
            out,
            "{:>6}  {:<10} {:>9} {:>9} {:>9} {:>9}",
            d.id, d.state, d.ops, d.failed, d.retries, d.restarts
        );
        if let Some(r) = &d.reason {
            // A reason several devices share (one fault that poisoned the process) once.
            match devices[..i].iter().find(|e| e.reason.as_ref() == Some(r)) {
                Some(first) => _ = write!(out, "  (as device {})", first.id),
                None => _ = write!(out, "  ({r})"),
            }
        }
        out.push('\n');
    }
    let _ = writeln!(
        out,
        "{:>6}  {:<10} {:>9} {:>9} {:>9} {:>9}",
        "total",
        "",
        devices.iter().map(|d| d.ops).sum::<u64>(),
        devices.iter().map(|d| d.failed).sum::<u64>(),
        devices.iter().map(|d| d.retries).sum::<u64>(),
        u(&report["restarts"]),
    );
    let _ = writeln!(
        out,
        "ops: {} submitted, {} succeeded, {} failed, {} missing replies, {} wrong results",
        u(&ops["submitted"]),
        u(&ops["succeeded"]),
        u(&ops["failed"]),
        u(&ops["missing_replies"]),
        u(&ops["wrong_results"]),
    );
    let retries = &report["retries"];
    let _ = writeln!(
        out,
        "retries: {} ({} succeeded, {} exhausted)",
        u(&retries["attempts"]),
        u(&retries["succeeded"]),
        u(&retries["exhausted"]),
    );
    let _ = writeln!(
        out,
        "latency: p50 {:.0} us, p99 {:.0} us; {:.0} ops/s",
        f(&report["latency_us"]["p50"]),
        f(&report["latency_us"]["p99"]),
        f(&report["throughput_ops_per_s"]),
    );
    let mut problems = Vec::new();
    if let Some(why) = report["could_not_run"].as_str() {
        problems.push(format!("could not run: {why}"));
    }
    if u(&ops["missing_replies"]) > 0 {
        problems.push(format!("{} replies missing", u(&ops["missing_replies"])));
    }
    if u(&ops["wrong_results"]) > 0 {
        problems.push(format!("{} wrong results", u(&ops["wrong_results"])));
    }
    if report["metrics_consistent"] == false {
        problems.push("the metrics disagree with what the application observed".into());
    }
    if let Some(violations) = report["violations"].as_array() {
        for v in violations {
            problems.push(format!("violation: {}", s(v)));
        }
    }
    let verdict = if !problems.is_empty() {
        format!("FAILED: {}", problems.join("; "))
    } else if let Some(signal) = report["interrupted"].as_str() {
        format!("interrupted by {signal} before all ops were submitted")
    } else if report["violations"].is_array() {
        "ok, no violation".into()
    } else {
        "ok".into()
    };
    let _ = writeln!(out, "result: {verdict}");
    out.push_str(FULL_REPORT);
    out.push('\n');
    out
}

/// The summary of `bench`: each measurement's median and range, then the derived ratios.
pub(crate) fn bench(report: &Value) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "hipvisor bench: {} backend, {} cores, {} repetitions of {} ops, h2d {} MiB",
        s(&report["backend"]),
        u(&report["cores"]),
        u(&report["repetitions"]),
        u(&report["ops_per_measurement"]),
        u(&report["h2d_bytes"]) >> 20,
    );
    let empty = Vec::new();
    let results = report["results"].as_array().unwrap_or(&empty);
    let width = results.iter().map(|r| s(&r["name"]).len()).max().unwrap_or(0);
    let _ = writeln!(out, "{:<width$}  {:>12}  min – max", "measurement", "median");
    for r in results {
        let Some((unit, stats)) = r.as_object().and_then(|o| o.iter().find(|(k, _)| *k != "name")) else {
            continue;
        };
        let unit = match unit.as_str() {
            "ns_per_op" => "ns/op",
            "gbps" => "GB/s",
            "us_per_request" => "µs/request",
            other => other,
        };
        let _ = writeln!(
            out,
            "{:<width$}  {:>12}  {} – {} {unit}",
            s(&r["name"]),
            format!("{} {unit}", figure(f(&stats["median"]))),
            figure(f(&stats["min"])),
            figure(f(&stats["max"])),
        );
    }
    if let Some(derived) = report["derived"].as_object() {
        let width = derived.keys().map(String::len).max().unwrap_or(0);
        let _ = writeln!(out, "derived:");
        for (name, value) in derived {
            let _ = writeln!(out, "  {name:<width$}  {}", figure(f(value)));
        }
    }
    out.push_str(FULL_REPORT);
    out.push('\n');
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn report() -> Value {
        json!({
            "backend": "sim", "isolation": "process", "devices": 2,
            "ops": {"submitted": 1010, "succeeded": 1000, "failed": 10, "missing_replies": 0, "wrong_results": 0},
            "retries": {"attempts": 41, "succeeded": 40, "exhausted": 1},
            "restarts": 1,
            "latency_us": {"p50": 118.4, "p99": 210.0},
            "throughput_ops_per_s": 6977.2,
            "elapsed_s": 0.145,
            "metrics_consistent": true,
            "interrupted": null,
            "could_not_run": null,
        })
    }

    fn rows() -> Vec<DeviceRow> {
        vec![
            DeviceRow {
                id: 0,
                state: "ready",
                reason: None,
                ops: 600,
                failed: 0,
                retries: 0,
                restarts: 0,
            },
            DeviceRow {
                id: 1,
                state: "failed",
                reason: Some("sticky fault".into()),
                ops: 410,
                failed: 10,
                retries: 41,
                restarts: 1,
            },
        ]
    }

    #[test]
    fn a_run_summary_has_a_row_per_device_the_totals_and_where_the_report_is() {
        let text = run("run", &report(), &rows());
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "hipvisor run: sim backend, process isolation, 2 devices, 0.14 s"
        );
        assert_eq!(lines[1], "device  state            ops    failed   retries  restarts");
        assert_eq!(lines[2], "     0  ready            600         0         0         0");
        assert_eq!(
            lines[3],
            "     1  failed           410        10        41         1  (sticky fault)"
        );
        assert_eq!(lines[4], " total                  1010        10        41         1");
        assert_eq!(
            lines[5],
            "ops: 1010 submitted, 1000 succeeded, 10 failed, 0 missing replies, 0 wrong results"
        );
        assert_eq!(lines[6], "retries: 41 (40 succeeded, 1 exhausted)");
        assert_eq!(lines[7], "latency: p50 118 us, p99 210 us; 6977 ops/s");
        assert_eq!(lines[8], "result: ok");
        assert_eq!(lines[9], FULL_REPORT);
        assert_eq!(lines.len(), 10, "{text}");
    }

    #[test]
    fn the_verdict_names_every_failure_and_a_signal() {
        let mut r = report();
        r["ops"]["missing_replies"] = json!(2);
        r["metrics_consistent"] = json!(false);
        r["could_not_run"] = json!("no op succeeded");
        r["violations"] = json!(["device 1 ended failed (sticky fault)"]);
        let text = run("chaos", &r, &rows());
        assert!(
            text.contains(
                "result: FAILED: could not run: no op succeeded; 2 replies missing; the metrics disagree with \
                 what the application observed; violation: device 1 ended failed (sticky fault)\n"
            ),
            "{text}"
        );
        let mut r = report();
        r["interrupted"] = json!("SIGINT");
        assert!(run("run", &r, &rows()).contains("result: interrupted by SIGINT"));
        let mut r = report();
        r["violations"] = json!([]);
        assert!(run("chaos", &r, &rows()).contains("result: ok, no violation\n"));
    }

    #[test]
    fn a_reason_several_devices_share_is_written_once() {
        let mut devices = rows();
        devices.push(DeviceRow {
            id: 2,
            ..devices[1].clone()
        });
        let text = run("run", &report(), &devices);
        assert_eq!(text.matches("(sticky fault)").count(), 1, "{text}");
        assert!(text.contains("         1  (as device 1)\n"), "{text}");
    }

    #[test]
    fn device_rows_count_each_device_s_ops_and_failures_from_the_snapshot() {
        use hipvisor::DeviceState;
        use hipvisor::metrics::{DeviceSnapshot, OpCount};
        let device = |id, state, restarts| DeviceSnapshot {
            id,
            state,
            reason: None,
            restarts,
            retries: 3 * restarts,
            breaker: hipvisor::core::BreakerState::Closed,
            durable_bytes: 0,
        };
        let count = |device, outcome, count| OpCount {
            device,
            op: hipvisor::OpKind::Alloc,
            outcome,
            count,
        };
        let snapshot = Snapshot {
            devices: vec![device(0, DeviceState::Ready, 0), device(1, DeviceState::Lost, 2)],
            ops: vec![
                count(0, Outcome::Success, 5),
                count(1, Outcome::Success, 7),
                count(1, Outcome::Transient, 2),
                count(1, Outcome::DeviceLost, 1),
            ],
            ..Snapshot::default()
        };
        let rows = device_rows(&snapshot);
        assert_eq!(
            (rows[0].ops, rows[0].failed, rows[0].retries, rows[0].restarts),
            (5, 0, 0, 0)
        );
        assert_eq!(
            (rows[1].ops, rows[1].failed, rows[1].retries, rows[1].restarts),
            (10, 3, 6, 2)
        );
        assert_eq!(rows[1].state, "lost");
    }

    #[test]
    fn a_bench_summary_has_a_row_per_measurement_and_the_ratios() {
        let report = json!({
            "backend": "sim", "cores": 16, "ops_per_measurement": 2000, "h2d_bytes": 2 << 20, "repetitions": 1,
            "results": [
                {"name": "direct_null", "ns_per_op": {"median": 51.25, "min": 50.0, "max": 1234.5}},
                {"name": "runtime_thread_h2d", "gbps": {"median": 9.5, "min": 9.0, "max": 10.0}},
            ],
            "derived": {"runtime_thread_h2d / direct_h2d": 0.95},
        });
        let text = bench(&report);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines[0],
            "hipvisor bench: sim backend, 16 cores, 1 repetitions of 2000 ops, h2d 2 MiB"
        );
        assert_eq!(lines[2], "direct_null           51.2 ns/op  50.0 – 1234 ns/op");
        assert_eq!(lines[3], "runtime_thread_h2d    9.500 GB/s  9.000 – 10.0 GB/s");
        assert_eq!(lines[4], "derived:");
        assert_eq!(lines[5], "  runtime_thread_h2d / direct_h2d  0.950");
        assert_eq!(*lines.last().unwrap(), FULL_REPORT);
    }
}
