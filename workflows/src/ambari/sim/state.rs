//! The emulator's in-memory world: hosts, blueprints, clusters, requests and
//! users, and the rules that move requests forward with time.
//!
//! Everything is a plain method over `&mut World` taking the current instant,
//! so the HTTP layer is thin and time is explicit. Requests advance lazily:
//! [`World::settle`] (called before every read and by a background tick)
//! finishes the tasks whose time has come, in order, and applies a finished
//! request's effect (services started, …).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use serde_json::{json, Value};
use tokio::time::Instant;

use super::SimError;
use crate::ambari::{
    blueprint::{self, Blueprint, ClusterTemplate, Placement},
    client::PROVISION_CONTEXT_PREFIX,
    model::{HostStatus, RequestStatus},
};

/// When a new request starts and how long it will take in total.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub now: Instant,
    pub budget: Duration,
}

/// `PUT /clusters/{c}/services`: the wanted state, the request's context,
/// and the optional `?ServiceInfo/state=` predicate.
#[derive(Debug)]
pub(crate) struct ServicesChange<'a> {
    pub target: &'a str,
    pub context: &'a str,
    pub only_in_state: Option<&'a str>,
}

/// A pending request failure taken from the fault configuration.
#[derive(Debug, Clone)]
pub(crate) struct FailPlan {
    pub role: Option<String>,
}

#[derive(Debug)]
pub(crate) struct HostRec {
    pub name: String,
    pub last_heartbeat: Instant,
    pub last_heartbeat_ms: i64,
    /// Set when a fault dropped the agent; cleared by the next accepted
    /// heartbeat after it is no longer dropped.
    pub lost_at: Option<Instant>,
    pub cluster: Option<String>,
}

impl HostRec {
    /// Whether the host counted as alive at `t`.
    fn healthy_at(&self, t: Instant, timeout: Duration) -> bool {
        self.lost_at.is_none_or(|lost| t < lost) && t <= self.last_heartbeat + timeout
    }
}

#[derive(Debug)]
pub(crate) struct ServiceRec {
    pub state: String,
    /// A request under way towards a state: `(target, request id)`.
    pub pending: Option<(String, u64)>,
}

#[derive(Debug)]
pub(crate) struct ClusterRec {
    pub blueprint: String,
    pub stack: String,
    /// host → host group.
    pub hosts: BTreeMap<String, String>,
    pub services: BTreeMap<String, ServiceRec>,
    pub privileges: Vec<PrivilegeRec>,
}

#[derive(Debug, Clone)]
pub(crate) struct PrivilegeRec {
    pub id: u64,
    pub permission: String,
    pub principal_name: String,
    pub principal_type: String,
}

#[derive(Debug)]
pub(crate) struct UserRec {
    pub admin: bool,
    pub active: bool,
}

#[derive(Debug)]
enum Effect {
    /// Cluster creation: every service ends `STARTED` (or `INSTALL_FAILED`).
    Provision,
    /// Services move to `target`.
    Services {
        target: String,
        services: Vec<String>,
    },
}

#[derive(Debug)]
pub(crate) struct TaskRec {
    pub id: u64,
    pub host: String,
    pub role: String,
    pub command: String,
    pub status: RequestStatus,
    pub exit_code: Option<i64>,
    pub stdout: String,
    pub stderr: String,
}

#[derive(Debug)]
pub(crate) struct RequestRec {
    pub id: u64,
    pub cluster: String,
    pub context: String,
    pub status: RequestStatus,
    pub tasks: Vec<TaskRec>,
    /// Index of the task running now; every task before it has finished.
    cursor: usize,
    started: Instant,
    pub created_ms: i64,
    pub ended_ms: Option<i64>,
    task_len: Duration,
    fail_at: Option<usize>,
    pub abort_reason: Option<String>,
    effect: Effect,
}

impl RequestRec {
    fn task_end(&self, index: usize) -> Instant {
        self.started + self.task_len * (index as u32 + 1)
    }

