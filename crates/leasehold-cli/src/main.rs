//! `leasehold`: run any program only while this process holds leadership of a lock, inspect a
//! lock, watch its leader, or see a demo. See `leasehold --help`.

mod backend;
mod child;
mod demo;
mod error;
mod inspect;
mod run;
mod serve;
mod supervisor;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};

/// Exit codes, documented in `--help` and the README.
const EXIT_CODES: &str = "\
EXIT CODES:
    0    success (run: the command exited 0, or leasehold was stopped before it started)
    N    run: the command's own exit code, passed through (128+S if it died from signal S)
    1    an unexpected error
    2    bad usage (unknown flag, missing argument)
    3    bad backend URL or configuration
    4    the backend cannot be reached (after --connect-timeout)
    5    the backend refused our credentials, permissions or TLS (a certificate, or TLS and plain text crossed)
    6    run: leadership was lost while the command ran (the command was stopped); use
         --restart to campaign again instead
    7    transfer: the target did not take over within --timeout (nobody led, the leader did
         not hand over, or the target did not take the reserved lock)";

/// Leader election for any program: run it only while this process holds the lock.
#[derive(Debug, Parser)]
#[command(name = "leasehold", version, about, after_help = EXIT_CODES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Campaign for LOCK and run CMD while leading; stop it when leadership ends.
    ///
    /// The command gets LEASEHOLD_TOKEN (fencing token), LEASEHOLD_TERM, LEASEHOLD_IDENTITY and
    /// LEASEHOLD_LOCK. Its whole process tree ends with the term: when the backend reports the
    /// term lost it gets SIGKILL at once; when renewing fails, or on SIGINT/SIGTERM to
    /// leasehold, SIGTERM, then SIGKILL after --grace (never past the term's validity). When it
    /// exits, whatever it left running gets SIGKILL, then the lock is released and leasehold
    /// exits with its code (or, with --restart, campaigns again). If leasehold dies, even by
    /// SIGKILL, the tree gets SIGKILL; if it is frozen (SIGSTOP) or hung past the term's
    /// validity, its supervisor SIGKILLs the tree by then on its own.
    #[command(after_help = EXIT_CODES)]
    Run(RunArgs),
    /// Print the holder of LOCK, its token, times, lease duration, and whether it looks expired.
    #[command(after_help = EXIT_CODES)]
    Status(InspectArgs),
    /// Print one line per leader change of LOCK, without campaigning.
    #[command(after_help = EXIT_CODES)]
    Watch(InspectArgs),
    /// Ask the leader of LOCK to hand over to the candidate --to, and wait until it leads.
    ///
    /// The request marks the held record; the leader (any leasehold elector, `leasehold run`
    /// included) hears it on its watch, stops its work, and reserves the lock for the target
    /// for one lease. Exits 0 once the target leads, 7 if it does not within --timeout.
    #[command(after_help = EXIT_CODES)]
    Transfer(TransferArgs),
    /// N candidates on the in-memory backend: kill the leader, let another resign, and print a
    /// timeline with handover times. Needs no server.
    Demo(DemoArgs),
    /// Internal: the supervisor between `run` and its command.
    #[command(name = "__supervise", hide = true)]
    Supervise(SuperviseArgs),
}

#[derive(Debug, Args)]
struct SuperviseArgs {
    /// SIGKILL the command's tree at this CLOCK_MONOTONIC instant (nanoseconds) unless told a
    /// later one on the control pipe.
    #[arg(long)]
    kill_at: Option<u64>,
    /// The inherited read end of the control pipe.
    control_fd: i32,
    /// The inherited write end of the status pipe.
    status_fd: i32,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

/// Where the lock lives.
#[derive(Debug, Clone, Args)]
struct BackendArgs {
    /// Where the lock lives (see the help text for the URL forms).
    #[arg(
        long,
        env = "LEASEHOLD_BACKEND",
        // `--help` must not print a URL's password.
        hide_env_values = true,
        help = "memory://, redis://host:port[/db], rediss://..., etcd://host:port[,host:port], \
                postgres://user:password@host:port/db[?sslmode=...], \
                kube://NAMESPACE (kubeconfig or in-cluster)"
    )]
    backend: String,
    /// The lock name (Lease name, etcd election, Redis key).
    #[arg(long, env = "LEASEHOLD_LOCK")]
    lock: String,
    /// How long to wait for the backend to answer at start.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    connect_timeout: Duration,
    /// The CA certificate(s) to trust, PEM (rediss://, etcd over TLS, postgres; as redis-cli
    /// and etcdctl --cacert, libpq's sslrootcert). For etcd, any --tls-* flag means https.
    #[arg(long, value_name = "FILE", env = "LEASEHOLD_TLS_CA")]
    tls_ca: Option<PathBuf>,
    /// The client certificate to present, PEM (with --tls-key).
    #[arg(long, value_name = "FILE", env = "LEASEHOLD_TLS_CERT")]
    tls_cert: Option<PathBuf>,
    /// The client certificate's private key, PEM (with --tls-cert).
    #[arg(long, value_name = "FILE", env = "LEASEHOLD_TLS_KEY")]
    tls_key: Option<PathBuf>,
    /// A file holding the backend's password (its final line break dropped), instead of one
    /// in the URL, which shows in `ps` and shell history. The user, if any, stays in the URL
    /// (etcd://USER@host:port).
    #[arg(long, value_name = "FILE", env = "LEASEHOLD_BACKEND_PASSWORD_FILE")]
    backend_password_file: Option<PathBuf>,
    /// How long a password from --backend-password-file that worked may be refused (a
    /// rotation: the server or the file changed first) before leasehold gives up with exit
    /// code 5 [default: 5m; PostgreSQL: leasehold_password_grace_ms in the URL]. 0s: at once.
    #[arg(
        long,
        value_name = "DURATION",
        env = "LEASEHOLD_BACKEND_PASSWORD_GRACE",
        value_parser = humantime::parse_duration
    )]
    backend_password_grace: Option<Duration>,
}

