//! Weir's HTTP surface: event ingress (the CloudEvents HTTP binding), the admin API, topic
//! history for `weir tail`, `/metrics` and `/healthz`.
//!
//! Ingress decodes before it publishes, so a malformed event is refused with a 400 that says
//! exactly what is wrong instead of reaching a function; what it publishes is the decoded
//! event in CloudEvents binary mode, so the id returned in the 202 is the id the function sees.
//! It does not run functions or decide anything about delivery.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering as AtomicOrdering;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::rejection::{BytesRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use weir_broker_bridge::{BrokerKind, TransportError};
use weir_schemas::{Event, Format, WireMessage};

use crate::ingress;
use crate::runtime::Shared;
use crate::telemetry;

/// State shared by the handlers.
#[derive(Clone)]
pub struct AppState {
    pub shared: Arc<Shared>,
    pub metrics: PrometheusHandle,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState").finish_non_exhaustive()
    }
}

/// The router, with the body limit from the config.
pub fn router(state: AppState) -> Router {
    let max_body = state.shared.config.http.max_body.as_u64() as usize;
    Router::new()
        .route("/", get(crate::status::page))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/metrics", get(metrics))
        .route("/v1/functions", get(functions))
        .route("/v1/topics", get(topics))
        .route("/v1/topics/{topic}", post(publish))
        .route("/v1/topics/{topic}/events", get(events))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(state)
}

/// Serve until `shutdown` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: AppState,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(async move { shutdown.cancelled().await })
        .await
}

/// An error answer: a status and a reason a person can act on.
#[derive(Debug)]
struct Problem {
    status: StatusCode,
    kind: &'static str,
    message: String,
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        telemetry::http_ingress(self.status.as_u16());
        (
            self.status,
            Json(json!({ "error": self.message, "kind": self.kind })),
        )
            .into_response()
    }
}

async fn publish(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ingress::Accepted>), Problem> {
    check_topic(&topic)?;
    // axum's own rejection is plain text; an ingress client gets the same JSON problem (and
    // the same metric) for a body over the limit as for any other refusal.
    let body = body.map_err(|rejection| {
        let status = rejection.status();
        let message = if status == StatusCode::PAYLOAD_TOO_LARGE {
            format!(
                "the request body is over http.max_body ({})",
                state.shared.config.http.max_body
            )
        } else {
            rejection.body_text()
        };
        Problem {
            status,
            kind: "body",
            message,
        }
    })?;
    let mut wire_headers: Vec<(String, String)> = Vec::with_capacity(headers.len());
    for (name, value) in &headers {
        let value = value.to_str().map_err(|_| Problem {
            status: StatusCode::BAD_REQUEST,
            kind: "header",
            message: format!("header {name} is not valid UTF-8"),
        })?;
        wire_headers.push((name.as_str().to_owned(), value.to_owned()));
    }
    let events = ingress::decode_request(ingress::Entry::Http, &topic, &wire_headers, &body)
        .map_err(|e| Problem {
            status: StatusCode::BAD_REQUEST,
            kind: e.kind(),
            message: e.to_string(),
        })?;
    let (broker, publisher) = state.shared.ingress(&topic).map_err(|e| Problem {
        status: StatusCode::SERVICE_UNAVAILABLE,
        kind: "broker",
        message: format!("{e:#}"),
    })?;
    let accepted = ingress::publish(publisher.as_ref(), broker, &topic, events, None)
        .await
        .map_err(|e| match e {
            // The request's fault, not the broker's: sending it again fails again.
            TransportError::TooLarge { .. } => Problem {
                status: StatusCode::PAYLOAD_TOO_LARGE,
                kind: "too-large",
                message: e.to_string(),
            },
            e => Problem {
                status: StatusCode::SERVICE_UNAVAILABLE,
                kind: "publish",
                message: e.to_string(),
            },
        })?;
    telemetry::http_ingress(StatusCode::ACCEPTED.as_u16());
    Ok((StatusCode::ACCEPTED, Json(accepted)))
}

