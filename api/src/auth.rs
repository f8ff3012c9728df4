//! Authentication: API keys and the callers they identify.
//!
//! A key has a public id (`lookup`, 16 lowercase letters and digits) and a
//! secret (32 random bytes, base64url). Only the secret's SHA-256 is stored;
//! a 256-bit random secret needs no slow hash. `/v1` takes the whole key as
//! `Authorization: Bearer orr_<lookup>_<secret>`; `/cosmos/v1` takes
//! `Authorization: Basic base64(<lookup>:<secret>)`, so the id is the
//! original platform's `apiKey` and the secret its `apiSecret`.
//!
//! Every request reads the key row (one indexed query), so a revoked key is
//! refused at once by every API process. Cluster requests are checked by
//! their admission batch instead: a key this process verified in the last
//! minute ([`VerifiedKeys`]) is not read before the batch's rows are
//! prepared, but checked again by the statement that writes them, which
//! fails (and the batch is checked anew) when any of them no longer holds;
//! other keys with one query for the batch.

use axum::{extract::FromRequestParts, http::request::Parts};
use base64::Engine as _;
use rand::RngCore;
use sha2::{Digest, Sha256};
use sqlx::Row;
use subtle::ConstantTimeEq;
use uuid::Uuid;

use crate::{
    app::AppState,
    error::{ApiError, ApiResult},
};

/// Who is calling, as established from their key.
#[derive(Clone, Debug)]
pub struct Caller {
    pub user_id: Uuid,
    pub name: String,
    pub group_id: Option<Uuid>,
    pub is_operator: bool,
    /// The key used, so a user can tell which of their keys is in use.
    pub key_id: Uuid,
}

/// A caller who is an operator; anyone else gets 403.
#[derive(Clone, Debug)]
pub struct Operator(pub Caller);

/// A freshly generated key; the secret exists only in this value.
pub struct NewKey {
    pub id: Uuid,
    pub lookup: String,
    pub secret: String,
}

impl NewKey {
    pub fn generate() -> Self {
        let mut rng = rand::rng();
        const ALPHABET: &[u8] = b"abcdefghijklmnopqrstuvwxyz0123456789";
        let lookup: String = (0..16)
            .map(|_| ALPHABET[(rng.next_u32() % ALPHABET.len() as u32) as usize] as char)
            .collect();
        let mut secret = [0u8; 32];
        rng.fill_bytes(&mut secret);
        NewKey {
            id: Uuid::now_v7(),
            lookup,
            secret: base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(secret),
        }
    }

    /// The bearer token: `orr_<lookup>_<secret>`.
    pub fn token(&self) -> String {
        format!("orr_{}_{}", self.lookup, self.secret)
    }

    pub fn secret_sha256(&self) -> Vec<u8> {
        sha256(&self.secret)
    }
}

pub fn sha256(text: &str) -> Vec<u8> {
    Sha256::digest(text.as_bytes()).to_vec()
}

/// Random URL-safe text of `bytes` random bytes (webhook secrets).
pub fn random_secret(bytes: usize) -> String {
    let mut buf = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut buf);
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(buf)
}

/// `orr_<lookup>_<secret>` → (lookup, secret).
pub fn split_token(token: &str) -> Option<(&str, &str)> {
    let rest = token.strip_prefix("orr_")?;
    let (lookup, secret) = rest.split_once('_')?;
    (lookup.len() == 16 && !secret.is_empty()).then_some((lookup, secret))
}

/// `Authorization` value for `/cosmos/v1`: `Basic base64(apiKey:apiSecret)`.
pub fn basic_header(api_key: &str, api_secret: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{api_key}:{api_secret}"))
    )
}

/// An API key as presented in `Authorization`, not yet checked. Cluster
/// requests carry it to admission, which checks a whole batch's keys with one
/// query ([`verify_all`]; a key remembered in [`VerifiedKeys`] is re-checked
/// by the admission statement instead); other routes check it at once
/// ([`Credentials::verify`]).
#[derive(Clone, Debug)]
pub struct Credentials {
    pub lookup: String,
    secret: String,
}

impl Credentials {
    pub fn new(lookup: &str, secret: &str) -> Self {
        Credentials {
            lookup: lookup.to_owned(),
            secret: secret.to_owned(),
        }
    }

    /// The caller this key belongs to, or 401/403.
    pub async fn verify(&self, state: &AppState) -> ApiResult<Caller> {
        let mut conn = state.0.pool.acquire().await?;
        let mut answers = verify_all(&mut conn, &state.0.pool, &[self]).await?;
        answers.pop().expect("one answer per key")
    }
}

