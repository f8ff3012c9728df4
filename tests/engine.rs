//! The engine against real PostgreSQL, real Redis and real worker processes:
//! every guarantee of the engine issue, each shown by a run's real outcome.

mod support;

use std::{collections::HashSet, time::Duration};

use orrery_workflows::{
    cron, reconciler,
    store::{self, ReplayRequest},
    writer::{
        write_and_claim, write_batch, Checkpoint, CheckpointKind, CheckpointWriter, DispatchMark,
        RunUpdate,
    },
    EngineError, RunState,
};
use serde_json::json;
use support::{PrivateRedis, TestEnv, LEASE_MS};
use uuid::Uuid;

const T: Duration = Duration::from_secs(30);
const DONE: &[RunState] = &[RunState::Succeeded, RunState::Failed, RunState::Cancelled];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_spanning_two_queues_run_to_success_on_two_worker_processes() {
    let mut env = TestEnv::new("two_queues").await;
    env.spawn_worker(&["--queues", "alpha"]);
    env.spawn_worker(&["--queues", "beta"]);
    let id = env
        .submit("test.two_queues", json!({ "effects": env.effects_path() }))
        .await;
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    let effects = env.effects_of(id);
    let order: Vec<&str> = effects.iter().map(|e| e.what.as_str()).collect();
    assert_eq!(order, ["a", "b", "c"]);
    assert_eq!(
        effects[0].worker, effects[2].worker,
        "alpha steps ran on the alpha worker"
    );
    assert_ne!(
        effects[0].worker, effects[1].worker,
        "the beta step ran on the other process"
    );
    assert_eq!(run.output.unwrap()["step"], "c");
    let logs = store::step_logs(&env.pool, id).await.unwrap();
    let logged: Vec<&str> = logs.iter().map(|l| l.step.as_str()).collect();
    assert_eq!(logged, ["a", "b", "c"], "each step's log is kept");
    assert!(logs[1].text.starts_with("b ran on ") && logs[1].text.ends_with(&effects[1].worker));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_mid_step_is_finished_by_another_from_the_last_checkpoint() {
    let mut env = TestEnv::new("sigkill").await;
    let doomed = env.spawn_worker(&["--queues", "alpha"]);
    let id = chain_until(&env, 1200, "two").await;
    env.workers[doomed].child.kill().unwrap(); // SIGKILL
    env.workers[doomed].child.wait().unwrap();
    let checkpointed_before: Vec<String> = store::steps(&env.pool, id)
        .await
        .unwrap()
        .into_iter()
        .filter(|s| s.output.is_some())
        .map(|s| s.step)
        .collect();
    assert_eq!(checkpointed_before, ["one"]);
    env.spawn_worker(&["--queues", "alpha"]);
    env.spawn_worker(&["--scheduler"]);
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    assert_eq!(
        env.count(id, "one"),
        1,
        "a checkpointed step never runs twice"
    );
    assert_eq!(env.count(id, "two"), 2, "the interrupted step runs again");
    assert_eq!(env.count(id, "three"), 1);
    assert_eq!(env.count(id, "four"), 1);
    let killed_worker = &env.effects_of(id)[0].worker;
    assert!(env.effects_of(id)[2..]
        .iter()
        .all(|e| &e.worker != killed_worker));
}

/// PostgreSQL crashes (`pg_ctl stop -m immediate`: every connection cut, no
/// shutdown checkpoint, WAL recovery on restart) twice while 24 runs are in
/// flight on two worker processes and the scheduler. Every run still
/// succeeds, and no step ran twice: a step that finished while the database
/// was away keeps its run (the outage is shorter than the lease) and has its
/// checkpoint sent again until it is back, and a checkpoint whose commit
/// happened but whose answer the crash cut is recognised when sent again.
/// A private server, so the machine's own PostgreSQL and the other tests are
/// untouched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgresql_crash_and_restart_mid_flight_loses_no_run() {
    let Some((pg, mut env)) = support::PrivatePostgres::with_env(
        "a_postgresql_crash_and_restart_mid_flight_loses_no_run",
        "pg_crash",
    )
    .await
    else {
        return;
    };
    let lease = outage_lease();
    env.spawn_worker_env(&["--queues", "alpha"], &lease);
    env.spawn_worker_env(&["--queues", "alpha"], &lease);
    env.spawn_worker_env(&["--scheduler"], &lease);
    let mut ids = Vec::new();
    for _ in 0..24 {
        ids.push(
            env.submit(
                "test.chain",
                json!({ "effects": env.effects_path(), "sleep_ms": 150 }),
            )
            .await,
        );
    }
    // Fan-outs too: an item that finishes while the database is away has
    // its item checkpoint written once it is back, and does not run again.
    let mut fanouts = Vec::new();
    for _ in 0..4 {
        fanouts.push(
            env.submit(
                "test.fanout",
                json!({ "effects": env.effects_path(), "items": 8, "sleep_ms": 150 }),
            )
            .await,
        );
    }
    for round in 0..2 {
        let before = env.effects().len();
        env.wait_until("more steps to start", T, || async {
            env.effects().len() >= before + 8
        })
        .await;
        pg.crash_and_restart(Duration::from_millis(300 + 400 * round))
            .await;
    }
    for id in &ids {
        let run = env.wait_state(*id, DONE, Duration::from_secs(90)).await;
        assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    }
    let finished: Vec<(Uuid, String, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT run_id, step, finished_at FROM step_checkpoints WHERE run_id = ANY($1) AND output IS NOT NULL",
    )
    .bind(&ids)
    .fetch_all(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        finished.len(),
        ids.len() * 4,
        "every step of every run checkpointed once"
    );
    for (run, step, at) in &finished {
        let runs_of_step: Vec<u128> = env
            .effects_of(*run)
            .iter()
            .filter(|e| &e.what == step)
            .map(|e| e.at_ms)
            .collect();
        let committed = at.timestamp_millis() as u128;
        assert!(
            runs_of_step.len() == 1 && runs_of_step[0] <= committed,
            "{run}: step {step} must have run once, before its checkpoint committed at {committed}: {runs_of_step:?}"
        );
    }
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_history WHERE run_id = ANY($1) AND event = 'step_succeeded'",
    )
    .bind(&ids)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        events as usize,
        ids.len() * 4,
        "one history event per step, none written twice"
    );
    for id in &fanouts {
        let run = env.wait_state(*id, DONE, Duration::from_secs(90)).await;
        assert_eq!(run.state, RunState::Succeeded, "{run:?}");
        for i in 0..8 {
            let key = format!("h{i:02}");
            assert_eq!(env.count(*id, &key), 1, "{id}: item {key} ran once");
        }
    }
}

/// Worker settings for the outage tests: leases longer than an outage (a
/// crash, a pause, recovery: 1-2 s), so the runs stay with their workers.
fn outage_lease() -> [(String, String); 1] {
    [("ORRERY_LEASE_MS".to_string(), "8000".to_string())]
}

