//! Admission of a cluster request: the user's quota, the group's quota, the
//! machines actually available, and other groups' unused reservations.
//!
//! [`admit`] is the pure decision, tested here; [`load`] reads its inputs in
//! the submitting transaction, after the caller took the admission lock so
//! two concurrent requests cannot both spend the same machines.
//!
//! - usage: sum of the sizes of a user's (group's) clusters in
//!   `provisioning`, `running` or `terminating`;
//! - user limit: `users.quota_machines`, else the group's quota, else
//!   `ORRERY_DEFAULT_QUOTA`;
//! - group limit: `groups.quota_machines` (none when NULL);
//! - available: free machines (pool provider) or `ORRERY_LOCAL_CAPACITY`
//!   minus allocated local machines, minus the machines still owed to
//!   clusters being provisioned, minus every *other* group's unused
//!   reservation (`reserved_machines` − that group's usage).

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use crate::app::{ApiConfig, Provider};

/// Everything the decision needs, already read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Standing {
    pub user_usage: i64,
    pub user_limit: i64,
    pub group: Option<GroupStanding>,
    /// Machines free for anyone after pending demand, before reservations.
    pub available: i64,
    /// Sum over other groups of their unused reservations.
    pub reserved_for_others: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupStanding {
    pub name: String,
    pub usage: i64,
    pub limit: Option<i64>,
}

/// Why a request is refused; the message is the original platform's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub message: String,
    /// The most machines the caller could request now.
    pub can_request: i64,
    /// `quota` (a limit of theirs) or `availability` (the pool is short).
    pub reason: &'static str,
}

impl Standing {
    /// The standing as it was before the caller's own (already inserted,
    /// still provisioning, machine-less) cluster of `size`.
    pub fn without(mut self, size: i64) -> Self {
        self.user_usage -= size;
        if let Some(g) = self.group.as_mut() {
            g.usage -= size;
        }
        self.available += size;
        self
    }

    /// The most machines the caller may request now, and which bound binds.
    pub fn headroom(&self) -> (i64, &'static str) {
        let user = self.user_limit - self.user_usage;
        let group = self
            .group
            .as_ref()
            .and_then(|g| g.limit.map(|l| l - g.usage))
            .unwrap_or(i64::MAX);
        let machines = self.available - self.reserved_for_others;
        let quota = user.min(group);
        if machines < quota {
            (machines.max(0), "availability")
        } else {
            (quota.max(0), "quota")
        }
    }
}

pub fn admit(s: &Standing, size: i64) -> Result<(), Refusal> {
    let (can, reason) = s.headroom();
    if size <= can {
        return Ok(());
    }
    let group_full = s
        .group
        .as_ref()
        .is_some_and(|g| g.limit.is_some_and(|l| g.usage >= l));
    let message = if group_full {
        format!(
            "Quota exceeded for group [{}].",
            s.group
                .as_ref()
                .map(|g| g.name.as_str())
                .unwrap_or_default()
        )
    } else {
        format!("You can request up to {can} machines at this point.")
    };
    Err(Refusal {
        message,
        can_request: can,
        reason: if group_full { "quota" } else { reason },
    })
}

const ACTIVE: &str = "('provisioning', 'running', 'terminating')";

/// Serialise admissions: one transaction-scoped advisory lock, so quota and
/// availability are read and spent atomically across every API process.
/// Callers write their cluster first and take the lock last, right before
/// [`load`] and the commit, so the serialised part is two statements and a
/// commit; [`Standing::without`] then removes the caller's own cluster.
pub async fn lock(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    sqlx::query("SELECT pg_advisory_xact_lock(7263548129)")
        .execute(conn)
        .await?;
    Ok(())
}

