//! SSH to cluster machines, with russh.
//!
//! - [`PlatformKey`]: the platform's own ed25519 key, generated once and kept
//!   in a file; its public line goes into machines' `authorized_keys`.
//! - [`SshClient`]: connects as root (by default) with that key, and checks
//!   the server's host key against the one pinned in the inventory *before*
//!   authenticating: a mismatch is a fatal error naming the host, and no
//!   command is ever sent.
//! - [`Session`]: one connection, reused for every command of a step. Each
//!   command has a timeout and watches the run's cancellation token (a fired
//!   token stops waiting, signals and closes the channel); its stdout and
//!   stderr are captured (bounded, the tail is kept) and returned for the
//!   caller to keep in the step log; a non-zero exit is an error carrying the
//!   exit code and the tail of stderr.
//!
//! Classification ([`SshError::is_retryable`]): connection trouble, timeouts
//! and non-zero exits are retryable (the caller may decide otherwise with
//! [`SshError::exit_code`]); a host key mismatch, a bad pinned key and a
//! rejected platform key are fatal.
//!
//! This module knows nothing of what the commands do (bootstrap scripts live
//! with the workflows) and does no retrying of its own.

use std::{
    fmt,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use russh::{
    client,
    keys::{
        ssh_key::{private::Ed25519Keypair, HashAlg, LineEnding},
        PrivateKey, PrivateKeyWithHashAlg, PublicKey, PublicKeyOrCertificate,
    },
    ChannelMsg, Disconnect, Sig,
};
use tokio_util::sync::CancellationToken;

use crate::{error::StepError, infra::Machine};

/// Each of stdout and stderr keeps at most this much (its tail) by default.
pub const DEFAULT_OUTPUT_LIMIT: usize = 256 * 1024;
/// How much of stderr an error message carries.
const STDERR_TAIL: usize = 2 * 1024;

/// Failures of SSH, classified at birth.
#[derive(Debug, thiserror::Error)]
pub enum SshError {
    /// The platform key cannot be read or written.
    #[error("platform SSH key {path}: {message}")]
    Key { path: PathBuf, message: String },
    /// The pinned host key of the inventory is not a public key line.
    #[error("pinned host key of {host} is invalid: {message}")]
    InvalidPinnedKey { host: String, message: String },
    /// The server presented another host key than the pinned one. Fatal: it
    /// is not the machine we think it is (or it was reinstalled).
    #[error(
        "host key mismatch for {host}: expected {expected}, server presented {presented}; \
         refusing to run anything there"
    )]
    HostKeyMismatch {
        host: String,
        expected: String,
        presented: String,
    },
    #[error("{host} rejected the platform key for user {user}")]
    AuthRejected { host: String, user: String },
    #[error("cannot connect to {host}: {message}")]
    Connect { host: String, message: String },
    #[error("`{command}` on {host} timed out after {after:?}")]
    Timeout {
        host: String,
        command: String,
        after: Duration,
    },
    #[error("`{command}` on {host} was cancelled")]
    Cancelled { host: String, command: String },
    #[error("`{command}` on {host} exited with {code}: {stderr_tail}")]
    NonZeroExit {
        host: String,
        command: String,
        code: u32,
        stderr_tail: String,
        output: Box<CommandOutput>,
    },
    #[error("`{command}` on {host} was killed by signal {signal}: {stderr_tail}")]
    Signal {
        host: String,
        command: String,
        signal: String,
        stderr_tail: String,
    },
    #[error("SSH channel to {host}: {message}")]
    Channel { host: String, message: String },
}

impl SshError {
    pub fn is_retryable(&self) -> bool {
        !matches!(
            self,
            SshError::Key { .. }
                | SshError::InvalidPinnedKey { .. }
                | SshError::HostKeyMismatch { .. }
                | SshError::AuthRejected { .. }
        )
    }

