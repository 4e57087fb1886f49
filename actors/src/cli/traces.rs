//! `--otel-traces`: spans go through tracing-opentelemetry to the OpenTelemetry SDK and are
//! exported as JSON lines on stderr (never stdout, which carries `--json` output).

use std::io::Write;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::error::OTelSdkResult;
use opentelemetry_sdk::trace::{SdkTracerProvider, SpanData, SpanExporter};

/// Writes each finished span as one JSON line on stderr.
#[derive(Debug, Default)]
struct StderrExporter;

impl SpanExporter for StderrExporter {
    async fn export(&self, batch: Vec<SpanData>) -> OTelSdkResult {
        let mut err = std::io::stderr().lock();
        for s in batch {
            let attributes: serde_json::Map<String, serde_json::Value> = s
                .attributes
                .iter()
                .map(|kv| (kv.key.to_string(), kv.value.to_string().into()))
                .collect();
            let events: Vec<String> = s.events.iter().map(|e| e.name.to_string()).collect();
            let duration_us = s
                .end_time
                .duration_since(s.start_time)
                .map(|d| d.as_secs_f64() * 1e6)
                .unwrap_or(0.0);
            let line = serde_json::json!({
                "trace_id": s.span_context.trace_id().to_string(),
                "span_id": s.span_context.span_id().to_string(),
                "parent_span_id": s.parent_span_id.to_string(),
                "name": s.name,
                "duration_us": duration_us,
                "attributes": attributes,
                "events": events,
            });
            let _ = writeln!(err, "{line}");
        }
        Ok(())
    }
}

/// A tracer provider exporting to stderr, and the tracing layer that feeds it.
pub(crate) fn provider() -> SdkTracerProvider {
    SdkTracerProvider::builder()
        .with_simple_exporter(StderrExporter)
        .build()
}

/// The tracing layer for `provider`.
pub(crate) fn layer<S>(provider: &SdkTracerProvider) -> impl tracing_subscriber::Layer<S>
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    tracing_opentelemetry::layer().with_tracer(provider.tracer("hipvisor"))
}
