//! Admission of a cluster request: the user's quota, the group's quota, the
//! machines actually available, and other groups' unused reservations.
//!
//! [`admit`] is the pure decision, tested here; its inputs are the rows of
//! `quota_ledger` (migrations/0010_admission_ledger.sql), which
//! [`crate::admission`] reads for a whole batch of requests through
//! `admission_ledger`, after the admission lock, so two batches (or two API
//! processes) cannot both spend the same machines.
//!
//! - usage: sum of the sizes of a user's (group's) clusters in
//!   `provisioning`, `running` or `terminating`, kept as counters in
//!   `machine_usage` (migrations/0006_machine_usage.sql);
//! - user limit: `users.quota_machines`, else the group's quota, else
//!   `ORRERY_DEFAULT_QUOTA`;
//! - group limit: `groups.quota_machines` (none when NULL);
//! - available: free machines (pool provider) or `ORRERY_LOCAL_CAPACITY`
//!   minus allocated local machines, minus the machines still owed to
//!   clusters being provisioned, minus every *other* group's unused
//!   reservation (`reserved_machines` − that group's usage).

use std::collections::HashMap;

use sqlx::{postgres::PgRow, PgConnection, Row};
use uuid::Uuid;

use crate::app::ApiConfig;

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

/// Read the caller's standing in one statement.
pub async fn load(
    conn: &mut PgConnection,
    cfg: &ApiConfig,
    user_id: Uuid,
) -> Result<Standing, sqlx::Error> {
    Ledger::load(conn, cfg, &[user_id])
        .await?
        .standing(user_id)
        .ok_or(sqlx::Error::RowNotFound)
}

