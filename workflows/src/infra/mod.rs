//! Infrastructure abstraction layer: the machines clusters are built on.
//!
//! A [`Provider`] hands out machines for a cluster and takes them back. Each
//! machine has a hostname, an address, an SSH port and a *pinned* SSH host
//! key (an OpenSSH public key line), which [`crate::ssh`] checks on every
//! connection. Every machine a provider hands out has a row in the `machines`
//! inventory table.
//!
//! Two providers:
//!
//! - [`pool::PoolProvider`]: machines an operator registered beforehand
//!   ([`pool::register_machine`]), each already running `sshd`. Allocation
//!   marks free rows as allocated (`FOR UPDATE SKIP LOCKED`), release marks
//!   them free again.
//! - [`local::LocalProvider`]: real lightweight Linux containers on this
//!   machine (network, mount, UTS and PID namespaces, an overlay copy of the
//!   root file system, a static address on a bridge, their own `sshd`), for
//!   development, the demo and the tests. Allocation creates them, release
//!   destroys them.
//!
//! Workflow steps are retried and resumed, so both `allocate` and `release`
//! are idempotent per cluster: allocating again returns the machines the
//! cluster already holds and completes a partial allocation; releasing again
//! is a no-op, and releasing after a partial allocation gives back whatever
//! was taken. `list` reports what really exists, for the cleanup job that
//! reconciles the inventory against it.
//!
//! This module does not run commands on machines (that is [`crate::ssh`]) nor
//! decide how many machines a user may hold (quotas live in the API).

pub mod local;
pub mod pool;

use std::net::IpAddr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::error::StepError;

/// One machine handed out to a cluster: everything needed to reach it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Machine {
    /// The inventory row (`machines.id`).
    pub id: Uuid,
    pub hostname: String,
    /// An IP address (what SSH connects to).
    pub address: String,
    pub ssh_port: u16,
    /// The pinned SSH host key, an OpenSSH public key line (`ssh-ed25519 AAAA...`).
    pub host_key: String,
}

/// A machine as the provider itself sees it, independently of the inventory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ObservedMachine {
    pub hostname: String,
    pub address: String,
    pub ssh_port: u16,
    /// The host key the provider knows for it, if any.
    pub host_key: Option<String>,
    /// The cluster the provider believes it belongs to, if any.
    pub cluster_id: Option<Uuid>,
    /// Local: its processes are alive. Pool: its SSH port accepts connections.
    pub running: bool,
}

/// What `health` reports.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Health {
    pub provider: String,
    pub healthy: bool,
    /// Machines that could still be allocated (free pool rows, or container slots).
    pub free: usize,
    /// Machines currently held by clusters.
    pub in_use: usize,
    /// A human-readable summary, or what is wrong.
    pub detail: String,
}

/// Failures of a provider, classified at birth (see [`InfraError::is_retryable`]).
#[derive(Debug, thiserror::Error)]
pub enum InfraError {
    /// Not enough machines: retrying the same request will not help.
    #[error(
        "no capacity: cluster {cluster_id} needs {needed} more `{profile}` machine(s) from the \
         {provider} provider but only {free} are free"
    )]
    NoCapacity {
        provider: &'static str,
        cluster_id: Uuid,
        profile: String,
        needed: usize,
        free: usize,
    },
    /// The cluster row does not exist (machines reference it).
    #[error("cluster {0} does not exist")]
    UnknownCluster(Uuid),
    /// Bad input: an invalid host key line, hostname, address or port.
    #[error("{0}")]
    Invalid(String),
    /// This machine cannot run the local provider (not root, no namespaces...).
    #[error("the local provider cannot run on this machine: {0}")]
    Unsupported(String),
    #[error("inventory database: {0}")]
    Database(#[from] sqlx::Error),
    /// A system operation (a command, a file, a process) failed; usually transient.
    #[error("{0}")]
    System(String),
}