    pub fn progress_percent(&self, now: Instant) -> f64 {
        if self.status == RequestStatus::Completed || self.tasks.is_empty() {
            return 100.0;
        }
        let n = self.tasks.len() as f64;
        let mut done = self.cursor as f64;
        if self.status == RequestStatus::InProgress && !self.task_len.is_zero() {
            let begun = self.started + self.task_len * self.cursor as u32;
            let part =
                now.saturating_duration_since(begun).as_secs_f64() / self.task_len.as_secs_f64();
            done += part.clamp(0.0, 0.99);
        }
        ((done / n) * 1000.0).floor() / 10.0
    }

    pub fn count(&self, statuses: &[RequestStatus]) -> usize {
        self.tasks
            .iter()
            .filter(|t| statuses.contains(&t.status))
            .count()
    }
}

/// All of the emulator's state.
#[derive(Debug, Default)]
pub(crate) struct World {
    pub hosts: BTreeMap<String, HostRec>,
    pub blueprints: BTreeMap<String, Blueprint>,
    pub clusters: BTreeMap<String, ClusterRec>,
    pub requests: BTreeMap<u64, RequestRec>,
    pub users: BTreeMap<String, UserRec>,
    next_request: u64,
    next_task: u64,
    next_privilege: u64,
}

fn epoch_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// The same instant as epoch milliseconds (for `*_time` fields).
fn ms_at(now: Instant, t: Instant) -> i64 {
    let base = epoch_ms();
    if t >= now {
        base + (t - now).as_millis() as i64
    } else {
        base - (now - t).as_millis() as i64
    }
}

pub(crate) fn not_found(what: impl std::fmt::Display) -> SimError {
    SimError::new(
        404,
        format!("The requested resource doesn't exist: {what} not found"),
    )
}

fn bad(msg: impl Into<String>) -> SimError {
    SimError::new(400, msg)
}

impl World {
    pub fn new() -> Self {
        World {
            next_request: 1,
            next_task: 1,
            next_privilege: 1,
            ..Default::default()
        }
    }

    // ------------------------------------------------------------- agents

    /// An agent registers (or re-registers): the host exists from now on.
    pub fn register(&mut self, host: &str, now: Instant) -> bool {
        let fresh = !self.hosts.contains_key(host);
        let rec = self
            .hosts
            .entry(host.to_owned())
            .or_insert_with(|| HostRec {
                name: host.to_owned(),
                last_heartbeat: now,
                last_heartbeat_ms: epoch_ms(),
                lost_at: None,
                cluster: None,
            });
        rec.last_heartbeat = now;
        rec.last_heartbeat_ms = epoch_ms();
        rec.lost_at = None;
        fresh
    }

    /// A heartbeat; `false` if the host never registered (the agent must).
    pub fn heartbeat(&mut self, host: &str, now: Instant) -> bool {
        match self.hosts.get_mut(host) {
            Some(rec) => {
                rec.last_heartbeat = now;
                rec.last_heartbeat_ms = epoch_ms();
                rec.lost_at = None;
                true
            }
            None => false,
        }
    }

    /// A fault dropped these agents: their hosts are lost from now on.
    pub fn drop_agents(&mut self, names: &BTreeSet<String>, now: Instant) {
        for name in names {
            if let Some(rec) = self.hosts.get_mut(&name.to_ascii_lowercase()) {
                rec.lost_at.get_or_insert(now);
            }
        }
    }

    pub fn host_status(&self, host: &HostRec, now: Instant, timeout: Duration) -> HostStatus {
        if host.healthy_at(now, timeout) {
            HostStatus::Healthy
        } else {
            HostStatus::Unknown
        }
    }

