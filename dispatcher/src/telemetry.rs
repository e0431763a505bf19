//! The one place the dispatcher emits metrics: a named function per event (like Vector's
//! `internal_events`), and the Prometheus recorder that renders them.
//!
//! Every metric is prefixed `weir_` and carries only bounded labels: `function` (from the
//! config), `broker`, `outcome`, `reason`, `kind`, `direction`, `status_class` (each a
//! `&'static str` from a fixed set). Never a subject, topic, key or event id: those go to
//! logs and traces. Units are base units (seconds); counters end in `_total`.
//!
//! Histograms are rendered as real Prometheus histograms with explicit buckets (not the
//! exporter's default summaries, which cannot be aggregated across dispatchers).
//!
//! This module does not serve HTTP (the `/metrics` route renders [`PrometheusHandle`]) and
//! does not emit tracing spans.

use std::sync::OnceLock;
use std::time::Duration;

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Counter,
    Histogram, Unit,
};
use metrics_exporter_prometheus::{BuildError, Matcher, PrometheusBuilder, PrometheusHandle};

pub const EVENTS_RECEIVED: &str = "weir_events_received_total";
pub const INVOCATIONS: &str = "weir_invocations_total";
pub const INVOCATION_DURATION: &str = "weir_invocation_duration_seconds";
pub const RETRIES: &str = "weir_retries_total";
pub const DEAD_LETTERS: &str = "weir_dead_letters_total";
pub const DLQ_PUBLISH_FAILURES: &str = "weir_dlq_publish_failures_total";
pub const DEAD_LETTERS_SHRUNK: &str = "weir_dead_letters_shrunk_total";
pub const LANE_PAUSED: &str = "weir_lane_paused";
pub const REDRIVES_PASSED_OVER: &str = "weir_redrives_passed_over_total";
pub const OUTPUTS_PUBLISHED: &str = "weir_outputs_published_total";
pub const OUTPUT_PUBLISH_FAILURES: &str = "weir_output_publish_failures_total";
pub const INSTANCE_STARTS: &str = "weir_instance_starts_total";
pub const INSTANCE_START_DURATION: &str = "weir_instance_start_duration_seconds";
pub const INSTANCES_DISCARDED: &str = "weir_instances_discarded_total";
pub const INSTANCES: &str = "weir_instances";
pub const INSTANCES_DESIRED: &str = "weir_instances_desired";
pub const CONSUMER_LAG: &str = "weir_consumer_lag";
pub const SCALE_EVENTS: &str = "weir_scale_events_total";
pub const UNDECODABLE_EVENTS: &str = "weir_undecodable_events_total";
pub const HTTP_INGRESS_REQUESTS: &str = "weir_http_ingress_requests_total";
pub const BUILD_INFO: &str = "weir_build_info";

/// Every metric name this module emits (for the dashboard test: a panel may only query these).
pub const METRIC_NAMES: &[&str] = &[
    EVENTS_RECEIVED,
    INVOCATIONS,
    INVOCATION_DURATION,
    RETRIES,
    DEAD_LETTERS,
    DLQ_PUBLISH_FAILURES,
    DEAD_LETTERS_SHRUNK,
    LANE_PAUSED,
    REDRIVES_PASSED_OVER,
    OUTPUTS_PUBLISHED,
    OUTPUT_PUBLISH_FAILURES,
    INSTANCE_STARTS,
    INSTANCE_START_DURATION,
    INSTANCES_DISCARDED,
    INSTANCES,
    INSTANCES_DESIRED,
    CONSUMER_LAG,
    SCALE_EVENTS,
    UNDECODABLE_EVENTS,
    HTTP_INGRESS_REQUESTS,
    BUILD_INFO,
];

/// Invocations range from a warm call (microseconds) to the longest sensible timeout.
pub const INVOCATION_DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0,
];

/// Instantiating from a cached `InstancePre` takes tens of microseconds; a cold path more.
pub const INSTANCE_START_BUCKETS: &[f64] = &[
    0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0,
];

/// How often histogram samples are folded in when nobody scrapes, so memory stays bounded.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("installing the Prometheus metrics recorder: {0}")]
    Install(String),
}

