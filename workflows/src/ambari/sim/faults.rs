//! Fault injection: what the emulator does wrong on purpose, set at start-up
//! (flags/env of `orrery-ambari-sim`) or at run time (`POST /_sim/faults`).
//! Randomness comes from a seeded generator so a failing test replays.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

/// Which requests a request failure applies to.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestKind {
    /// Any asynchronous request.
    #[default]
    Any,
    /// Blueprint-based cluster creation (`POST /clusters/{c}`).
    ClusterCreate,
    /// Service state changes (`PUT /clusters/{c}/services`).
    ServiceState,
}

impl std::str::FromStr for RequestKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().to_ascii_lowercase().replace('-', "_").as_str() {
            "any" => Ok(RequestKind::Any),
            "cluster_create" => Ok(RequestKind::ClusterCreate),
            "service_state" => Ok(RequestKind::ServiceState),
            other => Err(format!(
                "unknown request kind `{other}` (any, cluster_create, service_state)"
            )),
        }
    }
}

/// The whole fault configuration. `POST /_sim/faults` replaces it; absent
/// fields take their defaults (no fault), so `{}` clears everything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Faults {
    /// Share (0.0–1.0) of `/api/v1` calls answered `500`. For POST/PUT/DELETE
    /// half of those fail *after* the change was made (the answer is lost),
    /// which is what makes client idempotency matter.
    pub error_rate: f64,
    /// Seed of the generator behind `error_rate` (re-seeded on every change).
    pub seed: u64,
    /// Added before every `/api/v1` answer.
    pub latency_ms: u64,
    /// The next this-many asynchronous requests of `fail_kind` end `FAILED`
    /// with one failed task.
    pub fail_requests: u32,
    pub fail_kind: RequestKind,
    /// The role whose first task fails (e.g. `DATANODE`); default: the task
    /// in the middle of the request.
    pub fail_role: Option<String>,
    /// Agents whose host is marked lost at once and whose registrations
    /// and heartbeats are refused (`503`) until removed from the set.
    pub drop_agents: BTreeSet<String>,
}

impl Faults {
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.error_rate) || self.error_rate.is_nan() {
            return Err(format!(
                "error_rate must be between 0 and 1, not {}",
                self.error_rate
            ));
        }
        Ok(())
    }
}

/// SplitMix64: tiny, seedable, good enough to pick which calls fail.
#[derive(Debug, Clone)]
pub(crate) struct Rng(u64);

impl Rng {
    pub(crate) fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub(crate) fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub(crate) fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// When an injected `500` happens relative to the real work.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Injected {
    Before,
    After,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generator_is_deterministic_and_roughly_uniform() {
        let mut a = Rng::new(7);
        let mut b = Rng::new(7);
        let xs: Vec<f64> = (0..1000).map(|_| a.next_f64()).collect();
        let ys: Vec<f64> = (0..1000).map(|_| b.next_f64()).collect();
        assert_eq!(xs, ys);
        let below = xs.iter().filter(|x| **x < 0.3).count();
        assert!((200..400).contains(&below), "{below}");
    }

    #[test]
    fn faults_parse_from_partial_json_and_reject_unknown_fields() {
        let f: Faults =
            serde_json::from_str(r#"{"error_rate":0.3,"fail_kind":"cluster_create"}"#).unwrap();
        assert_eq!(f.fail_kind, RequestKind::ClusterCreate);
        assert_eq!(f.fail_requests, 0);
        assert!(serde_json::from_str::<Faults>(r#"{"eror_rate":1}"#).is_err());
        assert!(Faults {
            error_rate: 1.5,
            ..Faults::default()
        }
        .validate()
        .is_err());
    }
}
