//! Cluster provisioning: the `create_cluster`, `terminate_cluster`,
//! `grant_user` and `revoke_user` workflows, built from the infrastructure
//! layer ([`crate::infra`]), SSH ([`crate::ssh`]) and Ambari ([`crate::ambari`]).
//!
//! Steps reach those systems through one [`Provisioning`] service (found
//! with `ctx.service::<Provisioning>()`); the cluster rows they read and
//! update are in [`cluster`]; the shell commands they run on machines are
//! built (and unit-tested) in [`accounts`].
//!
//! Queues: `provision` (allocation, release, bookkeeping), `ssh` (agent
//! bootstrap, UNIX and HDFS accounts), `ambari` (REST calls and polls).

pub mod accounts;
pub mod cluster;
mod create;
mod terminate;
pub mod upkeep;
mod users;

use std::{path::PathBuf, sync::Arc, time::Duration};

use crate::{
    ambari::{AmbariClient, AmbariConfig},
    config::{var, ConfigError},
    infra::{
        local::{LocalConfig, LocalProvider},
        pool::PoolProvider,
        Provider,
    },
    ssh::{PlatformKey, SshClient},
    workflow::{Registry, Services},
};

pub use create::create_cluster;
pub use terminate::terminate_cluster;
pub use users::{grant_user, revoke_user};

pub const PROVISION: &str = "provision";
pub const SSH: &str = "ssh";
pub const AMBARI: &str = "ambari";

/// Everything the provisioning steps use, built once per worker process.
pub struct Provisioning {
    /// Where machines come from (`ORRERY_PROVIDER`: `local` or `pool`).
    pub provider: Arc<dyn Provider>,
    /// SSH with the platform key; host keys checked against the inventory.
    pub ssh: SshClient,
    pub ambari: AmbariClient,
    /// Host and port the agents on the machines report to
    /// (`ORRERY_AMBARI_AGENT_SERVER`, `ORRERY_AMBARI_AGENT_PORT`).
    pub agent_server: String,
    pub agent_port: u16,
    /// `ORRERY_STACK`, e.g. `HDP-2.6`.
    pub stack_name: String,
    pub stack_version: String,
    /// Machine profile requested from the provider (`ORRERY_PROFILE`).
    pub profile: String,
    /// How often waiting steps poll Ambari (`ORRERY_AMBARI_POLL_MS`).
    pub poll: Duration,
    /// Time limit of one SSH command (`ORRERY_SSH_COMMAND_TIMEOUT_MS`).
    pub command_timeout: Duration,
    /// Shell run before the bootstrap on every host (`ORRERY_BOOTSTRAP_PRELUDE`);
    /// empty by default. Lets an operator add site set-up (proxies, repos),
    /// and tests inject a failing command.
    pub bootstrap_prelude: String,
}

/// What [`Provisioning::from_env`] needs that is not in the environment.
pub struct ProvisioningEnv {
    pub pool: sqlx::PgPool,
}

