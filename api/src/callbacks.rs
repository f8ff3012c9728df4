//! Webhook callbacks, receiver side: how a client checks that a delivery
//! came from Orrery. Deliveries themselves are durable runs of the
//! `deliver_callback` workflow (`workflows::builtin::api_fakes`), created with
//! the task ([`crate::submit`]): they wait for the task to finish, then post
//! `{"type": "task.finished", "delivery", "task": {...}}` with retries.
//!
//! Headers: `X-Orrery-Delivery` (stable across retries: deduplicate on it),
//! `X-Orrery-Attempt`, and `X-Orrery-Signature: t=<unix>,v1=<hex>` where
//! `v1` is HMAC-SHA256 of `"<t>.<body>"` under the user's webhook secret
//! (`GET /v1/account`, rotated with `POST /v1/account/webhook-secret`).

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// Check a signature header against the body; `max_age` bounds replays.
pub fn verify_signature(secret: &str, header: &str, body: &[u8], now: i64, max_age: i64) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v.parse::<i64>().ok(),
            Some(("v1", v)) => v1 = hex::decode(v).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(sig)) = (t, v1) else {
        return false;
    };
    if (now - t).abs() > max_age {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use orrery_workflows::builtin::api_fakes::signature;

    #[test]
    fn a_delivery_signature_verifies_and_a_tampered_one_does_not() {
        let h = signature("secret", 1000, b"{\"a\":1}");
        assert!(verify_signature("secret", &h, b"{\"a\":1}", 1010, 300));
        assert!(!verify_signature("secret", &h, b"{\"a\":2}", 1010, 300));
        assert!(!verify_signature("other", &h, b"{\"a\":1}", 1010, 300));
        assert!(!verify_signature("secret", &h, b"{\"a\":1}", 5000, 300));
    }
}