    /// The exit code of a command that ran and failed.
    pub fn exit_code(&self) -> Option<u32> {
        match self {
            SshError::NonZeroExit { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// The captured output of a command that ran and failed.
    pub fn output(&self) -> Option<&CommandOutput> {
        match self {
            SshError::NonZeroExit { output, .. } => Some(output),
            _ => None,
        }
    }
}

impl From<SshError> for StepError {
    fn from(err: SshError) -> Self {
        if err.is_retryable() {
            StepError::Retryable(err.to_string())
        } else {
            StepError::Fatal(err.to_string())
        }
    }
}

/// A finished command's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandOutput {
    pub exit_code: u32,
    /// Lossy UTF-8; the tail when longer than the limit.
    pub stdout: String,
    pub stderr: String,
    /// Some output was dropped (only the tail was kept).
    pub truncated: bool,
    pub elapsed: Duration,
}

/// A fresh ed25519 key (for the platform, and for local containers' host keys).
pub(crate) fn generate_ed25519(comment: &str) -> PrivateKey {
    let seed: [u8; 32] = rand::random();
    let mut key = PrivateKey::from(Ed25519Keypair::from_seed(&seed));
    key.set_comment(comment);
    key
}

/// `<algorithm> <base64>[ <comment>]`.
pub(crate) fn public_line(key: &PublicKey, comment: &str) -> String {
    let bare = PublicKey::from(key.key_data().clone());
    let line = bare.to_openssh().unwrap_or_default();
    if comment.is_empty() {
        line
    } else {
        format!("{line} {comment}")
    }
}

fn fingerprint(key: &PublicKey) -> String {
    key.fingerprint(HashAlg::Sha256).to_string()
}

/// The platform's SSH identity.
#[derive(Clone)]
pub struct PlatformKey {
    key: Arc<PrivateKey>,
    public_line: String,
}

impl fmt::Debug for PlatformKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PlatformKey")
            .field("public", &self.public_line)
            .finish_non_exhaustive()
    }
}

impl PlatformKey {
    /// A new key, in memory only.
    pub fn generate() -> Self {
        Self::from_key(generate_ed25519("orrery-platform"))
    }

    fn from_key(key: PrivateKey) -> Self {
        let public_line = public_line(key.public_key(), "orrery-platform");
        PlatformKey {
            key: Arc::new(key),
            public_line,
        }
    }

    /// Load the key at `path` (OpenSSH format), or generate one and write it
    /// there (mode 0600, with the public line in `<path>.pub`).
    pub fn load_or_generate(path: &Path) -> Result<Self, SshError> {
        let err = |message: String| SshError::Key {
            path: path.to_owned(),
            message,
        };
        if path.exists() {
            let key = russh::keys::load_secret_key(path, None)
                .map_err(|e| err(format!("cannot load: {e}")))?;
            return Ok(Self::from_key(key));
        }
        use std::os::unix::fs::PermissionsExt;
        let key = Self::generate();
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| err(format!("cannot create dir: {e}")))?;
        }
        let pem = key
            .key
            .to_openssh(LineEnding::LF)
            .map_err(|e| err(format!("cannot encode: {e}")))?;
        // Written aside and renamed: two processes racing end up with one key.
        let tmp = path.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&tmp, pem.as_bytes()).map_err(|e| err(format!("cannot write: {e}")))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| err(format!("cannot chmod: {e}")))?;
        std::fs::hard_link(&tmp, path).or_else(|e| {
            let _ = std::fs::remove_file(&tmp);
            if path.exists() {
                Ok(())
            } else {
                Err(err(format!("cannot install: {e}")))
            }
        })?;
        let _ = std::fs::remove_file(&tmp);
        // Whoever won the race, use what is on disk.
        let key = Self::from_key(
            russh::keys::load_secret_key(path, None)
                .map_err(|e| err(format!("cannot load: {e}")))?,
        );
        let mut pub_path = path.as_os_str().to_owned();
        pub_path.push(".pub");
        let _ = std::fs::write(PathBuf::from(pub_path), format!("{}\n", key.public_line));
        Ok(key)
    }

    /// The OpenSSH public key line, for `authorized_keys`.
    pub fn public_line(&self) -> &str {
        &self.public_line
    }
}

/// Where to connect, and the host key to expect.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SshTarget {
    /// The machine's name, used in every message.
    pub host: String,
    pub address: String,
    pub port: u16,
    /// The pinned host key line.
    pub host_key: String,
}

impl From<&Machine> for SshTarget {
    fn from(m: &Machine) -> Self {
        SshTarget {
            host: m.hostname.clone(),
            address: m.address.clone(),
            port: m.ssh_port,
            host_key: m.host_key.clone(),
        }
    }
}

