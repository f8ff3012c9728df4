//! `create_cluster`: allocate → bootstrap every agent in parallel → wait for
//! registration → blueprint → create the cluster → follow the install →
//! start services → UNIX/HDFS accounts → Ambari users → `running`.
//!
//! Unwinding (a fatal error, exhausted retries, a cancel) runs, in reverse:
//! abort the Ambari request and delete the half-made cluster and its hosts;
//! stop the agents; release every allocated machine and mark the cluster
//! `failed` with the run's error as its reason.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use uuid::Uuid;

use super::{cluster, remote_retry, run_on, ssh_retry, Provisioning, AMBARI, PROVISION, SSH};
use crate::{
    ambari::{
        agent,
        blueprint::{self, ClusterSpec, ClusterTemplate},
        NewUser, RequestId, ServiceState,
    },
    error::StepError,
    infra::Machine,
    workflow::{Progress, Step, StepCtx, Workflow},
};
use std::time::Duration;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ClusterInput {
    pub cluster_id: Uuid,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Planned {
    pub blueprint: String,
    pub template: ClusterTemplate,
    pub services: Vec<String>,
    pub colocated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Requested {
    pub request_id: Option<RequestId>,
}

fn pg(ctx: &StepCtx) -> Result<std::sync::Arc<sqlx::PgPool>, StepError> {
    ctx.service::<sqlx::PgPool>()
}

pub(crate) fn hostnames(machines: &[Machine]) -> Vec<String> {
    machines
        .iter()
        .map(|m| m.hostname.to_ascii_lowercase())
        .collect()
}

fn random_secret() -> String {
    Uuid::new_v4().simple().to_string()
}

/// Poll an Ambari request: done, failed (fatal, with Ambari's reason), or not yet.
pub(crate) async fn follow(
    p: &Provisioning,
    ambari_cluster: &str,
    id: Option<RequestId>,
) -> Result<Progress<Value>, StepError> {
    let Some(id) = id else {
        return Ok(Progress::Done(json!({ "request_id": null })));
    };
    let state = p.ambari.request_status(ambari_cluster, id).await?;
    if state.status.is_failure() {
        return Err(StepError::fatal(format!(
            "Ambari request {id} ended {:?}: {}",
            state.status,
            state.failure.as_deref().unwrap_or("no reason given")
        )));
    }
    if state.status.is_finished() {
        return Ok(Progress::Done(
            json!({ "request_id": id, "progress": state.progress_percent }),
        ));
    }
    Ok(Progress::WaitFor(p.poll))
}

/// Undo a half-made Ambari cluster: abort every request still at work on
/// it (the creation, a start), stop the services that run and wait for
/// that, then delete it (Ambari refuses to delete a cluster whose services
/// run). Safe to repeat: each part finds its work done.
async fn unwind_ambari_cluster(
    ctx: &StepCtx,
    p: &Provisioning,
    name: &str,
) -> Result<(), StepError> {
    let reason = format!("run {} unwinding", ctx.run_id);
    for (id, _, status) in p.ambari.list_requests(name).await? {
        if status.is_some_and(|s| s.is_finished()) {
            continue;
        }
        p.ambari.abort_request(name, id, &reason).await?;
        ctx.log("info", &format!("Ambari request {id} aborted"))
            .await;
    }
    let context = format!("orrery run {} unwinding: stop services", ctx.run_id);
    let stop = p
        .ambari
        .set_services_state_from(
            name,
            ServiceState::Started,
            ServiceState::Installed,
            &context,
        )
        .await?;
    if let Some(id) = stop {
        // Bounded by the compensation's timeout (the step's).
        loop {
            let state = p.ambari.request_status(name, id).await?;
            if state.status.is_finished() {
                if let Some(failure) = state.failure {
                    ctx.log(
                        "warning",
                        &format!("stopping services failed, deleting anyway: {failure}"),
                    )
                    .await;
                }
                break;
            }
            tokio::time::sleep(p.poll).await;
        }
    }
    p.ambari.delete_cluster(name).await?;
    ctx.log("info", &format!("Ambari cluster {name} deleted"))
        .await;
    Ok(())
}

pub fn create_cluster() -> Workflow {
    Workflow::new("create_cluster", 1)
        .input::<ClusterInput>()
        .step(
            Step::new("allocate", PROVISION, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let c = cluster::load(&*pg(&ctx)?, input.cluster_id).await?;
                let machines = p.provider.allocate(c.id, &p.profile, c.size as usize).await?;
                ctx.log("info", &format!("allocated {}", hostnames(&machines).join(", "))).await;
                Ok::<_, StepError>(machines)
            })
            .timeout(Duration::from_secs(300))
            .compensate(|ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let pool = pg(&ctx)?;
                let released = p.provider.release(input.cluster_id).await?;
                ctx.log("info", &format!("released {released} machine(s)")).await;
                let reason = cluster::run_error(&pool, ctx.run_id).await?;
                cluster::set_users_state(&pool, input.cluster_id, None, &["pending", "active"], "failed").await?;
                cluster::set_state(&pool, input.cluster_id, "failed", Some(&reason)).await
            }),
        )
        .step(
            Step::fan_out(
                "bootstrap",
                SSH,
                |ctx: &StepCtx, _: ClusterInput| {
                    let machines: Vec<Machine> = ctx.output("allocate")?;
                    Ok(machines.into_iter().map(|m| (m.hostname.clone(), m)).collect())
                },
                |ctx: StepCtx, host: String, machine: Machine| async move {
                    let p = ctx.service::<Provisioning>()?;
                    let install = agent::bootstrap_command(&p.agent_server, p.agent_port).ok_or_else(|| {
                        StepError::fatal(format!(
                            "ORRERY_AMBARI_AGENT_SERVER={:?} is not a plain host name or address",
                            p.agent_server
                        ))
                    })?;
                    let command = if p.bootstrap_prelude.is_empty() {
                        install
                    } else {
                        format!("{}\n{install}", p.bootstrap_prelude)
                    };
                    run_on(&ctx, &p, &machine, &[("bootstrap", command)]).await?;
                    Ok::<_, StepError>(json!({ "host": host, "agent": "installed" }))
                },
            )
            .concurrency(16)
            .timeout(Duration::from_secs(600))
            .retry(ssh_retry())
            .compensate(|ctx: StepCtx, _: ClusterInput| async move {
                // Best effort: a pool machine goes back to the pool without an agent;
                // an unreachable one must not block the release that follows.
                let p = ctx.service::<Provisioning>()?;
                let machines: Vec<Machine> = ctx.output("allocate").unwrap_or_default();
                for m in &machines {
                    if let Err(err) = run_on(&ctx, &p, m, &[("stop agent", "command -v ambari-agent >/dev/null && ambari-agent stop || true".into())]).await {
                        ctx.log("warning", &format!("{}: agent not stopped: {}", m.hostname, err.message())).await;
                    }
                }
                Ok(())
            }),
        )
        .step(
            Step::waiting("await_agents", AMBARI, |ctx: StepCtx, _: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let machines: Vec<Machine> = ctx.output("allocate")?;
                let report = p.ambari.hosts_report(&hostnames(&machines)).await?;
                if report.all_healthy() {
                    return Ok(Progress::Done(json!({ "registered": report.healthy })));
                }
                if ctx.polls.is_multiple_of(10) {
                    ctx.log("info", &format!("waiting for agents: missing {:?}, unhealthy {:?}", report.missing, report.unhealthy)).await;
                }
                Ok(Progress::WaitFor(p.poll))
            })
            .retry(remote_retry())
            .wait_deadline(Duration::from_secs(300)),
        )
        .step(
            Step::new("blueprint", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let c = cluster::load(&*pg(&ctx)?, input.cluster_id).await?;
                let machines: Vec<Machine> = ctx.output("allocate")?;
                let spec = ClusterSpec {
                    blueprint_name: cluster::ambari_name(c.id),
                    stack_name: p.stack_name.clone(),
                    stack_version: p.stack_version.clone(),
                    services: c.services.clone(),
                    hosts: hostnames(&machines),
                    default_password: Some(random_secret()),
                };
                let plan = blueprint::plan(&spec).map_err(|e| StepError::fatal(format!("blueprint: {e}")))?;
                p.ambari.register_blueprint(&spec.blueprint_name, &plan.blueprint).await?;
                Ok::<_, StepError>(Planned {
                    blueprint: spec.blueprint_name,
                    template: plan.template,
                    services: plan.services.iter().map(|s| s.to_string()).collect(),
                    colocated: plan.colocated,
                })
            })
            .retry(remote_retry()),
        )
        .step(
            Step::new("create", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let planned: Planned = ctx.output("blueprint")?;
                // Idempotent: an existing cluster answers with its creation request.
                let id = p.ambari.create_cluster(&cluster::ambari_name(input.cluster_id), &planned.template).await?;
                ctx.log("info", &format!("Ambari request {id} installs and starts the cluster")).await;
                Ok::<_, StepError>(Requested { request_id: Some(id) })
            })
            .retry(remote_retry())
            .compensate(|ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let name = cluster::ambari_name(input.cluster_id);
                // Whatever the checkpoints say: the creation request may
                // have been sent by an attempt that never checkpointed it.
                if p.ambari.cluster_exists(&name).await? {
                    unwind_ambari_cluster(&ctx, &p, &name).await?;
                }
                let machines: Vec<Machine> = ctx.output("allocate").unwrap_or_default();
                for host in hostnames(&machines) {
                    p.ambari.delete_host(&host).await?;
                }
                Ok(())
            }),
        )
        .step(
            Step::waiting("install", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let requested: Requested = ctx.output("create")?;
                follow(&p, &cluster::ambari_name(input.cluster_id), requested.request_id).await
            })
            .retry(remote_retry())
            .wait_deadline(Duration::from_secs(7200)),
        )
        .step(
            Step::new("start", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let context = format!("orrery run {} start services", ctx.run_id);
                let id = p.ambari.set_services_state(&cluster::ambari_name(input.cluster_id), ServiceState::Started, &context).await?;
                Ok::<_, StepError>(Requested { request_id: id })
            })
            .retry(remote_retry()),
        )
        .step(
            Step::waiting("await_started", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let requested: Requested = ctx.output("start")?;
                follow(&p, &cluster::ambari_name(input.cluster_id), requested.request_id).await
            })
            .retry(remote_retry())
            .wait_deadline(Duration::from_secs(3600)),
        )
        .step(accounts_step("accounts"))
        .step(
            Step::new("ambari_users", AMBARI, |ctx: StepCtx, input: ClusterInput| async move {
                let p = ctx.service::<Provisioning>()?;
                let users = cluster::accounts(&*pg(&ctx)?, input.cluster_id, None).await?;
                let name = cluster::ambari_name(input.cluster_id);
                for u in &users {
                    grant_ambari_user(&p, &name, &u.username).await?;
                }
                Ok::<_, StepError>(users.iter().map(|u| u.username.clone()).collect::<Vec<_>>())
            })
            .retry(remote_retry()),
        )
        .step(Step::new("finish", PROVISION, |ctx: StepCtx, input: ClusterInput| async move {
            let pool = pg(&ctx)?;
            cluster::set_users_state(&pool, input.cluster_id, None, &["pending"], "active").await?;
            cluster::set_state(&pool, input.cluster_id, "running", None).await?;
            let machines: Vec<Machine> = ctx.output("allocate")?;
            let nodes: Vec<Value> = machines
                .iter()
                .map(|m| json!({ "hostname": m.hostname, "address": m.address }))
                .collect();
            Ok::<_, StepError>(json!({ "cluster_id": input.cluster_id, "state": "running", "master": nodes.first(), "nodes": nodes }))
        }))
}