impl InfraError {
    /// Transient failures (database, system commands) are retryable; capacity,
    /// bad input and an unsupported machine are not.
    pub fn is_retryable(&self) -> bool {
        match self {
            InfraError::Database(e) => !is_foreign_key_violation(e),
            InfraError::System(_) => true,
            InfraError::NoCapacity { .. }
            | InfraError::UnknownCluster(_)
            | InfraError::Invalid(_)
            | InfraError::Unsupported(_) => false,
        }
    }

    pub(crate) fn system(msg: impl std::fmt::Display) -> Self {
        InfraError::System(msg.to_string())
    }
}

impl From<InfraError> for StepError {
    fn from(err: InfraError) -> Self {
        if err.is_retryable() {
            StepError::Retryable(err.to_string())
        } else {
            StepError::Fatal(err.to_string())
        }
    }
}

fn is_foreign_key_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_foreign_key_violation())
}

/// An infrastructure provider, held as `Arc<dyn Provider>`.
#[async_trait]
pub trait Provider: Send + Sync {
    /// `pool` or `local`: the `machines.provider` value of its rows.
    fn name(&self) -> &'static str;

    /// Make sure cluster `cluster_id` holds at least `count` machines of
    /// `profile` and return every machine it holds, ordered by hostname.
    /// Idempotent: machines the cluster already holds are kept and returned,
    /// a partial allocation is completed. Never shrinks an allocation.
    async fn allocate(
        &self,
        cluster_id: Uuid,
        profile: &str,
        count: usize,
    ) -> Result<Vec<Machine>, InfraError>;

    /// Give back every machine of the cluster, including any left over by an
    /// interrupted allocation. Returns how many were released; idempotent.
    async fn release(&self, cluster_id: Uuid) -> Result<usize, InfraError>;

    /// Give back one machine by hostname, whatever the inventory says (for the
    /// cleanup job, when `list` shows something the inventory does not hold).
    /// Idempotent.
    async fn reclaim(&self, hostname: &str) -> Result<(), InfraError>;

    /// What really exists, independently of the inventory.
    async fn list(&self) -> Result<Vec<ObservedMachine>, InfraError>;

    /// Whether the provider can allocate, and how much is free.
    async fn health(&self) -> Result<Health, InfraError>;
}

/// Parse and normalize an OpenSSH public key line (`<algorithm> <base64> [comment]`)
/// to `<algorithm> <base64>`. Anything else is [`InfraError::Invalid`].
pub fn normalize_host_key(line: &str) -> Result<String, InfraError> {
    let line = line.trim();
    if line.is_empty() || line.contains('\n') {
        return Err(InfraError::Invalid(
            "host key must be one OpenSSH public key line (`ssh-ed25519 AAAA...`)".into(),
        ));
    }
    let key = russh::keys::PublicKey::from_openssh(line).map_err(|e| {
        InfraError::Invalid(format!("host key is not an OpenSSH public key line: {e}"))
    })?;
    // Rebuilt from the key data alone: drops the comment.
    russh::keys::PublicKey::from(key.key_data().clone())
        .to_openssh()
        .map(|s| s.trim().to_owned())
        .map_err(|e| InfraError::Invalid(format!("host key cannot be encoded: {e}")))
}

/// Validate a hostname: 1..=253 characters, dot-separated labels of letters,
/// digits and hyphens (RFC 1123).
pub fn validate_hostname(hostname: &str) -> Result<(), InfraError> {
    let ok = !hostname.is_empty()
        && hostname.len() <= 253
        && hostname.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        });
    if ok {
        Ok(())
    } else {
        Err(InfraError::Invalid(format!(
            "`{hostname}` is not a valid hostname (letters, digits, hyphens; dot-separated labels)"
        )))
    }
}

pub(crate) fn validate_address(address: &str) -> Result<IpAddr, InfraError> {
    address
        .parse::<IpAddr>()
        .map_err(|_| InfraError::Invalid(format!("`{address}` is not an IP address")))
}

