//! The `pool` provider: machines an operator registered in the inventory,
//! each already running `sshd` with a stable host key.
//!
//! The inventory is the whole truth here: allocating marks free rows as
//! allocated to the cluster (`FOR UPDATE SKIP LOCKED`, so two concurrent
//! allocations never take the same machine and never wait on each other),
//! releasing marks them free again. Nothing is created or destroyed.

use std::{net::SocketAddr, time::Duration};

use async_trait::async_trait;
use sqlx::PgPool;
use uuid::Uuid;

use super::{
    cluster_machines, lock_cluster, machine_from_row, normalize_host_key, validate_address,
    validate_hostname, Health, InfraError, Machine, ObservedMachine, Provider,
};

const PROVIDER: &str = "pool";

/// How long `list` waits for a machine's SSH port before calling it not running.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// A machine to add to the pool.
#[derive(Debug, Clone)]
pub struct NewMachine {
    pub hostname: String,
    pub address: String,
    pub ssh_port: u16,
    /// Its OpenSSH public host key line (`ssh-ed25519 AAAA...`), pinned from now on.
    pub host_key: String,
    /// Which allocation requests it serves (default `standard`).
    pub profile: String,
}

/// Register a free `standard` machine in the pool (the operator command).
/// See [`register`].
pub async fn register_machine(
    pool: &PgPool,
    hostname: &str,
    address: &str,
    port: u16,
    host_key: &str,
) -> Result<Machine, InfraError> {
    register(
        pool,
        &NewMachine {
            hostname: hostname.to_owned(),
            address: address.to_owned(),
            ssh_port: port,
            host_key: host_key.to_owned(),
            profile: "standard".to_owned(),
        },
    )
    .await
}

/// Register a free machine in the pool. The host key line is validated and
/// stored without its comment. Registering the same machine again (same
/// hostname, address, port and key) returns the existing row; a different
/// machine under a registered hostname is refused.
pub async fn register(pool: &PgPool, new: &NewMachine) -> Result<Machine, InfraError> {
    validate_hostname(&new.hostname)?;
    validate_address(&new.address)?;
    if new.ssh_port == 0 {
        return Err(InfraError::Invalid("SSH port must be 1..=65535".into()));
    }
    let host_key = normalize_host_key(&new.host_key)?;
    let inserted: Option<(Uuid, String, String, i32, String)> = sqlx::query_as(
        "INSERT INTO machines (id, provider, hostname, address, ssh_port, host_key, profile, state) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, 'free') \
         ON CONFLICT (hostname) DO NOTHING \
         RETURNING id, hostname, address, ssh_port, host_key",
    )
    .bind(Uuid::now_v7())
    .bind(PROVIDER)
    .bind(&new.hostname)
    .bind(&new.address)
    .bind(i32::from(new.ssh_port))
    .bind(&host_key)
    .bind(&new.profile)
    .fetch_optional(pool)
    .await?;
    if let Some(row) = inserted {
        return Ok(machine_from_row(row));
    }
    let (id, provider, address, port, key): (Uuid, String, String, i32, String) = sqlx::query_as(
        "SELECT id, provider, address, ssh_port, host_key FROM machines WHERE hostname = $1",
    )
    .bind(&new.hostname)
    .fetch_one(pool)
    .await?;
    if provider == PROVIDER
        && address == new.address
        && port == i32::from(new.ssh_port)
        && key == host_key
    {
        return Ok(machine_from_row((
            id,
            new.hostname.clone(),
            address,
            port,
            key,
        )));
    }
    Err(InfraError::Invalid(format!(
        "hostname `{}` is already registered ({provider} provider, {address}:{port}) with a \
         different address, port or host key; retire it first",
        new.hostname
    )))
}

/// The `pool` provider.
pub struct PoolProvider {
    pool: PgPool,
}

impl PoolProvider {
    pub fn new(pool: PgPool) -> Self {
        PoolProvider { pool }
    }
}

