//! The `local` provider: real lightweight Linux containers on this machine,
//! for development, the demo and the tests.
//!
//! Each container is a set of namespaces around its own `sshd`:
//!
//! - a network namespace (`/run/netns/orr-<name>`) with a static address on a
//!   bridge this provider creates (default `orrery0`, 10.77.0.1/24); the bridge
//!   address is the containers' default route, so they reach services on this
//!   machine at that address (the Ambari emulator, for instance). Nothing is
//!   forwarded or NATed: traffic stays on this machine;
//! - mount, UTS and PID namespaces: a copy-on-write view of the host's root
//!   file system (overlayfs, lowerdir=/), fresh /proc, /sys, /dev, /run and
//!   /tmp, its own hostname, and an init that dies with everything in it;
//! - Debian's OpenSSH `sshd` with an ed25519 host key generated at creation
//!   (pinned in the inventory) that accepts the platform's key for root.
//!
//! See [`container`] for the on-disk layout. Container names are the
//! machines' hostnames, derived from the cluster (`<prefix><tag>-<i>`), so
//! allocating again after a crash finds the containers already made.
//! Allocation creates containers up to a capacity; release destroys them and
//! deletes their inventory rows.
//!
//! Needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN), overlayfs, `ip` (iproute2),
//! `unshare`/`setsid`/`pivot_root`/`mount` (util-linux) and `sshd`
//! (openssh-server); [`LocalProvider::check`] says what is missing.

pub mod container;

use std::{net::Ipv4Addr, path::PathBuf, sync::Arc, time::Duration};

use async_trait::async_trait;
use sqlx::PgPool;
use uuid::Uuid;

pub use container::{ContainerHost, ContainerInfo, HostConfig, Reservation};

use super::{
    cluster_machines, cluster_tag, lock_cluster, Health, InfraError, Machine, ObservedMachine,
    Provider,
};

const PROVIDER: &str = "local";

/// Configuration of the local provider.
#[derive(Debug, Clone)]
pub struct LocalConfig {
    /// Where container state lives (`ORRERY_LOCAL_STATE_DIR`, default
    /// `/var/lib/orrery/containers`).
    pub state_dir: PathBuf,
    /// The bridge (`ORRERY_LOCAL_BRIDGE`, default `orrery0`).
    pub bridge: String,
    /// The bridge's address and prefix (`ORRERY_LOCAL_SUBNET`, default `10.77.0.1/24`).
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// Container names start with this (`ORRERY_LOCAL_PREFIX`, default `node-`);
    /// `list` and the capacity only count containers with this prefix.
    pub name_prefix: String,
    /// How many containers may exist at once (`ORRERY_LOCAL_CAPACITY`, default 8).
    pub capacity: usize,
    /// Public key lines accepted for root in every container (the platform's key).
    pub authorized_keys: Vec<String>,
    /// How long a container may take to answer on its SSH port.
    pub start_timeout: Duration,
}

impl LocalConfig {
    /// Defaults, overridden by the `ORRERY_LOCAL_*` variables; a bad value is
    /// an error naming the variable.
    pub fn from_env(authorized_key: &str) -> Result<Self, InfraError> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let subnet = var("ORRERY_LOCAL_SUBNET").unwrap_or_else(|| "10.77.0.1/24".into());
        let (gateway, prefix_len) = parse_subnet(&subnet)
            .map_err(|e| InfraError::Invalid(format!("ORRERY_LOCAL_SUBNET=`{subnet}`: {e}")))?;
        let capacity = match var("ORRERY_LOCAL_CAPACITY") {
            Some(v) => v.parse().map_err(|_| {
                InfraError::Invalid(format!("ORRERY_LOCAL_CAPACITY=`{v}` is not a number"))
            })?,
            None => 8,
        };
        Ok(LocalConfig {
            state_dir: var("ORRERY_LOCAL_STATE_DIR")
                .unwrap_or_else(|| "/var/lib/orrery/containers".into())
                .into(),
            bridge: var("ORRERY_LOCAL_BRIDGE").unwrap_or_else(|| "orrery0".into()),
            gateway,
            prefix_len,
            name_prefix: var("ORRERY_LOCAL_PREFIX").unwrap_or_else(|| "node-".into()),
            capacity,
            authorized_keys: vec![authorized_key.to_owned()],
            start_timeout: Duration::from_secs(15),
        })
    }
}

