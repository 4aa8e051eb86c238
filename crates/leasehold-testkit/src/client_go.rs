//! A real client-go `leaderelection` program (tests/client-go-elector), run as a child process,
//! for interop tests on one Lease.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::harness::Timing;

/// The client-go elector binary: `$LEASEHOLD_CLIENT_GO_ELECTOR`, else what
/// `scripts/build-client-go-elector` prints (it builds once per source change and caches).
pub async fn client_go_elector_binary() -> PathBuf {
    crate::process::built_binary("LEASEHOLD_CLIENT_GO_ELECTOR", "build-client-go-elector").await
}

/// One line the Go program printed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GoEvent {
    /// `OnStartedLeading`, at this wall-clock time.
    Started(SystemTime),
    /// `OnStoppedLeading` after a term (`was_leading`), at this time.
    Stopped(SystemTime),
    /// `OnNewLeader` with this identity.
    NewLeader(String),
    /// The program is exiting.
    Exit,
}

/// A running client-go elector.
#[derive(Debug)]
pub struct GoElector {
    /// Its identity.
    pub identity: String,
    child: Child,
    events: Arc<Mutex<Vec<GoEvent>>>,
}

impl GoElector {
    /// Starts `binary` on Lease `lock` with `kubeconfig` and `timing`.
    ///
    /// # Panics
    ///
    /// When the program cannot start.
    pub fn start(
        binary: &Path,
        kubeconfig: &Path,
        lock: &str,
        identity: &str,
        timing: Timing,
    ) -> GoElector {
        Self::start_with(binary, kubeconfig, lock, identity, timing, &[])
    }

    /// [`start`](Self::start) with `extra` flags appended (e.g. `--release-on-cancel=false`;
    /// tests/client-go-elector/README.md lists them).
    ///
    /// # Panics
    ///
    /// When the program cannot start.
    pub fn start_with(
        binary: &Path,
        kubeconfig: &Path,
        lock: &str,
        identity: &str,
        timing: Timing,
        extra: &[&str],
    ) -> GoElector {
        let fmt = |d: Duration| format!("{}ms", d.as_millis());
        let mut child = Command::new(binary)
            .arg("--kubeconfig")
            .arg(kubeconfig)
            .args(["--name", lock, "--identity", identity])
            .args(["--lease-duration", &fmt(timing.lease_duration)])
            .args(["--renew-deadline", &fmt(timing.renew_deadline)])
            .args(["--retry-period", &fmt(timing.retry_period)])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {}: {e}", binary.display()));
        let events = Arc::new(Mutex::new(Vec::new()));
        if let Some(stdout) = child.stdout.take() {
            let events = events.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if let Some(event) = parse(&line) {
                        events
                            .lock()
                            .unwrap_or_else(PoisonError::into_inner)
                            .push(event);
                    }
                }
            });
        }
        GoElector {
            identity: identity.to_owned(),
            child,
            events,
        }
    }

    /// Every event so far.
    pub fn events(&self) -> Vec<GoEvent> {
        self.events
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// `true` while its latest term has started and not stopped.
    pub fn is_leading(&self) -> bool {
        let events = self.events();
        let started = events
            .iter()
            .rposition(|e| matches!(e, GoEvent::Started(_)));
        let stopped = events
            .iter()
            .rposition(|e| matches!(e, GoEvent::Stopped(_)));
        match (started, stopped) {
            (Some(s), Some(t)) => s > t,
            (Some(_), None) => true,
            _ => false,
        }
    }

    /// The leader it last reported.
    pub fn leader(&self) -> Option<String> {
        self.events().into_iter().rev().find_map(|e| match e {
            GoEvent::NewLeader(id) => Some(id),
            _ => None,
        })
    }

    /// Its leadership intervals on the wall clock (an open one ends at `now`).
    pub fn intervals(&self) -> Vec<(SystemTime, SystemTime)> {
        let mut out = Vec::new();
        let mut open = None;
        for event in self.events() {
            match event {
                GoEvent::Started(at) => open = Some(at),
                GoEvent::Stopped(at) => {
                    if let Some(start) = open.take() {
                        out.push((start, at));
                    }
                }
                _ => {}
            }
        }
        if let Some(start) = open {
            out.push((start, SystemTime::now()));
        }
        out
    }

    /// SIGTERM, as a pod being stopped: client-go cancels its context and, with
    /// release-on-cancel, releases the Lease; then waits for the exit.
    pub async fn terminate(&mut self) {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status()
                .await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(15), self.child.wait()).await;
        let _ = self.child.start_kill();
        // Let the reader task take the last lines.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    /// SIGKILL, as a crashed process: nothing is released (the Lease stays held until it
    /// expires); waits for the exit.
    pub async fn kill(&mut self) {
        let _ = self.child.kill().await;
    }
}

fn parse(line: &str) -> Option<GoEvent> {
    let value: serde_json::Value = serde_json::from_str(line).ok()?;
    let at = value
        .get("at_unix_nano")
        .and_then(serde_json::Value::as_u64)
        .map(|n| UNIX_EPOCH + Duration::from_nanos(n))?;
    match value.get("event")?.as_str()? {
        "started" => Some(GoEvent::Started(at)),
        "stopped"
            if value
                .get("was_leading")
                .and_then(serde_json::Value::as_bool)
                == Some(true) =>
        {
            Some(GoEvent::Stopped(at))
        }
        "new_leader" => Some(GoEvent::NewLeader(
            value.get("leader")?.as_str()?.to_owned(),
        )),
        "exit" => Some(GoEvent::Exit),
        _ => None,
    }
}
