//! `orrery-api`: serves the REST API on `ORRERY_API_ADDR` (default 127.0.0.1:8080).
//! Configuration: the engine's `ORRERY_*` variables plus the API's own
//! (`ORRERY_CLUSTER_WORKFLOWS`, `ORRERY_PROVIDER`, `ORRERY_LOCAL_CAPACITY`,
//! `ORRERY_DEFAULT_QUOTA`, `ORRERY_MAX_CLUSTER_SIZE`; see `app.rs`).

use anyhow::Context;
use orrery_api::ApiConfig;
use orrery_workflows::{config, telemetry, EngineConfig};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init();
    let cfg = EngineConfig::from_env()?;
    let api_cfg = ApiConfig::from_env()?;
    let addr: std::net::SocketAddr = config::var("ORRERY_API_ADDR", "127.0.0.1:8080".parse()?)?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let app = orrery_api::app::App::connect(cfg, api_cfg, shutdown.clone()).await?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("cannot listen on {addr}"))?;
    tracing::info!(%addr, "api listening");
    let s = shutdown.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! { _ = term.recv() => {}, _ = tokio::signal::ctrl_c() => {} }
        s.cancel();
    });
    orrery_api::serve_app(app, listener, shutdown).await?;
    Ok(())
}