/// The Prometheus recorder with Weir's buckets, not yet installed.
pub fn prometheus_builder() -> Result<PrometheusBuilder, BuildError> {
    PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(INVOCATION_DURATION.to_owned()),
            INVOCATION_DURATION_BUCKETS,
        )?
        .set_buckets_for_metric(
            Matcher::Full(INSTANCE_START_DURATION.to_owned()),
            INSTANCE_START_BUCKETS,
        )
}

/// Installs the process-wide Prometheus recorder, describes every metric and returns a handle
/// to render `/metrics`. Idempotent: later calls return the same handle (or the same error).
/// Starts a background thread that runs the exporter's upkeep every few seconds.
pub fn install_prometheus() -> Result<PrometheusHandle, TelemetryError> {
    static INSTALLED: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();
    let installed = INSTALLED.get_or_init(|| {
        let handle = prometheus_builder()
            .and_then(PrometheusBuilder::install_recorder)
            .map_err(|err| err.to_string())?;
        describe_metrics();
        build_info();
        let upkeep = handle.clone();
        std::thread::Builder::new()
            .name("weir-metrics-upkeep".to_owned())
            .spawn(move || loop {
                std::thread::sleep(UPKEEP_INTERVAL);
                upkeep.run_upkeep();
            })
            .map_err(|err| format!("starting the metrics upkeep thread: {err}"))?;
        Ok(handle)
    });
    installed.clone().map_err(TelemetryError::Install)
}

/// Registers help texts and units with the current recorder.
pub fn describe_metrics() {
    describe_counter!(
        EVENTS_RECEIVED,
        Unit::Count,
        "Events received from a broker, per function."
    );
    describe_counter!(
        INVOCATIONS,
        Unit::Count,
        "Function invocations by outcome (ok, retry, reject, trap, timeout, ...)."
    );
    describe_histogram!(
        INVOCATION_DURATION,
        Unit::Seconds,
        "Duration of one function invocation."
    );
    describe_counter!(
        RETRIES,
        Unit::Count,
        "Retries scheduled after a transient failure."
    );
    describe_counter!(
        DEAD_LETTERS,
        Unit::Count,
        "Events written to the dead-letter queue, by reason."
    );
    describe_counter!(
        DLQ_PUBLISH_FAILURES,
        Unit::Count,
        "Failed attempts to write a dead-letter record (the source event stays unacknowledged)."
    );
    describe_counter!(
        DEAD_LETTERS_SHRUNK,
        Unit::Count,
        "Dead-letter records their broker refused as too large, written again without the original's data or extensions (by what was dropped)."
    );
    describe_counter!(
        REDRIVES_PASSED_OVER,
        Unit::Count,
        "Redriven messages sent back to another function on the same topic, acknowledged without running this one."
    );
    describe_gauge!(
        LANE_PAUSED,
        Unit::Count,
        "Lanes of a function currently paused because the dead-letter queue is unavailable."
    );
    describe_counter!(
        OUTPUTS_PUBLISHED,
        Unit::Count,
        "Output events published and confirmed."
    );
    describe_counter!(
        OUTPUT_PUBLISH_FAILURES,
        Unit::Count,
        "Output events whose publish failed."
    );
    describe_counter!(INSTANCE_STARTS, Unit::Count, "Function instances started.");
    describe_histogram!(
        INSTANCE_START_DURATION,
        Unit::Seconds,
        "Time to create a function instance (Store + instantiate)."
    );
    describe_counter!(
        INSTANCES_DISCARDED,
        Unit::Count,
        "Function instances dropped, by reason (trap, timeout, limit, recycled, idle, ...)."
    );
    describe_gauge!(
        INSTANCES,
        Unit::Count,
        "Function instances currently alive."
    );
    describe_gauge!(
        INSTANCES_DESIRED,
        Unit::Count,
        "Function instances the autoscaler wants."
    );
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "Messages waiting or in flight for a function's trigger."
    );
    describe_counter!(
        SCALE_EVENTS,
        Unit::Count,
        "Autoscaler decisions, by direction (up, down)."
    );
    describe_counter!(
        UNDECODABLE_EVENTS,
        Unit::Count,
        "Messages that did not decode, by kind of error."
    );
    describe_counter!(
        HTTP_INGRESS_REQUESTS,
        Unit::Count,
        "HTTP ingress requests, by status class (2xx, 4xx, 5xx)."
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which Weir version runs."
    );
}

