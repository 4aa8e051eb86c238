//! The supervised command, as leasehold sees it: a [supervisor](crate::supervisor) process
//! (leasehold re-executed) that runs the command and ends its whole process tree — when the
//! command exits, when asked, and when leasehold dies.

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

/// A running command, behind its supervisor.
pub struct Child {
    supervisor: tokio::process::Child,
    /// The write end of the control pipe: `T` = SIGTERM the tree, `K` = SIGKILL it. Closing it
    /// (leasehold exits or dies) makes the supervisor SIGKILL the tree.
    control: File,
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
    /// inheriting stdio; returns once the command has started.
    ///
    /// # Errors
    ///
    /// [`CliError::Other`] when the program cannot be started (not found, not executable).
    pub async fn spawn(argv: &[String], env: &[(&str, String)]) -> Result<Child, CliError> {
        if argv.is_empty() {
            return Err(CliError::Other("no command given after --".into()));
        }
        let (control_read, control_write) = pipe()?;
        let (status_read, status_write) = pipe()?;
        inheritable(&control_read)?;
        inheritable(&status_write)?;
        // /proc/self/exe: this very binary, even if it was replaced on disk since it started.
        let mut command = Command::new("/proc/self/exe");
        command
            .arg0("leasehold")
            .arg(SUPERVISE)
            .arg(control_read.as_raw_fd().to_string())
            .arg(status_write.as_raw_fd().to_string())
            .arg("--")
            .args(argv)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .process_group(0);
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

    fn send(&mut self, order: u8) {
        if let Err(error) = self.control.write_all(&[order]) {
            tracing::debug!(%error, "the supervisor is gone");
        }
    }

    /// SIGTERM to the command's whole tree, SIGKILL after `grace`; returns its status.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.supervisor.try_wait() {
            return Some(status);
        }
        self.send(b'T');
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
        self.send(b'K');
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