/// Parse `10.77.0.1/24` into the gateway address and prefix length.
pub fn parse_subnet(text: &str) -> Result<(Ipv4Addr, u8), String> {
    let (addr, len) = text
        .split_once('/')
        .ok_or("expected <bridge address>/<prefix length>, e.g. 10.77.0.1/24")?;
    let addr: Ipv4Addr = addr
        .parse()
        .map_err(|_| format!("`{addr}` is not an IPv4 address"))?;
    let len: u8 = len
        .parse()
        .map_err(|_| format!("`{len}` is not a prefix length"))?;
    if !(8..=30).contains(&len) {
        return Err(format!("prefix length {len} is outside 8..=30"));
    }
    Ok((addr, len))
}

/// The `local` provider.
pub struct LocalProvider {
    pool: PgPool,
    config: LocalConfig,
    host: Arc<ContainerHost>,
}

impl LocalProvider {
    pub fn new(pool: PgPool, config: LocalConfig) -> Result<Self, InfraError> {
        if config.name_prefix.is_empty() {
            return Err(InfraError::Invalid(
                "local provider: empty name prefix".into(),
            ));
        }
        // The prefix must itself be a valid start of a hostname.
        super::validate_hostname(&format!("{}x", config.name_prefix))?;
        for key in &config.authorized_keys {
            super::normalize_host_key(key).map_err(|e| {
                InfraError::Invalid(format!("local provider: bad authorized key: {e}"))
            })?;
        }
        let host = Arc::new(ContainerHost::new(HostConfig {
            state_root: config.state_dir.clone(),
            bridge: config.bridge.clone(),
            gateway: config.gateway,
            prefix_len: config.prefix_len,
            authorized_keys: config.authorized_keys.clone(),
            start_timeout: config.start_timeout,
        }));
        Ok(LocalProvider { pool, config, host })
    }

