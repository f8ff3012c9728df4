//! `orrery-api`: serves the REST API on `ORRERY_API_ADDR` (default 127.0.0.1:8080).

use std::sync::Arc;

use anyhow::Context;
use orrery_workflows::{config, telemetry, EngineConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let cfg = EngineConfig::from_env()?;
    let addr: std::net::SocketAddr = config::var("ORRERY_API_ADDR", "127.0.0.1:8080".parse()?)?;
    let pool = config::connect_db(&cfg)
        .await
        .context("cannot connect to PostgreSQL (ORRERY_DATABASE_URL)")?;
    let redis = redis::Client::open(cfg.redis_url.as_str())
        .context("ORRERY_REDIS_URL is not a Redis URL")?
        .get_connection_manager()
        .await
        .context("cannot connect to Redis (ORRERY_REDIS_URL)")?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "api listening");
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        s.cancel();
    });
    orrery_api::serve(
        Arc::new(orrery_api::App { pool, redis }),
        listener,
        shutdown,
    )
    .await?;
    Ok(())
}