/// Dispatches that reach a worker while PostgreSQL is down are claimed once
/// it is back, by that worker, with no reconciler running: the claim is
/// asked again while the database is unreachable instead of dropping the
/// dispatch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dispatches_arriving_while_postgresql_is_down_run_once_it_is_back() {
    let Some((pg, mut env)) = support::PrivatePostgres::with_env(
        "dispatches_arriving_while_postgresql_is_down_run_once_it_is_back",
        "pg_claims",
    )
    .await
    else {
        return;
    };
    let lease = outage_lease();
    let worker = env.spawn_worker_env(&["--queues", "alpha"], &lease);
    // Warm: the worker is up and consuming.
    let first = env
        .submit("test.chain", json!({ "effects": env.effects_path() }))
        .await;
    env.wait_state(first, DONE, T).await;
    env.workers[worker].signal("STOP");
    let mut ids = Vec::new();
    for _ in 0..6 {
        ids.push(
            env.submit("test.chain", json!({ "effects": env.effects_path() }))
                .await,
        );
    }
    pg.crash();
    // The worker now fetches the dispatches and cannot claim them.
    env.workers[worker].signal("CONT");
    tokio::time::sleep(Duration::from_millis(700)).await;
    pg.restart().await;
    for id in &ids {
        let run = env.wait_state(*id, DONE, Duration::from_secs(20)).await;
        assert_eq!(run.state, RunState::Succeeded, "{run:?}");
        assert_eq!(env.count(*id, "one"), 1);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_finishes_the_current_step_hands_the_run_back_and_exits() {
    let mut env = TestEnv::new("sigterm").await;
    let leaving = env.spawn_worker(&["--queues", "alpha"]);
    let id = env
        .submit(
            "test.chain",
            json!({ "effects": env.effects_path(), "sleep_ms": 1000 }),
        )
        .await;
    env.wait_until("step `two` to start", T, || async {
        env.count(id, "two") == 1
    })
    .await;
    env.workers[leaving].signal("TERM");
    let exited = {
        let deadline = std::time::Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(status) = env.workers[leaving].child.try_wait().unwrap() {
                break status;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "worker did not exit after SIGTERM"
            );
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    };
    assert!(exited.success(), "{exited:?}");
    let run = env.run(id).await;
    assert_eq!(
        (run.state, run.cursor),
        (RunState::Queued, 2),
        "step two committed, run handed back: {run:?}"
    );
    env.spawn_worker(&["--queues", "alpha"]);
    assert_eq!(env.wait_state(id, DONE, T).await.state, RunState::Succeeded);
    assert_eq!(
        ["one", "two", "three", "four"].map(|s| env.count(id, s)),
        [1, 1, 1, 1]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_dispatch_delivered_twice_runs_each_step_once() {
    let env = TestEnv::new("duplicate").await;
    let id = env
        .submit(
            "test.chain",
            json!({ "effects": env.effects_path(), "sleep_ms": 50 }),
        )
        .await;
    // Two deliveries of the same dispatch racing in one process, plus more through Redis later.
    let engine = env.rt.engine.clone();
    let (a, b) = (engine.clone(), engine.clone());
    tokio::join!(a.handle("alpha", id), b.handle("alpha", id));
    let run = env.run(id).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    engine.handle("alpha", id).await; // a late duplicate of a finished run
    for step in ["one", "two", "three", "four"] {
        assert_eq!(env.count(id, step), 1, "step {step}");
    }
    assert_eq!(
        env.run(id).await.fence,
        run.fence,
        "the late duplicate claimed nothing"
    );
}

/// `n` `test.chain` runs left queued: queue `alpha` has no consumer in the
/// tests that call this, so the runs wait for the claims the test makes.
async fn queued_chains(env: &TestEnv, n: usize) -> Vec<Uuid> {
    let mut ids = Vec::with_capacity(n);
    for _ in 0..n {
        ids.push(
            env.submit("test.chain", json!({ "effects": env.effects_path() }))
                .await,
        );
    }
    ids
}

/// Claims that arrive together share statements (`CheckpointWriter`), yet
/// each asker gets its own answer: every queued run goes to exactly one
/// asker (a run asked for twice: to one of the two, whether both asks share
/// a statement or not), an unknown run to nobody, and a run already leased
/// is refused to a second claimer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_arriving_together_each_get_their_own_answer() {
    let env = TestEnv::new("claim_batch").await;
    let ids = queued_chains(&env, 12).await;
    let (lease, stuck) = (Duration::from_secs(60), Duration::from_secs(600));
    let claimer = CheckpointWriter::spawn(env.pool.clone(), "claimer-a", lease, stuck);
    let unknown = Uuid::new_v4();
    let mut asks = ids.clone();
    asks.extend([ids[0], unknown, ids[5]]);
    let answers =
        futures::future::join_all(asks.iter().map(|id| claimer.claim(*id, Uuid::now_v7()))).await;
    let answers: Vec<_> = answers.into_iter().map(Result::unwrap).collect();
    // Asks for one run may land in different statements: whichever commits
    // first wins, the other gets None.
    for id in ids.iter().chain([&unknown]) {
        let won: Vec<_> = asks
            .iter()
            .zip(&answers)
            .filter(|(ask, _)| *ask == id)
            .filter_map(|(_, answer)| answer.as_ref())
            .collect();
        let expected = usize::from(*id != unknown);
        assert_eq!(
            won.len(),
            expected,
            "run {id}: claimed by {} askers",
            won.len()
        );
        for run in won {
            assert_eq!(run.id, *id);
            assert_eq!(
                (run.state, run.prev_state, run.fence),
                (RunState::Running, RunState::Queued, 1)
            );
        }
    }
    let owners: Vec<(Option<String>, i64)> =
        sqlx::query_as("SELECT lease_owner, fence FROM runs WHERE id = ANY($1)")
            .bind(&ids)
            .fetch_all(&env.pool)
            .await
            .unwrap();
    assert_eq!(owners.len(), ids.len());
    assert!(
        owners.iter().all(|o| o == &(Some("claimer-a".into()), 1)),
        "{owners:?}"
    );
    // A second worker's claimer: the leases are live, so nothing is taken over.
    let other = CheckpointWriter::spawn(env.pool.clone(), "claimer-b", lease, stuck);
    assert!(other.claim(ids[3], Uuid::now_v7()).await.unwrap().is_none());
    assert_eq!(
        env.run(ids[3]).await.fence,
        1,
        "a refused claim bumps no fence"
    );
}

/// A checkpoint sent again because its first answer was lost (the database
/// cut the connection after the commit) is answered "applied" and written
/// once: one checkpoint attempt, one history event. Sent again after another
/// worker claimed the run, it is refused like any write of a lost lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_sent_again_after_a_lost_answer_is_written_once() {
    let env = TestEnv::new("resend").await;
    let id = env
        .submit("test.chain", json!({ "effects": env.effects_path() }))
        .await;
    let (lease, stuck) = (Duration::from_secs(60), Duration::from_secs(600));
    let mine = CheckpointWriter::spawn(env.pool.clone(), "resender", lease, stuck);
    let run = mine
        .claim(id, Uuid::now_v7())
        .await
        .unwrap()
        .expect("claimable");
    let update = step_one_done(id, run.fence, "resender", stuck);
    let mut conn = env.pool.acquire().await.unwrap();
    assert_eq!(write_batch(&mut *conn, &[&update]).await.unwrap(), [id]);
    let again = RunUpdate {
        resent: true,
        ..update.clone()
    };
    assert_eq!(
        write_batch(&mut *conn, &[&again]).await.unwrap(),
        [id],
        "the second send of a committed write is answered applied"
    );
    let (attempts, events): (i32, i64) = sqlx::query_as(
        "SELECT (SELECT attempts FROM step_checkpoints WHERE run_id = $1 AND step_index = 0),
                (SELECT count(*) FROM run_history WHERE run_id = $1 AND event = 'step_succeeded')",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!((attempts, events), (1, 1), "written once");
    // Another worker takes the run over (lease expired): the old write, sent
    // once more, is refused.
    sqlx::query("UPDATE runs SET lease_until = now() - interval '1 second' WHERE id = $1")
        .bind(id)
        .execute(&env.pool)
        .await
        .unwrap();
    let theirs = CheckpointWriter::spawn(env.pool.clone(), "taker", lease, stuck);
    let taken = theirs
        .claim(id, Uuid::now_v7())
        .await
        .unwrap()
        .expect("expired lease is claimable");
    assert_eq!(taken.cursor, 1, "the taker resumes after the checkpoint");
    assert!(write_batch(&mut *conn, &[&again]).await.unwrap().is_empty());
}

/// The write of a `test.chain` run's step `one`, done, by `owner` holding
/// the run's lease at `fence`.
fn step_one_done(run_id: Uuid, fence: i64, owner: &str, stuck: Duration) -> RunUpdate {
    RunUpdate {
        write_id: Uuid::now_v7(),
        resent: false,
        run_id,
        fence,
        owner: owner.into(),
        state: RunState::Running,
        cursor: 1,
        attempt: 0,
        queue: "alpha".into(),
        compensate_cursor: None,
        wake_in: None,
        release: false,
        dispatch: DispatchMark::Keep,
        error: None,
        output: None,
        stuck_in: Some(stuck),
        checkpoint: Some(Checkpoint {
            index: 0,
            step: "one".into(),
            kind: CheckpointKind::Done(json!({ "step": "one" })),
            started_at: chrono::Utc::now(),
        }),
        event: Some(("step_succeeded".into(), None)),
    }
}

/// A worker's claims share its checkpoint statements: claims waiting while
/// a write is in flight are made by the next write's statement. Such a
/// statement writes what the lease allows and claims what is claimable, as
/// the two statements would apart: a run asked for twice is claimed once, a
/// run the statement also writes (a duplicate dispatch of a run this worker
/// holds) is refused and keeps its fence, and a write sent again after a
/// lost answer is answered applied without being written twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_and_claims_share_one_statement() {
    use orrery_workflows::store::{ClaimRequest, ClaimStatement};

    let env = TestEnv::new("write_claim").await;
    let ids = queued_chains(&env, 4).await;
    let (held, others) = (ids[0], &ids[1..]);
    let (lease, stuck) = (Duration::from_secs(60), Duration::from_secs(600));
    let claims = ClaimStatement::new("w", lease, stuck);
    let writer = CheckpointWriter::spawn(env.pool.clone(), "w", lease, stuck);
    let run = writer
        .claim(held, Uuid::now_v7())
        .await
        .unwrap()
        .expect("claimable");
    let update = step_one_done(held, run.fence, "w", stuck);
    let ask = |run_id| ClaimRequest {
        run_id,
        claim_id: Uuid::now_v7(),
    };
    let asks = [ask(others[0]), ask(held), ask(others[1]), ask(others[0])];
    let mut conn = env.pool.acquire().await.unwrap();
    let (written, claimed) = write_and_claim(
        &mut conn,
        &[&update],
        &claims,
        &asks.iter().collect::<Vec<_>>(),
    )
    .await
    .unwrap();
    assert_eq!(written, [held], "the write is applied");
    let mut got: Vec<Uuid> = claimed.iter().map(|r| r.id).collect();
    got.sort();
    let mut want = vec![others[0], others[1]];
    want.sort();
    assert_eq!(got, want, "each claimable run once, the written one not");
    assert!(claimed
        .iter()
        .all(|r| (r.state, r.prev_state, r.fence) == (RunState::Running, RunState::Queued, 1)));
    let held_now = env.run(held).await;
    assert_eq!(
        (held_now.fence, held_now.cursor),
        (run.fence, 1),
        "the held run was written, not claimed again"
    );
    // The same write sent again, with a claim: applied once, and the claim made.
    let again = RunUpdate {
        resent: true,
        ..update.clone()
    };
    let (written, claimed) = write_and_claim(&mut conn, &[&again], &claims, &[&ask(others[2])])
        .await
        .unwrap();
    assert_eq!(written, [held], "the second send is answered applied");
    assert_eq!(
        claimed.iter().map(|r| r.id).collect::<Vec<_>>(),
        [others[2]]
    );
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_history WHERE run_id = $1 AND event = 'step_succeeded'",
    )
    .bind(held)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(events, 1, "written once");
    // Nothing claimable and a lost lease: nothing written, nothing claimed,
    // and still an answer.
    let stale = step_one_done(held, run.fence - 1, "w", stuck);
    let (written, claimed) = write_and_claim(&mut conn, &[&stale], &claims, &[&ask(others[2])])
        .await
        .unwrap();
    assert!(written.is_empty() && claimed.is_empty());
}