    pub fn host_json(&self, host: &HostRec, now: Instant, timeout: Duration, base: &str) -> Value {
        let status = self.host_status(host, now, timeout);
        let state = if status == HostStatus::Healthy {
            "HEALTHY"
        } else {
            "HEARTBEAT_LOST"
        };
        let mut h = json!({
            "host_name": host.name,
            "host_status": status.as_str(),
            "host_state": state,
            "last_heartbeat_time": host.last_heartbeat_ms,
        });
        if let Some(c) = &host.cluster {
            h["cluster_name"] = json!(c);
        }
        json!({"href": format!("{base}/hosts/{}", host.name), "Hosts": h})
    }

    pub fn delete_host(&mut self, host: &str) -> Result<(), SimError> {
        let rec = self
            .hosts
            .get(host)
            .ok_or_else(|| not_found(format!("Host {host}")))?;
        if let Some(c) = &rec.cluster {
            return Err(bad(format!(
                "Host {host} is still a member of cluster {c}; delete the cluster first"
            )));
        }
        self.hosts.remove(host);
        Ok(())
    }

    // ---------------------------------------------------------- blueprints

    pub fn add_blueprint(&mut self, name: &str, body: Value) -> Result<(), SimError> {
        if self.blueprints.contains_key(name) {
            return Err(SimError::new(
                409,
                format!(
                    "Attempted to create a Blueprint which already exists, blueprint_name={name}"
                ),
            ));
        }
        let mut bp: Blueprint = serde_json::from_value(body)
            .map_err(|e| bad(format!("Invalid Request: Malformed blueprint: {e}")))?;
        if bp.host_groups.is_empty() {
            return Err(bad(
                "Invalid Request: Blueprint must contain at least one host group",
            ));
        }
        for g in &bp.host_groups {
            for c in &g.components {
                if blueprint::component(&c.name).is_none() {
                    return Err(bad(format!(
                        "The component '{}' in host group '{}' is not valid for the specified stack",
                        c.name, g.name
                    )));
                }
            }
        }
        bp.info.blueprint_name = Some(name.to_owned());
        self.blueprints.insert(name.to_owned(), bp);
        Ok(())
    }

    // ------------------------------------------------------------ clusters

    pub fn create_cluster(
        &mut self,
        name: &str,
        template: ClusterTemplate,
        at: Timing,
        fail: impl FnOnce() -> Option<FailPlan>,
    ) -> Result<u64, SimError> {
        if self.clusters.contains_key(name) {
            return Err(SimError::new(
                409,
                format!("Attempted to create a Cluster which already exists, clusterName={name}"),
            ));
        }
        let bp = self.blueprints.get(&template.blueprint).ok_or_else(|| {
            bad(format!(
                "The specified blueprint doesn't exist: {}",
                template.blueprint
            ))
        })?;
        let mut hosts = BTreeMap::new();
        for g in &bp.host_groups {
            let given = template
                .host_groups
                .iter()
                .find(|t| t.name == g.name)
                .map_or(0, |t| t.hosts.len());
            let ok = match g.cardinality.trim() {
                "1" => given == 1,
                "1+" => given >= 1,
                _ => true,
            };
            if !ok && given > 0 {
                return Err(bad(format!(
                    "Host group '{}' has cardinality {} but {given} hosts were given",
                    g.name, g.cardinality
                )));
            }
        }
        for (group, host) in template.hosts() {
            if !bp.host_groups.iter().any(|g| g.name == group) {
                return Err(bad(format!(
                    "The host group '{group}' is not in blueprint '{}'",
                    template.blueprint
                )));
            }
            let host = host.to_ascii_lowercase();
            let rec = self.hosts.get(&host).ok_or_else(|| {
                bad(format!(
                    "Host '{host}' is not registered with Ambari (its agent must register first)"
                ))
            })?;
            if let Some(c) = &rec.cluster {
                return Err(bad(format!(
                    "Host '{host}' already belongs to cluster '{c}'"
                )));
            }
            if hosts.insert(host.clone(), group.to_owned()).is_some() {
                return Err(bad(format!("Host '{host}' is in more than one host group")));
            }
        }
        if hosts.is_empty() {
            return Err(bad("Invalid Request: no hosts given"));
        }
        // Install everything, then start what is not a client: Ambari's stages.
        let mut installs = Vec::new();
        let mut starts = Vec::new();
        let mut services = BTreeMap::new();
        for (host, group) in &hosts {
            let comps = &bp
                .host_groups
                .iter()
                .find(|g| &g.name == group)
                .unwrap()
                .components;
            for c in comps {
                let (svc, placement) = blueprint::component(&c.name).expect("validated");
                services.entry(svc.name.to_owned()).or_insert(ServiceRec {
                    state: "INIT".into(),
                    pending: None,
                });
                installs.push((host.clone(), c.name.clone(), "INSTALL"));
                if placement != Placement::Client {
                    starts.push((host.clone(), c.name.clone(), "START"));
                }
            }
        }
        installs.extend(starts);
        let stack = format!("{}-{}", bp.info.stack_name, bp.info.stack_version);
        let blueprint = template.blueprint.clone();
        for host in hosts.keys() {
            if let Some(h) = self.hosts.get_mut(host) {
                h.cluster = Some(name.to_owned());
            }
        }
        let id = self.new_request(
            name,
            format!("{PROVISION_CONTEXT_PREFIX} '{name}'"),
            installs,
            Effect::Provision,
            at,
            fail(),
        );
        for s in services.values_mut() {
            s.pending = Some(("STARTED".into(), id));
        }
        self.clusters.insert(
            name.to_owned(),
            ClusterRec {
                blueprint,
                stack,
                hosts,
                services,
                privileges: Vec::new(),
            },
        );
        Ok(id)
    }

