//! Local containers: creating, finding and destroying them.
//!
//! Everything here is synchronous (it runs `ip`, `setsid`, `kill` and touches
//! files); [`super::LocalProvider`] calls it from `spawn_blocking`, and test
//! guards can call it from `Drop`.
//!
//! # Layout
//!
//! One directory per container under the state root (`<state root>/<name>/`):
//!
//! | path            | what                                                        |
//! |-----------------|-------------------------------------------------------------|
//! | `address`       | its IPv4 address on the bridge (the reservation)            |
//! | `cluster`       | the cluster it was made for, if any                         |
//! | `host_key.pub`  | its SSH host key, pinned in the inventory                   |
//! | `veth`          | the host side of its veth pair (plugged into the bridge)    |
//! | `pid`           | host pid of its launcher (`unshare`, parent of its PID 1)   |
//! | `owner`         | pid of the process that created it (for test sweeps)        |
//! | `init.sh`       | the init script it runs                                     |
//! | `console.log`   | output of the init script and sshd                          |
//! | `upper/`,`work/`| the overlay's writable layer: everything it wrote           |
//! | `root/`         | the overlay mount point (mounted inside the container only) |
//!
//! Its network namespace is `/run/netns/orr-<name>` (`ip netns`). The host
//! key and `authorized_keys` live in `upper/`, so a container that is started
//! again (after a reboot) keeps its identity.
//!
//! Addresses are handed out under an exclusive lock on `<state root>/.lock`,
//! by scanning the `address` files: two processes sharing a state root (and
//! so a bridge) never hand out the same address. They go round-robin (after
//! `<state root>/.last-address`) and the host's ARP entry is flushed when one
//! is plugged or unplugged: a recycled address must not reach the old MAC.
//!
//! The container's `/root/.bashrc` and `.profile` come from `/etc/skel`, not
//! from this host's root (bash reads `.bashrc` for every SSH command).

use std::{
    collections::BTreeSet,
    fs,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddr, TcpStream},
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};
use uuid::Uuid;

use crate::infra::InfraError;

const INIT_SCRIPT: &str = include_str!("init.sh");
const NETNS_PREFIX: &str = "orr-";
const LOCK_FILE: &str = ".lock";
const LAST_ADDRESS_FILE: &str = ".last-address";

/// Where containers live and how they are networked.
#[derive(Debug, Clone)]
pub struct HostConfig {
    /// One directory per container (see the module docs).
    pub state_root: PathBuf,
    /// The Linux bridge the containers are plugged into (created if missing).
    pub bridge: String,
    /// The bridge's own address: the containers' default route, and where
    /// they reach services on this machine.
    pub gateway: Ipv4Addr,
    pub prefix_len: u8,
    /// OpenSSH public key lines put in each container's `/root/.ssh/authorized_keys`.
    pub authorized_keys: Vec<String>,
    /// How long a container may take to answer on its SSH port.
    pub start_timeout: Duration,
}

/// What is known about one container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerInfo {
    pub name: String,
    /// `None` when only a stray network namespace was found.
    pub address: Option<Ipv4Addr>,
    pub host_key: Option<String>,
    pub cluster_id: Option<Uuid>,
    pub running: bool,
}

/// The outcome of reserving names under a capacity limit.
#[derive(Debug, PartialEq, Eq)]
pub enum Reservation {
    Reserved,
    /// Not enough room: `needed` containers were missing, only `free` could be made.
    Full {
        free: usize,
        needed: usize,
    },
}

/// The containers of one state root.
#[derive(Debug)]
pub struct ContainerHost {
    config: HostConfig,
}

impl ContainerHost {
    pub fn new(config: HostConfig) -> Self {
        ContainerHost { config }
    }

    pub fn config(&self) -> &HostConfig {
        &self.config
    }

    /// The network namespace of container `name`.
    pub fn netns(name: &str) -> String {
        format!("{NETNS_PREFIX}{name}")
    }

    fn dir(&self, name: &str) -> PathBuf {
        self.config.state_root.join(name)
    }

