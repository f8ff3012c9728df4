//! Workflows that ship with the engine: the demonstration the README's first
//! command runs, and the workflows the test suite and the benchmark drive
//! through real worker processes (registered only with `ORRERY_TEST_WORKFLOWS=1`).
//!
//! Test steps record each execution as a line in an "effects" file named by
//! the input, a real side effect visible across processes, so tests can count
//! how often each step truly ran.

use std::{io::Write, time::Duration};

use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::{
    error::StepError,
    retry::RetryPolicy,
    workflow::{Progress, Registry, Step, StepCtx, Workflow},
};

pub mod api_fakes;

/// Register the demonstration workflow, and the test ones when asked.
pub fn register(registry: &mut Registry, test_workflows: bool) {
    registry.register(demo());
    // Callback delivery is production work, not a test stand-in.
    registry.register(api_fakes::deliver_callback());
    if test_workflows {
        for wf in test_workflows_all()
            .into_iter()
            .chain(api_fakes::workflows())
        {
            registry.register(wf);
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DemoInput {
    /// Hosts to "bootstrap" in parallel.
    pub hosts: u32,
    /// How long each simulated piece of work takes.
    #[serde(default = "default_demo_ms")]
    pub work_ms: u64,
}

fn default_demo_ms() -> u64 {
    400
}

/// A workflow shaped like cluster provisioning, across the three queues,
/// with a fan-out and a waiting step, but touching nothing outside itself.
pub fn demo() -> Workflow {
    Workflow::new("demo", 1)
        .input::<DemoInput>()
        .step(
            Step::new("allocate", "provision", |_ctx: StepCtx, input: DemoInput| async move {
                tokio::time::sleep(Duration::from_millis(input.work_ms)).await;
                let hosts: Vec<String> = (1..=input.hosts).map(|i| format!("demo-node-{i}")).collect();
                Ok::<_, StepError>(json!({ "hosts": hosts }))
            })
            .compensate(|_ctx: StepCtx, _: DemoInput| async { Ok(()) }),
        )
        .step(
            Step::fan_out(
                "bootstrap",
                "ssh",
                |ctx: &StepCtx, _: DemoInput| {
                    let hosts: Vec<String> = serde_json::from_value(ctx.output::<Value>("allocate")?["hosts"].clone())
                        .map_err(StepError::fatal)?;
                    Ok(hosts.into_iter().map(|h| (h.clone(), h)).collect())
                },
                |ctx: StepCtx, _key: String, host: String| async move {
                    let input: DemoInput = ctx.input()?;
                    tokio::time::sleep(Duration::from_millis(input.work_ms)).await;
                    Ok::<_, StepError>(json!({ "host": host, "agent": "registered" }))
                },
            )
            .concurrency(8),
        )
        .step(
            Step::waiting("install", "ambari", |ctx: StepCtx, input: DemoInput| async move {
                let progress = (ctx.polls + 1) * 25;
                tracing::info!(progress, "demo install progress");
                if progress >= 100 {
                    Ok(Progress::Done(json!({ "progress": 100 })))
                } else {
                    Ok::<_, StepError>(Progress::WaitFor(Duration::from_millis(input.work_ms)))
                }
            })
            .wait_deadline(Duration::from_secs(600)),
        )
        .step(Step::new("finish", "provision", |ctx: StepCtx, _: DemoInput| async move {
            let boot: Value = ctx.output("bootstrap")?;
            Ok::<_, StepError>(json!({ "running": true, "hosts": boot.as_object().map(|m| m.len()).unwrap_or(0) }))
        }))
}

/// Input shared by the test workflows; every field optional.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(default)]
pub struct TestInput {
    /// File to append one line per step execution to.
    pub effects: Option<String>,
    /// Work time of each step.
    pub sleep_ms: u64,
    /// Retryable failures of the flaky step before it succeeds.
    pub fail_times: u32,
    /// Name of a step that fails fatally.
    pub fail_at: Option<String>,
    /// Cancellable steps ignore their token (to exercise the grace period).
    pub ignore_cancel: bool,
    /// Fan-out: number of items.
    pub items: u32,
    /// Fan-out: items that fail once (retryable) before succeeding.
    pub fail_once: Vec<String>,
    /// Waiting step: polls before done.
    pub polls: u32,
}

/// Append `run step worker attempt epoch_ms` to the effects file, if the input names one.
pub fn effect(input: &TestInput, ctx: &StepCtx, what: &str) -> Result<(), StepError> {
    let Some(path) = &input.effects else {
        return Ok(());
    };
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| StepError::fatal(format!("effects file {path}: {e}")))?;
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or_default();
    // One write per line, so concurrent processes never interleave a line.
    f.write_all(
        format!(
            "{} {what} {} {} {ms}\n",
            ctx.run_id, ctx.worker_id, ctx.attempt
        )
        .as_bytes(),
    )
    .map_err(|e| StepError::fatal(format!("effects file {path}: {e}")))
}

/// Sleep `ms`, waking early when the step is cancelled (unless told to ignore it).
async fn work(ctx: &StepCtx, input: &TestInput) {
    let sleep = tokio::time::sleep(Duration::from_millis(input.sleep_ms));
    if input.ignore_cancel {
        sleep.await;
    } else {
        tokio::select! {
            _ = sleep => {}
            _ = ctx.cancel.cancelled() => {}
        }
    }
}

/// A step that records itself, works, and fails if `fail_at` names it.
fn plain(name: &'static str, queue: &str) -> Step {
    recorded(name, queue, true)
}

/// Like [`plain`], but `works` says whether it spends `sleep_ms`.
fn recorded(name: &'static str, queue: &str, works: bool) -> Step {
    Step::new(
        name,
        queue,
        move |ctx: StepCtx, input: TestInput| async move {
            effect(&input, &ctx, name)?;
            ctx.log("info", &format!("{name} ran on {}", ctx.worker_id))
                .await;
            if works {
                work(&ctx, &input).await;
            }
            if input.fail_at.as_deref() == Some(name) {
                return Err(StepError::fatal(format!("{name} was told to fail")));
            }
            Ok(json!({ "step": name, "worker": ctx.worker_id.to_string() }))
        },
    )
    .retry(RetryPolicy::default().delays(Duration::from_millis(50), Duration::from_millis(500)))
}

/// Records itself, works, then reports what another session sees of the
/// run's row: whether this worker's claim is visible yet.
fn seen(name: &'static str) -> Step {
    Step::new(
        name,
        "alpha",
        move |ctx: StepCtx, input: TestInput| async move {
            effect(&input, &ctx, name)?;
            work(&ctx, &input).await;
            let pool = ctx.service::<sqlx::PgPool>()?;
            let (state, leased_by): (String, Option<String>) =
                sqlx::query_as("SELECT state, lease_owner FROM runs WHERE id = $1")
                    .bind(ctx.run_id)
                    .fetch_one(&*pool)
                    .await
                    .map_err(|e| StepError::retryable(format!("database: {e}")))?;
            Ok(json!({ "state": state, "leased_by": leased_by }))
        },
    )
}

fn undo(
    name: &'static str,
) -> impl Fn(StepCtx, TestInput) -> futures::future::Ready<Result<(), StepError>> + Send + Sync + 'static
{
    move |ctx: StepCtx, input: TestInput| {
        futures::future::ready(effect(&input, &ctx, &format!("undo-{name}")))
    }
}

fn test_workflows_all() -> Vec<Workflow> {
    vec![
        // Steps across two queues; with `sleep_ms` it is also the "long step" workflow.
        Workflow::new("test.two_queues", 1)
            .step(plain("a", "alpha"))
            .step(plain("b", "beta"))
            .step(plain("c", "alpha")),
        // Retries, then compensation in reverse order.
        Workflow::new("test.saga", 1)
            .step(plain("s1", "alpha").compensate(undo("s1")))
            .step(plain("s2", "alpha").compensate(undo("s2")))
            .step(
                Step::new("s3", "alpha", |ctx: StepCtx, input: TestInput| async move {
                    effect(&input, &ctx, "s3")?;
                    if ctx.attempt <= input.fail_times {
                        return Err(StepError::retryable(format!(
                            "transient failure {}",
                            ctx.attempt
                        )));
                    }
                    if input.fail_at.as_deref() == Some("s3") {
                        return Err(StepError::fatal("s3 hit a fatal error"));
                    }
                    Ok(json!({ "attempts": ctx.attempt }))
                })
                .retry(
                    RetryPolicy::default()
                        .attempts(5)
                        .delays(Duration::from_millis(100), Duration::from_secs(1))
                        .without_jitter(),
                ),
            ),
        // Cancellation during a long step.
        Workflow::new("test.cancellable", 1)
            .step(recorded("prepare", "alpha", false).compensate(undo("prepare")))
            .step(
                plain("long", "alpha")
                    .compensate(undo("long"))
                    .cancel_grace(Duration::from_millis(1500)),
            ),
        // Replay: four steps, no compensations.
        Workflow::new("test.chain", 1)
            .step(plain("one", "alpha"))
            .step(plain("two", "alpha"))
            .step(plain("three", "alpha"))
            .step(plain("four", "alpha")),
        // Held claims: each step says whether the run's claim is visible.
        Workflow::new("test.seen", 1)
            .step(seen("first"))
            .step(seen("second")),
        // Fan-out with per-item checkpoints.
        Workflow::new("test.fanout", 1).step(
            Step::fan_out(
                "hosts",
                "alpha",
                |_ctx: &StepCtx, input: TestInput| {
                    Ok((0..input.items).map(|i| (format!("h{i:02}"), i)).collect())
                },
                |ctx: StepCtx, key: String, _item: u32| async move {
                    let input: TestInput = ctx.input()?;
                    effect(&input, &ctx, &key)?;
                    work(&ctx, &input).await;
                    if ctx.attempt == 1 && input.fail_once.contains(&key) {
                        return Err(StepError::retryable(format!("{key} flaked")));
                    }
                    Ok(json!({ "item": key }))
                },
            )
            .concurrency(4)
            .retry(
                RetryPolicy::default()
                    .delays(Duration::from_millis(50), Duration::from_millis(200)),
            ),
        ),
        // A step whose input type the run's input does not match.
        Workflow::new("test.typed", 1).step(Step::new(
            "count",
            "alpha",
            |_ctx: StepCtx, input: CountInput| async move {
                Ok::<_, StepError>(json!({ "count": input.count }))
            },
        )),
        // A waiting step that parks the run `polls` times.
        Workflow::new("test.wait", 1).step(Step::waiting(
            "poll",
            "alpha",
            |ctx: StepCtx, input: TestInput| async move {
                effect(&input, &ctx, "poll")?;
                if ctx.polls >= input.polls {
                    Ok(Progress::Done(json!({ "polls": ctx.polls })))
                } else {
                    Ok::<_, StepError>(Progress::WaitFor(Duration::from_millis(
                        input.sleep_ms.max(10),
                    )))
                }
            },
        )),
        // Benchmarks: no-op steps on one queue.
        (0..10).fold(Workflow::new("bench.noop10", 1), |wf, i| {
            wf.step(Step::new(
                &format!("n{i}"),
                "bench",
                |_ctx: StepCtx, _: Value| async { Ok::<_, StepError>(()) },
            ))
        }),
        Workflow::new("bench.noop1", 1).step(Step::new(
            "n0",
            "bench",
            |_ctx: StepCtx, _: Value| async { Ok::<_, StepError>(()) },
        )),
    ]
}

#[derive(Debug, Deserialize)]
struct CountInput {
    count: u32,
}
