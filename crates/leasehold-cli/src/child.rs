//! The supervised command: its own process group, killed if leasehold dies, stopped with
//! SIGTERM then SIGKILL.

use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;

use crate::error::CliError;

/// A running command.
pub struct Child {
    inner: tokio::process::Child,
    group: Option<Pid>,
}

/// Makes the child get SIGKILL when leasehold dies (even by SIGKILL), so a command never outlives
/// the leadership it was started under.
///
/// This is the crate's one `unsafe` block: `pre_exec` is unsafe because its closure runs in the
/// forked child before `exec`, where only async-signal-safe calls are allowed.
#[allow(unsafe_code)]
fn die_with_parent(command: &mut Command) {
    // SAFETY: the closure only calls prctl(2) through nix (no allocation, no lock): it is
    // async-signal-safe.
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

impl Child {
    /// Starts `argv` with `env` added, in a new process group, inheriting stdio.
    ///
    /// # Errors
    ///
    /// [`CliError::Other`] when the program cannot be started (not found, not executable).
    pub fn spawn(argv: &[String], env: &[(&str, String)]) -> Result<Child, CliError> {
        let Some((program, args)) = argv.split_first() else {
            return Err(CliError::Other("no command given after --".into()));
        };
        let mut command = Command::new(program);
        command
            .args(args)
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .process_group(0)
            .kill_on_drop(true);
        die_with_parent(&mut command);
        let inner = command
            .spawn()
            .map_err(|e| CliError::Other(format!("cannot start {program:?}: {e}")))?;
        let group = inner
            .id()
            .and_then(|id| i32::try_from(id).ok())
            .map(Pid::from_raw);
        Ok(Child { inner, group })
    }

    /// Waits for the command to exit.
    ///
    /// # Cancel safety
    ///
    /// Cancel safe.
    pub async fn wait(&mut self) -> std::io::Result<ExitStatus> {
        self.inner.wait().await
    }

    /// SIGTERM to the command's process group, SIGKILL after `grace`; returns its status.
    pub async fn stop(&mut self, grace: Duration) -> Option<ExitStatus> {
        if let Ok(Some(status)) = self.inner.try_wait() {
            return Some(status);
        }
        self.signal(Signal::SIGTERM);
        match tokio::time::timeout(grace, self.inner.wait()).await {
            Ok(status) => status.ok(),
            Err(_) => {
                tracing::warn!(?grace, "the command ignored SIGTERM; sending SIGKILL");
                self.signal(Signal::SIGKILL);
                self.inner.wait().await.ok()
            }
        }
    }

    fn signal(&self, signal: Signal) {
        if let Some(group) = self.group {
            if let Err(error) = killpg(group, signal) {
                tracing::debug!(%error, ?signal, "signal to the command's process group failed");
            }
        }
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