    pub fn cluster(&self, name: &str) -> Result<&ClusterRec, SimError> {
        self.clusters
            .get(name)
            .ok_or_else(|| not_found(format!("Cluster {name}")))
    }

    fn cluster_mut(&mut self, name: &str) -> Result<&mut ClusterRec, SimError> {
        self.clusters
            .get_mut(name)
            .ok_or_else(|| not_found(format!("Cluster {name}")))
    }

    pub fn delete_cluster(&mut self, name: &str) -> Result<(), SimError> {
        let c = self.cluster(name)?;
        if let Some((svc, s)) = c
            .services
            .iter()
            .find(|(_, s)| s.state == "STARTED" || s.pending.is_some())
        {
            return Err(bad(format!(
                "Cluster {name} cannot be deleted: service {svc} is {}{}; stop all services first",
                s.state,
                if s.pending.is_some() {
                    " with a request in progress"
                } else {
                    ""
                }
            )));
        }
        self.clusters.remove(name);
        self.requests.retain(|_, r| r.cluster != name);
        for h in self.hosts.values_mut() {
            if h.cluster.as_deref() == Some(name) {
                h.cluster = None;
            }
        }
        Ok(())
    }

    /// `PUT /clusters/{c}/services`: `None` when nothing has to change.
    pub fn set_services_state(
        &mut self,
        cluster: &str,
        change: &ServicesChange<'_>,
        at: Timing,
        fail: impl FnOnce() -> Option<FailPlan>,
    ) -> Result<Option<u64>, SimError> {
        let ServicesChange {
            target,
            context,
            only_in_state,
        } = *change;
        if !matches!(target, "INSTALLED" | "STARTED") {
            return Err(bad(format!(
                "Invalid desired state {target:?} for services (INSTALLED or STARTED)"
            )));
        }
        let c = self.cluster(cluster)?;
        let affected: Vec<String> = c
            .services
            .iter()
            .filter(|(_, s)| only_in_state.is_none_or(|only| s.state == only))
            .filter(|(_, s)| s.state != target)
            .filter(|(_, s)| s.pending.as_ref().is_none_or(|(t, _)| t != target))
            .map(|(n, _)| n.clone())
            .collect();
        if affected.is_empty() {
            return Ok(None);
        }
        let bp = self.blueprints.get(&c.blueprint);
        let mut tasks = Vec::new();
        for (host, group) in &c.hosts {
            let comps = bp
                .and_then(|bp| bp.host_groups.iter().find(|g| &g.name == group))
                .map(|g| g.components.clone())
                .unwrap_or_default();
            for comp in comps {
                let Some((svc, placement)) = blueprint::component(&comp.name) else {
                    continue;
                };
                if placement == Placement::Client || !affected.iter().any(|a| a == svc.name) {
                    continue;
                }
                let from = &c.services[svc.name].state;
                let command = match (target, from.as_str()) {
                    ("STARTED", _) => "START",
                    (_, "STARTED") => "STOP",
                    _ => "INSTALL",
                };
                tasks.push((host.clone(), comp.name.clone(), command));
            }
        }
        let id = self.new_request(
            cluster,
            context.to_owned(),
            tasks,
            Effect::Services {
                target: target.to_owned(),
                services: affected.clone(),
            },
            at,
            fail(),
        );
        let c = self.cluster_mut(cluster)?;
        for name in affected {
            if let Some(s) = c.services.get_mut(&name) {
                s.pending = Some((target.to_owned(), id));
            }
        }
        Ok(Some(id))
    }