/// `weir_build_info{version} 1`.
pub fn build_info() {
    gauge!(BUILD_INFO, "version" => env!("CARGO_PKG_VERSION")).set(1.0);
}

/// Handles of the metrics every event of one function touches, registered once: looking a
/// labelled metric up by name (building its labels, hashing them) costs more than the rest
/// of a no-op event's bookkeeping. Failures and rarer events go through the functions below.
/// Create it after the recorder is installed, or its handles record nothing.
#[derive(Clone)]
pub struct FunctionMetrics {
    received: Counter,
    succeeded: Counter,
    duration: Histogram,
    outputs: Counter,
}

impl std::fmt::Debug for FunctionMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FunctionMetrics").finish_non_exhaustive()
    }
}

impl FunctionMetrics {
    /// `broker` is the function's trigger broker.
    pub fn new(function: &str, broker: &'static str) -> Self {
        Self {
            received: counter!(EVENTS_RECEIVED, "function" => function.to_owned(), "broker" => broker),
            succeeded: counter!(INVOCATIONS, "function" => function.to_owned(), "outcome" => "success"),
            duration: histogram!(INVOCATION_DURATION, "function" => function.to_owned()),
            outputs: counter!(OUTPUTS_PUBLISHED, "function" => function.to_owned()),
        }
    }

    /// A message arrived on the trigger.
    pub fn event_received(&self) {
        self.received.increment(1);
    }

    /// An invocation succeeded after `duration`.
    pub fn invocation_succeeded(&self, duration: Duration) {
        self.succeeded.increment(1);
        self.duration.record(duration.as_secs_f64());
    }

    /// `count` outputs of one invocation were confirmed by their broker.
    pub fn outputs_published(&self, count: u64) {
        self.outputs.increment(count);
    }
}

/// An invocation ended with `outcome`, after `duration`.
pub fn invocation_finished(function: &str, outcome: &'static str, duration: Duration) {
    counter!(INVOCATIONS, "function" => function.to_owned(), "outcome" => outcome).increment(1);
    histogram!(INVOCATION_DURATION, "function" => function.to_owned())
        .record(duration.as_secs_f64());
}

/// A transient failure will be retried.
pub fn retry_scheduled(function: &str, broker: &'static str) {
    counter!(RETRIES, "function" => function.to_owned(), "broker" => broker).increment(1);
}

/// An event's dead-letter record was confirmed written, for `reason`.
pub fn dead_lettered(function: &str, reason: &'static str) {
    counter!(DEAD_LETTERS, "function" => function.to_owned(), "reason" => reason).increment(1);
}

/// Writing a dead-letter record failed (it will be tried again; nothing is acknowledged).
pub fn dead_letter_publish_failed(function: &str) {
    counter!(DLQ_PUBLISH_FAILURES, "function" => function.to_owned()).increment(1);
}

/// A dead-letter record was too large for its broker and is written again without the
/// original's `dropped` (`data` or `extensions`).
pub fn dead_letter_shrunk(function: &str, dropped: &'static str) {
    counter!(DEAD_LETTERS_SHRUNK, "function" => function.to_owned(), "dropped" => dropped)
        .increment(1);
}

/// A message `weir dlq redrive` sent back to another function on this function's trigger
/// topic: acknowledged here without running, as this function had handled it already.
pub fn redrive_passed_over(function: &str) {
    counter!(REDRIVES_PASSED_OVER, "function" => function.to_owned()).increment(1);
}

/// A lane paused (`true`) or resumed (`false`). The gauge counts paused lanes, so each pause
/// must be followed by exactly one resume.
pub fn lane_paused(function: &str, paused: bool) {
    let gauge = gauge!(LANE_PAUSED, "function" => function.to_owned());
    if paused {
        gauge.increment(1.0);
    } else {
        gauge.decrement(1.0);
    }
}

/// Publishing an output failed.
pub fn output_publish_failed(function: &str) {
    counter!(OUTPUT_PUBLISH_FAILURES, "function" => function.to_owned()).increment(1);
}

