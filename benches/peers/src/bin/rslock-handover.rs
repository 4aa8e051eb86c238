//! Handover time of `rslock` (Redlock over one Redis): how long after holder A unlocks does
//! waiter B, blocked in the crate's own retrying `acquire`, come back with the lock?
//!
//! Per sample, on a fresh resource name: A (its own `LockManager`, so its own connection)
//! takes the lock with `lock`; B (a second `LockManager`) starts `acquire` on the same
//! resource in a task; after a settle time (B is in its retry loop) and the sample's pause,
//! t0, A calls `unlock`; t1 is when B's `acquire` returns the lock. Prints
//! `handover <pause_ms> <t1 - t0 in ms, 3 decimals>` per sample.

use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Parser;
use leasehold_bench_peers::{parse_pauses, pause_for, report};
use rslock::LockManager;

/// Handover latency of rslock between two lock managers on one Redis.
#[derive(Debug, Parser)]
#[command(name = "rslock-handover")]
struct Args {
    /// Redis URL, e.g. redis://127.0.0.1:6379.
    #[arg(long)]
    url: String,
    /// Number of samples (one fresh resource each).
    #[arg(long, default_value_t = 20)]
    samples: usize,
    /// Comma-separated pauses in ms between B starting to wait and A unlocking; sample i
    /// uses pause i % len.
    #[arg(long, default_value = "0")]
    pause_ms: String,
    /// TTL of the lock (both clients), in ms.
    #[arg(long, default_value_t = 2000)]
    ttl_ms: u64,
    /// Time B is given to enter its retry loop before the pause starts, in ms.
    #[arg(long, default_value_t = 250)]
    settle_ms: u64,
    /// How long B may take to get the lock after A unlocks before the run fails, in ms.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

fn manager(url: &str) -> Result<LockManager> {
    let client = redis::Client::open(url).with_context(|| format!("invalid Redis URL {url:?}"))?;
    // The crate's defaults: 3 tries per `lock` call, 0..200 ms random delay between them;
    // `acquire` repeats `lock` calls until one succeeds, so B never gives up on its own.
    Ok(LockManager::from_clients(vec![client]))
}

async fn run(args: Args) -> Result<()> {
    let pauses = parse_pauses(&args.pause_ms).map_err(anyhow::Error::msg)?;
    if args.samples == 0 {
        bail!("--samples must be at least 1");
    }
    let ttl = Duration::from_millis(args.ttl_ms);
    // A holds its lock without extending it, so the whole wait must fit in its TTL (with
    // 200 ms to spare for the round trips), or B would get the lock by expiry, not handover.
    let longest = pauses.iter().copied().max().unwrap_or(0);
    if args.settle_ms + longest + 200 >= args.ttl_ms {
        bail!(
            "--ttl-ms {} is too short for --settle-ms {} plus the longest pause {longest} ms \
             (+200 ms margin): A's lock would expire before it is released",
            args.ttl_ms,
            args.settle_ms
        );
    }
    let a = manager(&args.url)?;
    let b = manager(&args.url)?;
    let pid = std::process::id();
    let timeout = Duration::from_millis(args.timeout_ms);

    for i in 0..args.samples {
        let pause = pause_for(&pauses, i);
        let resource = format!("rslock-handover-{pid}-{i}").into_bytes();

        let held = a.lock(resource.as_slice(), ttl).await.map_err(|e| {
            anyhow::anyhow!(
                "sample {i}: A could not lock a fresh resource (is Redis up at {}?): {e}",
                args.url
            )
        })?;

        let waiter = b.clone();
        let wanted = resource.clone();
        let task = tokio::spawn(async move {
            let got = waiter.acquire(wanted.as_slice(), ttl).await;
            (Instant::now(), got)
        });

        tokio::time::sleep(Duration::from_millis(args.settle_ms)).await;
        tokio::time::sleep(Duration::from_millis(pause)).await;
        if task.is_finished() {
            bail!("sample {i}: B acquired the lock while A still held it");
        }
        match a.is_freed(&held).await {
            Ok(false) => {}
            other => bail!("sample {i}: A no longer holds its lock before unlocking: {other:?}"),
        }

        let t0 = Instant::now();
        a.unlock(&held).await;
        let (t1, got) = match tokio::time::timeout(timeout, task).await {
            Ok(joined) => joined.context("B's task failed")?,
            Err(_) => bail!("sample {i}: B did not get the lock within {timeout:?} of A's unlock"),
        };
        let guard = got.map_err(|e| anyhow::anyhow!("sample {i}: B's acquire failed: {e}"))?;
        report(pause, t1.saturating_duration_since(t0))?;
        guard.release().await;
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let args = Args::parse();
    match run(args).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("rslock-handover: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