    // ------------------------------------------------------------ requests

    fn new_request(
        &mut self,
        cluster: &str,
        context: String,
        tasks: Vec<(String, String, &str)>,
        effect: Effect,
        at: Timing,
        fail: Option<FailPlan>,
    ) -> u64 {
        let Timing { now, budget } = at;
        let id = self.next_request;
        self.next_request += 1;
        let n = tasks.len().max(1) as u32;
        let tasks: Vec<TaskRec> = tasks
            .into_iter()
            .map(|(host, role, command)| {
                let id = self.next_task;
                self.next_task += 1;
                TaskRec {
                    id,
                    host,
                    role,
                    command: command.to_owned(),
                    status: RequestStatus::Pending,
                    exit_code: None,
                    stdout: String::new(),
                    stderr: String::new(),
                }
            })
            .collect();
        let fail_at = fail.and_then(|f| match f.role {
            Some(role) => tasks
                .iter()
                .position(|t| t.role.eq_ignore_ascii_case(&role)),
            None if tasks.is_empty() => None,
            None => Some(tasks.len() / 2),
        });
        let mut req = RequestRec {
            id,
            cluster: cluster.to_owned(),
            context,
            status: RequestStatus::InProgress,
            tasks,
            cursor: 0,
            started: now,
            created_ms: epoch_ms(),
            ended_ms: None,
            task_len: budget / n,
            fail_at,
            abort_reason: None,
            effect,
        };
        if let Some(t) = req.tasks.first_mut() {
            t.status = RequestStatus::InProgress;
        }
        self.requests.insert(id, req);
        id
    }

    pub fn request(&self, cluster: &str, id: u64) -> Result<&RequestRec, SimError> {
        self.cluster(cluster)?;
        self.requests
            .get(&id)
            .filter(|r| r.cluster == cluster)
            .ok_or_else(|| not_found(format!("Request {id}")))
    }

