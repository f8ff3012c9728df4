//! `orrery admin ...`: accounts from the command line, straight against
//! PostgreSQL, so a fresh install gets its first operator (and groups) before
//! anyone holds an API key. The same functions as `/v1/admin` do the work
//! (validation, unique names, audit with actor `cli`).
//!
//! ```sh
//! orrery admin create-group data --quota 40 --reserved 8
//! orrery admin create-user alice --group data --operator   # prints alice's API key
//! orrery admin create-key alice --name laptop              # another key
//! ```

use anyhow::Context;
use clap::Subcommand;
use orrery_api::accounts::{self, NewGroup, NewUser};
use orrery_workflows::{config, EngineConfig};

// The variants are the subcommands' names (`orrery admin create-user`, ...),
// which users type and docs quote.
#[allow(clippy::enum_variant_names)]
#[derive(Subcommand)]
pub enum AdminCommand {
    /// Create a user and print their first API key (shown once).
    CreateUser {
        /// UNIX-style account name (lowercase letters, digits, `_`, `-`).
        name: String,
        #[arg(long)]
        email: Option<String>,
        /// An existing group.
        #[arg(long)]
        group: Option<String>,
        /// May use the operator routes.
        #[arg(long)]
        operator: bool,
        /// The user's machine limit (default: the group's, else ORRERY_DEFAULT_QUOTA).
        #[arg(long)]
        quota: Option<i32>,
    },
    /// Create a group.
    CreateGroup {
        name: String,
        /// Most machines the whole group may hold.
        #[arg(long)]
        quota: Option<i32>,
        /// Machines kept available for this group only.
        #[arg(long, default_value_t = 0)]
        reserved: i32,
    },
    /// Issue another API key for an existing user; prints it (shown once).
    CreateKey {
        user: String,
        #[arg(long, default_value = "cli")]
        name: String,
    },
}

fn say(text: &str) -> anyhow::Result<()> {
    std::io::Write::write_all(&mut std::io::stdout(), format!("{text}\n").as_bytes())?;
    Ok(())
}

fn api_err(e: orrery_api::ApiError) -> anyhow::Error {
    match e.internal {
        Some(inner) => inner.context(e.detail),
        None => anyhow::anyhow!(e.detail),
    }
}

pub async fn run(cfg: &EngineConfig, command: AdminCommand) -> anyhow::Result<()> {
    let pool = config::connect_db(cfg)
        .await
        .context("cannot connect to PostgreSQL (ORRERY_DATABASE_URL)")?;
    match command {
        AdminCommand::CreateUser {
            name,
            email,
            group,
            operator,
            quota,
        } => {
            let u = NewUser {
                name: name.clone(),
                email,
                group,
                operator,
                quota_machines: quota,
            };
            let (id, key) = accounts::create_user(&pool, &u, "cli")
                .await
                .map_err(api_err)?;
            say(&format!(
                "user {name} created ({id}){}",
                if operator { ", operator" } else { "" }
            ))?;
            say(&format!("API key (shown once): {}", key.token()))?;
            say(&format!(
                "for /cosmos/v1: apiKey={} apiSecret={}",
                key.lookup, key.secret
            ))?;
        }
        AdminCommand::CreateGroup {
            name,
            quota,
            reserved,
        } => {
            let g = NewGroup {
                name: name.clone(),
                quota_machines: quota,
                reserved_machines: reserved,
            };
            let id = accounts::create_group(&pool, &g, "cli")
                .await
                .map_err(api_err)?;
            say(&format!("group {name} created ({id})"))?;
        }
        AdminCommand::CreateKey { user, name } => {
            let id: uuid::Uuid = sqlx::query_scalar("SELECT id FROM users WHERE name = $1")
                .bind(&user)
                .fetch_optional(&pool)
                .await?
                .with_context(|| format!("no user named {user}"))?;
            let mut conn = pool.acquire().await?;
            let key = accounts::insert_key(&mut conn, id, &name)
                .await
                .map_err(api_err)?;
            say(&format!("API key for {user} (shown once): {}", key.token()))?;
            say(&format!(
                "for /cosmos/v1: apiKey={} apiSecret={}",
                key.lookup, key.secret
            ))?;
        }
    }
    Ok(())
}