impl BackendArgs {
    /// Parses `--backend` and connects (see [`backend::BackendUrl::connect`]) with the
    /// credentials given, checking that `--lock` can be read.
    async fn open(
        &self,
    ) -> Result<
        (
            backend::BackendUrl,
            std::sync::Arc<dyn leasehold::LockBackend>,
        ),
        error::CliError,
    > {
        let url = backend::BackendUrl::parse(&self.backend)?;
        let backend = url
            .connect(&self.lock, self.connect_timeout, &self.credentials())
            .await?;
        Ok((url, backend))
    }

    /// The TLS files and password file given.
    fn credentials(&self) -> backend::Credentials {
        backend::Credentials {
            tls: leasehold::TlsFiles {
                ca: self.tls_ca.clone(),
                cert: self.tls_cert.clone(),
                key: self.tls_key.clone(),
            },
            password_file: self.backend_password_file.clone(),
            password_grace: self.backend_password_grace,
        }
    }
}

#[derive(Debug, Args)]
struct RunArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// This candidate's identity (default: hostname-pid-random).
    #[arg(long, env = "LEASEHOLD_IDENTITY")]
    identity: Option<String>,
    /// How long a lease lasts without renewal.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    lease_duration: Duration,
    /// How long the leader keeps trying to renew before it steps down.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    renew_deadline: Duration,
    /// Interval between renewals and retries.
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    retry_period: Duration,
    /// Time between SIGTERM and SIGKILL when the command must stop.
    #[arg(long, default_value = "10s", value_parser = humantime::parse_duration)]
    grace: Duration,
    /// Campaign again after the command exits or leadership is lost, instead of exiting.
    #[arg(long)]
    restart: bool,
    /// Serve Prometheus `/metrics` and `/healthz` (200 or 503) on this address, e.g.
    /// 127.0.0.1:9090.
    #[arg(long, value_name = "ADDR")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// The command and its arguments (after `--`).
    #[arg(
        required = true,
        trailing_var_arg = true,
        allow_hyphen_values = true,
        value_name = "CMD"
    )]
    command: Vec<String>,
}

#[derive(Debug, Args)]
struct InspectArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// JSON output, one object per line.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct TransferArgs {
    #[command(flatten)]
    backend: BackendArgs,
    /// The identity of the candidate that should lead.
    #[arg(long, value_name = "IDENTITY")]
    to: String,
    /// How long to wait for the target to lead.
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration)]
    timeout: Duration,
    /// JSON output: one object when done.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Args)]
struct DemoArgs {
    /// How many candidates.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(2..=50))]
    candidates: u32,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LEASEHOLD_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    if let Command::Supervise(args) = &cli.command {
        return ExitCode::from(supervisor::supervise(
            args.control_fd,
            args.status_fd,
            args.kill_at,
            &args.command,
        ));
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("leasehold: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run::run(args).await,
            Command::Status(args) => inspect::status(args).await.map(|()| 0),
            Command::Watch(args) => inspect::watch(args).await.map(|()| 0),
            Command::Transfer(args) => inspect::transfer(args).await.map(|()| 0),
            Command::Demo(args) => demo::demo(args.candidates).await.map(|()| 0),
            Command::Supervise(_) => Ok(1),
        }
    });
    match result {
        Ok(code) => ExitCode::from(code),
        Err(error) => {
            eprintln!("leasehold: {error}");
            ExitCode::from(error.exit_code())
        }
    }
}