    /// Finish every task whose time has come; apply finished requests' effects.
    pub fn settle(&mut self, now: Instant, heartbeat_timeout: Duration) {
        let mut finished = Vec::new();
        for req in self.requests.values_mut() {
            if req.status != RequestStatus::InProgress {
                continue;
            }
            while req.cursor < req.tasks.len() {
                let end = req.task_end(req.cursor);
                if end > now {
                    break;
                }
                let i = req.cursor;
                let host_ok = self
                    .hosts
                    .get(&req.tasks[i].host)
                    .is_some_and(|h| h.healthy_at(end, heartbeat_timeout));
                let task = &mut req.tasks[i];
                if req.fail_at == Some(i) {
                    task.status = RequestStatus::Failed;
                    task.exit_code = Some(1);
                    task.stdout = format!("{} {}: starting\n", task.role, task.command);
                    task.stderr = format!(
                        "Traceback (most recent call last):\nFail: Execution of '{} {}' returned 1. \
                         (injected failure)\n",
                        task.command.to_lowercase(),
                        task.role.to_lowercase()
                    );
                    req.status = RequestStatus::Failed;
                } else if !host_ok {
                    task.status = RequestStatus::TimedOut;
                    task.exit_code = Some(999);
                    task.stderr = format!(
                        "Host {} lost its heartbeat; the command timed out\n",
                        task.host
                    );
                    req.status = RequestStatus::TimedOut;
                } else {
                    task.status = RequestStatus::Completed;
                    task.exit_code = Some(0);
                    task.stdout =
                        format!("{} {} on {}: done\n", task.role, task.command, task.host);
                }
                req.cursor += 1;
                if req.status != RequestStatus::InProgress {
                    for t in &mut req.tasks[req.cursor..] {
                        t.status = RequestStatus::Aborted;
                    }
                    break;
                }
                if let Some(next) = req.tasks.get_mut(req.cursor) {
                    next.status = RequestStatus::InProgress;
                }
            }
            if req.status == RequestStatus::InProgress && req.cursor == req.tasks.len() {
                req.status = RequestStatus::Completed;
            }
            if req.status != RequestStatus::InProgress {
                let end = if req.tasks.is_empty() {
                    now
                } else {
                    req.task_end(req.cursor.saturating_sub(1)).min(now)
                };
                req.ended_ms = Some(ms_at(now, end));
                finished.push(req.id);
            }
        }
        for id in finished {
            self.apply_effect(id);
        }
    }

    fn apply_effect(&mut self, id: u64) {
        let Some(req) = self.requests.get(&id) else {
            return;
        };
        let ok = req.status == RequestStatus::Completed;
        let Some(c) = self.clusters.get_mut(&req.cluster) else {
            return;
        };
        let (target, services): (&str, Vec<String>) = match &req.effect {
            Effect::Provision => (
                if ok { "STARTED" } else { "INSTALL_FAILED" },
                c.services.keys().cloned().collect(),
            ),
            Effect::Services { target, services } => (target.as_str(), services.clone()),
        };
        for name in services {
            if let Some(s) = c.services.get_mut(&name) {
                if s.pending.as_ref().is_some_and(|(_, r)| *r == id) {
                    s.pending = None;
                }
                if ok || matches!(req.effect, Effect::Provision) {
                    s.state = target.to_owned();
                }
            }
        }
    }

    pub fn abort(
        &mut self,
        cluster: &str,
        id: u64,
        reason: String,
        now: Instant,
    ) -> Result<(), SimError> {
        let status = self.request(cluster, id)?.status;
        if status != RequestStatus::InProgress {
            return Err(bad(format!(
                "Abort request can not be performed on request {id}: it is {status}"
            )));
        }
        let req = self.requests.get_mut(&id).expect("checked");
        req.status = RequestStatus::Aborted;
        req.abort_reason = Some(reason);
        req.ended_ms = Some(ms_at(now, now));
        for t in &mut req.tasks[req.cursor..] {
            t.status = RequestStatus::Aborted;
        }
        self.apply_effect(id);
        Ok(())
    }