/// A new instance was created in `duration`.
pub fn instance_started(function: &str, duration: Duration) {
    counter!(INSTANCE_STARTS, "function" => function.to_owned()).increment(1);
    histogram!(INSTANCE_START_DURATION, "function" => function.to_owned())
        .record(duration.as_secs_f64());
}

/// An instance was dropped for `reason`.
pub fn instance_discarded(function: &str, reason: &'static str) {
    counter!(INSTANCES_DISCARDED, "function" => function.to_owned(), "reason" => reason)
        .increment(1);
}

/// Current and desired instance counts.
pub fn instances(function: &str, current: usize, desired: usize) {
    gauge!(INSTANCES, "function" => function.to_owned()).set(current as f64);
    gauge!(INSTANCES_DESIRED, "function" => function.to_owned()).set(desired as f64);
}

/// The trigger's lag, as sampled by the autoscaler.
pub fn consumer_lag(function: &str, broker: &'static str, lag: u64) {
    gauge!(CONSUMER_LAG, "function" => function.to_owned(), "broker" => broker).set(lag as f64);
}

/// The autoscaler changed the slot count (`direction` is `up` or `down`).
pub fn scale_event(function: &str, direction: &'static str) {
    counter!(SCALE_EVENTS, "function" => function.to_owned(), "direction" => direction)
        .increment(1);
}

/// A message did not decode; `kind` is the decode error's kind.
pub fn undecodable(function: &str, kind: &'static str) {
    counter!(UNDECODABLE_EVENTS, "function" => function.to_owned(), "kind" => kind).increment(1);
}