/// Read the caller's standing in one statement.
pub async fn load(
    conn: &mut PgConnection,
    cfg: &ApiConfig,
    user_id: Uuid,
) -> Result<Standing, sqlx::Error> {
    // Every aggregate is an index-only scan (see the covering indexes in
    // migrations/0003_api.sql): by owner, by group, and over the clusters
    // still provisioning (at most the capacity in steady state).
    let sql = format!(
        "WITH me AS (
             SELECT u.id, u.quota_machines AS uq, g.id AS gid, g.name AS gname,
                    g.quota_machines AS gq
             FROM users u LEFT JOIN groups g ON g.id = u.group_id WHERE u.id = $1),
         others AS (
             SELECT COALESCE(sum(GREATEST(g.reserved_machines -
                        COALESCE((SELECT sum(a.size) FROM clusters a
                                  WHERE a.group_id = g.id AND a.state IN {ACTIVE}), 0), 0)), 0) AS n
             FROM groups g WHERE g.reserved_machines > 0 AND g.id IS DISTINCT FROM (SELECT gid FROM me))
         SELECT me.uq, me.gid, me.gname, me.gq,
                (SELECT COALESCE(sum(size), 0) FROM clusters
                 WHERE owner_id = me.id AND state IN {ACTIVE})::bigint AS user_usage,
                (SELECT COALESCE(sum(size), 0) FROM clusters
                 WHERE group_id = me.gid AND state IN {ACTIVE})::bigint AS group_usage,
                (CASE WHEN $2 = 'pool'
                      THEN (SELECT count(*) FROM machines WHERE provider = 'pool' AND state = 'free')
                      ELSE $3 - (SELECT count(*) FROM machines WHERE provider = 'local' AND state = 'allocated')
                 END
                 - (SELECT COALESCE(sum(size), 0) FROM clusters WHERE state = 'provisioning')
                 + (SELECT count(*) FROM machines m JOIN clusters c ON c.id = m.cluster_id
                    WHERE c.state = 'provisioning'))::bigint AS available,
                (SELECT n FROM others)::bigint AS reserved_for_others
         FROM me"
    );
    let row = sqlx::query(&sql)
        .bind(user_id)
        .bind(match cfg.provider {
            Provider::Pool => "pool",
            Provider::Local => "local",
        })
        .bind(cfg.local_capacity)
        .fetch_one(conn)
        .await?;
    let uq: Option<i32> = row.try_get("uq")?;
    let gq: Option<i32> = row.try_get("gq")?;
    let gid: Option<Uuid> = row.try_get("gid")?;
    Ok(Standing {
        user_usage: row.try_get("user_usage")?,
        user_limit: uq.or(gq).map(i64::from).unwrap_or(cfg.default_quota),
        group: match gid {
            Some(_) => Some(GroupStanding {
                name: row.try_get("gname")?,
                usage: row.try_get("group_usage")?,
                limit: gq.map(i64::from),
            }),
            None => None,
        },
        available: row.try_get("available")?,
        reserved_for_others: row.try_get("reserved_for_others")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn standing() -> Standing {
        Standing {
            user_usage: 2,
            user_limit: 8,
            group: Some(GroupStanding {
                name: "data".into(),
                usage: 2,
                limit: Some(10),
            }),
            available: 20,
            reserved_for_others: 0,
        }
    }

    #[test]
    fn a_request_within_every_bound_is_admitted() {
        assert_eq!(admit(&standing(), 6), Ok(()));
    }

    #[test]
    fn over_the_user_quota_says_how_many_are_left() {
        let r = admit(&standing(), 7).unwrap_err();
        assert_eq!(r.message, "You can request up to 6 machines at this point.");
        assert_eq!((r.can_request, r.reason), (6, "quota"));
    }

    #[test]
    fn a_full_group_is_named() {
        let mut s = standing();
        s.group.as_mut().unwrap().usage = 10;
        let r = admit(&s, 1).unwrap_err();
        assert_eq!(r.message, "Quota exceeded for group [data].");
    }

    #[test]
    fn a_short_pool_is_an_availability_refusal() {
        let mut s = standing();
        s.available = 3;
        let r = admit(&s, 4).unwrap_err();
        assert_eq!((r.can_request, r.reason), (3, "availability"));
        assert_eq!(r.message, "You can request up to 3 machines at this point.");
    }

    #[test]
    fn other_groups_unused_reservations_are_not_available() {
        let mut s = standing();
        s.available = 6;
        s.reserved_for_others = 4;
        assert!(admit(&s, 3).is_err());
        assert_eq!(admit(&s, 2), Ok(()));
    }

    #[test]
    fn a_standing_read_after_the_callers_own_insert_is_corrected() {
        let mut after = standing();
        after.user_usage += 3;
        after.group.as_mut().unwrap().usage += 3;
        after.available -= 3;
        assert_eq!(after.without(3), standing());
    }

    #[test]
    fn without_a_group_only_the_user_limit_and_the_pool_count() {
        let mut s = standing();
        s.group = None;
        assert_eq!(s.headroom(), (6, "quota"));
    }
}