    pub fn request_json(
        &self,
        req: &RequestRec,
        now: Instant,
        base: &str,
        tasks_full: bool,
    ) -> Value {
        let href = format!("{base}/clusters/{}/requests/{}", req.cluster, req.id);
        let mut r = json!({
            "id": req.id,
            "cluster_name": req.cluster,
            "request_context": req.context,
            "request_status": req.status.as_str(),
            "progress_percent": req.progress_percent(now),
            "task_count": req.tasks.len(),
            "completed_task_count": req.count(&[
                RequestStatus::Completed,
                RequestStatus::Failed,
                RequestStatus::TimedOut,
                RequestStatus::Aborted,
            ]),
            "failed_task_count": req.count(&[RequestStatus::Failed, RequestStatus::TimedOut]),
            "aborted_task_count": req.count(&[RequestStatus::Aborted]),
            "timed_out_task_count": req.count(&[RequestStatus::TimedOut]),
            "queued_task_count": req.count(&[RequestStatus::Pending, RequestStatus::Queued]),
            "create_time": req.created_ms,
            "start_time": req.created_ms,
            "end_time": req.ended_ms.unwrap_or(-1),
            "type": "INTERNAL_REQUEST",
        });
        if let Some(reason) = &req.abort_reason {
            r["abort_reason"] = json!(reason);
        }
        let tasks: Vec<Value> = req
            .tasks
            .iter()
            .map(|t| {
                let task_href = format!("{href}/tasks/{}", t.id);
                if tasks_full {
                    json!({"href": task_href, "Tasks": {
                        "id": t.id,
                        "request_id": req.id,
                        "cluster_name": req.cluster,
                        "host_name": t.host,
                        "role": t.role,
                        "command": t.command,
                        "status": t.status.as_str(),
                        "exit_code": t.exit_code.unwrap_or(999),
                        "stdout": t.stdout,
                        "stderr": t.stderr,
                    }})
                } else {
                    json!({"href": task_href, "Tasks": {
                        "id": t.id, "request_id": req.id, "cluster_name": req.cluster,
                    }})
                }
            })
            .collect();
        json!({"href": href, "Requests": r, "tasks": tasks})
    }

    // --------------------------------------------------------------- users

    pub fn create_user(&mut self, name: &str, admin: bool, active: bool) -> Result<(), SimError> {
        if name.trim().is_empty() {
            return Err(bad("Invalid Request: Users/user_name is required"));
        }
        if self.users.contains_key(name) {
            return Err(SimError::new(409, format!("User {name} already exists")));
        }
        self.users
            .insert(name.to_owned(), UserRec { admin, active });
        Ok(())
    }

    pub fn delete_user(&mut self, name: &str) -> Result<(), SimError> {
        self.users
            .remove(name)
            .ok_or_else(|| not_found(format!("User {name}")))?;
        for c in self.clusters.values_mut() {
            c.privileges
                .retain(|p| !(p.principal_type == "USER" && p.principal_name == name));
        }
        Ok(())
    }

    pub fn grant(
        &mut self,
        cluster: &str,
        permission: &str,
        principal_name: &str,
        principal_type: &str,
    ) -> Result<(), SimError> {
        if !matches!(
            permission,
            "CLUSTER.USER"
                | "CLUSTER.OPERATOR"
                | "CLUSTER.ADMINISTRATOR"
                | "SERVICE.OPERATOR"
                | "SERVICE.ADMINISTRATOR"
        ) {
            return Err(bad(format!("Invalid permission name {permission:?}")));
        }
        if principal_type != "USER" && principal_type != "GROUP" {
            return Err(bad(format!("Invalid principal type {principal_type:?}")));
        }
        if principal_type == "USER" && !self.users.contains_key(principal_name) {
            return Err(bad(format!("User {principal_name} does not exist")));
        }
        let id = self.next_privilege;
        let c = self.cluster_mut(cluster)?;
        if c.privileges.iter().any(|p| {
            p.permission == permission
                && p.principal_name == principal_name
                && p.principal_type == principal_type
        }) {
            return Err(SimError::new(
                409,
                format!(
                    "Privilege {permission} for {principal_type} {principal_name} already exists"
                ),
            ));
        }
        c.privileges.push(PrivilegeRec {
            id,
            permission: permission.to_owned(),
            principal_name: principal_name.to_owned(),
            principal_type: principal_type.to_owned(),
        });
        self.next_privilege += 1;
        Ok(())
    }

    pub fn revoke(&mut self, cluster: &str, id: u64) -> Result<(), SimError> {
        let c = self.cluster_mut(cluster)?;
        let before = c.privileges.len();
        c.privileges.retain(|p| p.id != id);
        if c.privileges.len() == before {
            return Err(not_found(format!("Privilege {id}")));
        }
        Ok(())
    }
}
