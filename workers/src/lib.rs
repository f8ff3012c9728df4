//! Process wiring shared by the `orrery-worker` binary and `orrery dev`:
//! build the engine from configuration, run queue consumers, run the
//! scheduler (reconciler + cron), and turn SIGTERM/SIGINT into a graceful stop.
//!
//! Nothing here decides what a run does; that is the engine's (`workflows`).

use std::{collections::BTreeSet, sync::Arc};

use orrery_workflows::{
    config::connect_db_or_explain, consumer, cron, dispatch::RedisDispatcher, provisioning,
    reconciler, Engine, EngineConfig, Registry, Services,
};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A built engine and the concrete dispatcher behind it (for Redis upkeep).
pub struct Runtime {
    pub engine: Arc<Engine>,
    pub dispatcher: Arc<RedisDispatcher>,
}

/// Connect to PostgreSQL and Redis and build the engine with every workflow
/// this build knows.
pub async fn start(config: EngineConfig, shutdown: CancellationToken) -> anyhow::Result<Runtime> {
    let pool = connect_db_or_explain(&config).await?;
    let dispatcher = Arc::new(RedisDispatcher::connect_or_explain(&config).await?);
    let registry = orrery_workflows::registry(config.test_workflows);
    let mut services = Services::new();
    if let Err(why) = provisioning::install(
        &mut services,
        provisioning::ProvisioningEnv { pool: pool.clone() },
    ) {
        tracing::warn!(%why, "provisioning is not configured in this process; its steps fail until it is");
    }
    let engine = Engine::new(
        pool,
        Arc::new(registry),
        services,
        dispatcher.clone(),
        config,
        shutdown,
    );
    Ok(Runtime { engine, dispatcher })
}

/// Every queue some registered workflow step uses.
pub fn all_queues(registry: &Registry) -> Vec<String> {
    let queues: BTreeSet<String> = registry
        .names()
        .filter_map(|n| registry.latest(n))
        .flat_map(|wf| wf.steps.iter().map(|s| s.queue.clone()).collect::<Vec<_>>())
        .collect();
    queues.into_iter().collect()
}

/// Start one consumer per queue.
pub fn spawn_consumers(
    tasks: &mut JoinSet<()>,
    rt: &Runtime,
    queues: &[String],
    shutdown: &CancellationToken,
) {
    let engine = rt.engine.clone();
    tasks.spawn({
        let listener = engine.spawn_cancel_listener();
        async move {
            let _ = listener.await;
        }
    });
    for queue in queues {
        tasks.spawn(consumer::run_queue(
            engine.clone(),
            queue.clone(),
            engine.config.concurrency,
            shutdown.clone(),
        ));
    }
}

/// Start the reconciler and the cron jobs.
pub fn spawn_scheduler(
    tasks: &mut JoinSet<()>,
    rt: &Runtime,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    let engine = &rt.engine;
    let cfg = &engine.config;
    tasks.spawn(reconciler::run(
        engine.pool.clone(),
        engine.dispatcher.clone(),
        all_queues(&engine.registry),
        cfg.redispatch_after,
        cfg.reconcile_every,
        shutdown.clone(),
    ));
    let (pool, days) = (engine.pool.clone(), cfg.retention_days);
    let purge = cron::CronJob::new("purge_finished_runs", "0 17 * * * *", move || {
        let pool = pool.clone();
        async move {
            cron::purge_finished_runs(&pool, days)
                .await
                .map(|n| format!("{n} finished runs older than {days} days deleted"))
                .map_err(|e| e.to_string())
        }
    })?;
    let (dispatcher, queues) = (rt.dispatcher.clone(), all_queues(&engine.registry));
    let vacuum = cron::CronJob::new("redis_vacuum", "30 * * * * *", move || {
        let (dispatcher, queues) = (dispatcher.clone(), queues.clone());
        async move {
            let mut total = 0;
            for q in &queues {
                total += dispatcher.vacuum(q).await.map_err(|e| e.to_string())?;
            }
            Ok(format!("{total} finished dispatches removed from Redis"))
        }
    })?;
    let e = engine.clone();
    let expire = cron::CronJob::new("expire_clusters", "15 * * * * *", move || {
        let e = e.clone();
        async move {
            provisioning::upkeep::expire_clusters(&e)
                .await
                .map(|n| format!("{n} expired cluster(s) sent to termination"))
                .map_err(|err| err.to_string())
        }
    })?;
    let e = engine.clone();
    let inventory = cron::CronJob::new("reconcile_inventory", "45 */5 * * * *", move || {
        let e = e.clone();
        async move {
            let Some(p) = e.services.get::<provisioning::Provisioning>() else {
                return Ok("provisioning not configured here; skipped".to_string());
            };
            provisioning::upkeep::reconcile_inventory(&p, &e.pool)
                .await
                .map(|r| format!("reclaimed {:?}, marked broken {:?}", r.reclaimed, r.broken))
                .map_err(|err| err.to_string())
        }
    })?;
    tasks.spawn(cron::run(
        engine.pool.clone(),
        vec![purge, vacuum, expire, inventory],
        engine.worker_id.to_string(),
        shutdown.clone(),
    ));
    Ok(())
}

/// A token fired by SIGTERM or SIGINT.
pub fn shutdown_on_signals() -> CancellationToken {
    let token = CancellationToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(err) => {
                    tracing::error!(error = %err, "cannot install SIGTERM handler");
                    return;
                }
            };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: finishing current steps, then stopping"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: finishing current steps, then stopping"),
        }
        t.cancel();
    });
    token
}