/// The advance statement (a step done and the run going on inline, or its
/// last step done and the run succeeding: most writes) writes exactly what
/// the general statement writes for the same update: the same columns of
/// the run changed to the same values, the same checkpoint row (here over
/// an earlier failed attempt, so through `ON CONFLICT`), the same history
/// event. Like the general one, it writes nothing for a stale fence, and
/// nothing twice for a write sent twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_advance_writes_what_the_general_statement_writes() {
    use orrery_workflows::writer::{is_advance, write_batch_general};
    use serde_json::{Map, Value};

    let env = TestEnv::new("advance").await;
    let ids = queued_chains(&env, 4).await;
    let (lease, stuck) = (Duration::from_secs(60), Duration::from_secs(600));
    let writer = CheckpointWriter::spawn(env.pool.clone(), "w", lease, stuck);
    let mut fences = Vec::new();
    for id in &ids {
        let run = writer.claim(*id, Uuid::now_v7()).await.unwrap().unwrap();
        fences.push(run.fence);
    }
    // Every run's first step failed once before.
    sqlx::query("UPDATE runs SET attempt = 1, error = 'first attempt failed' WHERE id = ANY($1)")
        .bind(&ids)
        .execute(&env.pool)
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO step_checkpoints (run_id, step_index, step, attempts, last_error, started_at)
         SELECT id, 0, 'one', 1, 'first attempt failed', now() - interval '1 second'
         FROM unnest($1::uuid[]) AS id",
    )
    .bind(&ids)
    .execute(&env.pool)
    .await
    .unwrap();
    let row = |table: &'static str, id: Uuid| {
        let pool = env.pool.clone();
        async move {
            let sql = format!(
                "SELECT row_to_json(t)::jsonb FROM {table} t WHERE {} = $1",
                if table == "runs" { "id" } else { "run_id" }
            );
            let v: Value = sqlx::query_scalar(&sql)
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap();
            v.as_object().unwrap().clone()
        }
    };
    // What the write changed: each changed column with its new value,
    // instants written by `now()` as "now", the write id as "write id".
    let diff = |before: Map<String, Value>, after: Map<String, Value>, write_id: Uuid| {
        after
            .into_iter()
            .filter(|(k, v)| before.get(k) != Some(v))
            .map(|(k, v)| {
                let v = match k.as_str() {
                    "updated_at" | "stuck_after" | "finished_at" if !v.is_null() => json!("now"),
                    "last_write" if v == json!(write_id) => json!("write id"),
                    _ => v,
                };
                (k, v)
            })
            .collect::<Map<String, Value>>()
    };
    // The same update through both statements, on two runs alike.
    let started_at = chrono::Utc::now();
    let mut conn = env.pool.acquire().await.unwrap();
    let mut by_kind = Vec::new();
    for (kind, pair) in ["goes on", "succeeds"].into_iter().zip(ids.chunks(2)) {
        let mut diffs = Vec::new();
        for (general, id) in [true, false].into_iter().zip(pair) {
            let fence = fences[ids.iter().position(|i| i == id).unwrap()];
            let mut update = step_one_done(*id, fence, "w", stuck);
            update.checkpoint.as_mut().unwrap().started_at = started_at;
            if kind == "succeeds" {
                update.state = RunState::Succeeded;
                update.release = true;
                update.output = Some(json!({ "result": 1 }));
                update.error = Some(None);
                update.stuck_in = None;
            }
            assert!(is_advance(&update), "{kind}: {update:?}");
            let (run_before, ck_before) =
                (row("runs", *id).await, row("step_checkpoints", *id).await);
            let written = if general {
                write_batch_general(&mut conn, &[&update]).await.unwrap()
            } else {
                write_batch(&mut *conn, &[&update]).await.unwrap()
            };
            assert_eq!(written, [*id], "{kind}");
            let history: Vec<(String, Option<String>, Option<Value>)> = sqlx::query_as(
                "SELECT event, step, detail FROM run_history WHERE run_id = $1 ORDER BY id",
            )
            .bind(id)
            .fetch_all(&mut *conn)
            .await
            .unwrap();
            let stuck_for: Option<f64> = sqlx::query_scalar(
                "SELECT extract(epoch FROM stuck_after - updated_at)::float8 FROM runs WHERE id = $1",
            )
            .bind(id)
            .fetch_one(&mut *conn)
            .await
            .unwrap();
            diffs.push((
                diff(run_before, row("runs", *id).await, update.write_id),
                diff(
                    ck_before,
                    row("step_checkpoints", *id).await,
                    update.write_id,
                ),
                history,
                stuck_for,
            ));
        }
        assert_eq!(
            diffs[0], diffs[1],
            "{kind}: general (left) and advance (right) differ"
        );
        by_kind.push(diffs.swap_remove(0));
    }
    let (goes_on, succeeds) = (&by_kind[0], &by_kind[1]);
    let changed = |d: &Map<String, Value>| {
        let mut keys: Vec<String> = d.keys().cloned().collect();
        keys.sort();
        keys
    };
    assert_eq!(
        changed(&goes_on.0),
        [
            "attempt",
            "cursor",
            "last_write",
            "stuck_after",
            "updated_at"
        ],
        "{goes_on:?}"
    );
    assert_eq!(
        changed(&succeeds.0),
        [
            "attempt",
            "cursor",
            "error",
            "finished_at",
            "last_write",
            "lease_owner",
            "lease_until",
            "output",
            "state",
            "stuck_after",
            "updated_at"
        ],
        "{succeeds:?}"
    );
    assert_eq!(goes_on.0["cursor"], json!(1));
    assert_eq!(goes_on.3, Some(stuck.as_secs_f64()));
    assert_eq!(
        (
            &succeeds.0["state"],
            &succeeds.0["output"],
            &succeeds.0["error"]
        ),
        (&json!("succeeded"), &json!({ "result": 1 }), &Value::Null)
    );
    assert_eq!(succeeds.3, None, "a finished run is never stuck");
    for (ck, history) in [(&goes_on.1, &goes_on.2), (&succeeds.1, &succeeds.2)] {
        assert_eq!(ck["output"], json!({ "step": "one" }));
        assert_eq!(ck["attempts"], json!(2));
        assert!(
            !ck.contains_key("last_error"),
            "the failed attempt's error is kept"
        );
        assert_eq!(history.last().unwrap().0, "step_succeeded");
    }
    // A stale fence writes nothing; the same write sent twice is written once.
    let stale = step_one_done(ids[1], fences[1] - 1, "w", stuck);
    assert!(is_advance(&stale));
    assert!(write_batch(&mut *conn, &[&stale]).await.unwrap().is_empty());
    let mut twice = step_one_done(ids[1], fences[1], "w", stuck);
    twice.write_id =
        Uuid::parse_str(row("runs", ids[1]).await["last_write"].as_str().unwrap()).unwrap();
    assert!(write_batch(&mut *conn, &[&twice]).await.unwrap().is_empty());
    let events: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_history WHERE run_id = $1 AND event = 'step_succeeded'",
    )
    .bind(ids[1])
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(events, 1);
}