/// Makes SSH sessions with the platform key. Cheap to clone.
#[derive(Clone, Debug)]
pub struct SshClient {
    key: PlatformKey,
    user: String,
    connect_timeout: Duration,
    output_limit: usize,
}

impl SshClient {
    /// Root, a 10 s connect timeout, 256 KiB of output kept per stream.
    pub fn new(key: PlatformKey) -> Self {
        SshClient {
            key,
            user: "root".into(),
            connect_timeout: Duration::from_secs(10),
            output_limit: DEFAULT_OUTPUT_LIMIT,
        }
    }

    pub fn with_user(mut self, user: &str) -> Self {
        self.user = user.to_owned();
        self
    }

    /// Covers TCP connect, key exchange and authentication.
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    pub fn with_output_limit(mut self, bytes: usize) -> Self {
        self.output_limit = bytes.max(1);
        self
    }

    pub fn key(&self) -> &PlatformKey {
        &self.key
    }

    /// Connect and authenticate. The host key is checked during the key
    /// exchange, before authentication; a mismatch ends the connection.
    pub async fn connect(
        &self,
        target: &SshTarget,
        cancel: &CancellationToken,
    ) -> Result<Session, SshError> {
        let host = target.host.clone();
        let expected = PublicKey::from_openssh(target.host_key.trim()).map_err(|e| {
            SshError::InvalidPinnedKey {
                host: host.clone(),
                message: e.to_string(),
            }
        })?;
        let presented = Arc::new(Mutex::new(None));
        let handler = Pinned {
            expected: expected.clone(),
            presented: presented.clone(),
        };
        let config = Arc::new(client::Config {
            inactivity_timeout: None,
            keepalive_interval: Some(Duration::from_secs(15)),
            keepalive_max: 4,
            ..Default::default()
        });
        let addr = (target.address.clone(), target.port);
        let user = self.user.clone();
        let key = self.key.key.clone();
        let connect_err = |message: String| SshError::Connect {
            host: host.clone(),
            message,
        };
        let attempt = async {
            let stream = QuickAck::connect(addr)
                .await
                .map_err(|e| connect_err(e.to_string()))?;
            let mut handle = client::connect_stream(config, stream, handler)
                .await
                .map_err(|e| {
                    if let Some(presented) = presented.lock().ok().and_then(|p| p.clone()) {
                        return SshError::HostKeyMismatch {
                            host: host.clone(),
                            expected: fingerprint(&expected),
                            presented,
                        };
                    }
                    connect_err(e.to_string())
                })?;
            let auth = handle
                .authenticate_publickey(user.clone(), PrivateKeyWithHashAlg::new(key, None))
                .await
                .map_err(|e| connect_err(format!("authentication: {e}")))?;
            if !auth.success() {
                return Err(SshError::AuthRejected {
                    host: host.clone(),
                    user: user.clone(),
                });
            }
            Ok(handle)
        };
        let handle = tokio::select! {
            res = tokio::time::timeout(self.connect_timeout, attempt) => match res {
                Ok(res) => res?,
                Err(_) => return Err(connect_err(format!("no answer within {:?}", self.connect_timeout))),
            },
            _ = cancel.cancelled() => return Err(SshError::Cancelled { host, command: "connect".into() }),
        };
        tracing::debug!(host = %target.host, address = %target.address, "ssh connected");
        Ok(Session {
            handle,
            host: target.host.clone(),
            output_limit: self.output_limit,
        })
    }
}

/// The TCP stream under an SSH connection, acknowledging what it receives
/// at once. sshd writes a non-interactive session's output with Nagle's
/// algorithm on, so a small write waits for the ACK of the one before, and
/// Linux delays ACKs up to 40 ms: every command paid about 40 ms of pure
/// waiting (a host's bootstrap took 81 ms instead of 38 ms). `TCP_QUICKACK`
/// does not stick (the kernel may go back to delayed ACKs), so it is set
/// again after every read; our own writes go out at once (`TCP_NODELAY`).
struct QuickAck(tokio::net::TcpStream);

