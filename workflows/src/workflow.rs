//! How workflows are declared: a named, versioned list of typed steps.
//!
//! A step is an `async fn(StepCtx, Input) -> Result<Output, StepError>` where
//! `Input` is the run's input deserialized into the step's own type and
//! `Output` is serialized into its checkpoint. Earlier steps' checkpoints are
//! read with [`StepCtx::output`]. A step declares its queue, timeout, retry
//! policy, whether it is safe to repeat after an interruption, and optionally
//! a compensation. Waiting steps return [`Progress::WaitFor`] to park the run;
//! fan-out steps run one function over many items, each checkpointed.
//!
//! The typed closures are erased here into boxed functions over JSON so the
//! executor can drive any workflow without knowing its types.

use std::{
    collections::{BTreeMap, HashMap},
    future::Future,
    pin::Pin,
    sync::Arc,
    time::Duration,
};

use serde::{de::DeserializeOwned, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::{error::StepError, retry::RetryPolicy};

pub type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send + 'static>>;

/// What a step attempt produced.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress<T> {
    /// The step is done; its output becomes the checkpoint.
    Done(T),
    /// Not done yet (an external request at 40%): park the run, free the
    /// worker, and run this step again after the delay.
    WaitFor(Duration),
}

/// The external systems steps use (database pool, infrastructure provider,
/// SSH, Ambari client), looked up by type: `ctx.service::<PgPool>()`.
/// Built once per process; tests build it with their own parts.
#[derive(Default, Clone)]
pub struct Services {
    map: HashMap<std::any::TypeId, Arc<dyn std::any::Any + Send + Sync>>,
}

impl Services {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) -> &mut Self {
        self.insert_arc(Arc::new(value))
    }

    pub fn insert_arc<T: Send + Sync + 'static + ?Sized>(&mut self, value: Arc<T>) -> &mut Self
    where
        Arc<T>: Send + Sync,
    {
        self.map
            .insert(std::any::TypeId::of::<Arc<T>>(), Arc::new(value));
        self
    }

    /// The service of type `T` (inserted with [`Services::insert`]).
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.get_arc::<T>()
    }

    /// Works for trait objects too: `get_arc::<dyn Provider>()`.
    pub fn get_arc<T: Send + Sync + 'static + ?Sized>(&self) -> Option<Arc<T>>
    where
        Arc<T>: Send + Sync,
    {
        self.map
            .get(&std::any::TypeId::of::<Arc<T>>())
            .and_then(|v| v.downcast_ref::<Arc<T>>())
            .cloned()
    }
}

/// Everything a step attempt may look at.
#[derive(Clone)]
pub struct StepCtx {
    pub run_id: Uuid,
    pub step: String,
    /// 1 for the first attempt of this step.
    pub attempt: u32,
    /// How many times this step parked the run before (waiting steps).
    pub polls: u32,
    /// The worker process running the attempt (unique per process).
    pub worker_id: Arc<str>,
    /// Fired when the run is cancelled or the lease is lost: long steps must
    /// watch it (SSH commands, polls) and return promptly.
    pub cancel: CancellationToken,
    pub(crate) input: Arc<Value>,
    pub(crate) outputs: Arc<HashMap<String, Value>>,
    pub(crate) services: Arc<Services>,
}