/// A claim sent again because its first answer was lost (the database cut
/// the connection after committing it) gets the run it had leased instead
/// of finding it leased and leaving it for the lease to expire (30 s by
/// default); a new claim of this same worker, or another worker's, is still
/// refused the live lease.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_sent_again_after_a_lost_answer_gets_its_run() {
    let env = TestEnv::new("claim_again").await;
    let id = env
        .submit("test.chain", json!({ "effects": env.effects_path() }))
        .await;
    let (lease, stuck) = (Duration::from_secs(60), Duration::from_secs(600));
    let mine = CheckpointWriter::spawn(env.pool.clone(), "claimer-a", lease, stuck);
    let claim = Uuid::now_v7();
    let first = mine.claim(id, claim).await.unwrap().expect("claimable");
    // Its answer is "lost": the same claim is sent again.
    let again = mine
        .claim(id, claim)
        .await
        .unwrap()
        .expect("a resent claim gets the lease it took");
    assert_eq!(
        again.fence,
        first.fence + 1,
        "the lost answer's fence is void"
    );
    assert_eq!((again.state, again.cursor), (RunState::Running, 0));
    // A new dispatch of the same run to the same worker is a new claim.
    assert!(mine.claim(id, Uuid::now_v7()).await.unwrap().is_none());
    // Another worker, even with the same claim id, finds a live lease.
    let other = CheckpointWriter::spawn(env.pool.clone(), "claimer-b", lease, stuck);
    assert!(other.claim(id, claim).await.unwrap().is_none());
    let (owner, fence): (Option<String>, i64) =
        sqlx::query_as("SELECT lease_owner, fence FROM runs WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert_eq!((owner.as_deref(), fence), (Some("claimer-a"), again.fence));
}