impl QuickAck {
    async fn connect(addr: (String, u16)) -> std::io::Result<Self> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let stream = QuickAck(stream);
        stream.ack_at_once();
        Ok(stream)
    }

    fn ack_at_once(&self) {
        #[cfg(target_os = "linux")]
        {
            // Best effort: without it the connection works, only slower.
            let _ = socket2::SockRef::from(&self.0).set_tcp_quickack(true);
        }
    }
}

impl tokio::io::AsyncRead for QuickAck {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let read = std::pin::Pin::new(&mut self.0).poll_read(cx, buf);
        if let std::task::Poll::Ready(Ok(())) = read {
            self.ack_at_once();
        }
        read
    }
}

impl tokio::io::AsyncWrite for QuickAck {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

/// Checks the server's key against the pinned one.
struct Pinned {
    expected: PublicKey,
    /// What the server presented when it did not match, for the error.
    presented: Arc<Mutex<Option<String>>>,
}

impl client::Handler for Pinned {
    type Error = russh::Error;

    async fn check_server_key(
        &mut self,
        server_key: &PublicKeyOrCertificate,
    ) -> Result<bool, Self::Error> {
        let presented = match server_key {
            PublicKeyOrCertificate::PublicKey { key, .. } => {
                if key.key_data() == self.expected.key_data() {
                    return Ok(true);
                }
                fingerprint(key)
            }
            PublicKeyOrCertificate::Certificate(cert) => {
                format!("a certificate ({})", cert.key_id())
            }
        };
        if let Ok(mut slot) = self.presented.lock() {
            *slot = Some(presented);
        }
        Ok(false)
    }
}

/// One authenticated connection; run as many commands on it as needed
/// (concurrently too: each command is its own channel).
pub struct Session {
    handle: client::Handle<Pinned>,
    host: String,
    output_limit: usize,
}

impl fmt::Debug for Session {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Session")
            .field("host", &self.host)
            .finish_non_exhaustive()
    }
}

impl Session {
    pub fn host(&self) -> &str {
        &self.host
    }

