//! Provisioning end to end: real containers with their own `sshd`, agents
//! bootstrapped over real SSH that register with the Ambari emulator, real
//! worker processes on the `provision`, `ssh` and `ambari` queues, real
//! PostgreSQL and Redis.
//!
//! These tests need root (namespaces, overlayfs, a bridge). Where the machine
//! does not allow containers they print why to stderr and return. They use a
//! bridge of their own (`orrp0`, 10.79.0.1/16), apart from the demo's and
//! the infrastructure tests', and a name prefix per test; each test destroys
//! its containers when it ends, failing or not.

mod support;

use std::{net::SocketAddr, path::PathBuf, time::Duration};

use orrery_workflows::{
    ambari::{
        sim::{self, Faults, RunningSim, SimConfig},
        AmbariClient, AmbariConfig,
    },
    infra::local::{ContainerHost, HostConfig, LocalProvider},
    ssh::{PlatformKey, SshClient, SshTarget},
    store, RunState,
};
use serde_json::json;
use support::TestEnv;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

const BRIDGE: &str = "orrp0";
const SUBNET: &str = "10.79.0.1/16";
const GATEWAY: &str = "10.79.0.1";
const STATE_ROOT: &str = "/var/tmp/orrery-test-provisioning";
const T: Duration = Duration::from_secs(120);
const DONE: &[RunState] = &[RunState::Succeeded, RunState::Failed, RunState::Cancelled];

/// One test's world: database, Redis namespace, emulator, container prefix, workers.
struct Rig {
    env: TestEnv,
    sim: RunningSim,
    prefix: String,
    host: ContainerHost,
    key: PlatformKey,
    extra: Vec<(String, String)>,
}