/// A stable short tag for a cluster, used in local container names.
pub(crate) fn cluster_tag(cluster_id: Uuid) -> String {
    // Hashed: UUIDv7 prefixes are timestamps and would collide.
    let digest = Sha256::digest(cluster_id.as_bytes());
    hex::encode(&digest[..4])
}

/// Take a per-cluster transaction-scoped advisory lock, so that two attempts
/// at allocating or releasing the same cluster (a retry racing a stale
/// attempt) run one after the other.
pub(crate) async fn lock_cluster(
    tx: &mut sqlx::Transaction<'_, sqlx::Postgres>,
    cluster_id: Uuid,
) -> Result<(), InfraError> {
    sqlx::query("SELECT pg_advisory_xact_lock(hashtextextended('orrery.infra.' || $1::text, 0))")
        .bind(cluster_id)
        .execute(&mut **tx)
        .await?;
    let exists: Option<(Uuid,)> = sqlx::query_as("SELECT id FROM clusters WHERE id = $1")
        .bind(cluster_id)
        .fetch_optional(&mut **tx)
        .await?;
    if exists.is_none() {
        return Err(InfraError::UnknownCluster(cluster_id));
    }
    Ok(())
}

type MachineRow = (Uuid, String, String, i32, String);

pub(crate) fn machine_from_row((id, hostname, address, ssh_port, host_key): MachineRow) -> Machine {
    Machine {
        id,
        hostname,
        address,
        ssh_port: u16::try_from(ssh_port).unwrap_or(22),
        host_key,
    }
}

/// Every machine `provider` has allocated to the cluster, ordered by hostname.
pub(crate) async fn cluster_machines<'e, E>(
    db: E,
    provider: &str,
    cluster_id: Uuid,
) -> Result<Vec<Machine>, InfraError>
where
    E: sqlx::PgExecutor<'e>,
{
    let rows: Vec<MachineRow> = sqlx::query_as(
        "SELECT id, hostname, address, ssh_port, host_key FROM machines \
         WHERE provider = $1 AND cluster_id = $2 AND state = 'allocated' ORDER BY hostname",
    )
    .bind(provider)
    .bind(cluster_id)
    .fetch_all(db)
    .await?;
    Ok(rows.into_iter().map(machine_from_row).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str =
        "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIJ4wr5l52IynuHSYgOHsSVFPdxemZHPicm4nrwsjpgbE";

    #[test]
    fn host_keys_are_normalized_without_their_comment() {
        assert_eq!(normalize_host_key(&format!("{KEY} root@h")).unwrap(), KEY);
        assert_eq!(normalize_host_key(&format!("  {KEY}\n")).unwrap(), KEY);
    }

    #[test]
    fn malformed_host_keys_are_rejected() {
        assert!(normalize_host_key("").is_err());
        assert!(normalize_host_key("ssh-ed25519 notbase64!").is_err());
        assert!(normalize_host_key(&format!("{KEY}\n{KEY}")).is_err());
    }

    #[test]
    fn hostnames_follow_rfc_1123() {
        assert!(validate_hostname("node-1.example.com").is_ok());
        assert!(validate_hostname("-bad").is_err());
        assert!(validate_hostname("bad_name").is_err());
        assert!(validate_hostname("").is_err());
    }

    #[test]
    fn capacity_errors_are_fatal_and_name_the_free_count() {
        let err = InfraError::NoCapacity {
            provider: "pool",
            cluster_id: Uuid::nil(),
            profile: "standard".into(),
            needed: 3,
            free: 1,
        };
        assert!(!err.is_retryable());
        let step: StepError = err.into();
        assert!(!step.is_retryable());
        assert!(
            step.message().contains("only 1 are free"),
            "{}",
            step.message()
        );
        assert!(StepError::from(InfraError::system("ip failed")).is_retryable());
    }
}
