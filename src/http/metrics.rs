//! `/metrics` in the Prometheus text format (OpenMetrics, through `prometheus-client`) and
//! `/healthz`. Both answer without a token: bind the server to an address only the monitoring
//! can reach, or let the reverse proxy keep them inside.
//!
//! The figures about syncs, files, mail and deals are read from the store at each scrape, so they
//! are the same whichever process wrote them; only the HTTP request counts and the daemon's own
//! signs of life (its loop's heartbeat, its file watcher) live in memory. This module must not
//! change anything.

use std::sync::atomic::AtomicU64;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde_json::json;

use super::{with_store, ApiError, SharedState};
use crate::store::stats::Figures;
use crate::store::{parse_timestamp, StoreError};

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    method: String,
    route: String,
    status: String,
}

/// The HTTP requests served, by method, route pattern and status.
#[derive(Debug, Default)]
pub struct HttpMetrics {
    requests: Family<RequestLabels, Counter>,
}

impl HttpMetrics {
    pub fn count(&self, method: &str, route: &str, status: u16) {
        self.requests
            .get_or_create(&RequestLabels {
                method: method.to_string(),
                route: route.to_string(),
                status: status.to_string(),
            })
            .inc();
    }
}

type Labelled<M> = Family<Vec<(String, String)>, M>;
type FloatGauge = Gauge<f64, AtomicU64>;

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

/// Everything the store says, as a registry to encode.
/// Everything the store says, as a registry to encode; `unchanged_syncs` is the daemon's count of
/// syncs that changed nothing (`None` under `funnelsync serve`).
fn store_registry(
    figures: Figures,
    unchanged_syncs: Option<u64>,
    now: chrono::DateTime<chrono::Utc>,
) -> Result<Registry, StoreError> {
    let mut registry = Registry::default();
    // Runs of files (command-line edits, API edits and undos are runs too, but of no file): synced,
    // failed and held. A sync that changed nothing records no run; the daemon counts those.
    let syncs = Labelled::<Counter>::default();
    for result in ["synced", "failed", "held"] {
        syncs
            .get_or_create(&labels(&[("result", result)]))
            .inc_by(0);
    }
    for (result, count) in figures.syncs {
        syncs
            .get_or_create(&labels(&[("result", &result)]))
            .inc_by(count.max(0) as u64);
    }
    if let Some(unchanged) = unchanged_syncs {
        syncs
            .get_or_create(&labels(&[("result", "unchanged")]))
            .inc_by(unchanged);
    }
    registry.register(
        "funnelsync_syncs",
        "File syncs by result: synced, failed and held from the store's runs of this site; \
         unchanged counted by this daemon since it started",
        syncs,
    );

    let rows = Labelled::<Counter>::default();
    let totals = figures.rows;
    for (change, count) in [
        ("created", totals[0]),
        ("updated", totals[1]),
        ("archived", totals[2]),
        ("deleted", totals[3]),
    ] {
        rows.get_or_create(&labels(&[("change", change)]))
            .inc_by(count.max(0) as u64);
    }
    registry.register(
        "funnelsync_rows",
        "Rows applied to deals by file syncs, by change",
        rows,
    );

    let issues = Labelled::<Gauge>::default();
    for severity in ["error", "warning"] {
        issues
            .get_or_create(&labels(&[("severity", severity)]))
            .set(0);
    }
    for (severity, count) in figures.issues_by_severity {
        issues
            .get_or_create(&labels(&[("severity", &severity)]))
            .set(count);
    }
    registry.register(
        "funnelsync_row_issues",
        "Row errors and warnings of the latest sync of each file",
        issues,
    );

    let files = Labelled::<Gauge>::default();
    for state in ["ok", "retrying", "failed", "held", "removed", "ignored"] {
        files.get_or_create(&labels(&[("state", state)])).set(0);
    }
    for (state, count) in figures.files_by_state {
        files
            .get_or_create(&labels(&[("state", &state)]))
            .set(count);
    }
    registry.register(
        "funnelsync_files",
        "Source files by the daemon's state",
        files,
    );

    let ages = Labelled::<FloatGauge>::default();
    for (source, at) in figures.last_sync_by_source {
        if let Some(at) = at {
            let age = (now - parse_timestamp(&at)?).num_milliseconds() as f64 / 1000.0;
            ages.get_or_create(&labels(&[("source", &source)]))
                .set(age.max(0.0));
        }
    }
    registry.register(
        "funnelsync_last_successful_sync_age_seconds",
        "Seconds since a file of the source was last read whole",
        ages,
    );

    let outbox = Labelled::<Gauge>::default();
    for status in ["pending", "sent", "failed"] {
        outbox.get_or_create(&labels(&[("status", status)])).set(0);
    }
    for (status, count) in figures.outbox_by_status {
        outbox
            .get_or_create(&labels(&[("status", &status)]))
            .set(count);
    }
    registry.register(
        "funnelsync_outbox_messages",
        "Mail in the outbox, by status",
        outbox,
    );

    let reminders: Counter = Counter::default();
    reminders.inc_by(figures.reminders_sent.max(0) as u64);
    registry.register(
        "funnelsync_reminders_sent",
        "Stalled-deal reminders delivered",
        reminders,
    );

    let deals = Labelled::<Gauge>::default();
    for (stage, count) in figures.live_deals_by_stage {
        deals
            .get_or_create(&labels(&[("stage", &stage)]))
            .set(count);
    }
    registry.register("funnelsync_deals", "Live deals by stage", deals);
    Ok(registry)
}

