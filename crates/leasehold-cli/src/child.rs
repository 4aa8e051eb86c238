//! The supervised command, as leasehold sees it: a [supervisor](crate::supervisor) process
//! (leasehold re-executed) that runs the command and ends its whole process tree — when the
//! command exits, when asked, when leasehold dies, and when the term's validity runs out
//! without leasehold having stopped it (leasehold frozen or hung).

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::process::ExitStatus;
use std::time::Duration;

use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};
use nix::sys::signal::Signal;
use tokio::process::Command;

use crate::error::CliError;

/// The hidden subcommand that runs the supervisor.
pub const SUPERVISE: &str = "__supervise";

/// What the supervisor writes on its status pipe once the command has started (anything else
/// is the error that kept it from starting).
pub const STARTED: &str = "started";

/// How long before the term's validity ends the command must be gone: leasehold's grace is cut
/// short by this much, and the supervisor's own deadline is this much before the validity.
pub const DEADLINE_MARGIN: Duration = Duration::from_millis(100);

/// The control-pipe order that sets the supervisor's deadline: `D` and 8 bytes (big-endian
/// CLOCK_MONOTONIC nanoseconds), written at once (less than `PIPE_BUF`, so never split).
pub const SET_DEADLINE: u8 = b'D';

/// CLOCK_MONOTONIC now, in nanoseconds: the clock leasehold hands the term's deadline to the
/// supervisor on (system-wide, so the same in both processes). `u64::MAX` if it cannot be
/// read, so that a deadline compared with it has passed.
pub fn monotonic_nanos() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(u64::MAX, |t| {
        let secs = u64::try_from(t.tv_sec()).unwrap_or(0);
        let nanos = u64::try_from(t.tv_nsec()).unwrap_or(0);
        secs.saturating_mul(1_000_000_000).saturating_add(nanos)
    })
}

/// `at` in CLOCK_MONOTONIC nanoseconds. The clock is read before the `Instant`, so an error
/// makes the result early, never late. 0 if the clock cannot be read (a deadline already past).
fn monotonic_nanos_at(at: std::time::Instant) -> u64 {
    let clock = monotonic_nanos();
    if clock == u64::MAX {
        return 0;
    }
    let now = std::time::Instant::now();
    let nanos = |d: Duration| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
    if at >= now {
        clock.saturating_add(nanos(at - now))
    } else {
        clock.saturating_sub(nanos(now - at))
    }
}

/// A running command, behind its supervisor.
pub struct Child {
    supervisor: tokio::process::Child,
    /// The write end of the control pipe (non-blocking): `T` = SIGTERM the tree, `K` = SIGKILL
    /// it, `D` + deadline = SIGKILL it at that instant unless told a later one. Closing it
    /// (leasehold exits or dies) makes the supervisor SIGKILL the tree.
    control: File,
    /// The instant the supervisor kills the tree on its own, as last told.
    kill_at: Option<std::time::Instant>,
}