    /// Run `command` (through the remote user's shell). A non-zero exit is
    /// [`SshError::NonZeroExit`]; the timeout or a fired `cancel` signals
    /// the command, closes the channel and returns at once.
    pub async fn run(
        &self,
        command: &str,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<CommandOutput, SshError> {
        self.exec(command, None, timeout, cancel).await
    }

    /// Like [`Session::run`], with `stdin` fed to the command.
    pub async fn run_with_input(
        &self,
        command: &str,
        stdin: &[u8],
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<CommandOutput, SshError> {
        self.exec(command, Some(stdin), timeout, cancel).await
    }

    /// Write `contents` to `path` with `mode` (e.g. 0o755), atomically
    /// (written aside, then renamed), creating the parent directory.
    pub async fn upload(
        &self,
        path: &str,
        contents: &[u8],
        mode: u32,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<(), SshError> {
        let dir = match path.rsplit_once('/') {
            Some(("", _)) => "/",
            Some((dir, _)) => dir,
            None => ".",
        };
        let tmp = format!("{path}.orrery-upload");
        let command = format!(
            "set -e; mkdir -p {dir}; umask 077; cat > {tmp}; chmod {mode:o} {tmp}; mv -f {tmp} {path}",
            dir = shell_quote(dir),
            tmp = shell_quote(&tmp),
            path = shell_quote(path),
        );
        self.exec(&command, Some(contents), timeout, cancel).await?;
        Ok(())
    }

    /// Close the connection politely.
    pub async fn close(self) {
        let _ = self
            .handle
            .disconnect(Disconnect::ByApplication, "", "en")
            .await;
    }

    async fn exec(
        &self,
        command: &str,
        stdin: Option<&[u8]>,
        timeout: Duration,
        cancel: &CancellationToken,
    ) -> Result<CommandOutput, SshError> {
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + timeout;
        let shown = summarize(command);
        let host = self.host.clone();
        let timed_out = || SshError::Timeout {
            host: host.clone(),
            command: shown.clone(),
            after: timeout,
        };
        let cancelled = || SshError::Cancelled {
            host: host.clone(),
            command: shown.clone(),
        };
        let channel_err = |e: russh::Error| SshError::Channel {
            host: host.clone(),
            message: e.to_string(),
        };

        // Each command records its process group, so that a command we stop
        // waiting for can be killed (see `abandon`).
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let wrapped = wrap(command, &run_id);
        let open = async {
            let channel = self
                .handle
                .channel_open_session()
                .await
                .map_err(channel_err)?;
            channel
                .exec(true, wrapped.as_str())
                .await
                .map_err(channel_err)?;
            Ok::<_, SshError>(channel)
        };
        let mut channel = tokio::select! {
            res = open => res?,
            _ = tokio::time::sleep_until(deadline) => return Err(timed_out()),
            _ = cancel.cancelled() => return Err(cancelled()),
        };

        let mut stdout = Capture::new(self.output_limit);
        let mut stderr = Capture::new(self.output_limit);
        let mut exit_code = None;
        let mut exit_signal = None;
        let mut input_sent = false;
        loop {
            let msg = tokio::select! {
                msg = channel.wait() => msg,
                _ = tokio::time::sleep_until(deadline) => {
                    self.abandon(&channel, &run_id).await;
                    return Err(timed_out());
                }
                _ = cancel.cancelled() => {
                    self.abandon(&channel, &run_id).await;
                    return Err(cancelled());
                }
            };
            match msg {
                None | Some(ChannelMsg::Close) => break,
                Some(ChannelMsg::Data { data }) => stdout.push(&data),
                Some(ChannelMsg::ExtendedData { data, ext: 1 }) => stderr.push(&data),
                Some(ChannelMsg::ExitStatus { exit_status }) => exit_code = Some(exit_status),
                Some(ChannelMsg::ExitSignal { signal_name, .. }) => {
                    exit_signal = Some(format!("{signal_name:?}"))
                }
                // Input (and, always, its end: a command reading stdin must
                // see it) only once sshd confirms the exec; sent earlier, it
                // can be lost before the command's pipes exist.
                Some(ChannelMsg::Success) if !input_sent => {
                    input_sent = true;
                    let send = async {
                        if let Some(data) = stdin {
                            channel.data(data).await?;
                        }
                        channel.eof().await
                    };
                    let outcome = tokio::select! {
                        res = send => Ok(res),
                        _ = tokio::time::sleep_until(deadline) => Err(timed_out()),
                        _ = cancel.cancelled() => Err(cancelled()),
                    };
                    match outcome {
                        Ok(res) => res.map_err(channel_err)?,
                        Err(err) => {
                            self.abandon(&channel, &run_id).await;
                            return Err(err);
                        }
                    }
                }
                Some(ChannelMsg::Failure) => {
                    return Err(SshError::Channel {
                        host,
                        message: format!("the server refused to run `{shown}`"),
                    })
                }
                Some(_) => {}
            }
        }
        let truncated = stdout.dropped || stderr.dropped;
        let output = CommandOutput {
            exit_code: exit_code.unwrap_or(u32::MAX),
            stdout: stdout.text(),
            stderr: stderr.text(),
            truncated,
            elapsed: started.elapsed(),
        };
        let stderr_tail = tail(&output.stderr, STDERR_TAIL);
        match (exit_code, exit_signal) {
            (Some(0), _) => Ok(output),
            (Some(code), _) => Err(SshError::NonZeroExit {
                host,
                command: shown,
                code,
                stderr_tail,
                output: Box::new(output),
            }),
            (None, Some(signal)) => Err(SshError::Signal {
                host,
                command: shown,
                signal,
                stderr_tail,
            }),
            (None, None) => Err(SshError::Channel {
                host,
                message: format!("`{shown}` ended without an exit status"),
            }),
        }
    }
}

/// The command line actually sent: `command` in a subshell of the session's
/// shell, which first writes its pid (sshd made it a process group leader)
/// to `$TMPDIR/.orrery-run-<id>` and removes the file when done.
fn wrap(command: &str, run_id: &str) -> String {
    format!(
        "f=${{TMPDIR:-/tmp}}/.orrery-run-{run_id}; echo $$ > \"$f\" 2>/dev/null; (\n{command}\n); rc=$?; rm -f \"$f\"; exit $rc"
    )
}

/// Kills the process group recorded by [`wrap`] (waiting a little for the
/// record, in case the command was abandoned as it started).
fn kill_command(run_id: &str) -> String {
    format!(
        "f=${{TMPDIR:-/tmp}}/.orrery-run-{run_id}; for i in 1 2 3 4 5; do [ -s \"$f\" ] && break; sleep 0.1; done; \
         [ -s \"$f\" ] && kill -KILL -- -$(cat \"$f\"); rm -f \"$f\""
    )
}

impl Session {
    /// Stop a command we no longer wait for, within about a second: ask for
    /// a signal (OpenSSH refuses that for root logins), close the channel,
    /// and kill the command's process group from a second channel (closing
    /// alone would leave it running: it has no terminal to lose).
    async fn abandon(&self, channel: &russh::Channel<client::Msg>, run_id: &str) {
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let _ = channel.signal(Sig::KILL).await;
            let _ = channel.close().await;
        })
        .await;
        let kill = async {
            let killer = self.handle.channel_open_session().await?;
            killer.exec(false, kill_command(run_id).as_str()).await?;
            killer.eof().await?;
            let mut killer = killer;
            while let Some(msg) = killer.wait().await {
                if matches!(msg, ChannelMsg::Close | ChannelMsg::ExitStatus { .. }) {
                    break;
                }
            }
            Ok::<_, russh::Error>(())
        };
        match tokio::time::timeout(Duration::from_secs(1), kill).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => {
                tracing::warn!(host = %self.host, error = %e, "cannot kill an abandoned command")
            }
            Err(_) => tracing::warn!(host = %self.host, "killing an abandoned command timed out"),
        }
    }
}

