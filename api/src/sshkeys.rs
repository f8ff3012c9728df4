//! SSH public keys: parsing an OpenSSH `authorized_keys` line and its
//! `SHA256:` fingerprint, the form `ssh-keygen -l` prints. Pure.

use base64::Engine as _;
use sha2::{Digest, Sha256};

const TYPES: [&str; 6] = [
    "ssh-ed25519",
    "ssh-rsa",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "sk-ssh-ed25519@openssh.com",
];

/// A valid key, normalised to `type base64 [comment]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicKey {
    pub line: String,
    pub kind: String,
    pub fingerprint: String,
}

fn read_string(blob: &[u8], at: &mut usize) -> Option<Vec<u8>> {
    let len = u32::from_be_bytes(blob.get(*at..*at + 4)?.try_into().ok()?) as usize;
    let s = blob.get(*at + 4..*at + 4 + len)?.to_vec();
    *at += 4 + len;
    Some(s)
}

pub fn parse(line: &str) -> Result<PublicKey, String> {
    let line = line.trim();
    if line.contains('\n') {
        return Err("give one key, on one line".into());
    }
    let mut parts = line.split_whitespace();
    let kind = parts.next().ok_or("the key is empty")?;
    if !TYPES.contains(&kind) {
        return Err(format!(
            "`{kind}` is not a supported key type; use one of {}",
            TYPES.join(", ")
        ));
    }
    let data = parts
        .next()
        .ok_or("the key has no base64 data after its type")?;
    let comment: Vec<&str> = parts.collect();
    let blob = base64::engine::general_purpose::STANDARD
        .decode(data)
        .map_err(|_| "the key data is not valid base64".to_owned())?;
    let mut at = 0;
    let inner = read_string(&blob, &mut at).ok_or("the key data is truncated")?;
    if inner != kind.as_bytes() {
        return Err("the key data does not match its type".into());
    }
    match kind {
        "ssh-ed25519" => {
            let k = read_string(&blob, &mut at).ok_or("the key data is truncated")?;
            if k.len() != 32 || at != blob.len() {
                return Err("an ed25519 key must hold exactly 32 bytes".into());
            }
        }
        "ssh-rsa" => {
            let _e = read_string(&blob, &mut at).ok_or("the key data is truncated")?;
            let n = read_string(&blob, &mut at).ok_or("the key data is truncated")?;
            let bits = n.iter().skip_while(|b| **b == 0).count() * 8;
            if bits < 2048 {
                return Err(format!("this RSA key has {bits} bits; use at least 2048"));
            }
        }
        _ => {
            read_string(&blob, &mut at).ok_or("the key data is truncated")?;
        }
    }
    let digest = Sha256::digest(&blob);
    let fingerprint = format!(
        "SHA256:{}",
        base64::engine::general_purpose::STANDARD_NO_PAD.encode(digest)
    );
    let mut normal = format!("{kind} {data}");
    if !comment.is_empty() {
        normal.push(' ');
        normal.push_str(&comment.join(" "));
    }
    Ok(PublicKey {
        line: normal,
        kind: kind.into(),
        fingerprint,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // Generated with `ssh-keygen -t ed25519`; fingerprint from `ssh-keygen -lf`.
    pub const ED25519: &str = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIPvF1n1iWOYTKyGnH8TUoBAvnVfv7+6tFH+7mWgeNXL8 alice@laptop";

    #[test]
    fn an_ed25519_key_parses_with_a_sha256_fingerprint() {
        let k = parse(ED25519).unwrap();
        assert_eq!(k.kind, "ssh-ed25519");
        assert_eq!(
            k.fingerprint,
            "SHA256:mPBrjJSrUwAIB/z25QtpG143Bm4h5ufYHWqjhi7OQ1k"
        );
        assert!(k.line.ends_with("alice@laptop"));
    }

    #[test]
    fn garbage_wrong_types_and_mismatches_are_refused() {
        assert!(parse("").is_err());
        assert!(parse("ssh-dss AAAA").unwrap_err().contains("supported"));
        assert!(parse("ssh-ed25519 !!!").unwrap_err().contains("base64"));
        // An ed25519 blob labelled as RSA.
        let data = ED25519.split(' ').nth(1).unwrap();
        assert!(parse(&format!("ssh-rsa {data}"))
            .unwrap_err()
            .contains("match"));
    }
}