    /// Can this machine run local containers? The error says everything that
    /// is missing (privileges, namespaces, overlayfs, programs).
    pub fn check() -> Result<(), InfraError> {
        let mut problems = Vec::new();
        let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_owned())
                .unwrap_or_default()
        };
        let euid = field("Uid:")
            .split_whitespace()
            .nth(1)
            .unwrap_or("?")
            .to_owned();
        if euid != "0" {
            problems.push(format!("not running as root (effective uid {euid})"));
        }
        let caps = u64::from_str_radix(&field("CapEff:"), 16).unwrap_or(0);
        for (bit, name) in [(21, "CAP_SYS_ADMIN"), (12, "CAP_NET_ADMIN")] {
            if caps & (1 << bit) == 0 {
                problems.push(format!("{name} is not in the effective capabilities"));
            }
        }
        let filesystems = std::fs::read_to_string("/proc/filesystems").unwrap_or_default();
        if !filesystems.contains("overlay") {
            problems.push("the kernel has no overlay file system (modprobe overlay)".into());
        }
        for (program, package) in [
            ("/usr/sbin/sshd", "openssh-server"),
            ("ip", "iproute2"),
            ("unshare", "util-linux"),
            ("setsid", "util-linux"),
            ("pivot_root", "util-linux"),
            ("mount", "mount"),
        ] {
            if !program_exists(program) {
                problems.push(format!("`{program}` not found (Debian package {package})"));
            }
        }
        if problems.is_empty() {
            // The real test: can we make the namespaces at all (seccomp,
            // user-namespace-only containers and the like say no here)?
            let out = std::process::Command::new("unshare")
                .args(["--mount", "--uts", "--pid", "--net", "--fork", "true"])
                .output();
            match out {
                Ok(out) if out.status.success() => {}
                Ok(out) => problems.push(format!(
                    "`unshare --mount --uts --pid --net` fails: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )),
                Err(e) => problems.push(format!("cannot run unshare: {e}")),
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(InfraError::Unsupported(problems.join("; ")))
        }
    }

    pub fn config(&self) -> &LocalConfig {
        &self.config
    }

    /// The container host, for creating and destroying containers directly.
    pub fn containers(&self) -> &Arc<ContainerHost> {
        &self.host
    }

    /// The bridge address: where containers reach services on this machine.
    pub fn gateway(&self) -> Ipv4Addr {
        self.config.gateway
    }

    /// The hostname (and container name) of machine `index` (1-based) of a cluster.
    pub fn hostname_for(&self, cluster_id: Uuid, index: usize) -> String {
        format!(
            "{}{}-{index}",
            self.config.name_prefix,
            cluster_tag(cluster_id)
        )
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, InfraError>
    where
        T: Send + 'static,
        F: FnOnce(&ContainerHost) -> Result<T, InfraError> + Send + 'static,
    {
        let host = self.host.clone();
        tokio::task::spawn_blocking(move || f(&host))
            .await
            .map_err(|e| InfraError::system(format!("container task failed: {e}")))?
    }

    /// Destroy containers in parallel; the first error wins, after all ran.
    async fn destroy_all(&self, names: Vec<String>) -> Result<(), InfraError> {
        let tasks = names
            .into_iter()
            .map(|name| self.blocking(move |h| h.destroy(&name)));
        for result in futures::future::join_all(tasks).await {
            result?;
        }
        Ok(())
    }
}

fn program_exists(program: &str) -> bool {
    if program.contains('/') {
        return std::path::Path::new(program).exists();
    }
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"])
        .any(|dir| std::path::Path::new(dir).join(program).exists());
    found
}

#[async_trait]
impl Provider for LocalProvider {
    fn name(&self) -> &'static str {
        PROVIDER
    }

    async fn allocate(
        &self,
        cluster_id: Uuid,
        profile: &str,
        count: usize,
    ) -> Result<Vec<Machine>, InfraError> {
        Self::check()?;
        let mut tx = self.pool.begin().await?;
        lock_cluster(&mut tx, cluster_id).await?;
        let names: Vec<String> = (1..=count)
            .map(|i| self.hostname_for(cluster_id, i))
            .collect();

        let (prefix, capacity) = (self.config.name_prefix.clone(), self.config.capacity);
        let reserve = names.clone();
        let reservation = self
            .blocking(move |h| h.reserve(&reserve, Some(cluster_id), Some((&prefix, capacity))))
            .await?;
        if let Reservation::Full { free, needed } = reservation {
            return Err(InfraError::NoCapacity {
                provider: PROVIDER,
                cluster_id,
                profile: profile.to_owned(),
                needed,
                free,
            });
        }

        // Start (or check) every container in parallel; each takes ~0.2 s.
        let starts = names
            .iter()
            .cloned()
            .map(|name| self.blocking(move |h| h.start(&name)));
        let mut started = Vec::new();
        for result in futures::future::join_all(starts).await {
            started.push(result?);
        }

        for info in started {
            let address = info.address.ok_or_else(|| {
                InfraError::system(format!("container {} has no address", info.name))
            })?;
            let host_key = info.host_key.ok_or_else(|| {
                InfraError::system(format!("container {} has no host key", info.name))
            })?;
            sqlx::query(
                "INSERT INTO machines (id, provider, hostname, address, ssh_port, host_key, profile, state, cluster_id) \
                 VALUES ($1, $2, $3, $4, 22, $5, $6, 'allocated', $7) \
                 ON CONFLICT (hostname) DO UPDATE SET address = EXCLUDED.address, \
                 ssh_port = 22, host_key = EXCLUDED.host_key, state = 'allocated', \
                 cluster_id = EXCLUDED.cluster_id, updated_at = now() \
                 WHERE machines.provider = EXCLUDED.provider",
            )
            .bind(Uuid::now_v7())
            .bind(PROVIDER)
            .bind(&info.name)
            .bind(address.to_string())
            .bind(&host_key)
            .bind(profile)
            .bind(cluster_id)
            .execute(&mut *tx)
            .await?;
        }
        let machines = cluster_machines(&mut *tx, PROVIDER, cluster_id).await?;
        tx.commit().await?;
        tracing::info!(%cluster_id, count = machines.len(), "local machines allocated");
        Ok(machines)
    }

    async fn release(&self, cluster_id: Uuid) -> Result<usize, InfraError> {
        let mut tx = self.pool.begin().await?;
        sqlx::query(
            "SELECT pg_advisory_xact_lock(hashtextextended('orrery.infra.' || $1::text, 0))",
        )
        .bind(cluster_id)
        .execute(&mut *tx)
        .await?;
        let rows: Vec<(String,)> =
            sqlx::query_as("SELECT hostname FROM machines WHERE provider = $1 AND cluster_id = $2")
                .bind(PROVIDER)
                .bind(cluster_id)
                .fetch_all(&mut *tx)
                .await?;
        let prefix = self.config.name_prefix.clone();
        // Containers of an interrupted allocation have no row yet: find them
        // by the cluster recorded in their state dir.
        let made = self
            .blocking(move |h| {
                Ok(h.list(&prefix)?
                    .into_iter()
                    .filter(|c| c.cluster_id == Some(cluster_id))
                    .map(|c| c.name)
                    .collect::<Vec<_>>())
            })
            .await?;
        let mut names: Vec<String> = rows.into_iter().map(|(h,)| h).chain(made).collect();
        names.sort();
        names.dedup();
        let released = names.len();
        self.destroy_all(names.clone()).await?;
        sqlx::query(
            "DELETE FROM machines WHERE provider = $1 AND (cluster_id = $2 OR hostname = ANY($3))",
        )
        .bind(PROVIDER)
        .bind(cluster_id)
        .bind(&names)
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        tracing::info!(%cluster_id, released, "local machines released");
        Ok(released)
    }

    async fn reclaim(&self, hostname: &str) -> Result<(), InfraError> {
        if !hostname.starts_with(&self.config.name_prefix) {
            return Err(InfraError::Invalid(format!(
                "`{hostname}` is not a container of this local provider (prefix `{}`)",
                self.config.name_prefix
            )));
        }
        let name = hostname.to_owned();
        self.blocking(move |h| h.destroy(&name)).await?;
        sqlx::query("DELETE FROM machines WHERE provider = $1 AND hostname = $2")
            .bind(PROVIDER)
            .bind(hostname)
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    async fn list(&self) -> Result<Vec<ObservedMachine>, InfraError> {
        let prefix = self.config.name_prefix.clone();
        let containers = self.blocking(move |h| h.list(&prefix)).await?;
        Ok(containers
            .into_iter()
            .map(|c| ObservedMachine {
                hostname: c.name,
                address: c.address.map(|a| a.to_string()).unwrap_or_default(),
                ssh_port: 22,
                host_key: c.host_key,
                cluster_id: c.cluster_id,
                running: c.running,
            })
            .collect())
    }

    async fn health(&self) -> Result<Health, InfraError> {
        let prefix = self.config.name_prefix.clone();
        let containers = self.blocking(move |h| h.list(&prefix)).await?;
        let in_use = containers.len();
        let free = self.config.capacity.saturating_sub(in_use);
        let (healthy, detail) = match Self::check() {
            Ok(()) => (
                true,
                format!(
                    "{in_use} of {} containers in use on bridge {} ({}/{})",
                    self.config.capacity,
                    self.config.bridge,
                    self.config.gateway,
                    self.config.prefix_len
                ),
            ),
            Err(e) => (false, e.to_string()),
        };
        Ok(Health {
            provider: PROVIDER.to_owned(),
            healthy,
            free,
            in_use,
            detail,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnets_parse_with_their_prefix() {
        assert_eq!(
            parse_subnet("10.77.0.1/24").unwrap(),
            (Ipv4Addr::new(10, 77, 0, 1), 24)
        );
        assert!(parse_subnet("10.77.0.1").is_err());
        assert!(parse_subnet("10.77.0.1/31").is_err());
        assert!(parse_subnet("nope/24").is_err());
    }
}