impl Rig {
    async fn new(name: &str, sim_config: SimConfig) -> Rig {
        let env = TestEnv::new(name).await;
        let (gateway, prefix_len) = orrery_workflows::infra::local::parse_subnet(SUBNET).unwrap();
        let host = ContainerHost::new(HostConfig {
            state_root: PathBuf::from(STATE_ROOT),
            bridge: BRIDGE.into(),
            gateway,
            prefix_len,
            authorized_keys: vec![],
            start_timeout: Duration::from_secs(15),
        });
        host.ensure_bridge().unwrap();
        // The agents in the containers reach the emulator on the bridge address.
        let api: SocketAddr = "127.0.0.1:0".parse().unwrap();
        let agent: SocketAddr = format!("{GATEWAY}:0").parse().unwrap();
        let sim = sim::serve(sim_config, api, agent, CancellationToken::new())
            .await
            .unwrap();
        let key = PlatformKey::load_or_generate(&env.dir.join("id_ed25519")).unwrap();
        let prefix = format!("p{}-", &Uuid::new_v4().simple().to_string()[..6]);
        let extra = vec![
            ("ORRERY_PROVIDER", "local".to_string()),
            ("ORRERY_LOCAL_BRIDGE", BRIDGE.into()),
            ("ORRERY_LOCAL_SUBNET", SUBNET.into()),
            ("ORRERY_LOCAL_STATE_DIR", STATE_ROOT.into()),
            ("ORRERY_LOCAL_PREFIX", prefix.clone()),
            ("ORRERY_LOCAL_CAPACITY", "8".into()),
            ("ORRERY_AMBARI_URL", sim.url()),
            ("ORRERY_AMBARI_AGENT_SERVER", GATEWAY.into()),
            (
                "ORRERY_AMBARI_AGENT_PORT",
                sim.agent_addr.port().to_string(),
            ),
            ("ORRERY_AMBARI_POLL_MS", "200".into()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Rig {
            env,
            sim,
            prefix,
            host,
            key,
            extra,
        }
    }

    fn set(&mut self, name: &str, value: &str) {
        self.extra.push((name.into(), value.into()));
    }

    fn worker(&mut self, queues: &str) -> usize {
        let extra = self.extra.clone();
        self.env.spawn_worker_env(&["--queues", queues], &extra)
    }

    fn all_workers(&mut self) {
        self.worker("provision");
        self.worker("ssh");
        self.worker("ambari");
        let extra = self.extra.clone();
        self.env.spawn_worker_env(&["--scheduler"], &extra);
    }

    fn ambari(&self) -> AmbariClient {
        AmbariClient::new(AmbariConfig::new(self.sim.url())).unwrap()
    }

    fn containers(&self) -> Vec<String> {
        self.host
            .list(&self.prefix)
            .unwrap()
            .into_iter()
            .map(|c| c.name)
            .collect()
    }

    /// A user, a cluster of `size` owned by them, the owner as a cluster user,
    /// and the `create_cluster` run: what the API writes in one transaction.
    async fn request_cluster(&self, size: i32) -> (Uuid, Uuid) {
        let pool = &self.env.pool;
        let user = Uuid::new_v4();
        sqlx::query("INSERT INTO users (id, name) VALUES ($1, 'alice')")
            .bind(user)
            .execute(pool)
            .await
            .unwrap();
        let cluster = Uuid::new_v4();
        sqlx::query(
            "INSERT INTO clusters (id, name, owner_id, size, services)
             VALUES ($1, 'c1', $2, $3, ARRAY['ZOOKEEPER','HDFS','YARN','MAPREDUCE2'])",
        )
        .bind(cluster)
        .bind(user)
        .bind(size)
        .execute(pool)
        .await
        .unwrap();
        sqlx::query(
            "INSERT INTO cluster_users (cluster_id, username, user_id, public_key, is_sudoer)
             VALUES ($1, 'alice', $2, $3, true)",
        )
        .bind(cluster)
        .bind(user)
        .bind(format!("{} alice@laptop", self.key.public_line()))
        .execute(pool)
        .await
        .unwrap();
        let run = self
            .env
            .submit("create_cluster", json!({ "cluster_id": cluster }))
            .await;
        (cluster, run)
    }

    async fn cluster_state(&self, id: Uuid) -> (String, Option<String>) {
        sqlx::query_as("SELECT state, state_reason FROM clusters WHERE id = $1")
            .bind(id)
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }

    async fn allocated(&self, cluster: Uuid) -> i64 {
        sqlx::query_scalar("SELECT count(*) FROM machines WHERE cluster_id = $1")
            .bind(cluster)
            .fetch_one(&self.env.pool)
            .await
            .unwrap()
    }

    /// How many times the bootstrap ran on each host, from the step log.
    async fn bootstraps(&self, run: Uuid) -> std::collections::BTreeMap<String, usize> {
        let mut counts = std::collections::BTreeMap::new();
        for log in store::step_logs(&self.env.pool, run).await.unwrap() {
            if log.step == "bootstrap" && log.text.contains("bootstrap attempt on") {
                *counts
                    .entry(log.stream.split(' ').next().unwrap().to_owned())
                    .or_insert(0) += 1;
            }
        }
        counts
    }

    /// Whether `user` has a UNIX account on each node of `cluster` (by
    /// hostname), asked over SSH.
    async fn accounts_on_nodes(&self, cluster: Uuid, user: &str) -> Vec<bool> {
        let machines: Vec<(String, String, i32, String)> = sqlx::query_as(
            "SELECT hostname, address, ssh_port, host_key FROM machines
             WHERE cluster_id = $1 ORDER BY hostname",
        )
        .bind(cluster)
        .fetch_all(&self.env.pool)
        .await
        .unwrap();
        let ssh = SshClient::new(self.key.clone());
        let mut found = Vec::new();
        for (host, address, port, host_key) in machines {
            let target = SshTarget {
                host,
                address,
                port: port as u16,
                host_key,
            };
            let session = ssh
                .connect(&target, &CancellationToken::new())
                .await
                .unwrap();
            let out = session
                .run(
                    &format!("id -nG {user} 2>/dev/null || echo none"),
                    Duration::from_secs(10),
                    &CancellationToken::new(),
                )
                .await
                .unwrap();
            session.close().await;
            found.push(out.stdout.contains("hadoop"));
        }
        found
    }

    /// Whether `user` holds a privilege on the Ambari cluster, read from the
    /// emulator's REST API as a client of Ambari would.
    async fn ambari_privileged(&self, cluster: &str, user: &str) -> bool {
        let body: serde_json::Value = reqwest::Client::new()
            .get(format!(
                "{}/api/v1/clusters/{cluster}/privileges?fields=PrivilegeInfo/*",
                self.sim.url()
            ))
            .basic_auth("admin", Some("admin"))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        body["items"].as_array().unwrap().iter().any(|i| {
            i["PrivilegeInfo"]["principal_name"] == user
                && i["PrivilegeInfo"]["principal_type"] == "USER"
        })
    }

    /// Pin another key for the cluster's first host, in the inventory and in
    /// the run's `allocate` checkpoint (which the steps read): the host's
    /// real key no longer matches. Returns the host's name.
    async fn swap_host_key(&self, cluster: Uuid, run: Uuid) -> String {
        let pool = &self.env.pool;
        let victim: String = sqlx::query_scalar(
            "SELECT hostname FROM machines WHERE cluster_id = $1 ORDER BY hostname LIMIT 1",
        )
        .bind(cluster)
        .fetch_one(pool)
        .await
        .unwrap();
        let other = PlatformKey::generate().public_line().to_owned();
        sqlx::query("UPDATE machines SET host_key = $2 WHERE hostname = $1")
            .bind(&victim)
            .bind(&other)
            .execute(pool)
            .await
            .unwrap();
        sqlx::query(
            "UPDATE step_checkpoints SET output = (
                SELECT jsonb_agg(CASE WHEN m->>'hostname' = $2 THEN jsonb_set(m, '{host_key}', to_jsonb($3::text)) ELSE m END)
                FROM jsonb_array_elements(output) m)
             WHERE run_id = $1 AND step = 'allocate'",
        )
        .bind(run)
        .bind(&victim)
        .bind(&other)
        .execute(pool)
        .await
        .unwrap();
        victim
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for name in self.host.list(&self.prefix).unwrap_or_default() {
            let _ = self.host.destroy(&name.name);
        }
    }
}

/// Every bootstrap says where it runs (kept in the step log), so tests count them.
const ANNOUNCE: &str = "echo \"bootstrap attempt on $(hostname)\" >&2";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_three_node_cluster_goes_from_request_to_running_with_accounts_and_terminates_without_leftovers(
) {
    if support::skip_without_containers("a_three_node_cluster...") {
        return;
    }
    let mut rig = Rig::new(
        "prov_happy",
        SimConfig {
            request_duration: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    rig.all_workers();
    let (cluster, run) = rig.request_cluster(3).await;
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
    assert_eq!(rig.cluster_state(cluster).await, ("running".into(), None));
    let nodes = done.output.unwrap()["nodes"].as_array().unwrap().clone();
    assert_eq!(nodes.len(), 3);
    let ambari = rig.ambari();
    let ambari_name = format!("orrery-{}", cluster.simple());
    assert!(ambari.cluster_exists(&ambari_name).await.unwrap());
    // The UNIX account exists on every node, with the key, as asked.
    let machines: Vec<(String, String, i32, String)> = sqlx::query_as(
        "SELECT hostname, address, ssh_port, host_key FROM machines WHERE cluster_id = $1",
    )
    .bind(cluster)
    .fetch_all(&rig.env.pool)
    .await
    .unwrap();
    assert_eq!(machines.len(), 3);
    let ssh = SshClient::new(rig.key.clone());
    let mut hdfs_homes = 0;
    for (hostname, address, port, host_key) in &machines {
        let target = SshTarget {
            host: hostname.clone(),
            address: address.clone(),
            port: *port as u16,
            host_key: host_key.clone(),
        };
        let session = ssh
            .connect(&target, &CancellationToken::new())
            .await
            .unwrap();
        let out = session
            .run(
                "id -nG alice && getent passwd alice | cut -d: -f7 && cat /home/alice/.ssh/authorized_keys && test -f /etc/sudoers.d/orrery-alice && echo sudo",
                Duration::from_secs(10),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        assert!(out.stdout.contains("hadoop"), "{hostname}: {out:?}");
        assert!(out.stdout.contains("/bin/bash"), "{hostname}: {out:?}");
        assert!(
            out.stdout.contains("alice@laptop") && out.stdout.contains("sudo"),
            "{hostname}: {out:?}"
        );
        // Owners and modes sshd and sudo insist on.
        let modes = session
            .run(
                // (The home's mode is useradd's HOME_MODE, which Debian releases differ on.)
                "stat -c '%n %U:%G' /home/alice && stat -c '%n %U:%G %a' /home/alice/.ssh /home/alice/.ssh/authorized_keys /etc/sudoers.d/orrery-alice",
                Duration::from_secs(10),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        let lines: Vec<&str> = modes.stdout.lines().collect();
        assert_eq!(
            lines,
            [
                "/home/alice alice:hadoop",
                "/home/alice/.ssh alice:hadoop 700",
                "/home/alice/.ssh/authorized_keys alice:hadoop 600",
                "/etc/sudoers.d/orrery-alice root:root 440",
            ],
            "{hostname}"
        );
        // The HDFS home, on the master only (the emulator has no HDFS: a
        // stand-in folder), owned by the user.
        let out = session
            .run(
                "stat -c '%U:%G' /var/lib/orrery-hdfs/user/alice 2>/dev/null || true",
                Duration::from_secs(10),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        if !out.stdout.trim().is_empty() {
            assert_eq!(out.stdout.trim(), "alice:hadoop", "{hostname}");
            hdfs_homes += 1;
        }
        session.close().await;
    }
    assert_eq!(hdfs_homes, 1, "one HDFS home, on the master");
    let users: Vec<String> =
        sqlx::query_scalar("SELECT state FROM cluster_users WHERE cluster_id = $1")
            .bind(cluster)
            .fetch_all(&rig.env.pool)
            .await
            .unwrap();
    assert_eq!(users, ["active"]);

    sqlx::query("UPDATE clusters SET state = 'terminating' WHERE id = $1")
        .bind(cluster)
        .execute(&rig.env.pool)
        .await
        .unwrap();
    let term = rig
        .env
        .submit("terminate_cluster", json!({ "cluster_id": cluster }))
        .await;
    assert_eq!(
        rig.env.wait_state(term, DONE, T).await.state,
        RunState::Succeeded
    );
    assert_eq!(rig.cluster_state(cluster).await.0, "terminated");
    assert!(
        rig.containers().is_empty(),
        "containers left: {:?}",
        rig.containers()
    );
    assert!(
        !ambari.cluster_exists(&ambari_name).await.unwrap(),
        "Ambari cluster left"
    );
    assert_eq!(rig.allocated(cluster).await, 0, "machines still allocated");
    // Terminating again is safe.
    let again = rig
        .env
        .submit("terminate_cluster", json!({ "cluster_id": cluster }))
        .await;
    assert_eq!(
        rig.env.wait_state(again, DONE, T).await.state,
        RunState::Succeeded
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ambari_answering_500_to_30_percent_of_calls_still_ends_running() {
    if support::skip_without_containers("ambari_answering_500...") {
        return;
    }
    let faults = Faults {
        error_rate: 0.3,
        seed: 7,
        ..Default::default()
    };
    let mut rig = Rig::new(
        "prov_500",
        SimConfig {
            request_duration: Duration::from_secs(1),
            faults,
            ..Default::default()
        },
    )
    .await;
    rig.all_workers();
    let (cluster, run) = rig.request_cluster(2).await;
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
    assert_eq!(rig.cluster_state(cluster).await.0, "running");
    let retried: i64 = sqlx::query_scalar(
        "SELECT COALESCE(sum(attempts - 1), 0) FROM step_checkpoints WHERE run_id = $1",
    )
    .bind(run)
    .fetch_one(&rig.env.pool)
    .await
    .unwrap();
    assert!(retried > 0, "no step was retried: the 500s did not happen");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ambari_request_that_fails_releases_every_machine_and_fails_the_cluster_with_the_reason()
{
    if support::skip_without_containers("an_ambari_request_that_fails...") {
        return;
    }
    let faults = Faults {
        fail_requests: 1,
        fail_kind: "cluster_create".parse().unwrap(),
        ..Default::default()
    };
    let mut rig = Rig::new(
        "prov_fail",
        SimConfig {
            request_duration: Duration::from_secs(1),
            faults,
            ..Default::default()
        },
    )
    .await;
    rig.all_workers();
    let (cluster, run) = rig.request_cluster(2).await;
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Failed, "{done:#?}");
    let (state, reason) = rig.cluster_state(cluster).await;
    assert_eq!(state, "failed");
    let reason = reason.unwrap();
    assert!(
        reason.contains("Ambari request") && reason.contains("FAILED"),
        "{reason}"
    );
    assert_eq!(rig.allocated(cluster).await, 0);
    assert!(
        rig.containers().is_empty(),
        "containers left: {:?}",
        rig.containers()
    );
    assert!(!rig
        .ambari()
        .cluster_exists(&format!("orrery-{}", cluster.simple()))
        .await
        .unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_the_services_started_stops_them_deletes_the_cluster_and_releases_every_machine(
) {
    if support::skip_without_containers("a_failure_after_the_services_started...") {
        return;
    }
    let mut rig = Rig::new(
        "prov_late_fail",
        SimConfig {
            request_duration: Duration::from_secs(2),
            ..Default::default()
        },
    )
    .await;
    rig.all_workers();
    let (cluster, run) = rig.request_cluster(2).await;
    // While Ambari installs: the accounts step, after the services have
    // started, then meets a host key that no longer matches (fatal).
    rig.env
        .wait_until("the install to be under way", T, || async {
            let r = rig.env.run(run).await;
            r.cursor == 5 && r.state == RunState::Waiting
        })
        .await;
    let victim = rig.swap_host_key(cluster, run).await;
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Failed, "{done:#?}");
    let error = done.error.unwrap();
    assert!(
        error.contains(&victim) && error.to_lowercase().contains("host key"),
        "{error}"
    );
    assert!(
        !error.contains("manual clean-up"),
        "every compensation ran: {error}"
    );
    let steps = store::steps(&rig.env.pool, run).await.unwrap();
    let finished = |name: &str| {
        steps
            .iter()
            .find(|s| s.step == name)
            .is_some_and(|s| s.finished_at.is_some())
    };
    assert!(
        finished("install") && finished("await_started"),
        "the services had started: {steps:#?}"
    );
    let (state, reason) = rig.cluster_state(cluster).await;
    assert_eq!(state, "failed");
    assert!(reason.unwrap_or_default().contains(&victim));
    assert!(!rig
        .ambari()
        .cluster_exists(&format!("orrery-{}", cluster.simple()))
        .await
        .unwrap());
    assert_eq!(rig.allocated(cluster).await, 0);
    assert!(rig.containers().is_empty(), "{:?}", rig.containers());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_changed_host_key_fails_the_bootstrap_as_fatal_naming_the_host_and_runs_nothing_there() {
    if support::skip_without_containers("a_changed_host_key...") {
        return;
    }
    let mut rig = Rig::new("prov_hostkey", SimConfig::default()).await;
    rig.set("ORRERY_BOOTSTRAP_PRELUDE", ANNOUNCE);
    rig.worker("provision");
    let (cluster, run) = rig.request_cluster(2).await;
    // Allocated, handed over to the ssh queue, not yet bootstrapped: swap one pinned key.
    rig.env
        .wait_until("allocation", T, || async {
            rig.env.run(run).await.cursor == 1
        })
        .await;
    let victim = rig.swap_host_key(cluster, run).await;
    rig.worker("ssh");
    rig.worker("ambari");
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Failed, "{done:#?}");
    let error = done.error.unwrap();
    assert!(
        error.contains(&victim) && error.to_lowercase().contains("host key"),
        "{error}"
    );
    let bootstraps = rig.bootstraps(run).await;
    assert!(
        !bootstraps.contains_key(&victim),
        "a command ran on {victim}: {bootstraps:?}"
    );
    assert!(
        rig.sim.sim.host_status(&victim).is_none(),
        "{victim} registered an agent"
    );
    let steps = store::steps(&rig.env.pool, run).await.unwrap();
    let boot = steps.iter().find(|s| s.step == "bootstrap").unwrap();
    assert_eq!(boot.attempts, 1, "a fatal error is not retried");
    assert_eq!(rig.cluster_state(cluster).await.0, "failed");
    assert!(rig.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_ssh_command_failing_once_on_one_of_five_hosts_repeats_only_that_hosts_bootstrap() {
    if support::skip_without_containers("an_ssh_command_failing_once...") {
        return;
    }
    let mut rig = Rig::new(
        "prov_flaky",
        SimConfig {
            request_duration: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    // The host whose name ends in -3 fails its first bootstrap.
    let prelude = format!(
        "{ANNOUNCE}\ncase \"$(hostname)\" in *-3) [ -e /root/.failed-once ] || {{ touch /root/.failed-once; echo 'injected failure' >&2; exit 7; }};; esac"
    );
    rig.set("ORRERY_BOOTSTRAP_PRELUDE", &prelude);
    rig.all_workers();
    let (_cluster, run) = rig.request_cluster(5).await;
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
    let counts = rig.bootstraps(run).await;
    assert_eq!(counts.len(), 5, "{counts:?}");
    for (host, n) in &counts {
        let expected = if host.ends_with("-3") { 2 } else { 1 };
        assert_eq!(*n, expected, "bootstrap runs on {host}: {counts:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_the_bootstrap_resumes_and_repeats_only_the_unfinished_host() {
    if support::skip_without_containers("a_worker_killed_during_the_bootstrap...") {
        return;
    }
    let mut rig = Rig::new(
        "prov_kill_boot",
        SimConfig {
            request_duration: Duration::from_secs(1),
            ..Default::default()
        },
    )
    .await;
    // Every attempt leaves a line in the container; the host whose name ends
    // in -2 hangs in its first attempt (and never installs from it), so the
    // worker is killed with the other hosts bootstrapped and this one not.
    let prelude = format!(
        "{ANNOUNCE}\necho attempt >> /root/.bootstrap-attempts\n\
         case \"$(hostname)\" in *-2) [ -e /root/.hung-once ] || {{ touch /root/.hung-once; sleep 300; exit 1; }};; esac"
    );
    rig.set("ORRERY_BOOTSTRAP_PRELUDE", &prelude);
    rig.worker("provision");
    let ssh_worker = rig.worker("ssh");
    rig.worker("ambari");
    let extra = rig.extra.clone();
    rig.env.spawn_worker_env(&["--scheduler"], &extra);
    let (cluster, run) = rig.request_cluster(4).await;
    let pool = rig.env.pool.clone();
    let bootstrapped = || async {
        sqlx::query_scalar::<_, i64>(
            "SELECT count(*) FROM item_checkpoints WHERE run_id = $1 AND step_index = 1",
        )
        .bind(run)
        .fetch_one(&pool)
        .await
        .unwrap()
    };
    rig.env
        .wait_until("three of four hosts bootstrapped", T, || async {
            bootstrapped().await == 3
        })
        .await;
    let r = rig.env.run(run).await;
    assert_eq!(
        (r.cursor, r.state),
        (1, RunState::Running),
        "still in the bootstrap"
    );
    rig.env.workers[ssh_worker].child.kill().unwrap();
    rig.env.workers[ssh_worker].child.wait().unwrap();
    rig.worker("ssh");
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
    assert_eq!(bootstrapped().await, 4);
    assert_eq!(rig.cluster_state(cluster).await, ("running".into(), None));
    // Counted inside the containers, over SSH: the killed attempt's log
    // lines died with the worker, the containers' files did not.
    let machines: Vec<(String, String, i32, String)> = sqlx::query_as(
        "SELECT hostname, address, ssh_port, host_key FROM machines WHERE cluster_id = $1",
    )
    .bind(cluster)
    .fetch_all(&rig.env.pool)
    .await
    .unwrap();
    assert_eq!(machines.len(), 4);
    let ssh = SshClient::new(rig.key.clone());
    for (hostname, address, port, host_key) in machines {
        let target = SshTarget {
            host: hostname.clone(),
            address,
            port: port as u16,
            host_key,
        };
        let session = ssh
            .connect(&target, &CancellationToken::new())
            .await
            .unwrap();
        let out = session
            .run(
                "wc -l < /root/.bootstrap-attempts",
                Duration::from_secs(10),
                &CancellationToken::new(),
            )
            .await
            .unwrap();
        session.close().await;
        let expected = if hostname.ends_with("-2") { "2" } else { "1" };
        assert_eq!(
            out.stdout.trim(),
            expected,
            "bootstrap attempts on {hostname}"
        );
    }
    let ambari = rig.ambari();
    let name = format!("orrery-{}", cluster.simple());
    let requests = ambari.list_requests(&name).await.unwrap();
    let creations = requests
        .iter()
        .filter(|(_, ctx, _)| {
            ctx.starts_with(orrery_workflows::ambari::client::PROVISION_CONTEXT_PREFIX)
        })
        .count();
    assert_eq!(creations, 1, "one cluster creation request: {requests:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_during_the_install_resumes_polling_the_same_ambari_request() {
    if support::skip_without_containers("a_worker_killed_during_the_install...") {
        return;
    }
    let mut rig = Rig::new(
        "prov_kill",
        SimConfig {
            request_duration: Duration::from_secs(6),
            ..Default::default()
        },
    )
    .await;
    rig.worker("provision");
    rig.worker("ssh");
    let ambari_worker = rig.worker("ambari");
    let extra = rig.extra.clone();
    rig.env.spawn_worker_env(&["--scheduler"], &extra);
    let (cluster, run) = rig.request_cluster(2).await;
    rig.env
        .wait_until("the install to be under way", T, || async {
            let r = rig.env.run(run).await;
            r.cursor == 5 && r.state == RunState::Waiting
        })
        .await;
    rig.env.workers[ambari_worker].child.kill().unwrap();
    rig.env.workers[ambari_worker].child.wait().unwrap();
    rig.worker("ambari");
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
    let ambari = rig.ambari();
    let requests = ambari
        .list_requests(&format!("orrery-{}", cluster.simple()))
        .await
        .unwrap();
    let creations = requests
        .iter()
        .filter(|(_, ctx, _)| {
            ctx.starts_with(orrery_workflows::ambari::client::PROVISION_CONTEXT_PREFIX)
        })
        .count();
    assert_eq!(creations, 1, "one cluster creation request: {requests:?}");
    // The resumed install followed the request the killed worker had
    // checkpointed, which is that one creation request.
    let steps = store::steps(&rig.env.pool, run).await.unwrap();
    let output = |name: &str| {
        steps
            .iter()
            .find(|s| s.step == name)
            .and_then(|s| s.output.clone())
            .unwrap_or_default()
    };
    let created = output("create")["request_id"].as_u64().unwrap();
    assert_eq!(output("install")["request_id"].as_u64(), Some(created));
    let creation = ambari
        .creation_request(&format!("orrery-{}", cluster.simple()))
        .await
        .unwrap();
    assert_eq!(creation, created);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_during_the_install_aborts_the_request_releases_the_machines_and_fails_the_cluster(
) {
    if support::skip_without_containers("cancelling_during_the_install...") {
        return;
    }
    let mut rig = Rig::new(
        "prov_cancel",
        SimConfig {
            request_duration: Duration::from_secs(30),
            ..Default::default()
        },
    )
    .await;
    rig.all_workers();
    let (cluster, run) = rig.request_cluster(2).await;
    rig.env
        .wait_until("the install to be under way", T, || async {
            rig.env.run(run).await.cursor == 5
        })
        .await;
    rig.env
        .rt
        .engine
        .cancel(run, "alice", Some("changed my mind"))
        .await
        .unwrap();
    let done = rig.env.wait_state(run, DONE, T).await;
    assert_eq!(done.state, RunState::Cancelled, "{done:#?}");
    let (state, reason) = rig.cluster_state(cluster).await;
    assert_eq!(state, "failed");
    assert_eq!(
        reason.as_deref(),
        Some("cancelled by alice: changed my mind")
    );
    assert_eq!(rig.allocated(cluster).await, 0);
    assert!(rig.containers().is_empty());
    let create: serde_json::Value = sqlx::query_scalar(
        "SELECT output FROM step_checkpoints WHERE run_id = $1 AND step = 'create'",
    )
    .bind(run)
    .fetch_one(&rig.env.pool)
    .await
    .unwrap();
    let request_id = create["request_id"].as_u64().unwrap();
    // The Ambari cluster was deleted; its request was aborted before that.
    let ambari = rig.ambari();
    assert!(!ambari
        .cluster_exists(&format!("orrery-{}", cluster.simple()))
        .await
        .unwrap());
    let aborted = store::step_logs(&rig.env.pool, run)
        .await
        .unwrap()
        .into_iter()
        .any(|l| l.text == format!("Ambari request {request_id} aborted"));
    assert!(aborted, "the install request was not aborted");
}

impl Rig {
    /// The provisioning service as a worker of this test builds it.
    fn provisioning(&self) -> orrery_workflows::provisioning::Provisioning {
        use orrery_workflows::infra::local::LocalConfig;
        let (gateway, prefix_len) = orrery_workflows::infra::local::parse_subnet(SUBNET).unwrap();
        let local = LocalConfig {
            state_dir: PathBuf::from(STATE_ROOT),
            bridge: BRIDGE.into(),
            gateway,
            prefix_len,
            name_prefix: self.prefix.clone(),
            capacity: 8,
            authorized_keys: vec![self.key.public_line().to_owned()],
            start_timeout: Duration::from_secs(15),
        };
        orrery_workflows::provisioning::Provisioning {
            provider: std::sync::Arc::new(
                LocalProvider::new(self.env.pool.clone(), local).unwrap(),
            ),
            ssh: SshClient::new(self.key.clone()),
            ambari: self.ambari(),
            agent_server: GATEWAY.into(),
            agent_port: self.sim.agent_addr.port(),
            stack_name: "HDP".into(),
            stack_version: "2.6".into(),
            profile: "standard".into(),
            poll: Duration::from_millis(200),
            command_timeout: Duration::from_secs(60),
            bootstrap_prelude: String::new(),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_past_its_time_to_live_is_terminated_as_a_task_of_its_owner() {
    if support::skip_without_containers("a_cluster_past_its_time_to_live...") {
        return;
    }
    let mut rig = Rig::new(
        "prov_ttl",
        SimConfig {
            request_duration: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .await;
    rig.all_workers();
    let (cluster, run) = rig.request_cluster(1).await;
    assert_eq!(
        rig.env.wait_state(run, DONE, T).await.state,
        RunState::Succeeded
    );
    let none = orrery_workflows::provisioning::upkeep::expire_clusters(&rig.env.rt.engine)
        .await
        .unwrap();
    assert_eq!(none, 0, "a cluster without expiry is left alone");
    sqlx::query("UPDATE clusters SET expires_at = now() - interval '1 second' WHERE id = $1")
        .bind(cluster)
        .execute(&rig.env.pool)
        .await
        .unwrap();
    assert_eq!(
        orrery_workflows::provisioning::upkeep::expire_clusters(&rig.env.rt.engine)
            .await
            .unwrap(),
        1
    );
    let term: Uuid = sqlx::query_scalar(
        "SELECT run_id FROM tasks WHERE cluster_id = $1 AND kind = 'terminate_cluster'",
    )
    .bind(cluster)
    .fetch_one(&rig.env.pool)
    .await
    .unwrap();
    assert_eq!(
        rig.env.wait_state(term, DONE, T).await.state,
        RunState::Succeeded
    );
    assert_eq!(rig.cluster_state(cluster).await.0, "terminated");
    assert!(rig.containers().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_reconciler_reclaims_forgotten_containers_and_flags_vanished_ones() {
    if support::skip_without_containers("the_inventory_reconciler...") {
        return;
    }
    let rig = Rig::new("prov_inventory", SimConfig::default()).await;
    let p = rig.provisioning();
    // A container nobody recorded (a crash between create and insert).
    let orphan = format!("{}orphan", rig.prefix);
    rig.host.create(&orphan, None).unwrap();
    // An allocated machine whose container vanished behind our back.
    let cluster = Uuid::new_v4();
    let user = Uuid::new_v4();
    sqlx::query("INSERT INTO users (id, name) VALUES ($1, 'bob')")
        .bind(user)
        .execute(&rig.env.pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO clusters (id, name, owner_id, size, services, state) VALUES ($1, 'c', $2, 1, '{}', 'running')")
        .bind(cluster)
        .bind(user)
        .execute(&rig.env.pool)
        .await
        .unwrap();
    let gone = format!("{}gone", rig.prefix);
    sqlx::query(
        "INSERT INTO machines (id, provider, hostname, address, host_key, state, cluster_id)
         VALUES ($1, 'local', $2, '10.79.255.254', $3, 'allocated', $4)",
    )
    .bind(Uuid::new_v4())
    .bind(&gone)
    .bind(rig.key.public_line())
    .bind(cluster)
    .execute(&rig.env.pool)
    .await
    .unwrap();
    let done = orrery_workflows::provisioning::upkeep::reconcile_inventory(&p, &rig.env.pool)
        .await
        .unwrap();
    assert_eq!(done.reclaimed, std::slice::from_ref(&orphan));
    assert_eq!(done.broken, std::slice::from_ref(&gone));
    assert!(rig.containers().is_empty(), "the orphan still exists");
    let state: String = sqlx::query_scalar("SELECT state FROM machines WHERE hostname = $1")
        .bind(&gone)
        .fetch_one(&rig.env.pool)
        .await
        .unwrap();
    assert_eq!(state, "broken");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_requested_through_the_rest_api_runs_grants_and_revokes_a_user_and_terminates() {
    if support::skip_without_containers("a_cluster_requested_through_the_rest_api...") {
        return;
    }
    use orrery_api::{
        accounts::{self, NewUser},
        app::{App, ClusterWorkflows},
        ApiConfig,
    };
    let mut rig = Rig::new(
        "prov_api",
        SimConfig {
            request_duration: Duration::from_millis(500),
            ..Default::default()
        },
    )
    .await;
    rig.all_workers();
    let redis = redis::Client::open(rig.env.redis_url.as_str())
        .unwrap()
        .get_connection_manager()
        .await
        .unwrap();
    let config = ApiConfig {
        workflows: ClusterWorkflows::real(),
        ..ApiConfig::default()
    };
    let app = App::new(rig.env.rt.engine.clone(), redis, config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stop = CancellationToken::new();
    tokio::spawn(orrery_api::serve_app(app, listener, stop.clone()));
    let user = |name: &str| NewUser {
        name: name.into(),
        email: None,
        group: None,
        operator: false,
        quota_machines: None,
    };
    let token = accounts::create_user(&rig.env.pool, &user("carol"), "test")
        .await
        .unwrap()
        .1
        .token();
    accounts::create_user(&rig.env.pool, &user("dave"), "test")
        .await
        .unwrap();
    let http = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let mut req = http
            .request(method, format!("{base}{path}"))
            .bearer_auth(&token);
        if let Some(b) = body {
            req = req.json(&b);
        }
        async move {
            let res = req.send().await.unwrap();
            let status = res.status().as_u16();
            (
                status,
                res.json::<serde_json::Value>().await.unwrap_or_default(),
            )
        }
    };
    let wait_task = |task: String| {
        let env = &rig.env;
        async move { env.wait_state(task.parse().unwrap(), DONE, T).await }
    };
    // A task-creating call: answered 202, its task run to success; then the
    // cluster as `GET` shows it.
    let act = |method: reqwest::Method, path: String, body: Option<serde_json::Value>| {
        let (call, wait_task) = (&call, &wait_task);
        async move {
            let (status, body) = call(method, path, body).await;
            assert_eq!(status, 202, "{body}");
            let done = wait_task(body["id"].as_str().unwrap().to_owned()).await;
            assert_eq!(done.state, RunState::Succeeded, "{done:#?}");
            let cluster = done.input["cluster_id"].as_str().unwrap().to_owned();
            let (status, shown) = call(
                reqwest::Method::GET,
                format!("/v1/clusters/{cluster}"),
                None,
            )
            .await;
            assert_eq!(status, 200);
            shown
        }
    };
    let user = |shown: &serde_json::Value, name: &str| {
        shown["users"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["username"] == name)
            .cloned()
    };

    let shown = act(
        reqwest::Method::POST,
        "/v1/clusters".into(),
        Some(json!({ "name": "api", "size": 2 })),
    )
    .await;
    let cluster = shown["id"].as_str().unwrap().to_owned();
    assert_eq!(shown["state"], "running", "{shown}");
    assert_eq!(shown["nodes"].as_array().unwrap().len(), 2, "{shown}");

    let shown = act(
        reqwest::Method::POST,
        format!("/v1/clusters/{cluster}/users"),
        Some(json!({ "username": "dave" })),
    )
    .await;
    assert_eq!(user(&shown, "dave").unwrap()["state"], "active", "{shown}");
    let id: Uuid = cluster.parse().unwrap();
    let ambari_name = format!("orrery-{}", id.simple());
    assert_eq!(rig.accounts_on_nodes(id, "dave").await, [true, true]);
    assert!(rig.ambari_privileged(&ambari_name, "dave").await);

    let shown = act(
        reqwest::Method::DELETE,
        format!("/v1/clusters/{cluster}/users/dave"),
        None,
    )
    .await;
    assert!(
        user(&shown, "dave").is_none_or(|d| d["state"] == "removed"),
        "{shown}"
    );
    assert_eq!(rig.accounts_on_nodes(id, "dave").await, [false, false]);
    assert!(!rig.ambari_privileged(&ambari_name, "dave").await);
    // The owner keeps everything.
    assert_eq!(rig.accounts_on_nodes(id, "carol").await, [true, true]);
    assert!(rig.ambari_privileged(&ambari_name, "carol").await);

    let shown = act(
        reqwest::Method::DELETE,
        format!("/v1/clusters/{cluster}"),
        None,
    )
    .await;
    assert_eq!(shown["state"], "terminated", "{shown}");
    assert!(rig.containers().is_empty());
    stop.cancel();
}