/// A worker stopped (SIGSTOP) in step `one` of a `test.chain` run whose
/// claim it holds for `hold` ms (0: committed at once), while another
/// worker and the scheduler finish the run; once resumed, it must notice
/// (its log shows one of `noticed`) and none of the run's steps may be its.
async fn stopped_in_step_one_commits_nothing(name: &str, hold: u64, noticed: &[&str]) {
    let mut env = TestEnv::new(name).await;
    let stopped = env.spawn_worker_env(&["--queues", "alpha"], &hold_ms(hold));
    let id = chain_until(&env, 1500, "one").await;
    env.workers[stopped].signal("STOP");
    let stopped_id = env.effects_of(id)[0].worker.clone();
    env.spawn_worker(&["--queues", "alpha"]);
    env.spawn_worker(&["--scheduler"]);
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    env.workers[stopped].signal("CONT");
    env.wait_until("the resumed worker to notice", T, || async {
        let log = env.workers[stopped].log_text();
        noticed.iter().any(|n| log.contains(n))
    })
    .await;
    let after = env.run(id).await;
    assert_eq!((after.state, after.fence), (RunState::Succeeded, run.fence));
    for step in store::steps(&env.pool, id).await.unwrap() {
        let worker = step.output.as_ref().unwrap()["worker"].as_str().unwrap();
        assert_ne!(
            worker, stopped_id,
            "step {} was committed by the stopped worker",
            step.step
        );
        assert_eq!(
            step.attempts, 1,
            "step {} has one committed attempt",
            step.step
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_paused_past_its_lease_cannot_commit_afterwards() {
    // A committed lease, not a claim held open (see the held-claim tests).
    stopped_in_step_one_commits_nothing("paused", 0, &["lease lost", "fence moved"]).await;
}

/// What a step of `test.seen` saw of its run's row from another session.
fn seen(steps: &[store::StepRecord], step: &str) -> (String, Option<String>) {
    let out = steps
        .iter()
        .find(|s| s.step == step)
        .and_then(|s| s.output.clone())
        .unwrap_or_else(|| panic!("step {step} has no output: {steps:?}"));
    (
        out["state"].as_str().unwrap().to_owned(),
        out["leased_by"].as_str().map(str::to_owned),
    )
}

/// A worker with nothing else in flight holds its claim open for the run's
/// first write (`hold`): while the first step runs, nobody else sees the
/// claim, and the first checkpoint commits it. A first step slower than the
/// window finds the claim committed alone, as a busy worker's would be.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lone_claim_commits_with_the_first_step_or_alone_when_the_window_ends() {
    let mut env = TestEnv::new("held_claim").await;
    env.spawn_worker(&["--queues", "alpha"]);
    let quick = env
        .submit("test.seen", json!({ "effects": env.effects_path() }))
        .await;
    let run = env.wait_state(quick, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    let steps = store::steps(&env.pool, quick).await.unwrap();
    let worker = env.effects_of(quick)[0].worker.clone();
    assert_eq!(
        seen(&steps, "first"),
        ("queued".to_owned(), None),
        "the claim was not visible during the first step"
    );
    assert_eq!(
        seen(&steps, "second"),
        ("running".to_owned(), Some(worker.clone())),
        "the first checkpoint committed the claim"
    );
    assert_eq!(run.fence, 1, "one claim");

    // Past the window (20 ms by default) the claim commits on its own.
    let slow = env
        .submit(
            "test.seen",
            json!({ "effects": env.effects_path(), "sleep_ms": 300 }),
        )
        .await;
    let run = env.wait_state(slow, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    let steps = store::steps(&env.pool, slow).await.unwrap();
    assert_eq!(
        seen(&steps, "first"),
        ("running".to_owned(), Some(worker)),
        "the window ended during the first step"
    );
    for step in ["first", "second"] {
        assert_eq!(env.count(slow, step), 1, "step {step}");
    }
}

/// Submit a `test.chain` run whose steps take `sleep_ms` each and wait
/// until its step `step` has started.
async fn chain_until(env: &TestEnv, sleep_ms: u64, step: &str) -> Uuid {
    let id = env
        .submit(
            "test.chain",
            json!({ "effects": env.effects_path(), "sleep_ms": sleep_ms }),
        )
        .await;
    env.wait_until(&format!("step `{step}` to start"), T, || async {
        env.count(id, step) == 1
    })
    .await;
    id
}

fn hold_ms(ms: u64) -> [(String, String); 1] {
    [("ORRERY_CLAIM_HOLD_MS".to_owned(), ms.to_string())]
}

/// A worker killed while it holds a claim open takes the claim with it: the
/// run is found queued and never claimed, with no lease to wait out, and the
/// reconciler's dispatch has another worker run it from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_killed_while_holding_a_claim_leaves_its_run_unclaimed() {
    let mut env = TestEnv::new("held_kill").await;
    let doomed = env.spawn_worker_env(&["--queues", "alpha"], &hold_ms(10_000));
    let id = chain_until(&env, 1500, "one").await;
    env.workers[doomed].child.kill().unwrap(); // SIGKILL
    env.workers[doomed].child.wait().unwrap();
    let run = env.run(id).await;
    assert_eq!(
        (run.state, run.fence),
        (RunState::Queued, 0),
        "the held claim died with its worker: {run:?}"
    );
    env.spawn_worker(&["--queues", "alpha"]);
    env.spawn_worker(&["--scheduler"]);
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    assert_eq!(
        env.count(id, "one"),
        2,
        "the step that ran under the lost claim runs again"
    );
    for step in ["two", "three", "four"] {
        assert_eq!(env.count(id, step), 1, "step {step}");
    }
}

/// A worker stopped while it holds a claim open cannot keep the run's row
/// locked: PostgreSQL ends its idle transaction (`hold::idle_limit`, 4 s
/// here), another worker runs the run, and the stopped worker, once
/// resumed, finds its claim gone and commits nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_stopped_while_holding_a_claim_loses_it_and_commits_nothing() {
    // Held longer than step `one` takes, so the claim is still open when the
    // worker stops. Its window timer or its first write, whichever runs
    // first once it is resumed, finds the claim gone.
    stopped_in_step_one_commits_nothing(
        "held_stop",
        2000,
        &["a held claim could not be committed"],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn flushall_with_100_runs_in_flight_loses_none() {
    let redis = PrivateRedis::start().await;
    let mut env = TestEnv::with_redis("flushall", &redis.url).await;
    let ids = two_queue_load(&mut env, 100, 150).await;
    redis.flushall().await;
    let in_flight = unfinished(&env, &ids).await;
    assert_hit_in_flight_then_all_succeed(&env, &ids, &[], in_flight, "the flush").await;
}

/// Two workers on queues `alpha,beta` and a scheduler, `runs` runs of
/// `test.two_queues` whose steps take `sleep_ms`; returns once at least ten
/// steps are checkpointed (runs are under way, many still in flight).
async fn two_queue_load(env: &mut TestEnv, runs: usize, sleep_ms: u64) -> Vec<Uuid> {
    env.spawn_worker(&["--queues", "alpha,beta"]);
    env.spawn_worker(&["--queues", "alpha,beta"]);
    env.spawn_worker(&["--scheduler"]);
    let mut ids = Vec::new();
    for _ in 0..runs {
        ids.push(
            env.submit("test.two_queues", json!({ "sleep_ms": sleep_ms }))
                .await,
        );
    }
    env.wait_until("some runs to be under way", T, || async {
        let busy: i64 = sqlx::query_scalar("SELECT count(*) FROM step_checkpoints")
            .fetch_one(&env.pool)
            .await
            .unwrap();
        busy >= 10
    })
    .await;
    ids
}

/// How many of `ids` have not succeeded yet.
async fn unfinished(env: &TestEnv, ids: &[Uuid]) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs WHERE id = ANY($1) AND state <> 'succeeded'")
        .bind(ids)
        .fetch_one(&env.pool)
        .await
        .unwrap()
}

/// `in_flight` of `ids` were unfinished when `what` happened (so it hit
/// work under way), and every one of `ids` and `more` then succeeds.
async fn assert_hit_in_flight_then_all_succeed(
    env: &TestEnv,
    ids: &[Uuid],
    more: &[Uuid],
    in_flight: i64,
    what: &str,
) {
    assert!(in_flight > 0, "{what} must hit runs in flight");
    for id in ids.iter().chain(more) {
        let run = env.wait_state(*id, DONE, Duration::from_secs(90)).await;
        assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    }
}

/// Redis is killed (SIGKILL, nothing kept) while 40 runs hand over between
/// two queues, stays down while more runs are submitted (their dispatch
/// fails; they are committed all the same), and an empty Redis comes back on
/// the same port: the consumers reconnect by themselves, the reconciler
/// re-dispatches what was lost, and every run succeeds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_killed_and_restarted_mid_flight_loses_no_run() {
    let mut redis = PrivateRedis::start().await;
    let mut env = TestEnv::with_redis("redis_kill", &redis.url).await;
    let ids = two_queue_load(&mut env, 40, 100).await;
    let down = Duration::from_millis(1500);
    redis.kill();
    let killed = std::time::Instant::now();
    // Submitted while Redis is down: their dispatch fails, they are
    // committed all the same.
    let mut late = Vec::new();
    for _ in 0..5 {
        late.push(
            env.submit("test.two_queues", json!({ "sleep_ms": 100 }))
                .await,
        );
    }
    tokio::time::sleep(down.saturating_sub(killed.elapsed())).await;
    // Counted before Redis is back: once it is, the reconciler may finish
    // every run before the count is taken.
    let in_flight = unfinished(&env, &ids).await;
    redis.restart().await;
    assert_hit_in_flight_then_all_succeed(&env, &ids, &late, in_flight, "the outage").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retryable_failures_back_off_then_succeed() {
    let mut env = TestEnv::new("retry").await;
    env.spawn_worker(&["--queues", "alpha"]);
    let id = env
        .submit(
            "test.saga",
            json!({ "effects": env.effects_path(), "fail_times": 2 }),
        )
        .await;
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    let s3: Vec<_> = env
        .effects_of(id)
        .into_iter()
        .filter(|e| e.what == "s3")
        .collect();
    assert_eq!(s3.iter().map(|e| e.attempt).collect::<Vec<_>>(), [1, 2, 3]);
    // Backoff without jitter: 100 ms then 200 ms.
    assert!(s3[1].at_ms - s3[0].at_ms >= 100, "{s3:?}");
    assert!(s3[2].at_ms - s3[1].at_ms >= 200, "{s3:?}");
    let step = store::steps(&env.pool, id)
        .await
        .unwrap()
        .into_iter()
        .find(|s| s.step == "s3")
        .unwrap();
    assert_eq!(step.attempts, 3);
    assert_eq!(step.last_error.as_deref(), Some("transient failure 2"));
    let retries = store::history(&env.pool, id)
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.event == "step_retrying")
        .count();
    assert_eq!(retries, 2);
    assert_eq!(
        env.count(id, "undo-s1") + env.count(id, "undo-s2"),
        0,
        "no compensation on success"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fatal_failure_compensates_in_reverse_and_fails_with_the_error() {
    let mut env = TestEnv::new("fatal").await;
    env.spawn_worker(&["--queues", "alpha"]);
    let id = env
        .submit(
            "test.saga",
            json!({ "effects": env.effects_path(), "fail_at": "s3" }),
        )
        .await;
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Failed);
    assert_eq!(
        run.error.as_deref(),
        Some("step `s3` failed: s3 hit a fatal error")
    );
    let order: Vec<String> = env.effects_of(id).into_iter().map(|e| e.what).collect();
    assert_eq!(
        order,
        ["s1", "s2", "s3", "undo-s2", "undo-s1"],
        "fatal: no retry; undo in reverse"
    );
    let steps = store::steps(&env.pool, id).await.unwrap();
    assert!(steps
        .iter()
        .filter(|s| s.step != "s3")
        .all(|s| s.compensated_at.is_some()));
}

async fn cancel_during_long_step(ignore_cancel: bool) {
    let mut env = TestEnv::new(if ignore_cancel {
        "cancel_ignored"
    } else {
        "cancel"
    })
    .await;
    env.spawn_worker(&["--queues", "alpha"]);
    let input = json!({ "effects": env.effects_path(), "sleep_ms": 60_000, "ignore_cancel": ignore_cancel });
    let id = env.submit("test.cancellable", input).await;
    env.wait_until("the long step to start", T, || async {
        env.count(id, "long") == 1
    })
    .await;
    let asked = std::time::Instant::now();
    env.rt
        .engine
        .cancel(id, "alice", Some("wrong size"))
        .await
        .unwrap();
    let run = env.wait_state(id, DONE, T).await;
    let took = asked.elapsed();
    assert_eq!(run.state, RunState::Cancelled, "{run:?}");
    assert_eq!(run.error.as_deref(), Some("cancelled by alice: wrong size"));
    let grace = Duration::from_millis(1500);
    assert!(took < grace + Duration::from_secs(3), "took {took:?}");
    if ignore_cancel {
        assert!(
            took >= grace,
            "a step ignoring its token is given its grace period ({took:?})"
        );
    }
    let order: Vec<String> = env.effects_of(id).into_iter().map(|e| e.what).collect();
    assert_eq!(order, ["prepare", "long", "undo-long", "undo-prepare"]);
    let audit: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM operator_audit WHERE action = 'cancel' AND actor = 'alice'",
    )
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(audit, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_during_a_long_step_stops_it_runs_compensations_and_ends_cancelled() {
    cancel_during_long_step(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_ignoring_its_cancel_token_is_dropped_after_its_grace_period() {
    cancel_during_long_step(true).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_that_waits_in_the_queue_compensates_nothing_and_ends_cancelled() {
    let env = TestEnv::new("cancel_queued").await; // no worker: the run stays queued
    let id = env
        .submit("test.cancellable", json!({ "effects": env.effects_path() }))
        .await;
    env.rt.engine.cancel(id, "bob", None).await.unwrap();
    assert_eq!(env.run(id).await.state, RunState::Cancelling);
    env.rt.engine.handle("alpha", id).await;
    let run = env.run(id).await;
    assert_eq!(run.state, RunState::Cancelled);
    // Nothing ran, but compensations are idempotent and run from the cursor down.
    assert_eq!(env.count(id, "prepare"), 0);
    assert!(matches!(
        env.rt.engine.cancel(id, "bob", None).await,
        Err(EngineError::Conflict(_))
    ));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_from_a_step_reuses_earlier_checkpoints_and_runs_it_onwards() {
    let mut env = TestEnv::new("replay").await;
    env.spawn_worker(&["--queues", "alpha"]);
    let effects = env.effects_path();
    let id = env
        .submit(
            "test.chain",
            json!({ "effects": effects, "fail_at": "three" }),
        )
        .await;
    assert_eq!(env.wait_state(id, DONE, T).await.state, RunState::Failed);
    let req = ReplayRequest {
        from_step: Some("two".into()),
        input: Some(json!({ "effects": effects })),
        force: false,
        reason: Some("fixed the input".into()),
    };
    let outcome = env.rt.engine.replay(id, &req, "carol").await.unwrap();
    assert_eq!((outcome.from_index, outcome.from_step.as_str()), (1, "two"));
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    assert_eq!(
        ["one", "two", "three", "four"].map(|s| env.count(id, s)),
        [1, 2, 2, 1],
        "steps before K reused, K onwards run again"
    );
    assert_eq!(run.replays, 1);
    let events: Vec<String> = store::history(&env.pool, id)
        .await
        .unwrap()
        .into_iter()
        .map(|h| h.event)
        .collect();
    assert!(
        events.contains(&"unwinding".to_owned()) && events.contains(&"replayed".to_owned()),
        "{events:?}"
    );
    let (actor, reason): (String, Option<String>) = sqlx::query_as(
        "SELECT actor, reason FROM operator_audit WHERE action = 'replay' AND run_id = $1",
    )
    .bind(id)
    .fetch_one(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        (actor.as_str(), reason.as_deref()),
        ("carol", Some("fixed the input"))
    );

    // Default: from the failed step.
    let id2 = env
        .submit(
            "test.chain",
            json!({ "effects": effects, "fail_at": "four" }),
        )
        .await;
    assert_eq!(env.wait_state(id2, DONE, T).await.state, RunState::Failed);
    let req = ReplayRequest {
        input: Some(json!({ "effects": effects })),
        ..Default::default()
    };
    assert_eq!(
        env.rt
            .engine
            .replay(id2, &req, "carol")
            .await
            .unwrap()
            .from_step,
        "four"
    );
    assert_eq!(
        env.wait_state(id2, DONE, T).await.state,
        RunState::Succeeded
    );
    assert_eq!(
        ["one", "two", "three", "four"].map(|s| env.count(id2, s)),
        [1, 1, 1, 2]
    );

    // Refusals say what to do.
    match env
        .rt
        .engine
        .replay(id2, &ReplayRequest::default(), "carol")
        .await
    {
        Err(EngineError::Conflict(m)) => assert!(m.contains("only failed or cancelled"), "{m}"),
        other => panic!("replaying a succeeded run: {other:?}"),
    }
    let id3 = env.submit("test.chain", json!({ "fail_at": "one" })).await;
    env.wait_state(id3, DONE, T).await;
    let bad = ReplayRequest {
        from_step: Some("five".into()),
        ..Default::default()
    };
    match env.rt.engine.replay(id3, &bad, "carol").await {
        Err(EngineError::BadRequest(m)) => assert!(m.contains("one, two, three, four"), "{m}"),
        other => panic!("unknown step: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_refuses_to_reuse_a_step_its_compensation_undid() {
    let mut env = TestEnv::new("replay_comp").await;
    env.spawn_worker(&["--queues", "alpha"]);
    let id = env.submit("test.saga", json!({ "fail_at": "s3" })).await;
    assert_eq!(env.wait_state(id, DONE, T).await.state, RunState::Failed);
    match env
        .rt
        .engine
        .replay(id, &ReplayRequest::default(), "dave")
        .await
    {
        Err(EngineError::Conflict(m)) => assert!(m.contains("`s1`"), "{m}"),
        other => panic!("expected a conflict: {other:?}"),
    }
    let from_start = ReplayRequest {
        from_step: Some("s1".into()),
        input: Some(json!({})),
        ..Default::default()
    };
    env.rt.engine.replay(id, &from_start, "dave").await.unwrap();
    assert_eq!(env.wait_state(id, DONE, T).await.state, RunState::Succeeded);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fan_out_over_ten_items_where_two_fail_once_reruns_only_those_two() {
    let mut env = TestEnv::new("fanout").await;
    env.spawn_worker(&["--queues", "alpha"]);
    let input = json!({ "effects": env.effects_path(), "items": 10, "fail_once": ["h03", "h07"], "sleep_ms": 100 });
    let id = env.submit("test.fanout", input).await;
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    for i in 0..10 {
        let key = format!("h{i:02}");
        let expected = if key == "h03" || key == "h07" { 2 } else { 1 };
        assert_eq!(env.count(id, &key), expected, "item {key}");
    }
    assert_eq!(run.output.unwrap().as_object().unwrap().len(), 10);
    let step = &store::steps(&env.pool, id).await.unwrap()[0];
    assert_eq!(step.attempts, 2);
    assert!(
        step.last_error
            .as_deref()
            .unwrap()
            .starts_with("2 of 10 items failed: h03"),
        "{step:?}"
    );
    // Bounded concurrency: 4 at a time, so ten 100 ms items take at least three waves.
    let first: Vec<_> = env
        .effects_of(id)
        .into_iter()
        .filter(|e| e.attempt == 1)
        .collect();
    let span =
        first.iter().map(|e| e.at_ms).max().unwrap() - first.iter().map(|e| e.at_ms).min().unwrap();
    assert!(
        span >= 200,
        "items started over {span} ms: concurrency was not bounded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_step_parks_the_run_without_holding_a_worker_and_keeps_history_bounded() {
    let mut env = TestEnv::new("waiting").await;
    env.spawn_worker(&["--queues", "alpha"]);
    let id = env
        .submit(
            "test.wait",
            json!({ "effects": env.effects_path(), "polls": 4, "sleep_ms": 400 }),
        )
        .await;
    env.wait_until("the run to park", T, || async {
        env.run(id).await.state == RunState::Waiting
    })
    .await;
    let (owner, wake): (Option<String>, Option<chrono::DateTime<chrono::Utc>>) =
        sqlx::query_as("SELECT lease_owner, wake_at FROM runs WHERE id = $1")
            .bind(id)
            .fetch_one(&env.pool)
            .await
            .unwrap();
    assert!(
        owner.is_none() && wake.is_some(),
        "a parked run holds no lease"
    );
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded);
    assert_eq!(env.count(id, "poll"), 5);
    let step = &store::steps(&env.pool, id).await.unwrap()[0];
    assert_eq!((step.polls, step.attempts), (4, 1));
    let waits = store::history(&env.pool, id)
        .await
        .unwrap()
        .into_iter()
        .filter(|h| h.event == "step_waiting")
        .count();
    assert_eq!(waits, 1, "polls do not grow history");
}

/// A worker pointed at a server that is not there stops at once, naming
/// the variable, the address and the real cause, and what to do about it
/// (not a pool timeout ten seconds later).
#[test]
fn a_worker_pointed_at_no_server_says_which_variable_and_why() {
    let closed = support::free_port();
    // Each URL carries a password: it must never be shown.
    for (var, url, shown, default_var, default_url) in [
        (
            "ORRERY_DATABASE_URL",
            format!("postgres://postgres:s3cret@127.0.0.1:{closed}/orrery"),
            format!("postgres://postgres:***@127.0.0.1:{closed}/orrery"),
            "ORRERY_REDIS_URL",
            support::default_redis_url(),
        ),
        (
            "ORRERY_REDIS_URL",
            format!("redis://:s3cret@127.0.0.1:{closed}"),
            format!("redis://:***@127.0.0.1:{closed}"),
            "ORRERY_DATABASE_URL",
            format!("{}/postgres", {
                let admin = support::admin_url();
                admin[..admin.rfind('/').unwrap()].to_owned()
            }),
        ),
    ] {
        let started = std::time::Instant::now();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_orrery-worker"))
            .args(["--queues", "alpha"])
            .env(var, &url)
            .env(default_var, &default_url)
            .env("RUST_BACKTRACE", "0")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{var}: {stderr}");
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{var}: took {:?}",
            started.elapsed()
        );
        for needle in [
            var,
            shown.as_str(),
            "Connection refused",
            "scripts/setup.sh",
        ] {
            assert!(
                stderr.contains(needle),
                "{var}: `{needle}` not in: {stderr}"
            );
        }
        assert!(
            !stderr.contains("s3cret"),
            "{var}: password shown: {stderr}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_never_crashes_a_worker() {
    let mut env = TestEnv::new("bad_input").await;
    let worker = env.spawn_worker(&["--queues", "alpha"]);
    // A dispatch naming a run that does not exist.
    let ghost = Uuid::new_v4();
    env.rt
        .engine
        .dispatcher
        .dispatch("alpha", ghost)
        .await
        .unwrap();
    // A job on the queue that is not a dispatch at all.
    {
        use apalis::prelude::TaskSink;
        let conn = apalis_redis::connect(env.redis_url.as_str()).await.unwrap();
        let mut raw = apalis_redis::RedisStorage::<serde_json::Value>::new(conn).with_config(
            orrery_workflows::dispatch::queue_config(&env.namespace, "alpha"),
        );
        raw.push(json!({ "nonsense": true })).await.unwrap();
    }
    // A run of a workflow this worker does not know.
    let unknown = env.insert_undispatched("nope", "alpha").await;
    env.rt
        .engine
        .dispatcher
        .dispatch("alpha", unknown)
        .await
        .unwrap();
    // A step input that does not deserialize.
    let typed = env.submit("test.typed", json!({ "count": "three" })).await;
    let run = env.wait_state(typed, DONE, T).await;
    assert_eq!(run.state, RunState::Failed);
    let error = run.error.unwrap();
    assert!(
        error.contains("field `count`") && error.contains("expected u32"),
        "{error}"
    );

    env.wait_until(
        "the worker to log the unknown run and workflow",
        T,
        || async {
            let log = env.workers[worker].log_text();
            log.contains("unknown run")
                && log.contains("does not know the run's workflow")
                && log.contains("malformed job on the queue; dropped")
        },
    )
    .await;
    assert!(
        !env.workers[worker]
            .log_text()
            .contains("apalis worker failed"),
        "a malformed job must not stop the consumer"
    );
    let stray = env.run(unknown).await;
    assert_eq!(
        stray.state,
        RunState::Queued,
        "left for a worker that knows it"
    );
    // The worker is still alive and working.
    assert!(
        env.workers[worker].child.try_wait().unwrap().is_none(),
        "worker exited"
    );
    let ok = env.submit("test.chain", json!({})).await;
    assert_eq!(env.wait_state(ok, DONE, T).await.state, RunState::Succeeded);

    // Submissions are checked before anything is written.
    let before: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    match env
        .rt
        .engine
        .submit("demo", json!({ "hosts": "many" }), None)
        .await
    {
        Err(EngineError::InvalidInput { message, .. }) => {
            assert!(message.contains("`hosts`"), "{message}")
        }
        other => panic!("bad demo input: {other:?}"),
    }
    assert!(matches!(
        env.rt.engine.submit("no.such", json!({}), None).await,
        Err(EngineError::UnknownWorkflow(_))
    ));
    let after: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&env.pool)
        .await
        .unwrap();
    assert_eq!(before, after, "refused submissions write nothing");
}

/// apalis-redis 1.0 files every push in the queue's scheduled set, and its
/// fetch moves every due entry to the active list with one Lua `unpack`,
/// which fails past about 8,000 values: a backlog that size failed every
/// fetch of the queue for good (found with `orrery-bench --runs 8000`). The
/// engine's own pushes leave no such backlog, and one left by apalis alone
/// (a pusher that died before promoting it, an older version) is moved
/// before the consumer's first fetch.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_past_the_lua_unpack_limit_does_not_wedge_the_queue() {
    use apalis::prelude::TaskSink;
    use orrery_workflows::dispatch::{queue_config, Dispatch};

    let mut env = TestEnv::new("backlog").await;
    let config = queue_config(&env.namespace, "alpha");
    let redis = env.redis().await;
    let (scheduled, active) = (config.scheduled_jobs_set(), config.active_jobs_list());
    let sizes = move || {
        let (scheduled, active) = (scheduled.clone(), active.clone());
        let mut redis = redis.clone();
        async move {
            let s: usize = redis::cmd("ZCARD")
                .arg(&scheduled)
                .query_async(&mut redis)
                .await
                .unwrap();
            let a: usize = redis::cmd("LLEN")
                .arg(&active)
                .query_async(&mut redis)
                .await
                .unwrap();
            (s, a)
        }
    };

    // Through the engine: a real run, then 1,500 dispatches of runs that do
    // not exist (more than one push chunk). All wait in the active list.
    let id = env.submit("test.chain", json!({})).await;
    let ghosts: Vec<Uuid> = (0..1500).map(|_| Uuid::new_v4()).collect();
    env.rt
        .engine
        .dispatcher
        .dispatch_many("alpha", &ghosts)
        .await
        .unwrap();
    assert_eq!(
        sizes().await,
        (0, 1501),
        "(scheduled, active) after the engine's pushes"
    );

    // Through apalis alone: 9,000 more stay in its scheduled set.
    let conn = apalis_redis::connect(env.redis_url.as_str()).await.unwrap();
    let mut raw = apalis_redis::RedisStorage::<Dispatch>::new(conn).with_config(config.clone());
    raw.push_bulk(
        (0..9000)
            .map(|_| Dispatch {
                run_id: Uuid::new_v4(),
            })
            .collect(),
    )
    .await
    .unwrap();
    assert_eq!(
        sizes().await,
        (9000, 1501),
        "(scheduled, active) after apalis' push"
    );

    let worker = env.spawn_worker(&["--queues", "alpha"]);
    let run = env.wait_state(id, DONE, T).await;
    assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    env.wait_until(
        "the whole backlog to be fetched",
        Duration::from_secs(90),
        || {
            let now = sizes();
            async move { now.await == (0, 0) }
        },
    )
    .await;
    let log = env.workers[worker].log_text();
    assert!(
        log.contains("moved=9000"),
        "the consumer moved the backlog first: {log}"
    );
    assert!(
        !log.contains("apalis worker failed"),
        "no fetch failed: {log}"
    );
}

/// The checkpoint writer and the claimer plan their statements once per
/// connection (a generic plan, `config::connect_keyed`) from the table
/// statistics of the moment, and keep that plan. Each statement must reach
/// `runs` by primary key only, whatever those statistics say:
///
/// - a new installation's `runs` (never analysed, nearly empty): the
///   cheapest plan was a sequential scan of `runs` hashed against the batch,
///   kept while the table grew, so every checkpoint read every run
///   (`orrery-bench` showed it on each write of each phase);
/// - a running installation's (few runs unfinished): the claim reached its
///   rows through the partial index of unfinished runs and read every one
///   of them at each claim, so a backlog made every claim slower.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hot_statements_look_runs_up_by_key_whatever_the_statistics() {
    let db = support::TestDb::new("plans").await;
    assert_plans_look_runs_up_by_key(&db.pool, "a new installation").await;
    sqlx::query(
        "INSERT INTO runs (id, workflow, workflow_version, input, state, queue)
         SELECT gen_random_uuid(), 'test.chain', 1, '{}',
                CASE WHEN g % 2000 = 0 THEN 'queued' ELSE 'succeeded' END, 'alpha'
         FROM generate_series(1, 20000) g",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    sqlx::query("ANALYZE runs").execute(&db.pool).await.unwrap();
    assert_plans_look_runs_up_by_key(&db.pool, "few unfinished runs").await;
}

/// The generic plans of the hot statements, made on a new dedicated
/// connection, reach `runs` through its primary key only.
async fn assert_plans_look_runs_up_by_key(pool: &sqlx::PgPool, statistics: &str) {
    use orrery_workflows::{config::connect_keyed, store::CLAIM_SQL, writer};

    let mut conn = connect_keyed(pool).await.unwrap();
    for (name, sql, params) in [
        ("write", writer::WRITE_SQL, 25),
        ("resend", writer::RESEND_SQL, 25),
        ("claim", &CLAIM_SQL, 5),
        ("write_claim", &writer::WRITE_AND_CLAIM_SQL, 30),
        ("resend_claim", &writer::RESEND_AND_CLAIM_SQL, 30),
        ("advance", writer::ADVANCE_SQL, 14),
        ("advance_claim", &writer::ADVANCE_AND_CLAIM_SQL, 19),
    ] {
        sqlx::query(&format!("PREPARE {name} AS {sql}"))
            .execute(&mut conn)
            .await
            .unwrap();
        // The generic plan's shape does not depend on the values.
        let nulls = vec!["NULL"; params].join(", ");
        let plan: Vec<String> =
            sqlx::query_scalar(&format!("EXPLAIN (COSTS OFF) EXECUTE {name}({nulls})"))
                .fetch_all(&mut conn)
                .await
                .unwrap();
        let plan = plan.join("\n");
        assert!(
            !plan.contains("Seq Scan on runs") && !plan.contains("runs_unfinished"),
            "{name} reads runs beyond the rows it names ({statistics}):\n{plan}"
        );
        assert!(
            plan.contains("Index Scan using runs_pkey on runs"),
            "{name} looks runs up by key ({statistics}):\n{plan}"
        );
    }
}

/// An idle consumer is woken through Redis pub/sub when a dispatch is
/// pushed. apalis-redis 1.0's wake-up stream forgot the consumer's waker
/// whenever a wake-up was already pending when it was polled, so a
/// wake-up arriving while the consumer fetched (another worker's push, a
/// burst of pushes) left it asleep until its next Redis heartbeat (5 s)
/// however many dispatches came after: with four worker processes a burst
/// ran on one to three of them (found with `orrery-bench`). Wake-ups now
/// register the waker on every poll (`consumer::Wakeup`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_consumer_woken_while_fetching_still_takes_the_next_dispatch_at_once() {
    use orrery_workflows::dispatch::{queue_config, wakeup_channel};

    let mut env = TestEnv::new("wakeup").await;
    let worker = env.spawn_worker(&["--queues", "alpha"]);
    env.wait_until("the worker to consume", T, || {
        let log = env.workers[worker].log_text();
        async move { log.contains("consuming") }
    })
    .await;
    let channel = wakeup_channel(&queue_config(&env.namespace, "alpha"));
    let mut redis = env.redis().await;
    for round in 0..5 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        // Wake-ups with nothing to fetch, one after the other, as other
        // workers' pushes arrive: some land while the consumer fetches.
        for _ in 0..50 {
            let _: i64 = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg("promoted")
                .query_async(&mut redis)
                .await
                .unwrap();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
        let submitted = std::time::Instant::now();
        let id = env.submit("test.chain", json!({})).await;
        let run = env.wait_state(id, DONE, T).await;
        assert_eq!(run.state, RunState::Succeeded, "{run:?}");
        let waited = submitted.elapsed();
        assert!(
            waited < Duration::from_secs(2),
            "round {round}: the run took {waited:?}: its wake-up was lost and only the \
             consumer's 5 s Redis heartbeat woke it"
        );
    }
}

/// While a queue has a backlog its runs wait in Redis past
/// `redispatch_after`; the reconciler must not push them again and again
/// (before, each of 30 waiting runs was pushed once more per pass). A run
/// whose dispatch was lost before the backlog formed (committed, never
/// pushed) is still sent, once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queue_with_a_backlog_is_not_flooded_with_duplicate_dispatches() {
    let mut env = TestEnv::new("backlog_redispatch").await;
    let active =
        orrery_workflows::dispatch::queue_config(&env.namespace, "alpha").active_jobs_list();
    let redis = env.redis().await;
    let listed = || {
        let (active, mut redis) = (active.clone(), redis.clone());
        async move {
            redis::cmd("LLEN")
                .arg(&active)
                .query_async::<usize>(&mut redis)
                .await
                .unwrap()
        }
    };
    // Committed but never pushed, like a submitter that died in between,
    // 10 s before the backlog.
    let lost = env.insert_undispatched("test.chain", "alpha").await;
    sqlx::query("UPDATE runs SET dispatched_at = now() - interval '10 seconds' WHERE id = $1")
        .bind(lost)
        .execute(&env.pool)
        .await
        .unwrap();
    let mut ids = vec![lost];
    for _ in 0..30 {
        ids.push(env.submit("test.chain", json!({})).await);
    }
    assert_eq!(listed().await, 30);
    // No consumer of `alpha`; the scheduler re-dispatches (1 s
    // `redispatch_after`, a pass every 200 ms in tests).
    env.spawn_worker(&["--scheduler"]);
    env.wait_until("the lost dispatch to be sent", T, || {
        let now = listed();
        async move { now.await > 30 }
    })
    .await;
    // Three times `redispatch_after` later: nothing was sent twice.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        listed().await,
        31,
        "the 30 waiting runs and the lost one, each once"
    );
    env.spawn_worker(&["--queues", "alpha"]);
    for id in ids {
        let run = env.wait_state(id, DONE, T).await;
        assert_eq!(run.state, RunState::Succeeded, "{run:?}");
    }
}

/// The `redis_vacuum` cron job's work: finished dispatches are forgotten
/// (data, metadata, the done set), waiting ones are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_redis_vacuum_forgets_finished_dispatches_and_keeps_waiting_ones() {
    let mut env = TestEnv::new("vacuum").await;
    let config = orrery_workflows::dispatch::queue_config(&env.namespace, "alpha");
    let mut redis = env.redis().await;
    let worker = env.spawn_worker(&["--queues", "alpha"]);
    let mut ids = Vec::new();
    for _ in 0..30 {
        ids.push(env.submit("test.chain", json!({})).await);
    }
    for id in &ids {
        assert_eq!(
            env.wait_state(*id, DONE, T).await.state,
            RunState::Succeeded
        );
    }
    let done_set = config.done_jobs_set();
    env.wait_until("every dispatch to be acknowledged", T, || {
        let (set, mut redis) = (done_set.clone(), redis.clone());
        async move {
            redis::cmd("SCARD")
                .arg(&set)
                .query_async::<usize>(&mut redis)
                .await
                .unwrap()
                >= 30
        }
    })
    .await;
    env.workers[worker].signal("KILL");
    let finished: Vec<String> = redis::cmd("SMEMBERS")
        .arg(&done_set)
        .query_async(&mut redis)
        .await
        .unwrap();
    // Waiting dispatches, pushed once nothing consumes the queue.
    let ghosts: Vec<Uuid> = (0..700).map(|_| Uuid::new_v4()).collect();
    env.rt
        .engine
        .dispatcher
        .dispatch_many("alpha", &ghosts)
        .await
        .unwrap();
    let waiting: Vec<String> = redis::cmd("LRANGE")
        .arg(config.active_jobs_list())
        .arg(0)
        .arg(-1)
        .query_async(&mut redis)
        .await
        .unwrap();
    assert_eq!(waiting.len(), 700);

    let forgotten = env.rt.dispatcher.vacuum("alpha").await.unwrap();
    assert_eq!(forgotten, finished.len());
    let data = config.job_data_hash();
    let meta = config.job_meta_hash();
    let mut kept = redis::pipe();
    kept.cmd("HLEN").arg(&data).cmd("SCARD").arg(&done_set);
    let (data_left, done_left): (usize, usize) = kept.query_async(&mut redis).await.unwrap();
    assert_eq!(
        (data_left, done_left),
        (700, 0),
        "(task data, done set) after the vacuum"
    );
    for (id, exists) in [(&finished[0], 0), (&waiting[0], 1), (&waiting[699], 1)] {
        let meta_keys: usize = redis::cmd("EXISTS")
            .arg(format!("{meta}:{id}"))
            .query_async(&mut redis)
            .await
            .unwrap();
        assert_eq!(meta_keys, exists, "metadata of {id}");
    }
    assert_eq!(env.rt.dispatcher.vacuum("alpha").await.unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_reconcilers_each_pick_a_due_run_once_and_cron_ticks_fire_once() {
    let env = TestEnv::new("reconcile").await;
    let mut ids = HashSet::new();
    for _ in 0..50 {
        ids.insert(env.submit("test.chain", json!({})).await);
    }
    // Pretend every dispatch was lost long ago.
    sqlx::query("UPDATE runs SET dispatched_at = now() - interval '1 hour'")
        .execute(&env.pool)
        .await
        .unwrap();
    let (a, b) = tokio::join!(
        reconciler::due_runs(&env.pool, Duration::from_secs(5), &[]),
        reconciler::due_runs(&env.pool, Duration::from_secs(5), &[])
    );
    let (a, b) = (a.unwrap(), b.unwrap());
    let a: HashSet<Uuid> = a.into_iter().map(|(id, _)| id).collect();
    let b: HashSet<Uuid> = b.into_iter().map(|(id, _)| id).collect();
    assert!(a.is_disjoint(&b), "a run was picked by two reconcilers");
    assert_eq!(&a | &b, ids);
    assert!(reconciler::due_runs(&env.pool, Duration::from_secs(5), &[])
        .await
        .unwrap()
        .is_empty());

    let tick: chrono::DateTime<chrono::Utc> = "2026-01-01T00:00:00Z".parse().unwrap();
    let (x, y) = tokio::join!(
        cron::claim_tick(&env.pool, "job", tick, "s1"),
        cron::claim_tick(&env.pool, "job", tick, "s2")
    );
    assert_eq!([x.unwrap(), y.unwrap()].iter().filter(|f| **f).count(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_worker_died_is_stuck_until_reclaimed_and_listed_as_such() {
    let env = TestEnv::new("stuck").await;
    let id = env.submit("test.chain", json!({})).await;
    // A worker claimed it and vanished; its lease and stuck bound passed long ago.
    sqlx::query(
        "UPDATE runs SET state = 'running', lease_owner = 'gone', lease_until = now() - interval '1 minute',
             stuck_after = now() - interval '1 second' WHERE id = $1",
    )
    .bind(id)
    .execute(&env.pool)
    .await
    .unwrap();
    let stuck = store::list_runs(
        &env.pool,
        &store::RunFilter {
            stuck: Some(true),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    assert_eq!(stuck.iter().map(|r| r.id).collect::<Vec<_>>(), [id]);
    env.rt.engine.handle("alpha", id).await;
    let run = env.run(id).await;
    assert_eq!(run.state, RunState::Succeeded);
    assert!(!run.stuck);
    let _ = LEASE_MS;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_purge_job_deletes_old_finished_runs_with_their_checkpoints_and_history_only() {
    let env = TestEnv::new("purge").await;
    let old = env.submit("test.chain", json!({})).await;
    let recent = env.submit("test.chain", json!({})).await;
    let unfinished = env.submit("test.chain", json!({})).await;
    env.rt.engine.handle("alpha", old).await;
    env.rt.engine.handle("alpha", recent).await;
    sqlx::query("UPDATE runs SET finished_at = now() - interval '40 days' WHERE id = $1")
        .bind(old)
        .execute(&env.pool)
        .await
        .unwrap();
    assert_eq!(cron::purge_finished_runs(&env.pool, 30).await.unwrap(), 1);
    let count = |table: &'static str, id: Uuid| {
        let pool = env.pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>(&format!("SELECT count(*) FROM {table} WHERE run_id = $1"))
                .bind(id)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    assert!(store::get_run(&env.pool, old).await.unwrap().is_none());
    assert_eq!(
        (
            count("step_checkpoints", old).await,
            count("run_history", old).await
        ),
        (0, 0)
    );
    assert_eq!(
        count("step_checkpoints", recent).await,
        4,
        "a recent run keeps its checkpoints"
    );
    assert!(count("run_history", recent).await > 0);
    assert_eq!(
        env.run(unfinished).await.state,
        RunState::Queued,
        "unfinished runs are never purged"
    );
}