/// Keys this process verified recently, with the caller each named: the
/// admission batches use them to prepare rows without a query of their own
/// and re-check them in the statement that writes the rows
/// (`crate::admission`), so what they save is a round trip, not a check.
/// An entry is used only for the very secret that was verified, and only
/// for a minute: after that the key is read again, which also keeps its
/// `last_used_at` as current as an uncached key's.
#[derive(Default)]
pub struct VerifiedKeys {
    entries: std::sync::Mutex<std::collections::HashMap<String, Verified>>,
}

struct Verified {
    secret_sha256: Vec<u8>,
    caller: Caller,
    at: std::time::Instant,
}

/// How long a verified key is remembered.
const REMEMBERED: std::time::Duration = std::time::Duration::from_secs(60);

/// Most keys remembered at once; past it the memory starts over.
const MOST_REMEMBERED: usize = 100_000;

/// A remembered key as the batch's statement re-checks it.
pub struct Recheck {
    pub lookup: String,
    pub secret_sha256: Vec<u8>,
    pub user_id: Uuid,
    pub group_id: Option<Uuid>,
}

impl VerifiedKeys {
    /// The caller `key` named when it was verified, if that was within
    /// [`REMEMBERED`] and with this same secret; with what to re-check.
    pub fn get(&self, key: &Credentials) -> Option<(Caller, Recheck)> {
        let entries = self.entries.lock().expect("verified keys lock poisoned");
        let v = entries.get(&key.lookup)?;
        let presented = sha256(&key.secret);
        if v.at.elapsed() > REMEMBERED || !bool::from(v.secret_sha256.ct_eq(&presented)) {
            return None;
        }
        Some((
            v.caller.clone(),
            Recheck {
                lookup: key.lookup.clone(),
                secret_sha256: presented,
                user_id: v.caller.user_id,
                group_id: v.caller.group_id,
            },
        ))
    }

    pub fn remember(&self, key: &Credentials, caller: &Caller) {
        let mut entries = self.entries.lock().expect("verified keys lock poisoned");
        if entries.len() >= MOST_REMEMBERED {
            entries.clear();
        }
        entries.insert(
            key.lookup.clone(),
            Verified {
                secret_sha256: sha256(&key.secret),
                caller: caller.clone(),
                at: std::time::Instant::now(),
            },
        );
    }

    pub fn forget<'a>(&self, lookups: impl IntoIterator<Item = &'a str>) {
        let mut entries = self.entries.lock().expect("verified keys lock poisoned");
        for lookup in lookups {
            entries.remove(lookup);
        }
    }
}

/// Check a key id and secret; the caller it belongs to, or 401.
pub async fn authenticate(state: &AppState, lookup: &str, secret: &str) -> ApiResult<Caller> {
    Credentials::new(lookup, secret).verify(state).await
}

/// Check `keys` with one query on `conn`: an answer per key, in order.
/// Reading the key row here, or in the admission statement for a key it
/// remembered ([`VerifiedKeys`]), is what refuses a revoked key at once in
/// every API process. `last_used_at` is written at most once
/// a minute per key, on `pool`, off the request's path.
pub async fn verify_all(
    conn: &mut sqlx::PgConnection,
    pool: &sqlx::PgPool,
    keys: &[&Credentials],
) -> Result<Vec<ApiResult<Caller>>, sqlx::Error> {
    const KEY_ROWS: &str = "SELECT k.lookup, k.id AS key_id, k.secret_sha256, k.revoked_at IS NOT NULL AS revoked,
                (k.last_used_at IS NULL OR k.last_used_at < now() - interval '1 minute') AS stale,
                u.id AS user_id, u.name, u.group_id, u.is_operator, u.disabled_at IS NOT NULL AS disabled
         FROM api_keys k JOIN users u ON u.id = k.user_id";
    // One key (every route but cluster creation) by equality: its plan is
    // a single index probe, cheaper than the array form's.
    let rows = if let [key] = keys {
        sqlx::query(&format!("{KEY_ROWS} WHERE k.lookup = $1"))
            .bind(&key.lookup)
            .fetch_all(conn)
            .await?
    } else {
        let lookups: Vec<&str> = keys.iter().map(|k| k.lookup.as_str()).collect();
        sqlx::query(&format!("{KEY_ROWS} WHERE k.lookup = ANY($1)"))
            .bind(&lookups)
            .fetch_all(conn)
            .await?
    };
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        found.insert(row.try_get::<String, _>("lookup")?, row);
    }
    let mut stale = Vec::new();
    let mut answers = Vec::with_capacity(keys.len());
    for key in keys {
        let answer = match found.get(key.lookup.as_str()) {
            None => Err(bad_key()),
            Some(row) => {
                let checked = check(row, key)?;
                if checked.as_ref().is_ok() && row.try_get::<bool, _>("stale")? {
                    stale.push(row.try_get::<Uuid, _>("key_id")?);
                }
                checked
            }
        };
        answers.push(answer);
    }
    if !stale.is_empty() {
        let pool = pool.clone();
        tokio::spawn(async move {
            let _ = sqlx::query("UPDATE api_keys SET last_used_at = now() WHERE id = ANY($1)")
                .bind(stale)
                .execute(&pool)
                .await;
        });
    }
    Ok(answers)
}