/// The inputs of the decision for several callers at once, read in one
/// statement and kept current in memory while a batch of requests is
/// admitted one after the other ([`Ledger::spend`]), so a batch reads the
/// database once however many requests it holds.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Ledger {
    default_quota: i64,
    /// Machines free for anyone after pending demand, before reservations.
    available: i64,
    users: HashMap<Uuid, UserLine>,
    /// The callers' groups and every group holding a reservation.
    groups: HashMap<Uuid, GroupLine>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct UserLine {
    quota: Option<i64>,
    group_id: Option<Uuid>,
    usage: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct GroupLine {
    name: String,
    quota: Option<i64>,
    reserved: i64,
    usage: i64,
}

impl Ledger {
    /// Read the ledger of `users` (unknown ids are left out), without the
    /// admission lock: what a caller's standing is now, for display.
    pub async fn load(
        conn: &mut PgConnection,
        cfg: &ApiConfig,
        users: &[Uuid],
    ) -> Result<Ledger, sqlx::Error> {
        // The query is `quota_ledger` (migrations/0010_admission_ledger.sql),
        // which the admission statement reads under the lock.
        let rows = Ledger::bind(
            sqlx::query("SELECT * FROM quota_ledger($1, $2, $3)"),
            cfg,
            users,
        )
        .fetch_all(conn)
        .await?;
        Ledger::from_rows(cfg, &rows)
    }

    /// Bind the arguments `quota_ledger` and `admission_ledger` take after
    /// their first ones (the users, the provider, the local capacity).
    pub fn bind<'q>(
        query: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
        cfg: &ApiConfig,
        users: &'q [Uuid],
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        query
            .bind(users)
            .bind(cfg.provider.name())
            .bind(cfg.local_capacity)
    }

    /// The ledger in the rows of `quota_ledger` (or `admission_ledger`).
    pub fn from_rows(cfg: &ApiConfig, rows: &[PgRow]) -> Result<Ledger, sqlx::Error> {
        let mut ledger = Ledger {
            default_quota: cfg.default_quota,
            ..Ledger::default()
        };
        for row in rows {
            let usage: i64 = row.try_get("usage")?;
            match row.try_get::<&str, _>("kind")? {
                "user" => {
                    ledger.users.insert(
                        row.try_get("id")?,
                        UserLine {
                            quota: row.try_get("quota")?,
                            group_id: row.try_get("group_id")?,
                            usage,
                        },
                    );
                }
                "group" => {
                    ledger.groups.insert(
                        row.try_get("id")?,
                        GroupLine {
                            name: row.try_get("name")?,
                            quota: row.try_get("quota")?,
                            reserved: row.try_get("reserved")?,
                            usage,
                        },
                    );
                }
                _ => ledger.available = usage,
            }
        }
        Ok(ledger)
    }

    /// The standing of `user` as of everything spent so far.
    pub fn standing(&self, user: Uuid) -> Option<Standing> {
        let me = self.users.get(&user)?;
        let group = me.group_id.and_then(|g| self.groups.get(&g));
        Some(Standing {
            user_usage: me.usage,
            user_limit: me
                .quota
                .or(group.and_then(|g| g.quota))
                .unwrap_or(self.default_quota),
            group: group.map(|g| GroupStanding {
                name: g.name.clone(),
                usage: g.usage,
                limit: g.quota,
            }),
            available: self.available,
            reserved_for_others: self
                .groups
                .iter()
                .filter(|(id, _)| Some(**id) != me.group_id)
                .map(|(_, g)| (g.reserved - g.usage).max(0))
                .sum(),
        })
    }

    /// Record an admitted cluster of `size` for `user`: it counts against
    /// the user, their group and the machines available.
    pub fn spend(&mut self, user: Uuid, size: i64) {
        let Some(me) = self.users.get_mut(&user) else {
            return;
        };
        me.usage += size;
        if let Some(g) = me.group_id.and_then(|g| self.groups.get_mut(&g)) {
            g.usage += size;
        }
        self.available -= size;
    }
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
    fn without_a_group_only_the_user_limit_and_the_pool_count() {
        let mut s = standing();
        s.group = None;
        assert_eq!(s.headroom(), (6, "quota"));
    }

    #[test]
    fn a_ledger_spends_a_batch_in_order_against_user_group_and_reservations() {
        let (alice, bob, data, vip) = (
            Uuid::from_u128(1),
            Uuid::from_u128(2),
            Uuid::from_u128(3),
            Uuid::from_u128(4),
        );
        let mut ledger = Ledger {
            default_quota: 8,
            available: 10,
            users: HashMap::from([
                (
                    alice,
                    UserLine {
                        quota: None,
                        group_id: Some(data),
                        usage: 0,
                    },
                ),
                (
                    bob,
                    UserLine {
                        quota: Some(3),
                        group_id: None,
                        usage: 1,
                    },
                ),
            ]),
            groups: HashMap::from([
                (
                    data,
                    GroupLine {
                        name: "data".into(),
                        quota: Some(6),
                        reserved: 0,
                        usage: 2,
                    },
                ),
                (
                    vip,
                    GroupLine {
                        name: "vip".into(),
                        quota: None,
                        reserved: 3,
                        usage: 1,
                    },
                ),
            ]),
        };
        let alice_now = ledger.standing(alice).unwrap();
        assert_eq!(
            (alice_now.user_limit, alice_now.reserved_for_others),
            (6, 2)
        );
        assert_eq!(
            alice_now.headroom(),
            (4, "quota"),
            "the group has 4 of 6 left"
        );
        ledger.spend(alice, 3);
        // Alice's cluster counts against her group and the pool for Bob too.
        let bob_now = ledger.standing(bob).unwrap();
        assert_eq!(bob_now.available, 7);
        assert_eq!(bob_now.headroom(), (2, "quota"));
        assert_eq!(
            admit(&ledger.standing(alice).unwrap(), 2)
                .unwrap_err()
                .message,
            "You can request up to 1 machines at this point."
        );
        assert!(
            ledger.standing(Uuid::from_u128(9)).is_none(),
            "an unknown user has no standing"
        );
    }
}