fn check_topic(topic: &str) -> Result<(), Problem> {
    let valid = !topic.is_empty()
        && topic.len() <= 249
        && topic
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        && !topic.starts_with('.')
        && !topic.ends_with('.')
        && !topic.contains("..");
    if valid {
        Ok(())
    } else {
        Err(Problem {
            status: StatusCode::BAD_REQUEST,
            kind: "topic",
            message: format!(
                "invalid topic {topic:?}: use 1-249 characters of a-z, A-Z, 0-9, '.', '_' and '-', with no empty '.'-separated token"
            ),
        })
    }
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        state.metrics.render(),
    )
}

/// One function, as `GET /v1/functions` shows it.
#[derive(Debug, Serialize)]
pub struct FunctionView {
    pub name: String,
    pub module: String,
    pub module_sha256: String,
    pub triggers: Vec<TriggerView>,
    pub outputs: Vec<String>,
    pub output_broker: &'static str,
    pub dead_letter: DeadLetterView,
    pub instances: crate::pool::PoolStats,
    pub counters: BTreeMap<&'static str, u64>,
    pub dead_letter_paused: bool,
    pub recent_failures: Vec<crate::runner::RecentFailure>,
}

#[derive(Debug, Serialize)]
pub struct TriggerView {
    pub broker: &'static str,
    pub topic: String,
    pub group: String,
    pub ordering: weir_broker_bridge::Ordering,
}

#[derive(Debug, Serialize)]
pub struct DeadLetterView {
    pub broker: &'static str,
    pub topic: String,
}

async fn functions(State(state): State<AppState>) -> Json<Value> {
    let views: Vec<FunctionView> = state
        .shared
        .config
        .functions
        .iter()
        .filter_map(|config| {
            let runner = state.shared.function(&config.name)?;
            let c = &runner.counters;
            let counters = BTreeMap::from([
                ("received", c.received.load(AtomicOrdering::Relaxed)),
                ("succeeded", c.succeeded.load(AtomicOrdering::Relaxed)),
                ("failed", c.failed.load(AtomicOrdering::Relaxed)),
                ("retried", c.retried.load(AtomicOrdering::Relaxed)),
                (
                    "dead_lettered",
                    c.dead_lettered.load(AtomicOrdering::Relaxed),
                ),
                ("outputs", c.outputs.load(AtomicOrdering::Relaxed)),
            ]);
            Some(FunctionView {
                name: config.name.clone(),
                module: config.module.display().to_string(),
                module_sha256: runner.pool.module().sha256().to_owned(),
                triggers: vec![TriggerView {
                    broker: config.trigger.broker.as_str(),
                    topic: config.trigger.topic.clone(),
                    group: config.trigger.group.clone(),
                    ordering: config.trigger.ordering,
                }],
                outputs: config.outputs.clone(),
                output_broker: config.output_broker.as_str(),
                dead_letter: DeadLetterView {
                    broker: config.dead_letter.broker.as_str(),
                    topic: config.dead_letter.topic.clone(),
                },
                instances: runner.pool.stats(),
                counters,
                dead_letter_paused: c.dlq_paused.load(AtomicOrdering::Relaxed),
                recent_failures: runner.recent_failures(),
            })
        })
        .collect();
    Json(json!({ "functions": views }))
}

async fn topics(State(state): State<AppState>) -> Json<Value> {
    let topics: Vec<Value> = state
        .shared
        .memory
        .topics()
        .into_iter()
        .map(|t| json!({ "name": t.name, "last_seq": t.last_seq, "retained": t.retained }))
        .collect();
    Json(json!({ "broker": "memory", "topics": topics }))
}

#[derive(Debug, Deserialize)]
struct EventsQuery {
    /// Return events with a sequence greater than this (default: from the oldest retained).
    after: Option<u64>,
    /// At most this many messages (1 to 1,000; default 100).
    limit: Option<usize>,
    /// Long-poll: wait up to this long (at most 30 s) for a new event when none is available
    /// (e.g. `10s`).
    wait: Option<String>,
}

