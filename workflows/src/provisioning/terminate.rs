//! `terminate_cluster`: stop services → delete the Ambari cluster and its
//! hosts → release the machines → `terminated`. Every step is safe to
//! repeat, so terminating twice (or resuming a half-done termination) works.
//! If it fails, the cluster is marked `failed` with the reason, so an
//! operator sees it and can replay the run.

use serde_json::json;
use std::time::Duration;

use super::{
    cluster,
    create::{follow, hostnames, ClusterInput, Requested},
    remote_retry, Provisioning, AMBARI, PROVISION,
};
use crate::{
    ambari::ServiceState,
    error::StepError,
    workflow::{Progress, Step, StepCtx, Workflow},
};

pub fn terminate_cluster() -> Workflow {
    Workflow::new("terminate_cluster", 1)
        .input::<ClusterInput>()
        .step(
            Step::new("stop_services", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let name = cluster::ambari_name(input.cluster_id);
                if !p.ambari.cluster_exists(&name).await? {
                    return Ok::<_, StepError>(Requested { request_id: None });
                }
                let context = format!("orrery run {} stop services", ctx.run_id);
                // Only what runs: asking every service for INSTALLED would
                // reinstall those that failed to install.
                let id = p
                    .ambari
                    .set_services_state_from(&name, ServiceState::Started, ServiceState::Installed, &context)
                    .await?;
                Ok(Requested { request_id: id })
            })
            .retry(remote_retry())
            .compensate(|ctx: StepCtx, input: ClusterInput| async move {
                let pool = ctx.service::<sqlx::PgPool>()?;
                let reason = cluster::run_error(&pool, ctx.run_id).await?;
                cluster::set_state(&pool, input.cluster_id, "failed", Some(&format!("termination failed: {reason}"))).await
            }),
        )
        .step(
            Step::waiting("await_stopped", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let requested: Requested = ctx.output("stop_services")?;
                match follow(&p, &cluster::ambari_name(input.cluster_id), requested.request_id).await {
                    // A stop that fails does not keep a cluster alive: deleting it is next.
                    Err(StepError::Fatal(reason)) => {
                        ctx.log("warning", &format!("stopping services failed, deleting anyway: {reason}")).await;
                        Ok(Progress::Done(json!({ "stopped": false })))
                    }
                    other => other,
                }
            })
            .retry(remote_retry())
            .wait_deadline(Duration::from_secs(3600)),
        )
        .step(
            Step::new("delete_ambari", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let pool = ctx.service::<sqlx::PgPool>()?;
                p.ambari.delete_cluster(&cluster::ambari_name(input.cluster_id)).await?;
                let machines = cluster::machines(&pool, input.cluster_id).await?;
                for host in hostnames(&machines) {
                    p.ambari.delete_host(&host).await?;
                }
                Ok::<_, StepError>(json!({ "deleted_hosts": hostnames(&machines) }))
            })
            .retry(remote_retry()),
        )
        .step(Step::new("release", PROVISION, |ctx: StepCtx, input: ClusterInput| async move {
            let p = ctx.service::<Provisioning>()?;
            let pool = ctx.service::<sqlx::PgPool>()?;
            let released = p.provider.release(input.cluster_id).await?;
            cluster::set_users_state(&pool, input.cluster_id, None, &["pending", "active", "removing"], "removed").await?;
            cluster::set_state(&pool, input.cluster_id, "terminated", None).await?;
            Ok::<_, StepError>(json!({ "cluster_id": input.cluster_id, "state": "terminated", "released": released }))
        }))
}
