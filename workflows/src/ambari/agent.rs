//! Our stand-in for `ambari-agent`, as files the bootstrap step installs on
//! each host over SSH: the agent script and its installer, embedded at build
//! time from `scripts/agent/`, and the one idempotent shell command that
//! installs both and (re)starts the agent.
//!
//! The agent registers with the emulator's agent port and heartbeats (see
//! `docs/AMBARI_EMULATOR.md`); it needs `sh` and `curl` on the host.

/// `scripts/agent/ambari-agent`.
pub const AGENT_SCRIPT: &str = include_str!("../../../scripts/agent/ambari-agent");

/// `scripts/agent/install.sh`.
pub const INSTALL_SCRIPT: &str = include_str!("../../../scripts/agent/install.sh");

/// The real agent's default registration port, which the emulator's agent
/// port also defaults to.
pub const DEFAULT_AGENT_PORT: u16 = 8440;

/// A shell command (for `sh -c` over SSH, as root) that installs the agent
/// pointing at `server:port` and restarts it. Safe to run again: files are
/// replaced and `restart` ends with exactly one agent running.
/// `None` if `server` is not a plain host name or address (it is embedded
/// in the command).
///
/// The installer runs in a subshell with the agent script as its standard
/// input (`AMBARI_AGENT_SOURCE=/dev/stdin`) rather than from temporary files:
/// every host of a cluster runs this at once, and on the local provider they
/// share this machine's cores, so each process not spawned (`mktemp`, `cat`,
/// a second `sh`, `rm`) is CPU given back to the other hosts.
pub fn bootstrap_command(server: &str, port: u16) -> Option<String> {
    let plain = !server.is_empty()
        && server
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_' | ':'));
    if !plain {
        return None;
    }
    Some(format!(
        "set -e\n\
         (\n\
         set -- '{server}' {port}\n\
         AMBARI_AGENT_SOURCE=/dev/stdin\n\
         {INSTALL_SCRIPT}) <<'ORRERY_AGENT_EOF'\n{AGENT_SCRIPT}ORRERY_AGENT_EOF\n\
         \"${{AMBARI_AGENT_PREFIX:-/usr/sbin}}/ambari-agent\" restart\n"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bootstrap_command_embeds_both_scripts_and_refuses_odd_servers() {
        let cmd = bootstrap_command("10.0.3.1", 8440).unwrap();
        assert!(cmd.contains("url_port=$PORT"));
        assert!(cmd.contains("__loop"));
        assert!(cmd.contains("set -- '10.0.3.1' 8440"));
        assert!(AGENT_SCRIPT.ends_with('\n') && INSTALL_SCRIPT.ends_with('\n'));
        assert!(bootstrap_command("x'; rm -rf /", 1).is_none());
        assert!(bootstrap_command("", 1).is_none());
    }

    /// `status` trusts a pidfile only when its process is the agent's: a
    /// stale number now held by another process is "not running", while the
    /// agent's own process is "running" even in the instant after `start`
    /// where it is still the forked copy of the starting shell (its command
    /// line names the script but not yet `__loop`).
    #[test]
    fn status_trusts_a_pidfile_only_for_the_agents_own_process() {
        let dir = std::env::temp_dir().join(format!("orrery-pid-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        let agent = dir.join("bin/ambari-agent");
        std::fs::write(&agent, AGENT_SCRIPT).unwrap();
        let status = |pid: u32| {
            std::fs::write(dir.join("ambari-agent.pid"), format!("{pid}\n")).unwrap();
            std::process::Command::new("sh")
                .arg(&agent)
                .arg("status")
                .env("AMBARI_AGENT_RUN_DIR", &dir)
                .output()
                .unwrap()
                .status
                .code()
        };
        // This test process: alive, but not the agent.
        let stale = status(std::process::id());
        // A process whose command line names the script (as the forked copy does).
        let mut forked = std::process::Command::new("sh")
            .args(["-c", "sleep 5", "ambari-agent"])
            .spawn()
            .unwrap();
        let fresh = status(forked.id());
        let _ = forked.kill();
        let _ = forked.wait();
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            stale,
            Some(3),
            "a pid held by another process is not the agent"
        );
        assert_eq!(fresh, Some(0), "the agent's own process is running");
    }

    /// Runs the real command with every path redirected to a temp dir.
    #[test]
    fn the_bootstrap_command_installs_and_restarts_the_agent() {
        let dir = std::env::temp_dir().join(format!("orrery-boot-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir).unwrap();
        // Port 9 (discard): nothing answers, the agent keeps retrying.
        let cmd = bootstrap_command("127.0.0.1", 9).unwrap();
        let run = |script: &str| {
            std::process::Command::new("sh")
                .arg("-c")
                .arg(script)
                .env("AMBARI_AGENT_PREFIX", dir.join("bin"))
                .env("AMBARI_AGENT_CONF", dir.join("agent.ini"))
                .env("AMBARI_AGENT_RUN_DIR", dir.join("run"))
                .env("AMBARI_AGENT_HOSTNAME", "boot.test")
                .output()
                .unwrap()
        };
        for _ in 0..2 {
            let out = run(&cmd);
            assert!(
                out.status.success(),
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let status = run("\"$AMBARI_AGENT_PREFIX/ambari-agent\" status");
        let stop = run("\"$AMBARI_AGENT_PREFIX/ambari-agent\" stop");
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            status.status.success(),
            "agent running after bootstrap: {}{}",
            String::from_utf8_lossy(&status.stdout),
            String::from_utf8_lossy(&status.stderr)
        );
        assert!(stop.status.success());
    }
}
