//! The `leasehold` binary as users run it: real processes against real Redis, etcd and
//! PostgreSQL servers.

use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leasehold_testkit::{free_port, EtcdServer, PostgresServer, RedisServer};
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

/// A command that appends `start TOKEN PID NANOS` when it starts and `stop TOKEN PID NANOS` when
/// it gets SIGTERM, and otherwise runs for ever.
fn worker(out: &Path) -> Vec<String> {
    stopping_after(out, "")
}

/// [`worker`] that takes 300 ms to stop after SIGTERM.
fn slow_worker(out: &Path) -> Vec<String> {
    stopping_after(out, "sleep 0.3; ")
}

/// [`worker`], running `before_stop` (shell) between SIGTERM and its `stop` line.
fn stopping_after(out: &Path, before_stop: &str) -> Vec<String> {
    let o = out.display();
    vec![
        "sh".into(),
        "-c".into(),
        format!(
            "echo \"start $LEASEHOLD_TOKEN $$ $(date +%s%N)\" >> {o}; \
             trap '{before_stop}echo \"stop $LEASEHOLD_TOKEN $$ $(date +%s%N)\" >> {o}; exit 0' TERM; \
             while :; do sleep 0.05; done"
        ),
    ]
}

fn leasehold_run(backend: &str, lock: &str, identity: &str, cmd: &[String]) -> Child {
    Command::new(BIN)
        .args([
            "run",
            "--backend",
            backend,
            "--lock",
            lock,
            "--identity",
            identity,
        ])
        .args(TIMING)
        .arg("--")
        .args(cmd)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("leasehold run")
}

async fn leasehold(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .await
        .expect("leasehold")
}

#[derive(Debug, Clone, PartialEq)]
struct Line {
    start: bool,
    token: u64,
    pid: i32,
    at: u128,
}

fn lines(out: &Path) -> Vec<Line> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let kind = f.next()?;
            Some(Line {
                start: kind == "start",
                token: f.next()?.parse().ok()?,
                pid: f.next()?.parse().ok()?,
                at: f.next()?.parse().ok()?,
            })
        })
        .collect()
}

fn alive(pid: i32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .unwrap_or_default()
            .contains(") Z ")
}

/// The parent of a pid.
fn parent_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(") ")?.1;
    after.split_whitespace().nth(1)?.parse().ok()
}

/// The leasehold that runs a command: the parent of the command's supervisor.
fn leasehold_of(command: i32) -> Option<u32> {
    parent_of(parent_of(command)?)?.try_into().ok()
}

async fn wait_lines(out: &Path, starts: usize, within: Duration) -> Vec<Line> {
    let deadline = Instant::now() + within;
    loop {
        let all = lines(out);
        if all.iter().filter(|l| l.start).count() >= starts {
            return all;
        }
        assert!(Instant::now() < deadline, "only {all:?} after {within:?}");
        sleep(Duration::from_millis(20)).await;
    }
}

fn now_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Checks the file: tokens strictly increase, and each start comes after the previous child
/// stopped (a stop line, or its death when its leasehold was killed, recorded in `deaths`).
fn check_never_two(all: &[Line], deaths: &[(i32, u128)]) {
    let starts: Vec<&Line> = all.iter().filter(|l| l.start).collect();
    for pair in starts.windows(2) {
        let (before, next) = (pair[0], pair[1]);
        assert!(next.token > before.token, "tokens must increase: {all:?}");
        let stopped = all
            .iter()
            .find(|l| !l.start && l.pid == before.pid)
            .map(|l| l.at)
            .or_else(|| deaths.iter().find(|d| d.0 == before.pid).map(|d| d.1))
            .unwrap_or_else(|| panic!("child {} never stopped: {all:?}", before.pid));
        assert!(
            stopped <= next.at,
            "two children at once: {} ran until {stopped}, {} started at {}",
            before.pid,
            next.pid,
            next.at
        );
    }
}