/// An HTTP ingress request finished with `status`; only its class is a label.
pub fn http_ingress(status: u16) {
    let class = match status {
        100..=199 => "1xx",
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        500..=599 => "5xx",
        _ => "other",
    };
    counter!(HTTP_INGRESS_REQUESTS, "status_class" => class).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `emit` against a private recorder and returns the rendered scrape.
    fn render_with(emit: impl FnOnce()) -> String {
        let recorder = prometheus_builder().unwrap().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            describe_metrics();
            emit();
        });
        handle.render()
    }

    fn assert_has(rendered: &str, line: &str) {
        assert!(
            rendered.lines().any(|l| l == line),
            "missing line {line:?} in:\n{rendered}"
        );
    }

    #[test]
    fn counters_render_with_bounded_labels() {
        let out = render_with(|| {
            let hot = FunctionMetrics::new("f", "kafka");
            hot.event_received();
            hot.event_received();
            hot.invocation_succeeded(Duration::from_millis(1));
            retry_scheduled("f", "jetstream");
            dead_lettered("f", "rejected");
            dead_letter_publish_failed("f");
            hot.outputs_published(3);
            hot.outputs_published(2);
            output_publish_failed("f");
            instance_discarded("f", "trap");
            scale_event("f", "up");
            undecodable("f", "json");
            http_ingress(202);
            http_ingress(404);
            http_ingress(503);
        });
        assert_has(
            &out,
            r#"weir_events_received_total{function="f",broker="kafka"} 2"#,
        );
        assert_has(
            &out,
            r#"weir_retries_total{function="f",broker="jetstream"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_dead_letters_total{function="f",reason="rejected"} 1"#,
        );
        assert_has(&out, r#"weir_dlq_publish_failures_total{function="f"} 1"#);
        assert_has(&out, r#"weir_outputs_published_total{function="f"} 5"#);
        assert_has(
            &out,
            r#"weir_output_publish_failures_total{function="f"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_instances_discarded_total{function="f",reason="trap"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_scale_events_total{function="f",direction="up"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_undecodable_events_total{function="f",kind="json"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_http_ingress_requests_total{status_class="2xx"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_http_ingress_requests_total{status_class="4xx"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_http_ingress_requests_total{status_class="5xx"} 1"#,
        );
        assert_has(&out, "# TYPE weir_events_received_total counter");
        assert!(out.contains("# HELP weir_dead_letters_total "), "{out}");
    }

    #[test]
    fn gauges_track_state() {
        let out = render_with(|| {
            instances("g", 3, 5);
            instances("g", 2, 4);
            consumer_lag("g", "memory", 42);
            lane_paused("g", true);
            lane_paused("g", true);
            lane_paused("g", false);
            build_info();
        });
        assert_has(&out, r#"weir_instances{function="g"} 2"#);
        assert_has(&out, r#"weir_instances_desired{function="g"} 4"#);
        assert_has(
            &out,
            r#"weir_consumer_lag{function="g",broker="memory"} 42"#,
        );
        assert_has(&out, r#"weir_lane_paused{function="g"} 1"#);
        assert_has(&out, "# TYPE weir_instances gauge");
        assert_has(
            &out,
            &format!(
                r#"weir_build_info{{version="{}"}} 1"#,
                env!("CARGO_PKG_VERSION")
            ),
        );
    }

    #[test]
    fn histograms_render_as_histograms_with_explicit_buckets() {
        let out = render_with(|| {
            invocation_finished("h", "ok", Duration::from_micros(300));
            invocation_finished("h", "timeout", Duration::from_secs(12));
            instance_started("h", Duration::from_micros(20));
        });
        assert_has(
            &out,
            r#"weir_invocations_total{function="h",outcome="ok"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_invocations_total{function="h",outcome="timeout"} 1"#,
        );
        assert_has(&out, "# TYPE weir_invocation_duration_seconds histogram");
        assert_has(
            &out,
            r#"weir_invocation_duration_seconds_bucket{function="h",le="0.0001"} 0"#,
        );
        assert_has(
            &out,
            r#"weir_invocation_duration_seconds_bucket{function="h",le="0.0005"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_invocation_duration_seconds_bucket{function="h",le="10"} 1"#,
        );
        assert_has(
            &out,
            r#"weir_invocation_duration_seconds_bucket{function="h",le="30"} 2"#,
        );
        assert_has(
            &out,
            r#"weir_invocation_duration_seconds_bucket{function="h",le="+Inf"} 2"#,
        );
        assert_has(
            &out,
            r#"weir_invocation_duration_seconds_count{function="h"} 2"#,
        );
        assert_has(&out, r#"weir_instance_starts_total{function="h"} 1"#);
        assert_has(
            &out,
            "# TYPE weir_instance_start_duration_seconds histogram",
        );
        assert_has(
            &out,
            r#"weir_instance_start_duration_seconds_bucket{function="h",le="0.00001"} 0"#,
        );
        assert_has(
            &out,
            r#"weir_instance_start_duration_seconds_bucket{function="h",le="0.000025"} 1"#,
        );
        assert!(
            !out.contains("quantile="),
            "histograms must not render as summaries:\n{out}"
        );
    }

    #[test]
    fn every_metric_has_help_text() {
        let out = render_with(|| {
            let hot = FunctionMetrics::new("d", "memory");
            hot.event_received();
            hot.invocation_succeeded(Duration::from_millis(1));
            invocation_finished("d", "trap", Duration::from_millis(1));
            retry_scheduled("d", "memory");
            dead_lettered("d", "expired");
            dead_letter_publish_failed("d");
            dead_letter_shrunk("d", "data");
            redrive_passed_over("d");
            lane_paused("d", true);
            hot.outputs_published(1);
            output_publish_failed("d");
            instance_started("d", Duration::from_millis(1));
            instance_discarded("d", "idle");
            instances("d", 1, 1);
            consumer_lag("d", "memory", 0);
            scale_event("d", "down");
            undecodable("d", "json");
            http_ingress(200);
            build_info();
        });
        for name in METRIC_NAMES {
            assert!(
                out.contains(&format!("# HELP {name} ")),
                "no help for {name}:\n{out}"
            );
            assert!(
                out.contains(&format!("# TYPE {name} ")),
                "{name} not emitted:\n{out}"
            );
        }
    }

    #[test]
    fn installing_twice_returns_the_same_recorder() {
        let first = install_prometheus().unwrap();
        let second = install_prometheus().unwrap();
        FunctionMetrics::new("installed-twice", "nats").event_received();
        let rendered = second.render();
        assert!(
            rendered.contains(
                r#"weir_events_received_total{function="installed-twice",broker="nats"} 1"#
            ),
            "{rendered}"
        );
        assert!(first.render().contains("installed-twice"));
    }
}