    /// Create the bridge with its address if it is missing (idempotent, and
    /// safe against another process doing the same).
    pub fn ensure_bridge(&self) -> Result<(), InfraError> {
        let bridge = &self.config.bridge;
        if !link_exists(bridge) {
            let out = Command::new("ip")
                .args(["link", "add", bridge, "type", "bridge"])
                .output()
                .map_err(|e| InfraError::system(format!("cannot run `ip`: {e}")))?;
            if !out.status.success() && !link_exists(bridge) {
                return Err(InfraError::system(format!(
                    "cannot create bridge {bridge}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        let cidr = format!("{}/{}", self.config.gateway, self.config.prefix_len);
        run("ip", &["addr", "replace", &cidr, "dev", bridge])?;
        run("ip", &["link", "set", bridge, "up"])?;
        Ok(())
    }

    /// Reserve state directories (and addresses) for `names`; names already
    /// reserved are kept as they are. With `limit = Some((prefix, capacity))`,
    /// at most `capacity` containers whose name starts with `prefix` may exist
    /// afterwards, or nothing is reserved.
    pub fn reserve(
        &self,
        names: &[String],
        cluster_id: Option<Uuid>,
        limit: Option<(&str, usize)>,
    ) -> Result<Reservation, InfraError> {
        fs::create_dir_all(&self.config.state_root).map_err(|e| {
            InfraError::system(format!(
                "cannot create state dir {}: {e}",
                self.config.state_root.display()
            ))
        })?;
        let lock = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.config.state_root.join(LOCK_FILE))
            .map_err(|e| InfraError::system(format!("cannot open state lock: {e}")))?;
        lock.lock()
            .map_err(|e| InfraError::system(format!("cannot lock state dir: {e}")))?;

        let existing = self.names()?;
        let missing: Vec<&String> = names.iter().filter(|n| !existing.contains(*n)).collect();
        if let Some((prefix, capacity)) = limit {
            let held = existing.iter().filter(|n| n.starts_with(prefix)).count();
            let free = capacity.saturating_sub(held);
            if missing.len() > free {
                return Ok(Reservation::Full {
                    free,
                    needed: missing.len(),
                });
            }
        }
        let mut used: BTreeSet<Ipv4Addr> = existing
            .iter()
            .filter_map(|n| read_trimmed(&self.dir(n).join("address")))
            .filter_map(|a| a.parse().ok())
            .collect();
        // Addresses go round-robin, not lowest-free: an address reused at
        // once would meet stale neighbour (ARP) entries for the old MAC.
        let cursor = self.config.state_root.join(LAST_ADDRESS_FILE);
        let mut last: Option<Ipv4Addr> = read_trimmed(&cursor).and_then(|a| a.parse().ok());
        for name in missing {
            let address = self.free_address(&used, last)?;
            used.insert(address);
            last = Some(address);
            write(&cursor, &address.to_string())?;
            let dir = self.dir(name);
            let tmp = self.config.state_root.join(format!(".{name}.tmp"));
            let _ = fs::remove_dir_all(&tmp);
            fs::create_dir_all(&tmp).map_err(sys_err("create", &tmp))?;
            write(&tmp.join("address"), &address.to_string())?;
            if let Some(cluster) = cluster_id {
                write(&tmp.join("cluster"), &cluster.to_string())?;
            }
            write(&tmp.join("owner"), &std::process::id().to_string())?;
            // The rename is the reservation: a crash never leaves half a one.
            fs::rename(&tmp, &dir).map_err(sys_err("rename", &dir))?;
        }
        drop(lock);
        Ok(Reservation::Reserved)
    }

    /// The first address after `last` (wrapping) that is neither the
    /// network, the broadcast, the gateway nor used.
    fn free_address(
        &self,
        used: &BTreeSet<Ipv4Addr>,
        last: Option<Ipv4Addr>,
    ) -> Result<Ipv4Addr, InfraError> {
        let gateway = u32::from(self.config.gateway);
        let mask = u32::MAX
            .checked_shl(32 - u32::from(self.config.prefix_len))
            .unwrap_or(0);
        let network = gateway & mask;
        let broadcast = network | !mask;
        let start = last
            .map(u32::from)
            .filter(|a| *a > network && *a < broadcast)
            .map_or(network + 1, |a| a + 1);
        (start..broadcast)
            .chain(network + 1..start)
            .map(Ipv4Addr::from)
            .find(|a| u32::from(*a) != gateway && !used.contains(a))
            .ok_or_else(|| {
                InfraError::system(format!(
                    "no free address left on {}/{}",
                    self.config.gateway, self.config.prefix_len
                ))
            })
    }

    /// Reserve (if needed) and start container `name`. Idempotent.
    pub fn create(
        &self,
        name: &str,
        cluster_id: Option<Uuid>,
    ) -> Result<ContainerInfo, InfraError> {
        crate::infra::validate_hostname(name)?;
        self.reserve(&[name.to_owned()], cluster_id, None)?;
        self.start(name)
    }

    /// Start reserved container `name`, or return it if it already runs:
    /// a container whose processes died (a reboot, a crash) is set up again
    /// around its kept state (same address, host key and files).
    pub fn start(&self, name: &str) -> Result<ContainerInfo, InfraError> {
        let dir = self.dir(name);
        let address: Ipv4Addr = read_trimmed(&dir.join("address"))
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| InfraError::system(format!("container {name} is not reserved")))?;
        if self.launcher(name).is_some() {
            self.wait_ready(name, address)?;
            return self.info(name).map(|i| i.expect("reserved"));
        }
        self.stop(name)?;
        self.prepare_files(name)?;
        self.ensure_bridge()?;
        self.plug(name, address)?;
        self.launch(name)?;
        self.wait_ready(name, address)?;
        tracing::info!(container = name, %address, "local container started");
        self.info(name).map(|i| i.expect("reserved"))
    }

    /// Write the container's SSH identity and configuration into its upper layer.
    fn prepare_files(&self, name: &str) -> Result<(), InfraError> {
        let dir = self.dir(name);
        let upper = dir.join("upper");
        for sub in ["upper", "work", "root"] {
            fs::create_dir_all(dir.join(sub)).map_err(sys_err("create", &dir.join(sub)))?;
        }
        let ssh_dir = upper.join("etc/ssh/orrery");
        fs::create_dir_all(&ssh_dir).map_err(sys_err("create", &ssh_dir))?;
        let private = ssh_dir.join("ssh_host_ed25519_key");
        let public = dir.join("host_key.pub");
        if !private.exists() || !public.exists() {
            let key = crate::ssh::generate_ed25519(&format!("root@{name}"));
            let pem = key
                .to_openssh(russh::keys::ssh_key::LineEnding::LF)
                .map_err(|e| InfraError::system(format!("cannot encode host key: {e}")))?;
            write_mode(&private, pem.as_bytes(), 0o600)?;
            let line = crate::ssh::public_line(key.public_key(), "");
            write(&public, &line)?;
        }
        write(&ssh_dir.join("sshd_config"), SSHD_CONFIG)?;

        let root_ssh = upper.join("root/.ssh");
        fs::create_dir_all(&root_ssh).map_err(sys_err("create", &root_ssh))?;
        fs::set_permissions(upper.join("root"), fs::Permissions::from_mode(0o700))
            .map_err(sys_err("chmod", &upper.join("root")))?;
        fs::set_permissions(&root_ssh, fs::Permissions::from_mode(0o700))
            .map_err(sys_err("chmod", &root_ssh))?;
        // A fresh machine's root shell files, not this host's: bash reads
        // ~/.bashrc for every SSH command, and a developer's (pyenv, nvm...)
        // would make each command slow or hang.
        for file in [".bashrc", ".profile"] {
            let target = upper.join("root").join(file);
            if !target.exists() {
                let skel = fs::read(Path::new("/etc/skel").join(file)).unwrap_or_default();
                write_mode(&target, &skel, 0o644)?;
            }
        }
        let mut keys = self.config.authorized_keys.join("\n");
        keys.push('\n');
        write_mode(&root_ssh.join("authorized_keys"), keys.as_bytes(), 0o600)?;

        let address = read_trimmed(&dir.join("address")).unwrap_or_default();
        write(&upper.join("etc/hostname"), &format!("{name}\n"))?;
        write(
            &upper.join("etc/hosts"),
            &format!(
                "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{address}\t{name}\n"
            ),
        )?;
        write(&dir.join("init.sh"), INIT_SCRIPT)?;
        Ok(())
    }

    /// Make its network namespace and plug it into the bridge.
    fn plug(&self, name: &str, address: Ipv4Addr) -> Result<(), InfraError> {
        let ns = Self::netns(name);
        let veth = veth_name(&self.config.state_root, name);
        write(&self.dir(name).join("veth"), &veth)?;
        let cidr = format!("{address}/{}", self.config.prefix_len);
        let gateway = self.config.gateway.to_string();
        forget_neighbour(&self.config.bridge, address);
        run("ip", &["netns", "add", &ns])?;
        run(
            "ip",
            &[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ],
        )?;
        run(
            "ip",
            &["link", "set", &veth, "master", &self.config.bridge, "up"],
        )?;
        run("ip", &["-n", &ns, "addr", "add", &cidr, "dev", "eth0"])?;
        run("ip", &["-n", &ns, "link", "set", "eth0", "up"])?;
        run("ip", &["-n", &ns, "link", "set", "lo", "up"])?;
        run(
            "ip",
            &["-n", &ns, "route", "add", "default", "via", &gateway],
        )?;
        Ok(())
    }

    /// Start its launcher, detached from this process (it outlives it).
    fn launch(&self, name: &str) -> Result<(), InfraError> {
        let dir = self.dir(name);
        let _ = fs::remove_file(dir.join("pid"));
        let console = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("console.log"))
            .map_err(sys_err("open", &dir.join("console.log")))?;
        let console2 = console
            .try_clone()
            .map_err(|e| InfraError::system(format!("cannot dup console log: {e}")))?;
        // `setsid -f` forks, so the launcher is re-parented to init and never
        // becomes our zombie; `$$` survives the two execs, so `pid` is the
        // launcher's pid.
        let status = Command::new("setsid")
            .args([
                "-f",
                "/bin/sh",
                "-c",
                r#"echo $$ > "$1/pid"; exec ip netns exec "$2" unshare --mount --uts --pid --fork --kill-child /bin/bash "$1/init.sh" "$1" "$3""#,
                "orrery-launch",
            ])
            .arg(&dir)
            .arg(Self::netns(name))
            .arg(name)
            .stdin(Stdio::null())
            .stdout(console)
            .stderr(console2)
            .status()
            .map_err(|e| InfraError::system(format!("cannot run setsid: {e}")))?;
        if !status.success() {
            return Err(InfraError::system(format!(
                "launching container {name} failed ({status})"
            )));
        }
        Ok(())
    }

    /// Wait until its sshd sends a banner; a launcher that dies is reported
    /// with the tail of its console log.
    fn wait_ready(&self, name: &str, address: Ipv4Addr) -> Result<(), InfraError> {
        let deadline = Instant::now() + self.config.start_timeout;
        let target = SocketAddr::from((address, 22));
        // The pid file is written just before the launcher execs: only a
        // launcher missing for a while is dead (not one caught mid-write).
        let mut missing_since: Option<Instant> = None;
        loop {
            if ssh_banner(target) {
                return Ok(());
            }
            let pid_written = self.dir(name).join("pid").exists();
            if self.launcher(name).is_some() || !pid_written {
                missing_since = None;
            } else if missing_since.is_none() {
                missing_since = Some(Instant::now());
            }
            if missing_since.is_some_and(|t| t.elapsed() > Duration::from_millis(300)) {
                return Err(InfraError::system(format!(
                    "container {name} stopped while starting; console log:\n{}",
                    self.console_tail(name)
                )));
            }
            if Instant::now() > deadline {
                return Err(InfraError::system(format!(
                    "container {name} did not answer on {target} within {:?}; console log:\n{}",
                    self.config.start_timeout,
                    self.console_tail(name)
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last lines of its console log.
    pub fn console_tail(&self, name: &str) -> String {
        let text = fs::read_to_string(self.dir(name).join("console.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// The pid of its launcher, if that process is alive and really is its launcher.
    fn launcher(&self, name: &str) -> Option<u32> {
        let dir = self.dir(name);
        let pid: u32 = read_trimmed(&dir.join("pid"))?.parse().ok()?;
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        // A recycled pid would not carry this container's state dir as an
        // argument (`sh -c ... <dir>` before its exec, `.../<dir>/init.sh` after).
        let init = dir.join("init.sh");
        let ours = cmdline.split(|b| *b == 0).any(|arg| {
            arg == dir.as_os_str().as_encoded_bytes() || arg == init.as_os_str().as_encoded_bytes()
        });
        ours.then_some(pid)
    }

    /// Kill its processes and remove its network namespace and veth, keeping its state.
    fn stop(&self, name: &str) -> Result<bool, InfraError> {
        let ns = Self::netns(name);
        let ns_exists = Path::new("/run/netns").join(&ns).exists();
        let mut found = ns_exists;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            let mut pids: Vec<u32> = self.launcher(name).into_iter().collect();
            if ns_exists {
                pids.extend(netns_pids(&ns));
            }
            if pids.is_empty() {
                break;
            }
            found = true;
            let args: Vec<String> = pids.iter().map(u32::to_string).collect();
            let _ = Command::new("kill")
                .arg("-KILL")
                .args(&args)
                .stderr(Stdio::null())
                .status();
            if Instant::now() > deadline {
                return Err(InfraError::system(format!(
                    "processes of container {name} survive SIGKILL: {args:?}"
                )));
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        if ns_exists {
            let out = Command::new("ip")
                .args(["netns", "del", &ns])
                .output()
                .map_err(|e| InfraError::system(format!("cannot run `ip`: {e}")))?;
            if !out.status.success() && Path::new("/run/netns").join(&ns).exists() {
                return Err(InfraError::system(format!(
                    "cannot delete netns {ns}: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
        }
        if let Some(address) =
            read_trimmed(&self.dir(name).join("address")).and_then(|a| a.parse().ok())
        {
            forget_neighbour(&self.config.bridge, address);
        }
        let veth = read_trimmed(&self.dir(name).join("veth"))
            .unwrap_or_else(|| veth_name(&self.config.state_root, name));
        if link_exists(&veth) {
            found = true;
            let _ = Command::new("ip").args(["link", "del", &veth]).output();
        }
        Ok(found)
    }

    /// Destroy container `name`: processes, network and state. Idempotent;
    /// returns whether anything of it existed.
    pub fn destroy(&self, name: &str) -> Result<bool, InfraError> {
        let mut found = self.stop(name)?;
        let dir = self.dir(name);
        if dir.exists() {
            found = true;
            fs::remove_dir_all(&dir).map_err(sys_err("remove", &dir))?;
        }
        if found {
            tracing::info!(container = name, "local container destroyed");
        }
        Ok(found)
    }

    /// What is known about container `name` (`None`: nothing of it exists).
    pub fn info(&self, name: &str) -> Result<Option<ContainerInfo>, InfraError> {
        let dir = self.dir(name);
        let ns = Self::netns(name);
        let ns_exists = Path::new("/run/netns").join(&ns).exists();
        if !dir.exists() && !ns_exists {
            return Ok(None);
        }
        let running = self.launcher(name).is_some() || (ns_exists && !netns_pids(&ns).is_empty());
        Ok(Some(ContainerInfo {
            name: name.to_owned(),
            address: read_trimmed(&dir.join("address")).and_then(|a| a.parse().ok()),
            host_key: read_trimmed(&dir.join("host_key.pub")),
            cluster_id: read_trimmed(&dir.join("cluster")).and_then(|c| c.parse().ok()),
            running,
        }))
    }

    /// Every container whose name starts with `prefix`: state dirs, and
    /// network namespaces left without one.
    pub fn list(&self, prefix: &str) -> Result<Vec<ContainerInfo>, InfraError> {
        let mut names: BTreeSet<String> = self
            .names()?
            .into_iter()
            .filter(|n| n.starts_with(prefix))
            .collect();
        if let Ok(entries) = fs::read_dir("/run/netns") {
            for entry in entries.flatten() {
                let file = entry.file_name().to_string_lossy().into_owned();
                if let Some(name) = file.strip_prefix(NETNS_PREFIX) {
                    if name.starts_with(prefix) {
                        names.insert(name.to_owned());
                    }
                }
            }
        }
        let mut out = Vec::new();
        for name in names {
            if let Some(info) = self.info(&name)? {
                out.push(info);
            }
        }
        Ok(out)
    }

    /// Names of the state dirs under the state root.
    fn names(&self) -> Result<BTreeSet<String>, InfraError> {
        let entries = match fs::read_dir(&self.config.state_root) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeSet::new()),
            Err(e) => return Err(sys_err("read", &self.config.state_root)(e)),
        };
        Ok(entries
            .flatten()
            .filter(|e| e.file_type().map(|t| t.is_dir()).unwrap_or(false))
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect())
    }

    /// The pid of the process that created container `name`, if recorded.
    pub fn owner(&self, name: &str) -> Option<u32> {
        read_trimmed(&self.dir(name).join("owner"))?.parse().ok()
    }
}

/// The sshd configuration of every container (its own host key, root by key only).
const SSHD_CONFIG: &str = "\
# Written by orrery's local provider.
Port 22
ListenAddress 0.0.0.0
HostKey /etc/ssh/orrery/ssh_host_ed25519_key
PermitRootLogin prohibit-password
PubkeyAuthentication yes
AuthorizedKeysFile .ssh/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
UseDNS no
PrintMotd no
PidFile /run/sshd.pid
MaxSessions 64
MaxStartups 64:30:128
AcceptEnv LANG LC_*
Subsystem sftp /usr/lib/openssh/sftp-server
";

/// The host side of a container's veth pair: at most 15 characters (IFNAMSIZ),
/// derived from the state root and name so that it is stable and distinct.
fn veth_name(state_root: &Path, name: &str) -> String {
    let mut hasher = Sha256::new();
    hasher.update(state_root.as_os_str().as_encoded_bytes());
    hasher.update([0]);
    hasher.update(name.as_bytes());
    format!("ov{}", &hex::encode(hasher.finalize())[..10])
}

/// Drop this host's ARP entry for `address`: it may name the MAC of a
/// container that had the address before.
fn forget_neighbour(bridge: &str, address: Ipv4Addr) {
    let _ = Command::new("ip")
        .args(["neigh", "flush", "to", &address.to_string(), "dev", bridge])
        .stderr(Stdio::null())
        .status();
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// Pids of the processes in a named network namespace.
fn netns_pids(ns: &str) -> Vec<u32> {
    // Like `ip netns pids`, without spawning it: compare namespace inodes.
    let Ok(target) = fs::metadata(Path::new("/run/netns").join(ns)) else {
        return Vec::new();
    };
    let Ok(procs) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    procs
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            fs::metadata(format!("/proc/{pid}/ns/net"))
                .map(|m| m.ino() == target.ino() && m.dev() == target.dev())
                .unwrap_or(false)
        })
        .collect()
}

/// Does something answer with an SSH banner at `target`?
fn ssh_banner(target: SocketAddr) -> bool {
    let Ok(mut stream) = TcpStream::connect_timeout(&target, Duration::from_millis(200)) else {
        return false;
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    let mut buf = [0u8; 4];
    let ok = stream.read_exact(&mut buf).is_ok() && &buf == b"SSH-";
    let _ = stream.write_all(b"SSH-2.0-orrery-probe\r\n");
    ok
}

/// Run a command; a failure carries the command line and its stderr.
fn run(program: &str, args: &[&str]) -> Result<String, InfraError> {
    let out = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| InfraError::system(format!("cannot run `{program}`: {e}")))?;
    if !out.status.success() {
        return Err(InfraError::system(format!(
            "`{program} {}` failed ({}): {}",
            args.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn read_trimmed(path: &Path) -> Option<String> {
    fs::read_to_string(path).ok().map(|s| s.trim().to_owned())
}

fn write(path: &Path, text: &str) -> Result<(), InfraError> {
    fs::write(path, text).map_err(sys_err("write", path))
}

fn write_mode(path: &Path, bytes: &[u8], mode: u32) -> Result<(), InfraError> {
    fs::write(path, bytes).map_err(sys_err("write", path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(mode)).map_err(sys_err("chmod", path))
}

fn sys_err<'a>(what: &'a str, path: &'a Path) -> impl Fn(std::io::Error) -> InfraError + 'a {
    move |e| InfraError::system(format!("cannot {what} {}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(gateway: &str, prefix_len: u8) -> ContainerHost {
        ContainerHost::new(HostConfig {
            state_root: PathBuf::from("/nonexistent"),
            bridge: "x".into(),
            gateway: gateway.parse().unwrap(),
            prefix_len,
            authorized_keys: vec![],
            start_timeout: Duration::from_secs(1),
        })
    }

    #[test]
    fn addresses_skip_the_network_gateway_and_used_ones() {
        let h = host("10.77.0.1", 24);
        let ip = |i| Ipv4Addr::new(10, 77, 0, i);
        let mut used = BTreeSet::new();
        assert_eq!(h.free_address(&used, None).unwrap(), ip(2));
        used.insert(ip(2));
        assert_eq!(h.free_address(&used, None).unwrap(), ip(3));
        // Round-robin after the last one handed out, wrapping around.
        assert_eq!(h.free_address(&used, Some(ip(7))).unwrap(), ip(8));
        assert_eq!(h.free_address(&used, Some(ip(254))).unwrap(), ip(3));
        let full: BTreeSet<Ipv4Addr> = (2..=254).map(ip).collect();
        assert!(h.free_address(&full, Some(ip(9))).is_err());
    }

    #[test]
    fn veth_names_fit_ifnamsiz_and_differ() {
        let a = veth_name(Path::new("/a"), "node-1");
        let b = veth_name(Path::new("/b"), "node-1");
        assert!(a.len() <= 15);
        assert_ne!(a, b);
    }
}
