//! What every real-server harness needs from the operating system: free loopback ports, server
//! child processes (killed on drop, also on panic), waiting for one to become ready, and the
//! binaries the `scripts/build-*` scripts build and cache.

use std::future::Future;
use std::net::TcpListener;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};

/// A free TCP port on 127.0.0.1 (bound and released; the small race is acceptable in tests).
///
/// # Panics
///
/// When no port can be bound.
pub fn free_port() -> u16 {
    // Below the kernel's ephemeral range (32768 and up by default): a port the kernel hands
    // out (port 0) is free now, but the next outgoing connection of any test may take it
    // before the server binds it, and the server then fails to start. Ports below the range
    // are never taken so; each process walks them from its own start.
    const LOW: u32 = 10_000;
    const HIGH: u32 = 32_000;
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let _ = NEXT.compare_exchange(
        0,
        LOW + (std::process::id().wrapping_mul(7919) % (HIGH - LOW)),
        std::sync::atomic::Ordering::SeqCst,
        std::sync::atomic::Ordering::SeqCst,
    );
    for _ in 0..(HIGH - LOW) {
        let next = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let port = LOW + (next - LOW) % (HIGH - LOW);
        let Ok(port) = u16::try_from(port) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

/// A server's child process, or none while it is stopped. Killed when dropped.
#[derive(Debug, Default)]
pub struct ServerProcess {
    // A mutex only so that [`exited`](Self::exited) can look from a shared reference, e.g. in
    // the readiness check of a [`wait_ready`] loop.
    child: Mutex<Option<Child>>,
}

impl ServerProcess {
    /// Starts `command` (killed on drop) in place of any process this holds.
    ///
    /// # Panics
    ///
    /// When the program cannot be started; `install_hint` says how to get it.
    pub fn spawn(&self, command: &mut Command, install_hint: &str) {
        let program = command
            .as_std()
            .get_program()
            .to_string_lossy()
            .into_owned();
        let child = command
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program} ({e}); {install_hint}"));
        *self.lock() = Some(child);
    }

    /// Kills the process (SIGKILL: no shutdown) and waits for it to exit. Does nothing when
    /// it is not running.
    pub async fn kill(&self) {
        let child = self.lock().take();
        if let Some(mut child) = child {
            let _ = child.kill().await;
        }
    }

    /// The process id while it runs (to send it SIGSTOP/SIGCONT).
    pub fn pid(&self) -> Option<u32> {
        self.lock().as_ref().and_then(Child::id)
    }

    /// How the process exited, if it did.
    pub fn exited(&self) -> Option<std::process::ExitStatus> {
        self.lock()
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Child>> {
        self.child.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// Calls `ready` every `every` until it returns `Ok`, and returns that; gives up after
/// `within`.
///
/// # Panics
///
/// After `within`, with `what` and the last error.
pub async fn wait_ready<T, E, F, Fut>(
    what: &str,
    within: Duration,
    every: Duration,
    mut ready: F,
) -> T
where
    E: std::fmt::Display,
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match ready().await {
            Ok(value) => return value,
            Err(e) => assert!(
                Instant::now() < deadline,
                "{what} is not ready after {within:?}: {e}"
            ),
        }
        sleep(every).await;
    }
}

/// A binary built and cached by one of the `scripts/build-*` scripts: `$env_var` when set, else
/// the last line the script prints (it builds once and caches).
///
/// # Panics
///
/// When the script fails.
pub(crate) async fn built_binary(env_var: &str, script: &str) -> std::path::PathBuf {
    use std::path::{Path, PathBuf};
    use std::process::Stdio;

    if let Some(path) = std::env::var_os(env_var) {
        return PathBuf::from(path);
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../scripts")
        .join(script);
    let output = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    assert!(output.status.success(), "{} failed", script.display());
    let stdout = String::from_utf8_lossy(&output.stdout);
    let path = stdout.lines().last().unwrap_or_default().trim().to_owned();
    assert!(!path.is_empty(), "{} printed no path", script.display());
    PathBuf::from(path)
}