pub(crate) async fn grant_ambari_user(
    p: &Provisioning,
    cluster: &str,
    username: &str,
) -> Result<(), StepError> {
    p.ambari
        .create_user(&NewUser {
            user_name: username.to_owned(),
            password: random_secret(),
            admin: false,
        })
        .await?;
    p.ambari.grant_cluster_user(cluster, username).await?;
    Ok(())
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct UserInput {
    pub cluster_id: Uuid,
    #[serde(default)]
    pub username: Option<String>,
}

/// UNIX accounts (and HDFS homes, on the master) for every cluster user, or
/// for `input.username` only: one item per machine.
pub(crate) fn accounts_step(name: &str) -> Step {
    Step::fan_out(
        name,
        SSH,
        |ctx: &StepCtx, _: UserInput| {
            let machines: Vec<Machine> = match ctx.output("allocate") {
                Ok(m) => m,
                // grant_user: the machines come from the inventory (see `users`).
                Err(_) => ctx.output("machines")?,
            };
            Ok(machines
                .into_iter()
                .enumerate()
                .map(|(i, m)| (m.hostname.clone(), (i == 0, m)))
                .collect())
        },
        |ctx: StepCtx, _host: String, (master, machine): (bool, Machine)| async move {
            let p = ctx.service::<Provisioning>()?;
            let input: UserInput = ctx.input()?;
            let users =
                cluster::accounts(&*pg(&ctx)?, input.cluster_id, input.username.as_deref()).await?;
            let mut commands: Vec<(&str, String)> = Vec::new();
            for u in &users {
                commands.push(("account", super::accounts::create_account(u)));
            }
            if master {
                for u in &users {
                    commands.push(("hdfs home", super::accounts::hdfs_home(&u.username)));
                }
            }
            run_on(&ctx, &p, &machine, &commands).await?;
            let names: BTreeMap<String, bool> = users
                .iter()
                .map(|u| (u.username.clone(), u.sudoer))
                .collect();
            Ok::<_, StepError>(json!({ "users": names, "master": master }))
        },
    )
    .concurrency(16)
    .retry(ssh_retry())
}
