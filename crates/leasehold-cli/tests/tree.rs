//! `leasehold run` ends the command's whole process tree with the term: real `leasehold`
//! processes on a real Redis server, commands that leave real grandchildren behind (in their
//! process group, in a new session, orphaned), recorded in files.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use leasehold::RedisBackend;
use leasehold_testkit::RedisServer;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::process::{Child, Command};
use tokio::time::{sleep, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_leasehold");
const TIMING: [&str; 8] = [
    "--lease-duration",
    "2s",
    "--renew-deadline",
    "1500ms",
    "--retry-period",
    "300ms",
    "--grace",
    "2s",
];

/// A command that first records (`alive PID`) every process of an earlier command's tree that
/// is still alive, then `start TOKEN PID`, then leaves three `sleep 300` behind and records
/// their pids in `pids.TOKEN`: one in its process group, one in a session of its own, one in a
/// session of its own whose parent has exited (an orphan). Then it runs until the file
/// `exit.TOKEN` appears, and exits 3.
///
/// `prelude` runs first (e.g. `trap '' TERM`).
fn tree_command(dir: &Path, prelude: &str) -> Vec<String> {
    let d = dir.display();
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "{prelude}
             for f in {d}/pids.*; do
               [ -e \"$f\" ] || continue
               for p in $(cat \"$f\"); do
                 if [ -d /proc/$p ] && ! grep -q ') Z ' /proc/$p/stat 2>/dev/null; then
                   echo \"alive $p\" >> {d}/events
                 fi
               done
             done
             echo \"start $LEASEHOLD_TOKEN $$\" >> {d}/events
             pids={d}/pids.$LEASEHOLD_TOKEN
             sleep 300 &
             echo $! >> $pids.tmp
             setsid sleep 300 &
             echo $! >> $pids.tmp
             (setsid sleep 300 & echo $! >> $pids.tmp)
             echo $$ >> $pids.tmp
             mv $pids.tmp $pids
             while [ ! -e {d}/exit.$LEASEHOLD_TOKEN ]; do sleep 0.05; done
             exit 3"
        ),
    ]
}

/// `leasehold run` with its stderr piped (see [`collect_stderr`]).
fn leasehold_run(url: &str, lock: &str, identity: &str, timing: &[&str], cmd: &[String]) -> Child {
    Command::new(BIN)
        .args([
            "run",
            "--backend",
            url,
            "--lock",
            lock,
            "--identity",
            identity,
        ])
        .args(timing)
        .arg("--")
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("leasehold run")
}

/// Collects a child's stderr into a shared string.
fn collect_stderr(child: &mut Child) -> std::sync::Arc<std::sync::Mutex<String>> {
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let mut stderr = child.stderr.take().expect("piped stderr");
    let out = seen.clone();
    tokio::spawn(async move {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            out.lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .push_str(&String::from_utf8_lossy(&buf[..n]));
        }
    });
    seen
}