/// Makes the child get SIGKILL when its parent (the supervisor) dies, even by SIGKILL: a last
/// line of defence should the supervisor itself be killed.
///
/// This is the crate's one `unsafe` block: `pre_exec` is unsafe because its closure runs in the
/// forked child before `exec`, where only async-signal-safe calls are allowed.
#[allow(unsafe_code)]
pub fn die_with_parent(command: &mut std::process::Command) {
    use std::os::unix::process::CommandExt;
    // SAFETY: the closure only calls prctl(2) through nix (no allocation, no lock): it is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

/// A pipe whose two ends are close-on-exec.
fn pipe() -> Result<(OwnedFd, OwnedFd), CliError> {
    nix::unistd::pipe2(OFlag::O_CLOEXEC)
        .map_err(|e| CliError::Other(format!("cannot create a pipe: {e}")))
}

/// Lets the next program started inherit `fd` (clears close-on-exec). Only the supervisor is
/// started while it is set, and leasehold closes its copy right after.
fn inheritable(fd: &OwnedFd) -> Result<(), CliError> {
    fcntl(fd, FcntlArg::F_SETFD(FdFlag::empty()))
        .map(drop)
        .map_err(|e| CliError::Other(format!("cannot pass a pipe to the supervisor: {e}")))
}

impl Child {
    /// Starts `argv` with `env` added under a supervisor, both in process groups of their own,
    /// inheriting stdio; returns once the command has started. The supervisor SIGKILLs the tree
    /// at `kill_at` on its own, unless [`set_kill_at`](Self::set_kill_at) moves it later.
    ///
    /// # Errors
    ///
    /// [`CliError::Other`] when the program cannot be started (not found, not executable).
    pub async fn spawn(
        argv: &[String],
        env: &[(&str, String)],
        kill_at: Option<std::time::Instant>,
    ) -> Result<Child, CliError> {
        if argv.is_empty() {
            return Err(CliError::Other("no command given after --".into()));
        }
        let (control_read, control_write) = pipe()?;
        let (status_read, status_write) = pipe()?;
        inheritable(&control_read)?;
        inheritable(&status_write)?;
        // A supervisor that stopped reading (itself frozen) must never block leasehold.
        fcntl(&control_write, FcntlArg::F_SETFL(OFlag::O_NONBLOCK))
            .map_err(|e| CliError::Other(format!("cannot set up the control pipe: {e}")))?;
        // /proc/self/exe: this very binary, even if it was replaced on disk since it started.
        let mut command = Command::new("/proc/self/exe");
        command.arg0("leasehold").arg(SUPERVISE);
        if let Some(at) = kill_at {
            command
                .arg("--kill-at")
                .arg(monotonic_nanos_at(at).to_string());
        }
        command
            .arg(control_read.as_raw_fd().to_string())
            .arg(status_write.as_raw_fd().to_string())
            .arg("--")
            .args(argv)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .process_group(0);
        // A backend URL with a password stays with leasehold: the command does not inherit it.
        if std::env::var("LEASEHOLD_BACKEND").is_ok_and(|url| crate::backend::redact(&url) != url) {
            command.env_remove("LEASEHOLD_BACKEND");
        }
        let spawned = command.spawn();
        drop(control_read);
        drop(status_write);
        let mut supervisor =
            spawned.map_err(|e| CliError::Other(format!("cannot start the supervisor: {e}")))?;
        let status = tokio::task::spawn_blocking(move || {
            let mut status = String::new();
            File::from(status_read)
                .read_to_string(&mut status)
                .map(|_| status)
        })
        .await;
        match status {
            Ok(Ok(status)) if status == STARTED => Ok(Child {
                supervisor,
                control: File::from(control_write),
                kill_at,
            }),
            other => {
                let _ = supervisor.wait().await;
                Err(CliError::Other(match other {
                    Ok(Ok(message)) if !message.is_empty() => message,
                    Ok(Err(e)) => format!("cannot hear from the supervisor: {e}"),
                    _ => "the supervisor exited before it started the command".into(),
                }))
            }
        }
    }

    /// Waits for the command to exit (and everything it left behind to be killed).
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.supervisor.wait().await
    }

    fn send(&mut self, order: &[u8]) {
        if let Err(error) = self.control.write_all(order) {
            tracing::debug!(%error, "the supervisor is gone or not reading");
        }
    }

    /// Tells the supervisor to SIGKILL the tree at `at` on its own (the term's validity, less
    /// [`DEADLINE_MARGIN`]) unless told a later instant: the deadline holds even if leasehold
    /// freezes. Sends nothing when `at` is what the supervisor was last told.
    pub fn set_kill_at(&mut self, at: std::time::Instant) {
        if self.kill_at == Some(at) {
            return;
        }
        self.kill_at = Some(at);
        let mut order = [0u8; 9];
        order[0] = SET_DEADLINE;
        order[1..].copy_from_slice(&monotonic_nanos_at(at).to_be_bytes());
        self.send(&order);
    }

    /// `true` once the instant the supervisor kills the tree on its own has passed.
    pub fn past_kill_at(&self) -> bool {
        self.kill_at
            .is_some_and(|at| std::time::Instant::now() >= at)
    }

    /// SIGTERM to the command's whole tree, SIGKILL after `grace`; returns its status.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.supervisor.try_wait() {
            return Some(status);
        }
        self.send(b"T");
        match tokio::time::timeout(grace, self.supervisor.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(?grace, "the command ignored SIGTERM; sending SIGKILL");
                self.kill().await
            }
        }
    }

    /// SIGKILL to the command's whole tree at once; returns its status.
    pub async fn kill(&mut self) -> Option<ExitStatus> {
        self.send(b"K");
        self.supervisor.wait().await.ok()
    }
}

/// The exit code to pass through: the command's code, or 128 + the signal that killed it.
pub fn exit_code(status: ExitStatus) -> u8 {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => u8::try_from(code & 0xff).unwrap_or(1),
        (None, Some(signal)) => u8::try_from((128 + signal) & 0xff).unwrap_or(1),
        (None, None) => 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_map_onto_the_monotonic_clock() {
        let now = monotonic_nanos();
        let later = monotonic_nanos_at(std::time::Instant::now() + Duration::from_secs(2));
        let earlier = monotonic_nanos_at(std::time::Instant::now() - Duration::from_secs(1));
        let after = monotonic_nanos();
        assert!(later >= now + 2_000_000_000 && later <= after + 2_000_000_000);
        assert!(earlier + 1_000_000_000 >= now && earlier + 1_000_000_000 <= after);
    }
}