impl StepCtx {
    /// The run's input, deserialized into `T`; a mismatch is fatal and names the field.
    pub fn input<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        decode(&self.input).map_err(|e| StepError::Fatal(format!("input {e}")))
    }

    /// The checkpointed output of an earlier step.
    pub fn output<T: DeserializeOwned>(&self, step: &str) -> Result<T, StepError> {
        let value = self.outputs.get(step).ok_or_else(|| {
            StepError::Fatal(format!(
                "step `{}` needs the output of `{step}`, which has none",
                self.step
            ))
        })?;
        decode(value).map_err(|e| StepError::Fatal(format!("output of `{step}` {e}")))
    }

    /// The raw checkpointed output of an earlier step, if any.
    pub fn output_value(&self, step: &str) -> Option<&Value> {
        self.outputs.get(step)
    }

    /// A service this process was built with; missing is a fatal configuration error.
    pub fn service<T: Send + Sync + 'static + ?Sized>(&self) -> Result<Arc<T>, StepError>
    where
        Arc<T>: Send + Sync,
    {
        self.services.get_arc::<T>().ok_or_else(|| {
            StepError::Fatal(format!(
                "step `{}` needs {}, which this worker was not configured with",
                self.step,
                std::any::type_name::<T>()
            ))
        })
    }

    /// Keep `text` in the step's log (`stream`: "stdout", "stderr", "info"...).
    /// Best effort: a log that cannot be written is traced, never fails the step.
    /// Entries over 64 KiB keep their last 64 KiB.
    pub async fn log(&self, stream: &str, text: &str) {
        const MAX: usize = 64 * 1024;
        let mut start = text.len().saturating_sub(MAX);
        while !text.is_char_boundary(start) {
            start += 1;
        }
        let Some(pool) = self.services.get::<sqlx::PgPool>() else {
            return;
        };
        let res = sqlx::query("INSERT INTO step_logs (run_id, step, attempt, stream, text) VALUES ($1, $2, $3, $4, $5)")
            .bind(self.run_id)
            .bind(&self.step)
            .bind(self.attempt as i32)
            .bind(stream)
            .bind(&text[start..])
            .execute(&*pool)
            .await;
        if let Err(err) = res {
            tracing::warn!(run_id = %self.run_id, step = self.step, error = %err, "cannot write step log");
        }
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// Deserialize with the path of the offending field in the message
/// (`at `size`: invalid type: string "x", expected u32`).
pub fn decode<T: DeserializeOwned>(value: &Value) -> Result<T, String> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            format!("does not match: {}", e.inner())
        } else {
            format!("field `{path}`: {}", e.inner())
        }
    })
}

pub(crate) type StepFn =
    Arc<dyn Fn(StepCtx) -> BoxFuture<Result<Progress<Value>, StepError>> + Send + Sync>;
pub(crate) type CompensateFn =
    Arc<dyn Fn(StepCtx) -> BoxFuture<Result<(), StepError>> + Send + Sync>;
pub(crate) type ItemsFn =
    Arc<dyn Fn(&StepCtx) -> Result<Vec<(String, Value)>, StepError> + Send + Sync>;
pub(crate) type ItemFn =
    Arc<dyn Fn(StepCtx, String, Value) -> BoxFuture<Result<Value, StepError>> + Send + Sync>;

pub(crate) enum StepBody {
    Single(StepFn),
    FanOut {
        items: ItemsFn,
        each: ItemFn,
        concurrency: usize,
    },
}

/// One step of a workflow; built with [`Step::new`], [`Step::waiting`] or
/// [`Step::fan_out`] and refined with the builder methods.
pub struct Step {
    pub name: String,
    pub queue: String,
    pub timeout: Duration,
    pub retry: RetryPolicy,
    /// Safe to run again if a worker died in the middle of it. A step that is
    /// not is failed (and compensated) instead of being repeated blindly.
    pub repeatable: bool,
    /// How long a cancelled step may take to return before it is dropped.
    pub cancel_grace: Duration,
    /// For waiting steps: the longest the step may keep the run waiting, in
    /// total across polls, before it fails as timed out.
    pub wait_deadline: Option<Duration>,
    pub(crate) body: StepBody,
    pub(crate) compensation: Option<CompensateFn>,
}

impl Step {
    fn with_body(name: &str, queue: &str, body: StepBody) -> Self {
        Step {
            name: name.to_owned(),
            queue: queue.to_owned(),
            timeout: Duration::from_secs(300),
            retry: RetryPolicy::default(),
            repeatable: true,
            cancel_grace: Duration::from_secs(10),
            wait_deadline: None,
            body,
            compensation: None,
        }
    }