fn text(seen: &std::sync::Mutex<String>) -> String {
    seen.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

fn events(dir: &Path) -> Vec<String> {
    std::fs::read_to_string(dir.join("events"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

/// The tokens of the `start` lines, in order.
fn starts(dir: &Path) -> Vec<u64> {
    events(dir)
        .iter()
        .filter_map(|l| l.strip_prefix("start "))
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect()
}

/// The pids of the tree started under `token` (the three sleeps and the command), once written.
fn tree(dir: &Path, token: u64) -> Option<Vec<i32>> {
    let all = std::fs::read_to_string(dir.join(format!("pids.{token}"))).ok()?;
    Some(all.lines().filter_map(|l| l.trim().parse().ok()).collect())
}

fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| !stat.contains(") Z "))
        .unwrap_or(false)
}

/// Waits until `n` commands started and the last one recorded its tree; returns its token and
/// tree.
async fn wait_tree(dir: &Path, n: usize, within: Duration) -> (u64, Vec<i32>) {
    let deadline = Instant::now() + within;
    loop {
        let tokens = starts(dir);
        if tokens.len() >= n {
            if let Some(pids) = tree(dir, tokens[n - 1]) {
                return (tokens[n - 1], pids);
            }
        }
        assert!(
            Instant::now() < deadline,
            "no tree {n} after {within:?}: {:?}",
            events(dir)
        );
        sleep(Duration::from_millis(20)).await;
    }
}

async fn wait_for(what: &str, within: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + within;
    while !done() {
        assert!(Instant::now() < deadline, "{what} not within {within:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

/// Kills every recorded process still alive, so a failing test leaves nothing behind.
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let Ok(entries) = std::fs::read_dir(&self.0) else {
            return;
        };
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with("pids.") {
                let pids = std::fs::read_to_string(entry.path()).unwrap_or_default();
                for pid in pids.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                    let _ = std::process::Command::new("kill")
                        .args(["-KILL", &pid.to_string()])
                        .stderr(Stdio::null())
                        .status();
                }
            }
        }
    }
}

/// Deletes `lock`'s key on the server, as an operator would (`DEL`), over plain RESP.
async fn delete_lock(server: &RedisServer, lock: &str) {
    let key = RedisBackend::from_url(&server.url())
        .expect("redis url")
        .keys(lock)
        .lock;
    let mut stream = tokio::net::TcpStream::connect(server.addr())
        .await
        .expect("connect to redis");
    let command = format!("*2\r\n$3\r\nDEL\r\n${}\r\n{key}\r\n", key.len());
    stream.write_all(command.as_bytes()).await.expect("DEL");
    let mut reply = [0u8; 16];
    let n = stream.read(&mut reply).await.expect("DEL reply");
    assert_eq!(&reply[..n], b":1\r\n", "the lock key {key} was not there");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_of_the_leader_kills_its_whole_tree_before_the_next_command() {
    let server = RedisServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let cmd = tree_command(dir.path(), "");
    let mut a = leasehold_run(&url, "tree-kill", "a", &TIMING, &cmd);
    let a_err = collect_stderr(&mut a);
    let (_, first) = wait_tree(dir.path(), 1, Duration::from_secs(20)).await;
    let mut b = leasehold_run(&url, "tree-kill", "b", &TIMING, &cmd);
    let b_err = collect_stderr(&mut b);
    wait_for("b campaigning", Duration::from_secs(10), || {
        text(&b_err).contains("campaigns")
    })
    .await;

    a.start_kill().expect("SIGKILL the leader");
    let _ = a.wait().await;
    // b takes over once a's lease expired; its command records any process of a's tree alive.
    wait_tree(dir.path(), 2, Duration::from_secs(30)).await;
    let all = events(dir.path());
    assert!(
        !all.iter().any(|l| l.starts_with("alive ")),
        "the next leader's command started beside the killed leader's tree {first:?}: {all:?}\n\
         a: {}",
        text(&a_err)
    );
    for pid in &first {
        assert!(
            !alive(*pid),
            "{pid} of {first:?} outlived its SIGKILLed leasehold"
        );
    }

    if let Some(pid) = b.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), b.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftovers_of_an_exited_command_die_before_the_release() {
    let server = RedisServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let cmd = tree_command(dir.path(), "");
    let mut a = leasehold_run(&url, "tree-exit", "a", &TIMING, &cmd);
    let a_err = collect_stderr(&mut a);
    let (token, first) = wait_tree(dir.path(), 1, Duration::from_secs(20)).await;
    let mut b = leasehold_run(&url, "tree-exit", "b", &TIMING, &cmd);
    let b_err = collect_stderr(&mut b);
    wait_for("b campaigning", Duration::from_secs(10), || {
        text(&b_err).contains("campaigns")
    })
    .await;

    // a's command exits on its own, leaving its three sleeps behind.
    std::fs::write(dir.path().join(format!("exit.{token}")), "").expect("exit file");
    let status = tokio::time::timeout(Duration::from_secs(20), a.wait())
        .await
        .expect("a exits after its command")
        .expect("a's status");
    assert_eq!(status.code(), Some(3), "{}", text(&a_err));
    // a released the lock before it exited: everything its command left had to be gone by then.
    for pid in &first {
        assert!(
            !alive(*pid),
            "{pid} of {first:?} outlived the term (a exited with the lock released)"
        );
    }
    wait_tree(dir.path(), 2, Duration::from_secs(20)).await;
    let all = events(dir.path());
    assert!(
        !all.iter().any(|l| l.starts_with("alive ")),
        "the next leader's command started beside the exited command's leftovers: {all:?}"
    );

    if let Some(pid) = b.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), b.wait()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_term_kills_the_tree_at_once_without_the_grace() {
    let server = RedisServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    // A long lease and a long grace: only an immediate SIGKILL ends the command soon.
    let timing = [
        "--lease-duration",
        "90s",
        "--renew-deadline",
        "60s",
        "--retry-period",
        "300ms",
        "--grace",
        "90s",
    ];
    let cmd = tree_command(dir.path(), "trap '' TERM");
    let mut a = leasehold_run(&url, "tree-lost", "a", &timing, &cmd);
    let a_err = collect_stderr(&mut a);
    let (_, first) = wait_tree(dir.path(), 1, Duration::from_secs(20)).await;

    // The lock disappears: the next renew reports the term lost; someone else may lead now.
    delete_lock(&server, "tree-lost").await;
    let status = tokio::time::timeout(Duration::from_secs(30), a.wait())
        .await
        .unwrap_or_else(|_| {
            panic!(
                "the command was not killed at once after the loss: {}",
                text(&a_err)
            )
        })
        .expect("a's status");
    assert_eq!(status.code(), Some(6), "{}", text(&a_err));
    for pid in &first {
        assert!(!alive(*pid), "{pid} of {first:?} outlived the lost term");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renew_deadline_step_down_ends_the_tree_by_the_terms_validity() {
    let server = RedisServer::start().await;
    let proxy = leasehold_testkit::proxy::Proxy::start(server.addr())
        .await
        .expect("proxy");
    let url = format!("redis://{}/0", proxy.addr());
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    // The grace is far longer than the lease: the term's validity must cut it short.
    let timing = [
        "--lease-duration",
        "6s",
        "--renew-deadline",
        "4s",
        "--retry-period",
        "300ms",
        "--grace",
        "90s",
    ];
    let cmd = tree_command(dir.path(), "trap '' TERM");
    let mut a = leasehold_run(&url, "tree-deadline", "a", &timing, &cmd);
    let a_err = collect_stderr(&mut a);
    let (_, first) = wait_tree(dir.path(), 1, Duration::from_secs(20)).await;

    // Renewals hang: a steps down at its renew deadline, still valid for up to 2 s more.
    proxy.partition();
    let status = tokio::time::timeout(Duration::from_secs(40), a.wait())
        .await
        .unwrap_or_else(|_| panic!("the grace outlived the term: {}", text(&a_err)))
        .expect("a's status");
    assert_eq!(status.code(), Some(6), "{}", text(&a_err));
    let log = text(&a_err);
    assert!(
        log.contains("leadership ended; stopping the command (SIGTERM, SIGKILL after"),
        "a step-down with validity left gets SIGTERM first: {log}"
    );
    for pid in &first {
        assert!(!alive(*pid), "{pid} of {first:?} outlived the term");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_leaders_tree_dies_by_its_deadline_before_the_next_command() {
    let server = RedisServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let _cleanup = Cleanup(dir.path().to_path_buf());
    let cmd = tree_command(dir.path(), "");
    let mut a = leasehold_run(&url, "tree-frozen", "a", &TIMING, &cmd);
    let a_err = collect_stderr(&mut a);
    let (_, first) = wait_tree(dir.path(), 1, Duration::from_secs(20)).await;
    let mut b = leasehold_run(&url, "tree-frozen", "b", &TIMING, &cmd);
    let b_err = collect_stderr(&mut b);
    wait_for("b campaigning", Duration::from_secs(10), || {
        text(&b_err).contains("campaigns")
    })
    .await;

    // a freezes (SIGSTOP: a VM pause, a debugger, a stuck cgroup): it can neither renew nor
    // stop its command. Its lease expires and b takes over; a's tree must be gone by then.
    let a_pid = a.id().expect("a's pid").to_string();
    let signal = |signal: &'static str| {
        let pid = a_pid.clone();
        async move {
            let _ = Command::new("kill").args([signal, &pid]).status().await;
        }
    };
    signal("-STOP").await;
    let waited = tokio::time::timeout(
        Duration::from_secs(30),
        wait_tree(dir.path(), 2, Duration::from_secs(30)),
    )
    .await;
    let all = events(dir.path());
    let leftovers: Vec<i32> = first.iter().copied().filter(|p| alive(*p)).collect();
    signal("-CONT").await;
    assert!(waited.is_ok(), "b never started its command: {all:?}");
    assert!(
        !all.iter().any(|l| l.starts_with("alive ")),
        "the next leader's command started beside the frozen leader's tree {first:?}: {all:?}"
    );
    assert!(
        leftovers.is_empty(),
        "{leftovers:?} of {first:?} outlived the frozen leader's term"
    );

    // Thawed, a finds its term over and its command gone: leadership was lost (exit 6).
    let status = tokio::time::timeout(Duration::from_secs(20), a.wait())
        .await
        .unwrap_or_else(|_| panic!("a did not exit after SIGCONT: {}", text(&a_err)))
        .expect("a's status");
    assert_eq!(status.code(), Some(6), "{}", text(&a_err));
    assert!(
        text(&a_err).contains("leasehold supervisor: the term's validity ends"),
        "the supervisor, not the thawed leasehold, killed the command: {}",
        text(&a_err)
    );

    if let Some(pid) = b.id() {
        let _ = Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(20), b.wait()).await;
}
