//! `grant_user` and `revoke_user` on a running cluster: the UNIX account on
//! every node (and the HDFS home on the master), and the Ambari login with
//! its cluster privilege. The API marks the cluster user `pending` or
//! `removing`; these workflows finish the job and set `active`/`removed`
//! (or `failed`, with the run's error kept on the run).

use serde_json::json;

use super::{
    accounts::{remove_account, valid_username},
    cluster,
    create::{accounts_step, grant_ambari_user, UserInput},
    remote_retry, run_on, Provisioning, AMBARI, PROVISION, SSH,
};
use crate::{
    error::StepError,
    infra::Machine,
    workflow::{Step, StepCtx, Workflow},
};

fn username(input: &UserInput) -> Result<String, StepError> {
    let name = input
        .username
        .clone()
        .ok_or_else(|| StepError::fatal("input field `username` is required"))?;
    if !valid_username(&name) {
        return Err(StepError::fatal(format!(
            "`{name}` is not a valid UNIX user name"
        )));
    }
    Ok(name)
}

/// First step of both: the cluster's machines, from the inventory.
fn machines_step() -> Step {
    Step::new(
        "machines",
        PROVISION,
        |ctx: StepCtx, input: UserInput| async move {
            username(&input)?;
            let pool = ctx.service::<sqlx::PgPool>()?;
            let c = cluster::load(&pool, input.cluster_id).await?;
            if c.state != "running" {
                return Err(StepError::fatal(format!(
                    "cluster {} is {}, not running",
                    c.id, c.state
                )));
            }
            cluster::machines(&pool, input.cluster_id).await
        },
    )
    .compensate(|ctx: StepCtx, input: UserInput| async move {
        let pool = ctx.service::<sqlx::PgPool>()?;
        let name = input.username.as_deref();
        cluster::set_users_state(
            &pool,
            input.cluster_id,
            name,
            &["pending", "removing"],
            "failed",
        )
        .await
    })
}

pub fn grant_user() -> Workflow {
    Workflow::new("grant_user", 1)
        .input::<UserInput>()
        .step(machines_step())
        .step(accounts_step("accounts"))
        .step(
            Step::new(
                "ambari_user",
                AMBARI,
                |ctx: StepCtx, input: UserInput| async move {
                    let p = ctx.service::<Provisioning>()?;
                    let name = username(&input)?;
                    grant_ambari_user(&p, &cluster::ambari_name(input.cluster_id), &name).await?;
                    Ok::<_, StepError>(name)
                },
            )
            .retry(remote_retry()),
        )
        .step(Step::new(
            "activate",
            PROVISION,
            |ctx: StepCtx, input: UserInput| async move {
                let pool = ctx.service::<sqlx::PgPool>()?;
                let name = username(&input)?;
                cluster::set_users_state(
                    &pool,
                    input.cluster_id,
                    Some(&name),
                    &["pending"],
                    "active",
                )
                .await?;
                Ok::<_, StepError>(
                    json!({ "cluster_id": input.cluster_id, "username": name, "state": "active" }),
                )
            },
        ))
}

pub fn revoke_user() -> Workflow {
    Workflow::new("revoke_user", 1)
        .input::<UserInput>()
        .step(machines_step())
        .step(
            Step::fan_out(
                "remove_accounts",
                SSH,
                |ctx: &StepCtx, _: UserInput| {
                    let machines: Vec<Machine> = ctx.output("machines")?;
                    Ok(machines
                        .into_iter()
                        .map(|m| (m.hostname.clone(), m))
                        .collect())
                },
                |ctx: StepCtx, host: String, machine: Machine| async move {
                    let p = ctx.service::<Provisioning>()?;
                    let name = username(&ctx.input()?)?;
                    run_on(
                        &ctx,
                        &p,
                        &machine,
                        &[("remove account", remove_account(&name))],
                    )
                    .await?;
                    Ok::<_, StepError>(json!({ "host": host }))
                },
            )
            .concurrency(16)
            .retry(remote_retry()),
        )
        .step(
            Step::new(
                "ambari_revoke",
                AMBARI,
                |ctx: StepCtx, input: UserInput| async move {
                    let p = ctx.service::<Provisioning>()?;
                    let name = username(&input)?;
                    p.ambari
                        .revoke_cluster_privileges(&cluster::ambari_name(input.cluster_id), &name)
                        .await?;
                    p.ambari.delete_user(&name).await?;
                    Ok::<_, StepError>(name)
                },
            )
            .retry(remote_retry()),
        )
        .step(Step::new(
            "deactivate",
            PROVISION,
            |ctx: StepCtx, input: UserInput| async move {
                let pool = ctx.service::<sqlx::PgPool>()?;
                let name = username(&input)?;
                cluster::set_users_state(
                    &pool,
                    input.cluster_id,
                    Some(&name),
                    &["removing", "active", "pending"],
                    "removed",
                )
                .await?;
                Ok::<_, StepError>(
                    json!({ "cluster_id": input.cluster_id, "username": name, "state": "removed" }),
                )
            },
        ))
}