fn bad_key() -> ApiError {
    ApiError::unauthorized(
        "the API key is not valid; create one with POST /v1/account/keys or ask an operator",
    )
}

/// The verdict on one presented key, given its row.
fn check(row: &sqlx::postgres::PgRow, key: &Credentials) -> Result<ApiResult<Caller>, sqlx::Error> {
    let stored: Vec<u8> = row.try_get("secret_sha256")?;
    if !bool::from(stored.ct_eq(&sha256(&key.secret))) {
        return Ok(Err(bad_key()));
    }
    if row.try_get::<bool, _>("revoked")? {
        return Ok(Err(ApiError::unauthorized(
            "this API key has been revoked; use another key",
        )));
    }
    if row.try_get::<bool, _>("disabled")? {
        return Ok(Err(ApiError::forbidden(
            "this account is disabled; ask an operator",
        )));
    }
    Ok(Ok(Caller {
        user_id: row.try_get("user_id")?,
        name: row.try_get("name")?,
        group_id: row.try_get("group_id")?,
        is_operator: row.try_get("is_operator")?,
        key_id: row.try_get("key_id")?,
    }))
}

fn header(parts: &Parts) -> Option<&str> {
    parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
}

impl<S: Send + Sync> FromRequestParts<S> for Credentials {
    type Rejection = ApiError;

    /// `Authorization: Bearer orr_<lookup>_<secret>`, parsed but not checked.
    async fn from_request_parts(parts: &mut Parts, _: &S) -> ApiResult<Self> {
        let Some(value) = header(parts) else {
            return Err(ApiError::unauthorized(
                "send your API key as `Authorization: Bearer orr_...`",
            ));
        };
        let token = value
            .strip_prefix("Bearer ")
            .or_else(|| value.strip_prefix("bearer "))
            .ok_or_else(|| {
                ApiError::unauthorized("use the Bearer scheme: `Authorization: Bearer orr_...`")
            })?
            .trim();
        let (lookup, secret) = split_token(token).ok_or_else(|| {
            ApiError::unauthorized(
                "the API key is malformed; it looks like orr_<16 characters>_<secret>",
            )
        })?;
        Ok(Credentials::new(lookup, secret))
    }
}

impl FromRequestParts<AppState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        Credentials::from_request_parts(parts, state)
            .await?
            .verify(state)
            .await
    }
}

impl FromRequestParts<AppState> for Operator {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> ApiResult<Self> {
        let caller = Caller::from_request_parts(parts, state).await?;
        if !caller.is_operator {
            return Err(ApiError::forbidden("this route is for operators only"));
        }
        Ok(Operator(caller))
    }
}

/// `Basic base64(apiKey:apiSecret)` → (apiKey, apiSecret).
pub fn parse_basic(value: &str) -> Option<(String, String)> {
    let encoded = value
        .strip_prefix("Basic ")
        .or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    let (k, s) = text.split_once(':')?;
    Some((k.to_owned(), s.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_splits_back_into_its_id_and_secret() {
        let key = NewKey::generate();
        let token = key.token();
        assert_eq!(
            split_token(&token),
            Some((key.lookup.as_str(), key.secret.as_str()))
        );
        assert_eq!(key.secret.len(), 43);
        assert!(split_token("orr_short_x").is_none());
        assert!(split_token("Bearer x").is_none());
    }

    #[test]
    fn basic_credentials_round_trip() {
        let h = basic_header("abc", "s3:cr_et");
        assert_eq!(parse_basic(&h), Some(("abc".into(), "s3:cr_et".into())));
        assert_eq!(parse_basic("Basic !!!"), None);
    }

    #[test]
    fn two_keys_differ() {
        assert_ne!(NewKey::generate().secret, NewKey::generate().secret);
    }
}