    /// A step that runs once to completion.
    pub fn new<I, O, F, Fut>(name: &str, queue: &str, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(StepCtx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        Self::waiting(name, queue, move |ctx: StepCtx, input: I| {
            let fut = f(ctx, input);
            async move { fut.await.map(Progress::Done) }
        })
    }

    /// A step that may park the run and be polled again later.
    pub fn waiting<I, O, F, Fut>(name: &str, queue: &str, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        F: Fn(StepCtx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<Progress<O>, StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        let erased: StepFn = Arc::new(move |ctx: StepCtx| {
            let f = f.clone();
            Box::pin(async move {
                let input: I = ctx.input()?;
                match f(ctx, input).await? {
                    Progress::Done(out) => Ok(Progress::Done(encode(&out)?)),
                    Progress::WaitFor(d) => Ok(Progress::WaitFor(d)),
                }
            })
        });
        Self::with_body(name, queue, StepBody::Single(erased))
    }

    /// A step over many items (hosts), each with its own checkpoint; at most
    /// `concurrency` run at once and a retry repeats only the failed items.
    /// The step's output maps each item key to its output.
    pub fn fan_out<I, T, O, L, F, Fut>(name: &str, queue: &str, items: L, each: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        T: Serialize + DeserializeOwned + Send + 'static,
        O: Serialize + Send + 'static,
        L: Fn(&StepCtx, I) -> Result<Vec<(String, T)>, StepError> + Send + Sync + 'static,
        F: Fn(StepCtx, String, T) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<O, StepError>> + Send + 'static,
    {
        let items: ItemsFn = Arc::new(move |ctx: &StepCtx| {
            let input: I = ctx.input()?;
            items(ctx, input)?
                .into_iter()
                .map(|(key, item)| Ok((key, encode(&item)?)))
                .collect()
        });
        let each = Arc::new(each);
        let each: ItemFn = Arc::new(move |ctx: StepCtx, key: String, item: Value| {
            let each = each.clone();
            Box::pin(async move {
                let item: T =
                    decode(&item).map_err(|e| StepError::Fatal(format!("item `{key}` {e}")))?;
                let out = each(ctx, key, item).await?;
                encode(&out)
            })
        });
        Self::with_body(
            name,
            queue,
            StepBody::FanOut {
                items,
                each,
                concurrency: 8,
            },
        )
    }

    /// The step that undoes this one (release containers, deregister hosts).
    /// It runs when a later failure or a cancel unwinds the run, also for the
    /// step that was interrupted or failed itself, so it must be idempotent
    /// and cope with partial work.
    pub fn compensate<I, F, Fut>(mut self, f: F) -> Self
    where
        I: DeserializeOwned + Send + 'static,
        F: Fn(StepCtx, I) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), StepError>> + Send + 'static,
    {
        let f = Arc::new(f);
        self.compensation = Some(Arc::new(move |ctx: StepCtx| {
            let f = f.clone();
            Box::pin(async move {
                let input: I = ctx.input()?;
                f(ctx, input).await
            })
        }));
        self
    }

    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = retry;
        self
    }

    pub fn not_repeatable(mut self) -> Self {
        self.repeatable = false;
        self
    }

    pub fn cancel_grace(mut self, grace: Duration) -> Self {
        self.cancel_grace = grace;
        self
    }

    pub fn wait_deadline(mut self, deadline: Duration) -> Self {
        self.wait_deadline = Some(deadline);
        self
    }

    /// Fan-out only: how many items run at once.
    pub fn concurrency(mut self, n: usize) -> Self {
        if let StepBody::FanOut { concurrency, .. } = &mut self.body {
            *concurrency = n.max(1);
        }
        self
    }
}

fn encode<T: Serialize>(value: &T) -> Result<Value, StepError> {
    serde_json::to_value(value)
        .map_err(|e| StepError::Fatal(format!("output does not serialize: {e}")))
}

type InputCheck = Arc<dyn Fn(&Value) -> Result<(), String> + Send + Sync>;

/// A named, versioned list of steps.
pub struct Workflow {
    pub name: String,
    pub version: i32,
    pub steps: Vec<Step>,
    input_check: Option<InputCheck>,
}

impl Workflow {
    pub fn new(name: &str, version: i32) -> Self {
        Workflow {
            name: name.to_owned(),
            version,
            steps: Vec::new(),
            input_check: None,
        }
    }