/// Keeps the last `limit` bytes written.
struct Capture {
    buf: Vec<u8>,
    limit: usize,
    dropped: bool,
}

impl Capture {
    fn new(limit: usize) -> Self {
        Capture {
            buf: Vec::new(),
            limit,
            dropped: false,
        }
    }

    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > self.limit {
            let excess = self.buf.len() - self.limit;
            self.buf.drain(..excess);
            self.dropped = true;
        }
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.buf).into_owned()
    }
}

/// The last `max` bytes of `text` (on a character boundary), trimmed.
fn tail(text: &str, max: usize) -> String {
    let mut start = text.len().saturating_sub(max);
    while !text.is_char_boundary(start) {
        start += 1;
    }
    text[start..].trim().to_owned()
}

/// The first line of a command, shortened, for messages.
fn summarize(command: &str) -> String {
    let first = command.lines().next().unwrap_or("").trim();
    let mut shown: String = first.chars().take(100).collect();
    if shown.len() < first.len() || command.lines().nth(1).is_some() {
        shown.push_str(" ...");
    }
    shown
}

/// Quote `s` for a POSIX shell.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r#"'\''"#))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capture_keeps_the_tail() {
        let mut c = Capture::new(4);
        c.push(b"abc");
        c.push(b"def");
        assert_eq!(c.text(), "cdef");
        assert!(c.dropped);
    }

    #[test]
    fn commands_are_wrapped_in_a_subshell_that_records_its_group() {
        let w = wrap("echo a\necho b", "x1");
        assert!(w.contains(".orrery-run-x1"));
        assert!(w.contains("(\necho a\necho b\n)"));
        assert!(kill_command("x1").contains("kill -KILL -- -$(cat"));
    }

    #[test]
    fn quoting_survives_single_quotes() {
        assert_eq!(shell_quote("a'b"), r#"'a'\''b'"#);
    }

    #[test]
    fn long_commands_are_summarized() {
        assert_eq!(summarize("echo hi"), "echo hi");
        assert_eq!(summarize("a\nb"), "a ...");
        assert_eq!(summarize(&"x".repeat(150)).len(), 104);
    }

    #[test]
    fn platform_keys_are_written_once_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("orrery-key-{}", uuid::Uuid::new_v4()));
        let path = dir.join("id_ed25519");
        let a = PlatformKey::load_or_generate(&path).unwrap();
        let b = PlatformKey::load_or_generate(&path).unwrap();
        assert_eq!(a.public_line(), b.public_line());
        assert!(a.public_line().starts_with("ssh-ed25519 "));
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn a_host_key_mismatch_is_fatal() {
        let err = SshError::HostKeyMismatch {
            host: "node-1".into(),
            expected: "SHA256:a".into(),
            presented: "SHA256:b".into(),
        };
        let step: StepError = err.into();
        assert!(!step.is_retryable());
        assert!(step.message().contains("node-1"));
    }
}