/// `GET /metrics`.
pub async fn metrics(State(state): State<SharedState>) -> Response {
    let unchanged_syncs = state
        .daemon
        .as_ref()
        .map(|link| link.heartbeat.unchanged_syncs());
    let store_text = with_store(&state, move |store, _| {
        let registry = store_registry(
            crate::store::stats::figures(&store.db())?,
            unchanged_syncs,
            chrono::Utc::now(),
        )?;
        let mut text = String::new();
        prometheus_client::encoding::text::encode_registry(&mut text, &registry)
            .map_err(ApiError::internal)?;
        Ok(text)
    })
    .await;
    let mut http_registry = Registry::default();
    http_registry.register(
        "funnelsync_http_requests",
        "HTTP requests served, by method, route and status",
        state.metrics.requests.clone(),
    );
    // Only `funnelsync run` has a watcher: 1 while it watches every folder, 0 once it failed.
    if let Some(link) = &state.daemon {
        let up = match link.heartbeat.watcher() {
            super::WatcherHealth::Alive => Some(1),
            super::WatcherHealth::Failed(_) => Some(0),
            super::WatcherHealth::Polling => None,
        };
        if let Some(up) = up {
            let gauge: Gauge = Gauge::default();
            gauge.set(up);
            http_registry.register(
                "funnelsync_watcher_up",
                "Whether the file watcher watches every source folder (0: failed; rescans only)",
                gauge,
            );
        }
    }
    let mut text = match store_text {
        Ok(text) => text,
        Err(error) => return error.into_response(),
    };
    if let Err(error) =
        prometheus_client::encoding::text::encode_registry(&mut text, &http_registry)
    {
        return ApiError::internal(error).into_response();
    }
    if let Err(error) = prometheus_client::encoding::text::encode_eof(&mut text) {
        return ApiError::internal(error).into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        text,
    )
        .into_response()
}

/// How long the daemon's loop may be silent before `/healthz` says it is stuck.
const MAX_HEARTBEAT_AGE: i64 = 30;

/// `GET /healthz`: 200 when the store answers and (under `funnelsync run`) the daemon's loop is
/// alive and its file watcher works; 503 otherwise. The body says which part is wrong: `loop`
/// (ok, stalled, off), `watcher` (ok, polling, failed, off, with `watcher_error` saying why).
pub async fn healthz(State(state): State<SharedState>) -> Response {
    let store = with_store(&state, |store, _| {
        use crate::store::CrmStore;
        Ok(store.crm().version()?)
    })
    .await;
    let store_ok = store.is_ok();
    let (daemon_loop, watcher, watcher_error) = match &state.daemon {
        None => ("off", "off", None),
        Some(link) => {
            let daemon_loop = if link.heartbeat.age() <= MAX_HEARTBEAT_AGE {
                "ok"
            } else {
                "stalled"
            };
            match link.heartbeat.watcher() {
                super::WatcherHealth::Alive => (daemon_loop, "ok", None),
                super::WatcherHealth::Polling => (daemon_loop, "polling", None),
                super::WatcherHealth::Failed(why) => (daemon_loop, "failed", Some(why)),
            }
        }
    };
    let healthy = store_ok && daemon_loop != "stalled" && watcher != "failed";
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let mut body = json!({
        "status": if healthy { "ok" } else { "unhealthy" },
        "store": if store_ok { "ok" } else { "unreachable" },
        "loop": daemon_loop,
        "watcher": watcher,
    });
    if let Some(why) = watcher_error {
        body["watcher_error"] = json!(why);
    }
    (status, Json(body)).into_response()
}