/// The retained history of a memory-bus topic, oldest first: what `weir tail` reads.
async fn events(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    query: Result<Query<EventsQuery>, QueryRejection>,
) -> Result<Json<Value>, Problem> {
    check_topic(&topic)?;
    let Query(query) = query.map_err(|rejection| Problem {
        status: StatusCode::BAD_REQUEST,
        kind: "query",
        message: rejection.body_text(),
    })?;
    // The memory bus would answer for any name with an empty history, and a `weir tail` would
    // wait on it for ever: say where the topic is instead.
    let broker = state.shared.topic_broker(&topic);
    if broker != BrokerKind::Memory {
        let flag = match broker {
            BrokerKind::Kafka => "--kafka BOOTSTRAP",
            _ => "--nats URL",
        };
        return Err(Problem {
            status: StatusCode::CONFLICT,
            kind: "broker",
            message: format!(
                "topic {topic} is on {} in this weir, not on its memory bus: read it there (weir tail {topic} {flag})",
                broker.as_str()
            ),
        });
    }
    // A page larger than the cap is only shortened: `next` says where to go on from.
    let limit = match query.limit {
        None => 100,
        Some(0) => {
            return Err(Problem {
                status: StatusCode::BAD_REQUEST,
                kind: "query",
                message: "limit=0: ask for 1 to 1000 events a page".to_owned(),
            })
        }
        Some(limit) => limit.min(1000),
    };
    let wait = match query.wait.as_deref() {
        None => Duration::ZERO,
        Some(text) => humantime::parse_duration(text).map_err(|e| Problem {
            status: StatusCode::BAD_REQUEST,
            kind: "query",
            message: format!("wait={text:?}: {e}"),
        })?,
    }
    .min(Duration::from_secs(30));
    let bus = &state.shared.memory;
    // From the oldest retained when no `after` is given (the bus's `None` would be the
    // newest page, and a tail would skip all but the last `limit`). Saturating: nothing
    // follows the largest sequence, and a client's `after` is not trusted.
    let from = Some(query.after.map_or(0, |after| after.saturating_add(1)));
    let mut watch = bus.watch(&topic);
    let mut stored = bus.history(&topic, from, limit);
    if stored.is_empty() && !wait.is_zero() {
        let deadline = tokio::time::Instant::now() + wait;
        while stored.is_empty() {
            match tokio::time::timeout_at(deadline, watch.recv()).await {
                Err(_) => break,
                Ok(Err(tokio::sync::broadcast::error::RecvError::Closed)) => break,
                Ok(_) => stored = bus.history(&topic, from, limit),
            }
        }
    }
    let next = stored.last().map(|m| m.seq).or(query.after).unwrap_or(0);
    let events: Vec<Value> = stored
        .iter()
        .map(|m| {
            let origin = format!("memory://{topic}/{}", m.seq);
            let source = weir_schemas::wire::default_source("memory", &topic);
            let wire = WireMessage {
                headers: &m.headers,
                payload: Some(&m.payload),
                key: m.key.as_deref(),
                origin: &origin,
                default_source: &source,
            };
            let event = match weir_schemas::decode(&wire, Format::Auto) {
                Ok(events) => events
                    .into_iter()
                    .map(|e| event_json(&e))
                    .collect::<Vec<_>>(),
                Err(e) => vec![json!({ "undecodable": e.to_string() })],
            };
            json!({ "seq": m.seq, "events": event })
        })
        .collect();
    Ok(Json(
        json!({ "topic": topic, "next": next, "messages": events }),
    ))
}

/// An event as JSON for people: structured mode, with Weir's typed MessagePack payloads
/// shown decoded.
pub fn event_json(event: &Event) -> Value {
    let mut value: Value = serde_json::from_slice(&weir_schemas::encode_structured(event))
        .unwrap_or_else(|e| json!({ "id": event.id, "error": e.to_string() }));
    let typed = match event.ty.as_str() {
        weir_schemas::DB_CHANGE_TYPE => event
            .db_change()
            .ok()
            .and_then(|c| serde_json::to_value(c).ok()),
        weir_schemas::UPLOAD_TYPE => event
            .upload()
            .ok()
            .and_then(|u| serde_json::to_value(u).ok()),
        _ => None,
    };
    if let (Some(typed), Some(object)) = (typed, value.as_object_mut()) {
        object.remove("data_base64");
        object.insert("data".to_owned(), typed);
    }
    value
}
