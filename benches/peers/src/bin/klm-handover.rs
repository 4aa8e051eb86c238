//! Handover time of `kube-lease-manager` (Kubernetes Lease): how long after leader A lets go
//! of the Lease does follower B report leadership on its watch channel?
//!
//! Per sample, on a fresh Lease name: manager A (its own kube `Client`) runs `watch()` and
//! is waited for until its channel says it leads; manager B (a second, separately built
//! `Client`, so its own connections) runs `watch()` on the same Lease and is checked to be
//! following (its channel false, the Lease's holder A); after the sample's pause, t0, A's
//! watch receiver is dropped, which is the crate's graceful release (its watch task sees the
//! channel closed, clears the Lease's holder and exits); t1 is when B's channel turns true.
//! Prints `handover <pause_ms> <t1 - t0 in ms, 3 decimals>` per sample.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use k8s_openapi::api::coordination::v1::Lease;
use kube::api::{Api, DeleteParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use kube_lease_manager::{LeaseCreateMode, LeaseManager, LeaseParams};
use leasehold_bench_peers::{parse_pauses, pause_for, report};
use tokio::sync::watch;

/// Handover latency of kube-lease-manager between two managers on one Lease.
#[derive(Debug, Parser)]
#[command(name = "klm-handover")]
struct Args {
    /// Kubeconfig file of the cluster (its current context is used).
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Namespace of the Leases.
    #[arg(long, default_value = "default")]
    namespace: String,
    /// Number of samples (one fresh Lease each).
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Comma-separated pauses in ms between B following and A releasing; sample i uses
    /// pause i % len.
    #[arg(long, default_value = "0")]
    pause_ms: String,
    /// The Lease's duration (`leaseDurationSeconds`); whole seconds, as the crate takes it.
    #[arg(long, default_value_t = 2)]
    lease_duration_secs: u64,
    /// The crate's `grace`: the holder renews this many seconds before its lease expires
    /// (whole seconds, 0 < grace < duration). With a 2 s lease the only choice is 1 s, so
    /// the holder renews every 1 s. The crate has no retry-period knob: a follower sleeps
    /// until the expiry it last read, then reads the Lease again.
    #[arg(long, default_value_t = 1)]
    grace_secs: u64,
    /// Time B is given to read the Lease and settle as a follower, in ms.
    #[arg(long, default_value_t = 500)]
    settle_ms: u64,
    /// How long A may take to lead, and B after A's release, before the run fails, in ms.
    #[arg(long, default_value_t = 30_000)]
    timeout_ms: u64,
}

/// A client of its own (own connection pool) from the kubeconfig file.
async fn client(path: &Path) -> Result<Client> {
    let kubeconfig = Kubeconfig::read_from(path)
        .with_context(|| format!("cannot read kubeconfig {}", path.display()))?;
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
        .await
        .with_context(|| format!("invalid kubeconfig {}", path.display()))?;
    Client::try_from(config).context("cannot build a kube client")
}

/// Waits until `rx` says true (leading), up to `timeout`.
async fn leads(rx: &mut watch::Receiver<bool>, timeout: Duration, who: &str) -> Result<()> {
    match tokio::time::timeout(timeout, rx.wait_for(|leading| *leading)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(_)) => bail!("{who}'s lease manager stopped before it led"),
        Err(_) => bail!("{who} did not lead within {timeout:?}"),
    }
}

async fn holder(api: &Api<Lease>, name: &str) -> Result<Option<String>> {
    let lease = api.get(name).await.context("cannot read the Lease")?;
    Ok(lease.spec.and_then(|s| s.holder_identity))
}

async fn run(args: Args) -> Result<()> {
    let pauses = parse_pauses(&args.pause_ms).map_err(anyhow::Error::msg)?;
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    // LeaseParams::new panics on these; check them first.
    if args.lease_duration_secs == 0
        || args.grace_secs == 0
        || args.grace_secs >= args.lease_duration_secs
    {
        bail!(
            "need 0 < --grace-secs < --lease-duration-secs (have grace {} s, duration {} s)",
            args.grace_secs,
            args.lease_duration_secs
        );
    }
    let timeout = Duration::from_millis(args.timeout_ms);
    let client_a = client(&args.kubeconfig).await?;
    let client_b = client(&args.kubeconfig).await?;
    let leases: Api<Lease> = Api::namespaced(client_a.clone(), &args.namespace);
    let pid = std::process::id();

    for i in 0..args.samples {
        let pause = pause_for(&pauses, i);
        let name = format!("klm-handover-{pid}-{i}");
        let id_a = format!("a-{pid}-{i}");
        let id_b = format!("b-{pid}-{i}");
        let params = |id: &str| LeaseParams::new(id, args.lease_duration_secs, args.grace_secs);

        let a = LeaseManager::new(
            client_a.clone(),
            &name,
            &args.namespace,
            params(&id_a),
            LeaseCreateMode::AutoCreate,
        )
        .await
        .with_context(|| format!("sample {i}: manager A on Lease {name}"))?;
        let (mut rx_a, task_a) = a.watch().await;
        leads(&mut rx_a, timeout, "A").await?;

        let b = LeaseManager::new(
            client_b.clone(),
            &name,
            &args.namespace,
            params(&id_b),
            LeaseCreateMode::UseExistent,
        )
        .await
        .with_context(|| format!("sample {i}: manager B on Lease {name}"))?;
        let (mut rx_b, task_b) = b.watch().await;

        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        if *rx_b.borrow() || task_b.is_finished() {
            bail!("sample {i}: B is not following (it leads or its manager stopped)");
        }
        let held_by = holder(&leases, &name).await?;
        if held_by.as_deref() != Some(id_a.as_str()) {
            bail!("sample {i}: the Lease's holder is {held_by:?}, not A ({id_a})");
        }

        tokio::time::sleep(Duration::from_millis(pause)).await;
        if !*rx_a.borrow() || *rx_b.borrow() {
            bail!("sample {i}: leadership changed during the pause");
        }

        // The crate's graceful release for watch(): close the channel.
        let t0 = Instant::now();
        drop(rx_a);
        leads(&mut rx_b, timeout, "B").await?;
        let t1 = Instant::now();
        report(pause, t1.saturating_duration_since(t0))?;

        task_a
            .await
            .context("A's watch task failed")?
            .with_context(|| format!("sample {i}: A's release"))?;
        drop(rx_b);
        task_b
            .await
            .context("B's watch task failed")?
            .with_context(|| format!("sample {i}: B's release"))?;
        leases
            .delete(&name, &DeleteParams::default())
            .await
            .with_context(|| format!("sample {i}: cannot delete Lease {name}"))?;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("klm-handover: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
