//! A lone claim held open so that it shares one commit with the run's first
//! write.
//!
//! A claim is a write of its own ([`crate::store::CLAIM_SQL`]). A busy
//! process batches its claims with its checkpoints
//! ([`crate::writer::CheckpointWriter::claim`]) so they share their
//! commits; a process with nothing else in flight has
//! nothing to batch with, so a run of n steps costs n + 1 commits, and at
//! low load a commit (a WAL flush) is most of what a step costs. Such a
//! process claims inside a transaction it leaves open on a connection kept
//! for the purpose, and the run's first write (its first checkpoint, a
//! park, a hand-over) is made in that transaction: one commit for both.
//! When that write has not come within the window (`ORRERY_CLAIM_HOLD_MS`),
//! the claim commits alone and the run goes on through the checkpoint
//! writer like any other.
//!
//! Until the commit nobody else sees the claim, so:
//! - the run's row is locked (`FOR NO KEY UPDATE`): a second claim of the
//!   run (a duplicate dispatch) waits for the commit, at most the window,
//!   then finds the lease taken; the reconciler skips locked rows;
//! - a worker that dies in the window takes its claim with it: the run is
//!   as it was before the dispatch and the reconciler dispatches it again,
//!   with no lease to wait out;
//! - a worker that stalls in the window (stopped, starved) cannot keep the
//!   row: PostgreSQL ends a session idle in its transaction longer than
//!   [`idle_limit`], and the claim with it, and every later write of the
//!   stalled worker is refused by the fence like any lost lease's;
//! - a step whose writes are fenced by the committed claim through other
//!   connections (a fan-out's item checkpoints) needs the claim committed
//!   first: the executor calls [`HeldClaim::settle`] before one.

use std::{sync::Arc, time::Duration};

use sqlx::{PgConnection, PgPool};
use tokio::sync::{Mutex, OwnedMutexGuard};
use uuid::Uuid;

use crate::{
    batch::BatchStatement,
    error::EngineError,
    store::{ClaimRequest, ClaimStatement, ClaimedRun},
    writer::{self, RunUpdate},
};

/// How long PostgreSQL lets a held claim's session sit idle in its
/// transaction: well past the window, so only a stalled process reaches it.
pub fn idle_limit(window: Duration) -> Duration {
    Duration::from_secs(2).max(window * 2)
}

/// The connection held claims use, kept between them (`None` until the
/// first, and after an error).
type Slot = Option<PgConnection>;

/// One per process: holds at most one claim at a time.
pub struct ClaimHolder {
    slot: Arc<Mutex<Slot>>,
    pool: PgPool,
    window: Duration,
    /// The claimer's own statement, sent on the held connection.
    statement: ClaimStatement,
}

/// What [`ClaimHolder::claim`] got: the run (if it was claimable) and, when
/// it was, the open transaction its first write goes into.
pub type Held = (Option<ClaimedRun>, Option<HeldClaim>);

impl ClaimHolder {
    /// Claims for `owner` (see [`crate::store::ClaimStatement::new`]); a zero
    /// `window` holds none.
    pub fn new(
        pool: PgPool,
        window: Duration,
        owner: &str,
        lease: Duration,
        stuck_in: Duration,
    ) -> Self {
        ClaimHolder {
            slot: Arc::default(),
            pool,
            window,
            statement: ClaimStatement::new(owner, lease, stuck_in),
        }
    }