async fn kill(pid: u32, signal: &str) {
    let _ = Command::new("kill")
        .args([signal, &pid.to_string()])
        .status()
        .await;
}

async fn scenario(backend: &str, dir: &Path) {
    let out = dir.join("events");
    let cmd = worker(&out);
    let lock = format!("cli-{}", std::process::id());
    let mut runs: Vec<Child> = ["a", "b", "c"]
        .iter()
        .map(|id| leasehold_run(backend, &lock, id, &cmd))
        .collect();

    // One child starts.
    let all = wait_lines(&out, 1, Duration::from_secs(20)).await;
    sleep(Duration::from_secs(1)).await;
    assert_eq!(
        lines(&out).iter().filter(|l| l.start).count(),
        1,
        "two children started"
    );
    let first = all[0].clone();

    // SIGTERM to its leasehold: the child is stopped, the lock released, another starts fast.
    let leader = leasehold_of(first.pid).expect("leader pid");
    let signalled = now_nanos();
    kill(leader, "-TERM").await;
    let all = wait_lines(&out, 2, Duration::from_secs(10)).await;
    let second = all
        .iter()
        .filter(|l| l.start)
        .nth(1)
        .expect("second")
        .clone();
    let handover = Duration::from_nanos(u64::try_from(second.at - signalled).unwrap_or(0));
    assert!(
        handover < Duration::from_secs(1),
        "graceful handover took {handover:?}: it should not wait for expiry"
    );

    // SIGKILL to the next leasehold: its child dies with it; another starts after the expiry.
    let leader = leasehold_of(second.pid).expect("leader pid");
    let killed = now_nanos();
    kill(leader, "-KILL").await;
    let all = wait_lines(&out, 3, Duration::from_secs(20)).await;
    assert!(
        !alive(second.pid),
        "the child outlived its killed leasehold"
    );
    let third = all
        .iter()
        .filter(|l| l.start)
        .nth(2)
        .expect("third")
        .clone();
    let failover = Duration::from_nanos(u64::try_from(third.at - killed).unwrap_or(0));
    assert!(
        failover >= Duration::from_millis(1000),
        "failover after a crash took only {failover:?}: it must wait for the lease to expire"
    );
    check_never_two(&all, &[(second.pid, killed)]);

    for run in &mut runs {
        if let Some(pid) = run.id() {
            kill(pid, "-TERM").await;
        }
    }
    for run in &mut runs {
        let _ = tokio::time::timeout(Duration::from_secs(10), run.wait()).await;
    }
    check_never_two(&lines(&out), &[(second.pid, killed)]);
    eprintln!("{backend}: handover {handover:?}, failover {failover:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_redis_never_overlap() {
    let server = RedisServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(&server.url(), dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_postgres_never_overlap() {
    let server = PostgresServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    scenario(&server.url(), dir.path()).await;
}

/// `postgresql://` is accepted too; a wrong password is a clear, fatal error (exit code of
/// an unauthorized backend), without the password in the message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_urls_and_bad_passwords_are_clear() {
    let server = PostgresServer::start_with_password("s3cret").await;
    let addr = server.addr();
    let good = format!("postgresql://leasehold:s3cret@{addr}/postgres?sslmode=disable");
    let out = leasehold(&["status", "--backend", &good, "--lock", "pg-status"]).await;
    assert!(
        out.status.success(),
        "status on postgresql://: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let bad = format!("postgres://leasehold:wrong@{addr}/postgres?sslmode=disable");
    let out = leasehold(&["status", "--backend", &bad, "--lock", "pg-status"]).await;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(5), "unauthorized: {stderr}");
    assert!(!stderr.contains("wrong"), "the password leaked: {stderr}");
    assert!(stderr.contains("password"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runs_on_etcd_never_overlap() {
    let server = EtcdServer::start().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let url = format!("etcd://{}", server.addr());
    scenario(&url, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn exit_code_passes_through_and_the_lock_is_released() {
    let server = RedisServer::start().await;
    let url = server.url();
    let status = Command::new(BIN)
        .args(["run", "--backend", &url, "--lock", "exit-code"])
        .args(TIMING)
        .args(["--", "sh", "-c", "test -n \"$LEASEHOLD_TOKEN\" && exit 7"])
        .status()
        .await
        .expect("run");
    assert_eq!(status.code(), Some(7));
    let out = leasehold(&["status", "--backend", &url, "--lock", "exit-code", "--json"]).await;
    assert!(out.status.success());
    let json: serde_json::Value =
        serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(json["state"], "free", "{json}");
    // A command that cannot start.
    let status = Command::new(BIN)
        .args([
            "run",
            "--backend",
            &url,
            "--lock",
            "nope",
            "--",
            "/no/such/program",
        ])
        .stderr(Stdio::null())
        .status()
        .await
        .expect("run");
    assert_eq!(status.code(), Some(1));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_and_watch_report_the_leader() {
    let server = RedisServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("events");
    let mut watch = Command::new(BIN)
        .args(["watch", "--backend", &url, "--lock", "observed", "--json"])
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("watch");
    // Collect the watch's lines as they come, and start the leader only once the watch has
    // reported the free lock (otherwise a slow start would miss it).
    let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let stdout = watch.stdout.take().expect("piped stdout");
    let reader = {
        let seen = seen.clone();
        tokio::spawn(async move {
            use tokio::io::AsyncBufReadExt;
            let mut lines = tokio::io::BufReader::new(stdout).lines();
            while let Ok(Some(line)) = lines.next_line().await {
                let mut all = seen
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                all.push_str(&line);
                all.push('\n');
            }
        })
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while seen.lock().map(|s| s.is_empty()).unwrap_or(true) {
        assert!(Instant::now() < deadline, "watch printed nothing");
        sleep(Duration::from_millis(20)).await;
    }
    let mut run = leasehold_run(&url, "observed", "pod-7", &worker(&out));
    wait_lines(&out, 1, Duration::from_secs(10)).await;
    let status = leasehold(&["status", "--backend", &url, "--lock", "observed", "--json"]).await;
    let json: serde_json::Value = serde_json::from_slice(&status.stdout).expect("json");
    assert_eq!(json["holder"], "pod-7", "{json}");
    assert_eq!(json["state"], "held");
    assert!(json["token"].as_u64().is_some());
    let human = leasehold(&["status", "--backend", &url, "--lock", "observed"]).await;
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(
        text.contains("holder:      pod-7") && text.contains("held"),
        "{text}"
    );

    if let Some(pid) = run.id() {
        kill(pid, "-TERM").await;
    }
    let _ = run.wait().await;
    sleep(Duration::from_millis(500)).await;
    if let Some(pid) = watch.id() {
        kill(pid, "-INT").await;
    }
    tokio::time::timeout(Duration::from_secs(10), watch.wait())
        .await
        .expect("watch exits on SIGINT")
        .expect("status");
    let _ = reader.await;
    let text = seen.lock().map(|s| s.clone()).unwrap_or_default();
    let leaders: Vec<serde_json::Value> = text
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .map(|v: serde_json::Value| v["leader"].clone())
        .collect();
    assert_eq!(
        leaders,
        vec![
            serde_json::Value::Null,
            "pod-7".into(),
            serde_json::Value::Null
        ],
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_urls_and_unreachable_backends_are_clear() {
    let out = leasehold(&["status", "--backend", "localhost:6379", "--lock", "x"]).await;
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    for form in ["memory://", "redis://", "etcd://", "kube://NAMESPACE"] {
        assert!(err.contains(form), "{err}");
    }
    let port = free_port();
    for backend in [
        format!("redis://127.0.0.1:{port}/"),
        format!("etcd://127.0.0.1:{port}"),
    ] {
        let started = Instant::now();
        let out = leasehold(&[
            "run",
            "--backend",
            &backend,
            "--lock",
            "x",
            "--connect-timeout",
            "1s",
            "--",
            "true",
        ])
        .await;
        assert_eq!(out.status.code(), Some(4), "{backend}: {:?}", out);
        assert!(started.elapsed() < Duration::from_secs(10));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("cannot reach"), "{err}");
    }
    let out = leasehold(&[
        "run",
        "--backend",
        "memory://",
        "--lock",
        "x",
        "--lease-duration",
        "1s",
        "--",
        "true",
    ])
    .await;
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("renew_deadline"));
    let help = leasehold(&["run", "--help"]).await;
    assert!(String::from_utf8_lossy(&help.stdout).contains("EXIT CODES"));
    let _ = PathBuf::new();
}

async fn http_get(port: u16, path: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .await
        .expect("write");
    let mut response = String::new();
    stream.read_to_string(&mut response).await.expect("read");
    response
}

/// The metrics page at `port` once it shows `lock` led, waiting up to `within`; fails with
/// `failure` otherwise.
async fn leading_metrics(port: u16, lock: &str, within: Duration, failure: &str) -> String {
    let deadline = Instant::now() + within;
    let leading = format!("leader_election_master_status{{name=\"{lock}\"}} 1");
    loop {
        if tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_ok()
        {
            let body = http_get(port, "/metrics").await;
            if body.contains(&leading) {
                return body;
            }
        }
        assert!(Instant::now() < deadline, "{failure}");
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_and_healthz_answer_on_loopback() {
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut run = Command::new(BIN)
        .args([
            "run",
            "--backend",
            "memory://",
            "--lock",
            "served",
            "--metrics-addr",
            &addr,
        ])
        .args(TIMING)
        .args(["--", "sleep", "30"])
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("run");
    let metrics = leading_metrics(
        port,
        "served",
        Duration::from_secs(10),
        "no metrics endpoint",
    )
    .await;
    assert!(metrics.starts_with("HTTP/1.0 200") || metrics.starts_with("HTTP/1.1 200"));
    assert!(
        metrics.contains("leasehold_terms_started_total{name=\"served\"} 1"),
        "{metrics}"
    );
    let health = http_get(port, "/healthz").await;
    assert!(health.contains(" 200 "), "{health}");
    assert!(health.contains("leading (term 1"), "{health}");
    if let Some(pid) = run.id() {
        kill(pid, "-TERM").await;
    }
    let _ = run.wait().await;
}

/// `leasehold transfer` moves leadership between two `leasehold run` processes: the old
/// leader's command has stopped before the target's starts, the target's token is greater,
/// and a transfer to nobody's identity reports that the target did not take over (exit 7).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transfer_moves_leadership_between_processes() {
    let server = RedisServer::start().await;
    let url = server.url();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = dir.path().join("events");
    // pod-1's command takes 300 ms to stop: pod-3's must still start after it.
    let mut first = leasehold_run(&url, "moved", "pod-1", &slow_worker(&out));
    wait_lines(&out, 1, Duration::from_secs(10)).await;
    let mut second = leasehold_run(&url, "moved", "pod-2", &worker(&out));
    let mut third = leasehold_run(&url, "moved", "pod-3", &worker(&out));
    // Both follow pod-1 before the request (a follower that has not started yet would be
    // reserved for all the same, but the test wants the hand-over, not a start race).
    sleep(Duration::from_millis(800)).await;
    let moved = leasehold(&[
        "transfer",
        "--backend",
        &url,
        "--lock",
        "moved",
        "--to",
        "pod-3",
        "--json",
    ])
    .await;
    let stderr = String::from_utf8_lossy(&moved.stderr);
    assert!(moved.status.success(), "transfer failed: {stderr}");
    let json: serde_json::Value = serde_json::from_slice(&moved.stdout).expect("json");
    assert_eq!(json["leader"], "pod-3", "{json}");
    let all = wait_lines(&out, 2, Duration::from_secs(10)).await;
    let starts: Vec<&Line> = all.iter().filter(|l| l.start).collect();
    let stop = all
        .iter()
        .find(|l| !l.start && l.token == starts[0].token)
        .expect("pod-1's command was stopped");
    assert!(
        stop.at <= starts[1].at,
        "pod-3's command started before pod-1's stopped: {all:?}"
    );
    assert!(starts[1].token > starts[0].token, "{all:?}");
    assert_eq!(json["token"].as_u64(), Some(starts[1].token), "{json}");

    let nobody = leasehold(&[
        "transfer",
        "--backend",
        &url,
        "--lock",
        "moved",
        "--to",
        "pod-9",
        "--timeout",
        "1s",
    ])
    .await;
    assert_eq!(
        nobody.status.code(),
        Some(7),
        "{}",
        String::from_utf8_lossy(&nobody.stderr)
    );
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(stderr.contains("pod-9 did not take"), "{stderr}");
    for child in [&mut first, &mut second, &mut third] {
        if let Some(pid) = child.id() {
            kill(pid, "-TERM").await;
        }
        let _ = child.wait().await;
    }
}

/// A secret that must never be printed: in a URL, a password file, a server's password.
const MARKER: &str = "leak-marker-7f3a9c1e5d";

/// Every output path — debug logs, `status --json`, `watch`, the metrics and health endpoints,
/// error messages for wrong passwords and refused certificates — with the marker secret as the
/// password, in URLs and in password files, on Redis, etcd and PostgreSQL over TLS. The marker
/// appears nowhere. (`Debug` of the configs: each backend crate's unit tests.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_output_path_leaks_a_secret() {
    use leasehold_testkit::{ServerCert, TestPki};
    use std::sync::Arc;
    let pki = Arc::new(TestPki::new());
    let dir = tempfile::tempdir().expect("tempdir");
    let secret_file = dir.path().join("password");
    std::fs::write(&secret_file, format!("{MARKER}\n")).expect("password file");
    let wrong_file = dir.path().join("wrong");
    std::fs::write(&wrong_file, format!("{MARKER}-wrong\n")).expect("password file");
    let tls = |client: &leasehold_testkit::CertFiles| -> Vec<String> {
        vec![
            "--tls-ca".into(),
            pki.ca.display().to_string(),
            "--tls-cert".into(),
            client.cert.display().to_string(),
            "--tls-key".into(),
            client.key.display().to_string(),
        ]
    };
    let redis = RedisServer::start_tls(pki.clone(), ServerCert::Good, Some(MARKER)).await;
    let etcd = EtcdServer::start_tls(pki.clone(), ServerCert::Good, Some(MARKER)).await;
    let postgres =
        PostgresServer::start_mutual_tls(free_port(), pki.clone(), ServerCert::Good, MARKER).await;
    let redis_url = format!("rediss://{}", redis.addr());
    let etcd_url = format!("etcd://root@{}", etcd.addr());
    let pg_url = format!(
        "postgres://leasehold@{}/postgres?sslmode=verify-full",
        postgres.addr()
    );
    let good = |url: &str, file: &Path| -> Vec<String> {
        let mut args = vec!["--backend".to_owned(), url.to_owned()];
        args.extend(tls(&pki.client));
        args.extend(["--backend-password-file".into(), file.display().to_string()]);
        args
    };
    // (arguments after the subcommand, the exit code expected)
    let mut cases: Vec<(Vec<String>, i32)> = Vec::new();
    for url in [&redis_url, &etcd_url, &pg_url] {
        cases.push((good(url, &secret_file), 0));
        cases.push((good(url, &wrong_file), 5));
        // A client certificate the server refuses: the error path of TLS.
        let mut foreign = vec!["--backend".to_owned(), url.clone()];
        foreign.extend(tls(&pki.foreign_client));
        foreign.extend([
            "--backend-password-file".into(),
            secret_file.display().to_string(),
        ]);
        cases.push((foreign, 5));
    }
    // The password in the URL itself, right and wrong.
    for (password, code) in [(MARKER.to_owned(), 0), (format!("{MARKER}x"), 5)] {
        let mut args = vec![
            "--backend".to_owned(),
            format!("rediss://:{password}@{}", redis.addr()),
        ];
        args.extend(tls(&pki.client));
        cases.push((args, code));
        let mut args = vec![
            "--backend".to_owned(),
            format!(
                "postgres://leasehold:{password}@{}/postgres?sslmode=verify-full",
                postgres.addr()
            ),
        ];
        args.extend(tls(&pki.client));
        cases.push((args, code));
    }
    let mut seen = String::new();
    for (args, code) in &cases {
        let output = Command::new(BIN)
            .arg("status")
            .args(args)
            .args(["--lock", "leaks", "--json", "--connect-timeout", "5s"])
            .env("LEASEHOLD_LOG", "debug")
            .output()
            .await
            .expect("status");
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert_eq!(
            output.status.code(),
            Some(*code),
            "{args:?}: {stdout} {stderr}"
        );
        seen.push_str(&stdout);
        seen.push_str(&stderr);
    }
    // A leader at debug level with its metrics and health endpoints, scraped while it leads.
    let port = free_port();
    let addr = format!("127.0.0.1:{port}");
    let mut run = Command::new(BIN)
        .arg("run")
        .args(good(&redis_url, &secret_file))
        .args([
            "--lock",
            "leaks",
            "--identity",
            "leaky",
            "--metrics-addr",
            &addr,
        ])
        .args(TIMING)
        .args(["--", "sleep", "30"])
        .env("LEASEHOLD_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run");
    let metrics = leading_metrics(
        port,
        "leaks",
        Duration::from_secs(15),
        "the leader's metrics never showed it leading",
    )
    .await;
    seen.push_str(&metrics);
    seen.push_str(&http_get(port, "/healthz").await);
    let mut watch = Command::new(BIN)
        .arg("watch")
        .args(good(&redis_url, &secret_file))
        .args(["--lock", "leaks", "--json"])
        .env("LEASEHOLD_LOG", "debug")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("watch");
    sleep(Duration::from_secs(1)).await;
    for child in [&mut watch, &mut run] {
        if let Some(pid) = child.id() {
            kill(pid, "-TERM").await;
        }
    }
    for child in [watch, run] {
        let output = child.wait_with_output().await.expect("output");
        seen.push_str(&String::from_utf8_lossy(&output.stdout));
        seen.push_str(&String::from_utf8_lossy(&output.stderr));
    }
    // `--help` with the URL in the environment: clap shows environment values unless told not to.
    for command in ["run", "status"] {
        let help = Command::new(BIN)
            .args([command, "--help"])
            .env(
                "LEASEHOLD_BACKEND",
                format!("rediss://:{MARKER}@{}", redis.addr()),
            )
            .output()
            .await
            .expect("help");
        assert!(help.status.success());
        seen.push_str(&String::from_utf8_lossy(&help.stdout));
    }
    // A URL with the password in LEASEHOLD_BACKEND: the command does not inherit it.
    let mut args = vec!["run".to_owned()];
    args.extend(tls(&pki.client));
    let child_env = Command::new(BIN)
        .args(&args)
        .args(["--lock", "leaks-env"])
        .args(TIMING)
        .args(["--", "sh", "-c", "env; echo child-ran"])
        .env(
            "LEASEHOLD_BACKEND",
            format!("rediss://:{MARKER}@{}", redis.addr()),
        )
        .env("LEASEHOLD_LOG", "debug")
        .output()
        .await
        .expect("run");
    let child_out = String::from_utf8_lossy(&child_env.stdout);
    assert!(child_out.contains("child-ran"), "{child_out}");
    seen.push_str(&child_out);
    seen.push_str(&String::from_utf8_lossy(&child_env.stderr));
    assert!(
        seen.contains("leaky"),
        "the outputs must hold what was asked for (the leader's identity): {seen}"
    );
    assert!(!seen.contains(MARKER), "the secret leaked:\n{seen}");
}