    pub fn step(mut self, step: Step) -> Self {
        assert!(
            self.steps.iter().all(|s| s.name != step.name),
            "workflow `{}` has two steps named `{}`",
            self.name,
            step.name
        );
        self.steps.push(step);
        self
    }

    /// Validate submissions against `I`, so bad input is refused before
    /// anything is written instead of failing the run later.
    pub fn input<I: DeserializeOwned + 'static>(mut self) -> Self {
        self.input_check = Some(Arc::new(|v: &Value| decode::<I>(v).map(|_: I| ())));
        self
    }

    pub fn check_input(&self, input: &Value) -> Result<(), String> {
        match &self.input_check {
            Some(check) => check(input),
            None => Ok(()),
        }
    }

    pub fn step_index(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// Every workflow a process knows, by name (the newest version wins for new
/// submissions; runs keep the version they started with).
#[derive(Default)]
pub struct Registry {
    workflows: HashMap<String, BTreeMap<i32, Arc<Workflow>>>,
}

impl Registry {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn register(&mut self, workflow: Workflow) -> &mut Self {
        assert!(
            !workflow.steps.is_empty(),
            "workflow `{}` has no steps",
            workflow.name
        );
        self.workflows
            .entry(workflow.name.clone())
            .or_default()
            .insert(workflow.version, Arc::new(workflow));
        self
    }

    pub fn latest(&self, name: &str) -> Option<Arc<Workflow>> {
        self.workflows.get(name)?.values().next_back().cloned()
    }

    pub fn get(&self, name: &str, version: i32) -> Option<Arc<Workflow>> {
        self.workflows.get(name)?.get(&version).cloned()
    }

    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.workflows.keys().map(String::as_str)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[allow(dead_code)]
    struct Input {
        size: u32,
        name: String,
    }

    #[test]
    fn decoding_errors_name_the_offending_field() {
        let err = decode::<Input>(&serde_json::json!({"size": "three", "name": "x"})).unwrap_err();
        assert!(err.contains("`size`"), "{err}");
        let err = decode::<Input>(&serde_json::json!({"size": 3})).unwrap_err();
        assert!(err.contains("name"), "{err}");
    }

    #[test]
    fn services_are_found_by_type_including_trait_objects() {
        trait Greeter: Send + Sync {
            fn hi(&self) -> &'static str;
        }
        struct En;
        impl Greeter for En {
            fn hi(&self) -> &'static str {
                "hi"
            }
        }
        let mut services = Services::new();
        services.insert(42u32);
        services.insert_arc::<dyn Greeter>(Arc::new(En));
        assert_eq!(*services.get::<u32>().unwrap(), 42);
        assert_eq!(services.get_arc::<dyn Greeter>().unwrap().hi(), "hi");
        assert!(services.get::<String>().is_none());
    }

    #[test]
    fn the_registry_serves_the_newest_version_and_keeps_old_ones() {
        let mut reg = Registry::new();
        let noop = || {
            Step::new("a", "q", |_ctx: StepCtx, _: Value| async {
                Ok::<_, StepError>(())
            })
        };
        reg.register(Workflow::new("w", 1).step(noop()));
        reg.register(Workflow::new("w", 2).step(noop()));
        assert_eq!(reg.latest("w").unwrap().version, 2);
        assert_eq!(reg.get("w", 1).unwrap().version, 1);
        assert!(reg.get("w", 3).is_none());
    }
}
