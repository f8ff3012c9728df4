//! `orrery infra ...`: the operator's commands for the machines clusters run on.
//!
//! - `prepare`: check this machine can run local containers and create their
//!   bridge (the Ambari emulator's agent port listens on its address).
//! - `register-machine`: add an existing server to the `pool` provider, its
//!   SSH host key pinned from now on.
//! - `list`: what the configured provider really has, beside the inventory.

use anyhow::Context;
use clap::Subcommand;
use orrery_workflows::{
    config,
    infra::{
        local::{ContainerHost, HostConfig, LocalConfig, LocalProvider},
        pool,
    },
    provisioning::{Provisioning, ProvisioningEnv},
    ssh::PlatformKey,
    EngineConfig,
};

#[derive(Subcommand)]
pub enum InfraCommand {
    /// Check that local containers are possible here and create their bridge.
    Prepare,
    /// Register a server (already running sshd) in the machine pool.
    RegisterMachine {
        hostname: String,
        /// IP address SSH connects to.
        address: String,
        /// Its SSH host public key line, e.g. from `ssh-keyscan -t ed25519 HOST`.
        #[arg(long)]
        host_key: String,
        #[arg(long, default_value_t = 22)]
        port: u16,
    },
    /// Machines the configured provider (ORRERY_PROVIDER) reports.
    List,
}

fn say(text: &str) -> anyhow::Result<()> {
    std::io::Write::write_all(&mut std::io::stdout(), format!("{text}\n").as_bytes())?;
    Ok(())
}

pub async fn run(cfg: &EngineConfig, command: InfraCommand) -> anyhow::Result<()> {
    match command {
        InfraCommand::Prepare => {
            LocalProvider::check().context("local containers are not possible on this machine")?;
            let key_path: std::path::PathBuf =
                config::var("ORRERY_SSH_KEY", "/var/lib/orrery/ssh/id_ed25519".into())?;
            let key = PlatformKey::load_or_generate(&key_path)?;
            let local = LocalConfig::from_env(key.public_line())?;
            ContainerHost::new(HostConfig {
                state_root: local.state_dir.clone(),
                bridge: local.bridge.clone(),
                gateway: local.gateway,
                prefix_len: local.prefix_len,
                authorized_keys: local.authorized_keys.clone(),
                start_timeout: local.start_timeout,
            })
            .ensure_bridge()?;
            say(&format!(
                "local containers ready: bridge {} at {}/{}, platform key {}",
                local.bridge,
                local.gateway,
                local.prefix_len,
                key_path.display()
            ))
        }
        InfraCommand::RegisterMachine {
            hostname,
            address,
            host_key,
            port,
        } => {
            let db = config::connect_db(cfg)
                .await
                .context("cannot connect to PostgreSQL (ORRERY_DATABASE_URL)")?;
            let m = pool::register_machine(&db, &hostname, &address, port, &host_key).await?;
            say(&format!(
                "registered {} ({}:{}) as {}",
                m.hostname, m.address, m.ssh_port, m.id
            ))
        }
        InfraCommand::List => {
            let db = config::connect_db(cfg)
                .await
                .context("cannot connect to PostgreSQL (ORRERY_DATABASE_URL)")?;
            let p =
                Provisioning::from_env(ProvisioningEnv { pool: db }).map_err(anyhow::Error::msg)?;
            let health = p.provider.health().await?;
            say(&format!(
                "{}: {} free, {} in use — {}",
                health.provider, health.free, health.in_use, health.detail
            ))?;
            for m in p.provider.list().await? {
                say(&format!(
                    "{:<32} {:<16} {:<8} {}",
                    m.hostname,
                    m.address,
                    if m.running { "running" } else { "stopped" },
                    m.cluster_id
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into())
                ))?;
            }
            Ok(())
        }
    }
}
