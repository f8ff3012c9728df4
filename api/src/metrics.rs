//! `/metrics` in the Prometheus text format: HTTP requests (counted by a
//! middleware, per method, route template and status, with total latency),
//! and, read from PostgreSQL at scrape time, runs by state, queue depth (due,
//! unleased runs per queue), clusters by state and step durations over the
//! last hour. Scrape-time reads keep the figures true across every API and
//! worker process without a push path.

use std::{collections::BTreeMap, fmt::Write as _, sync::Mutex, time::Instant};

use axum::{
    extract::{MatchedPath, Request, State},
    http::header,
    middleware::Next,
    response::{IntoResponse, Response},
};
use sqlx::Row;

use crate::{app::AppState, error::ApiResult};

/// (method, route template, status).
type RequestKey = (String, String, u16);
/// (count, total seconds).
type RequestStats = (u64, f64);

#[derive(Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<RequestKey, RequestStats>>,
}

impl Metrics {
    pub fn record(&self, method: &str, route: &str, status: u16, secs: f64) {
        if let Ok(mut m) = self.requests.lock() {
            let e = m
                .entry((method.to_owned(), route.to_owned(), status))
                .or_default();
            e.0 += 1;
            e.1 += secs;
        }
    }

    fn snapshot(&self) -> Vec<(RequestKey, RequestStats)> {
        self.requests
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), *v)).collect())
            .unwrap_or_default()
    }
}

/// Count every request by its route template (`/v1/tasks/{id}`), never the raw path.
pub async fn track(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_owned())
        .unwrap_or_else(|| "unmatched".into());
    let res = next.run(req).await;
    state.0.metrics.record(
        &method,
        &route,
        res.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    res
}

fn esc(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub async fn handler(State(state): State<AppState>) -> ApiResult<Response> {
    let app = &state.0;
    let mut out = String::new();
    out.push_str("# HELP orrery_http_requests_total HTTP requests served, by route template and status.\n# TYPE orrery_http_requests_total counter\n");
    let snap = app.metrics.snapshot();
    for ((m, r, s), (n, _)) in &snap {
        let _ = writeln!(
            out,
            "orrery_http_requests_total{{method=\"{m}\",route=\"{}\",status=\"{s}\"}} {n}",
            esc(r)
        );
    }
    out.push_str("# HELP orrery_http_request_duration_seconds Time spent serving requests.\n# TYPE orrery_http_request_duration_seconds summary\n");
    let mut by_route: BTreeMap<(String, String), (u64, f64)> = BTreeMap::new();
    for ((m, r, _), (n, secs)) in &snap {
        let e = by_route.entry((m.clone(), r.clone())).or_default();
        e.0 += n;
        e.1 += secs;
    }
    for ((m, r), (n, secs)) in &by_route {
        let _ = writeln!(
            out,
            "orrery_http_request_duration_seconds_sum{{method=\"{m}\",route=\"{}\"}} {secs}",
            esc(r)
        );
        let _ = writeln!(
            out,
            "orrery_http_request_duration_seconds_count{{method=\"{m}\",route=\"{}\"}} {n}",
            esc(r)
        );
    }

    out.push_str("# HELP orrery_runs Workflow runs by state.\n# TYPE orrery_runs gauge\n");
    let rows = sqlx::query("SELECT state, count(*) AS n FROM runs GROUP BY state ORDER BY state")
        .fetch_all(&app.pool)
        .await?;
    let mut seen = std::collections::HashSet::new();
    for r in &rows {
        let s: String = r.try_get("state")?;
        let _ = writeln!(
            out,
            "orrery_runs{{state=\"{s}\"}} {}",
            r.try_get::<i64, _>("n")?
        );
        seen.insert(s);
    }
    for s in orrery_workflows::RunState::ALL {
        if !seen.contains(s.as_str()) {
            let _ = writeln!(out, "orrery_runs{{state=\"{s}\"}} 0");
        }
    }

    out.push_str("# HELP orrery_queue_depth Runs due on each queue and held by no worker.\n# TYPE orrery_queue_depth gauge\n");
    let rows = sqlx::query(
        "SELECT queue, count(*) AS n FROM runs
         WHERE state NOT IN ('succeeded', 'failed', 'cancelled')
           AND (lease_until IS NULL OR lease_until < now())
           AND (wake_at IS NULL OR wake_at <= now())
         GROUP BY queue ORDER BY queue",
    )
    .fetch_all(&app.pool)
    .await?;
    for r in &rows {
        let _ = writeln!(
            out,
            "orrery_queue_depth{{queue=\"{}\"}} {}",
            esc(&r.try_get::<String, _>("queue")?),
            r.try_get::<i64, _>("n")?
        );
    }

    out.push_str("# HELP orrery_clusters Clusters by state.\n# TYPE orrery_clusters gauge\n");
    let rows =
        sqlx::query("SELECT state, count(*) AS n FROM clusters GROUP BY state ORDER BY state")
            .fetch_all(&app.pool)
            .await?;
    for r in &rows {
        let _ = writeln!(
            out,
            "orrery_clusters{{state=\"{}\"}} {}",
            r.try_get::<String, _>("state")?,
            r.try_get::<i64, _>("n")?
        );
    }

    out.push_str("# HELP orrery_step_duration_seconds Durations of steps finished in the last hour.\n# TYPE orrery_step_duration_seconds summary\n");
    let rows = sqlx::query(
        "SELECT r.workflow, s.step, count(*) AS n,
                sum(extract(epoch FROM s.finished_at - s.started_at))::float8 AS total,
                percentile_cont(0.5) WITHIN GROUP (ORDER BY extract(epoch FROM s.finished_at - s.started_at))::float8 AS p50,
                percentile_cont(0.95) WITHIN GROUP (ORDER BY extract(epoch FROM s.finished_at - s.started_at))::float8 AS p95
         FROM step_checkpoints s JOIN runs r ON r.id = s.run_id
         WHERE s.finished_at > now() - interval '1 hour' AND s.started_at IS NOT NULL
         GROUP BY r.workflow, s.step ORDER BY r.workflow, s.step",
    )
    .fetch_all(&app.pool)
    .await?;
    for r in &rows {
        let labels = format!(
            "workflow=\"{}\",step=\"{}\"",
            esc(&r.try_get::<String, _>("workflow")?),
            esc(&r.try_get::<String, _>("step")?)
        );
        let _ = writeln!(
            out,
            "orrery_step_duration_seconds{{{labels},quantile=\"0.5\"}} {}",
            r.try_get::<f64, _>("p50")?
        );
        let _ = writeln!(
            out,
            "orrery_step_duration_seconds{{{labels},quantile=\"0.95\"}} {}",
            r.try_get::<f64, _>("p95")?
        );
        let _ = writeln!(
            out,
            "orrery_step_duration_seconds_sum{{{labels}}} {}",
            r.try_get::<f64, _>("total")?
        );
        let _ = writeln!(
            out,
            "orrery_step_duration_seconds_count{{{labels}}} {}",
            r.try_get::<i64, _>("n")?
        );
    }
    Ok(([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out).into_response())
}
