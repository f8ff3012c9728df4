//! The shell commands provisioning runs on machines, as pure functions so
//! each is unit-tested for quoting and idempotency. Every command is safe to
//! run again: a retried step repeats it on a machine where it may have run.

use crate::ssh::shell_quote;

/// A UNIX account on every node of a cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Account {
    pub username: String,
    /// `authorized_keys` content (one key per line; may be empty).
    pub public_keys: String,
    pub sudoer: bool,
    pub ssh_enabled: bool,
}

/// Usernames go into shell commands and paths: only the portable set.
pub fn valid_username(name: &str) -> bool {
    let mut chars = name.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && name.len() <= 32
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

/// Create (or bring up to date) the account: member of `hadoop`, bash, a
/// home, `~/.ssh/authorized_keys` exactly as given, sudo if asked.
pub fn create_account(a: &Account) -> String {
    let user = shell_quote(&a.username);
    let keys = if a.ssh_enabled {
        a.public_keys.trim()
    } else {
        ""
    };
    let sudoers = format!("/etc/sudoers.d/orrery-{}", a.username);
    let sudo = if a.sudoer {
        format!(
            "[ -d /etc/sudoers.d ] || mkdir -p /etc/sudoers.d; printf '%s ALL=(ALL) NOPASSWD:ALL\\n' {user} | install -m 0440 /dev/stdin {f}.tmp && mv -f {f}.tmp {f}",
            f = shell_quote(&sudoers)
        )
    } else {
        format!("[ ! -e {f} ] || rm -f {f}", f = shell_quote(&sudoers))
    };
    // Every node of a cluster runs this at once, on the local provider on
    // shared cores: `install` creates, owns and modes a file or folder in
    // one process (the home itself is only touched when it is missing).
    format!(
        "set -e
getent group hadoop >/dev/null || groupadd hadoop
if id -u {user} >/dev/null 2>&1; then usermod -s /bin/bash -g hadoop {user}; else useradd -m -s /bin/bash -g hadoop {user}; fi
IFS=: read -r _ _ _ _ _ home _ <<ORRERY_PASSWD
$(getent passwd {user})
ORRERY_PASSWD
[ -d \"$home\" ] || install -d -m 0755 -o {user} -g hadoop \"$home\"
install -d -m 0700 -o {user} -g hadoop \"$home/.ssh\"
printf '%s\\n' {keys} | install -m 0600 -o {user} -g hadoop /dev/stdin \"$home/.ssh/authorized_keys\"
{sudo}
",
        keys = shell_quote(keys),
    )
}

/// Remove the account and its sudo rule (its HDFS home is kept: data
/// belongs to the user, not to the grant).
pub fn remove_account(username: &str) -> String {
    let user = shell_quote(username);
    format!(
        "set -e
if id -u {user} >/dev/null 2>&1; then pkill -KILL -u {user} 2>/dev/null || true; userdel -r {user} 2>/dev/null || userdel {user}; fi
rm -f {sudo}
",
        sudo = shell_quote(&format!("/etc/sudoers.d/orrery-{username}"))
    )
}

/// The user's HDFS home, `/user/<name>`, owned by them. With an HDFS client
/// on the master this is `hdfs dfs`; against the Ambari emulator no HDFS
/// exists, so the directory is recorded in a local stand-in tree and the
/// command says so on stderr (kept in the step log).
pub fn hdfs_home(username: &str) -> String {
    let user = shell_quote(username);
    let dir = shell_quote(&format!("/user/{username}"));
    format!(
        "set -e
if command -v hdfs >/dev/null 2>&1; then
  sudo -u hdfs hdfs dfs -mkdir -p {dir}
  sudo -u hdfs hdfs dfs -chown {user}:hadoop {dir}
else
  install -d -o {user} -g hadoop /var/lib/orrery-hdfs{dir}
  echo 'no HDFS client on this host (Ambari emulator): recorded {dir} under /var/lib/orrery-hdfs' >&2
fi
"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn usernames_are_restricted_to_the_portable_set() {
        for ok in ["alice", "_svc", "bob-2", "a_b"] {
            assert!(valid_username(ok), "{ok}");
        }
        for bad in [
            "",
            "Alice",
            "1bob",
            "a b",
            "x;rm -rf /",
            "a/b",
            &"a".repeat(33),
        ] {
            assert!(!valid_username(bad), "{bad}");
        }
    }

    #[test]
    fn keys_are_quoted_so_they_cannot_break_out_of_the_command() {
        let a = Account {
            username: "alice".into(),
            public_keys: "ssh-ed25519 AAAA alice@x'; touch /pwned; echo '".into(),
            sudoer: false,
            ssh_enabled: true,
        };
        let cmd = create_account(&a);
        assert!(
            cmd.contains("'ssh-ed25519 AAAA alice@x'\\''; touch /pwned; echo '\\'''"),
            "{cmd}"
        );
        assert!(cmd.contains("rm -f '/etc/sudoers.d/orrery-alice'"), "{cmd}");
    }

    #[test]
    fn ssh_disabled_accounts_get_no_keys_and_sudoers_get_a_rule() {
        let a = Account {
            username: "bob".into(),
            public_keys: "ssh-ed25519 AAAA".into(),
            sudoer: true,
            ssh_enabled: false,
        };
        let cmd = create_account(&a);
        assert!(cmd.contains("printf '%s\\n' '' | install -m 0600"), "{cmd}");
        assert!(cmd.contains("NOPASSWD:ALL"));
    }
}