    /// Claim `run_id` in a transaction left open for the run's first write.
    /// `None` when no claim can be held now (holding is off, another claim
    /// is held, or the database did not answer): the caller claims the
    /// usual way, which also waits out an outage. Nothing of a failed
    /// attempt is committed, so the same `claim_id` may be sent again.
    pub async fn claim(&self, run_id: Uuid, claim_id: Uuid) -> Option<Held> {
        if self.window.is_zero() {
            return None;
        }
        let mut slot = self.slot.clone().try_lock_owned().ok()?;
        let mut conn = match slot.take() {
            Some(conn) => conn,
            None => match self.connect().await {
                Ok(conn) => conn,
                Err(err) => {
                    tracing::debug!(error = %err, "no connection to hold a claim on; claiming the usual way");
                    return None;
                }
            },
        };
        let request = ClaimRequest { run_id, claim_id };
        let claimed = async {
            sqlx::query("BEGIN").execute(&mut conn).await?;
            let run = self
                .statement
                .execute(&mut conn, &[request])
                .await?
                .pop()
                .flatten();
            if run.is_none() {
                // Nothing was claimed, so nothing to keep open.
                sqlx::query("COMMIT").execute(&mut conn).await?;
            }
            Ok::<_, sqlx::Error>(run)
        }
        .await;
        match claimed {
            Ok(Some(run)) => Some((Some(run), Some(HeldClaim::open(conn, slot, self.window)))),
            Ok(None) => {
                *slot = Some(conn);
                Some((None, None))
            }
            Err(err) => {
                // Dropping the connection rolls back whatever it began.
                tracing::debug!(error = %err, "held claim failed; claiming the usual way");
                None
            }
        }
    }

    async fn connect(&self) -> Result<PgConnection, sqlx::Error> {
        let mut conn = crate::config::connect_keyed(&self.pool).await?;
        let limit = idle_limit(self.window).as_millis();
        sqlx::query(&format!(
            "SET idle_in_transaction_session_timeout = {limit}"
        ))
        .execute(&mut conn)
        .await?;
        Ok(conn)
    }
}

/// What a worker logs when its held claim could not be committed.
const LOST: &str = "a held claim could not be committed; the run is left to the reconciler";

fn lost(err: &sqlx::Error) -> bool {
    tracing::warn!(error = %err, "{LOST}");
    false
}

/// A claim whose transaction is still open, shared by the run's driver and
/// the timer that commits it alone when the window ends. Each of them
/// commits under the lock, so a write sent the usual way after finding the
/// claim gone can never reach the database before the claim's commit.
#[derive(Clone)]
pub struct HeldClaim {
    open: Arc<Mutex<Option<Open>>>,
}

struct Open {
    conn: PgConnection,
    /// Keeps the holder's slot taken until the connection goes back in it.
    slot: OwnedMutexGuard<Slot>,
}

impl Open {
    async fn commit(mut self) -> Result<(), sqlx::Error> {
        sqlx::query("COMMIT").execute(&mut self.conn).await?;
        let Open { conn, mut slot } = self;
        *slot = Some(conn);
        Ok(())
    }
}

impl HeldClaim {
    fn open(conn: PgConnection, slot: OwnedMutexGuard<Slot>, window: Duration) -> Self {
        let held = HeldClaim {
            open: Arc::new(Mutex::new(Some(Open { conn, slot }))),
        };
        let timer = held.clone();
        tokio::spawn(async move {
            tokio::time::sleep(window).await;
            if let Err(err) = timer.settle().await {
                // Rolled back, or its fate unknown: either way the run's next
                // write finds out (refused by the fence if the claim is gone).
                tracing::warn!(error = %err, "{LOST}");
            }
        });
        held
    }

    /// Write `update` in the claim's transaction and commit both. `None`
    /// when the claim was already committed alone: the caller writes the
    /// usual way. `Some(false)`: nothing was written, the run is lost to
    /// this worker as with a lost lease: the fence did not match, or the
    /// transaction could not be committed (PostgreSQL ended it after a
    /// stall, the connection broke). If such a commit did happen after all,
    /// the run is leased to this worker with its first write done, and is
    /// reclaimed from there once the lease expires.
    pub async fn commit_with(&self, update: &RunUpdate) -> Option<bool> {
        let mut guard = self.open.lock().await;
        let mut open = guard.take()?;
        let written = async {
            let applied = writer::write_batch(&mut open.conn, &[update]).await?;
            Ok::<_, sqlx::Error>(applied.contains(&update.run_id))
        }
        .await;
        // On an error `open` is dropped with its connection: rolled back.
        Some(match written {
            Ok(applied) => match open.commit().await {
                Ok(()) => applied,
                Err(err) => lost(&err),
            },
            Err(err) => lost(&err),
        })
    }

    /// Commit the claim alone if it is still open.
    pub async fn settle(&self) -> Result<(), EngineError> {
        let mut guard = self.open.lock().await;
        match guard.take() {
            Some(open) => Ok(open.commit().await?),
            None => Ok(()),
        }
    }
}