#[async_trait]
impl Provider for PoolProvider {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    async fn allocate(
        &self,
        cluster_id: Uuid,
        profile: &str,
        count: usize,
    ) -> Result<Vec<Machine>, InfraError> {
        let mut tx = self.pool.begin().await?;
        lock_cluster(&mut tx, cluster_id).await?;
        let held = cluster_machines(&mut *tx, PROVIDER, cluster_id).await?;
        let needed = count.saturating_sub(held.len());
        if needed == 0 {
            tx.commit().await?;
            return Ok(held);
        }
        // Rows another transaction is taking right now are skipped, not waited on.
        let taken: Vec<(Uuid,)> = sqlx::query_as(
            "SELECT id FROM machines \
             WHERE provider = $1 AND profile = $2 AND state = 'free' AND cluster_id IS NULL \
             ORDER BY hostname LIMIT $3 FOR UPDATE SKIP LOCKED",
        )
        .bind(PROVIDER)
        .bind(profile)
        .bind(needed as i64)
        .fetch_all(&mut *tx)
        .await?;
        if taken.len() < needed {
            let (free,): (i64,) = sqlx::query_as(
                "SELECT count(*) FROM machines WHERE provider = $1 AND profile = $2 AND state = 'free' AND cluster_id IS NULL",
            )
            .bind(PROVIDER)
            .bind(profile)
            .fetch_one(&mut *tx)
            .await?;
            tx.rollback().await?;
            return Err(InfraError::NoCapacity {
                provider: PROVIDER,
                cluster_id,
                profile: profile.to_owned(),
                needed,
                free: usize::try_from(free).unwrap_or(0),
            });
        }
        let ids: Vec<Uuid> = taken.into_iter().map(|(id,)| id).collect();
        sqlx::query(
            "UPDATE machines SET state = 'allocated', cluster_id = $1, updated_at = now() \
             WHERE id = ANY($2)",
        )
        .bind(cluster_id)
        .bind(&ids)
        .execute(&mut *tx)
        .await?;
        let machines = cluster_machines(&mut *tx, PROVIDER, cluster_id).await?;
        tx.commit().await?;
        tracing::info!(%cluster_id, profile, count = machines.len(), "pool machines allocated");
        Ok(machines)
    }

    async fn release(&self, cluster_id: Uuid) -> Result<usize, InfraError> {
        // Broken machines lose their cluster but stay broken for an operator.
        let done = sqlx::query(
            "UPDATE machines SET state = CASE WHEN state = 'allocated' THEN 'free' ELSE state END, \
             cluster_id = NULL, updated_at = now() \
             WHERE provider = $1 AND cluster_id = $2",
        )
        .bind(PROVIDER)
        .bind(cluster_id)
        .execute(&self.pool)
        .await?;
        let released = usize::try_from(done.rows_affected()).unwrap_or(0);
        tracing::info!(%cluster_id, released, "pool machines released");
        Ok(released)
    }

    async fn reclaim(&self, hostname: &str) -> Result<(), InfraError> {
        sqlx::query(
            "UPDATE machines SET state = 'free', cluster_id = NULL, updated_at = now() \
             WHERE provider = $1 AND hostname = $2 AND state = 'allocated'",
        )
        .bind(PROVIDER)
        .bind(hostname)
        .execute(&self.pool)
        .await?;
        Ok(())
    }

    /// The registered (not retired) machines, each probed on its SSH port.
    async fn list(&self) -> Result<Vec<ObservedMachine>, InfraError> {
        let rows: Vec<(String, String, i32, String, Option<Uuid>)> = sqlx::query_as(
            "SELECT hostname, address, ssh_port, host_key, cluster_id FROM machines \
             WHERE provider = $1 AND state <> 'retired' ORDER BY hostname",
        )
        .bind(PROVIDER)
        .fetch_all(&self.pool)
        .await?;
        let probes =
            rows.into_iter()
                .map(|(hostname, address, port, key, cluster_id)| async move {
                    let ssh_port = u16::try_from(port).unwrap_or(22);
                    let running = match address.parse::<std::net::IpAddr>() {
                        Ok(ip) => matches!(
                            tokio::time::timeout(
                                PROBE_TIMEOUT,
                                tokio::net::TcpStream::connect(SocketAddr::new(ip, ssh_port)),
                            )
                            .await,
                            Ok(Ok(_))
                        ),
                        Err(_) => false,
                    };
                    ObservedMachine {
                        hostname,
                        address,
                        ssh_port,
                        host_key: Some(key),
                        cluster_id,
                        running,
                    }
                });
        Ok(futures::future::join_all(probes).await)
    }

    async fn health(&self) -> Result<Health, InfraError> {
        let (free, in_use): (i64, i64) = sqlx::query_as(
            "SELECT count(*) FILTER (WHERE state = 'free'), count(*) FILTER (WHERE state = 'allocated') \
             FROM machines WHERE provider = $1",
        )
        .bind(PROVIDER)
        .fetch_one(&self.pool)
        .await?;
        Ok(Health {
            provider: PROVIDER.to_owned(),
            healthy: true,
            free: usize::try_from(free).unwrap_or(0),
            in_use: usize::try_from(in_use).unwrap_or(0),
            detail: format!("{free} free and {in_use} allocated registered machines"),
        })
    }
}