impl Provisioning {
    /// Read `ORRERY_*` settings and build the provider and clients.
    pub fn from_env(env: ProvisioningEnv) -> Result<Self, String> {
        let e = |err: ConfigError| err.to_string();
        let key_path: PathBuf = var(
            "ORRERY_SSH_KEY",
            PathBuf::from("/var/lib/orrery/ssh/id_ed25519"),
        )
        .map_err(e)?;
        let key = PlatformKey::load_or_generate(&key_path).map_err(|err| err.to_string())?;
        let provider_name: String = var("ORRERY_PROVIDER", "local".to_string()).map_err(e)?;
        let provider: Arc<dyn Provider> = match provider_name.as_str() {
            "pool" => Arc::new(PoolProvider::new(env.pool.clone())),
            "local" => {
                let config =
                    LocalConfig::from_env(key.public_line()).map_err(|err| err.to_string())?;
                Arc::new(
                    LocalProvider::new(env.pool.clone(), config).map_err(|err| err.to_string())?,
                )
            }
            other => {
                return Err(format!(
                    "ORRERY_PROVIDER={other:?} is invalid: expected `local` or `pool`"
                ))
            }
        };
        let stack: String = var("ORRERY_STACK", "HDP-2.6".to_string()).map_err(e)?;
        let (stack_name, stack_version) = stack
            .split_once('-')
            .map(|(n, v)| (n.to_owned(), v.to_owned()))
            .ok_or_else(|| {
                format!("ORRERY_STACK={stack:?} is invalid: expected NAME-VERSION, e.g. HDP-2.6")
            })?;
        let ambari = AmbariClient::new(AmbariConfig::from_env().map_err(e)?)
            .map_err(|err| err.to_string())?;
        Ok(Provisioning {
            provider,
            ssh: SshClient::new(key),
            ambari,
            agent_server: var("ORRERY_AMBARI_AGENT_SERVER", "10.77.0.1".to_string()).map_err(e)?,
            agent_port: var("ORRERY_AMBARI_AGENT_PORT", 8440u16).map_err(e)?,
            stack_name,
            stack_version,
            profile: var("ORRERY_PROFILE", "standard".to_string()).map_err(e)?,
            poll: Duration::from_millis(var("ORRERY_AMBARI_POLL_MS", 1000u64).map_err(e)?),
            command_timeout: Duration::from_millis(
                var("ORRERY_SSH_COMMAND_TIMEOUT_MS", 120_000u64).map_err(e)?,
            ),
            bootstrap_prelude: var("ORRERY_BOOTSTRAP_PRELUDE", String::new()).map_err(e)?,
        })
    }
}

/// Register the four provisioning workflows.
pub fn register(registry: &mut Registry) {
    registry.register(create_cluster());
    registry.register(terminate_cluster());
    registry.register(grant_user());
    registry.register(revoke_user());
}

/// Add the provisioning service to `services`, or explain why it is not
/// available in this process (the provisioning steps then fail with that).
pub fn install(services: &mut Services, env: ProvisioningEnv) -> Result<(), String> {
    let provisioning = Provisioning::from_env(env)?;
    services.insert(provisioning);
    Ok(())
}

/// Retries of Ambari calls and bookkeeping steps: 5xx answers, timeouts and
/// lost connections usually pass within seconds.
pub(crate) fn remote_retry() -> crate::retry::RetryPolicy {
    crate::retry::RetryPolicy::default()
        .attempts(8)
        .delays(Duration::from_millis(200), Duration::from_secs(10))
}

/// Retries of SSH work on hosts (fan-out steps: a retry repeats only the
/// hosts that failed).
pub(crate) fn ssh_retry() -> crate::retry::RetryPolicy {
    crate::retry::RetryPolicy::default()
        .attempts(4)
        .delays(Duration::from_millis(200), Duration::from_secs(5))
}

/// Run `commands` on `machine` over one SSH session, keeping each command's
/// stdout and stderr in the step's log (also when it fails).
pub(crate) async fn run_on(
    ctx: &crate::workflow::StepCtx,
    p: &Provisioning,
    machine: &crate::infra::Machine,
    commands: &[(&str, String)],
) -> Result<(), crate::error::StepError> {
    let session = p
        .ssh
        .connect(&crate::ssh::SshTarget::from(machine), &ctx.cancel)
        .await?;
    for (label, command) in commands {
        let result = session.run(command, p.command_timeout, &ctx.cancel).await;
        let output = match &result {
            Ok(out) => Some(out),
            Err(err) => err.output(),
        };
        if let Some(out) = output {
            for (stream, text) in [("stdout", &out.stdout), ("stderr", &out.stderr)] {
                if !text.trim().is_empty() {
                    ctx.log(&format!("{} {label} {stream}", machine.hostname), text)
                        .await;
                }
            }
        }
        if let Err(err) = result {
            session.close().await;
            return Err(err.into());
        }
    }
    session.close().await;
    Ok(())
}
