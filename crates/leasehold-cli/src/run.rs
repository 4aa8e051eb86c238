//! `leasehold run`: campaign, run the command while leading, stop it when leadership ends.

use std::hash::{BuildHasher, RandomState};
use std::time::Duration;

use leasehold::{Callbacks, CancellationToken, Config, Elector, Leadership, StopCause};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::{mpsc, oneshot};

use crate::child::{exit_code, Child, DEADLINE_MARGIN};
use crate::error::CliError;
use crate::RunArgs;

/// The default identity: hostname, pid and a random suffix.
fn default_identity() -> String {
    let host = nix::unistd::gethostname()
        .ok()
        .and_then(|h| h.into_string().ok())
        .unwrap_or_else(|| "host".into());
    let random = RandomState::new().hash_one(std::process::id()) & 0x00ff_ffff;
    format!("{host}-{}-{random:06x}", std::process::id())
}

/// Runs `leasehold run`; returns the exit code.
///
/// # Errors
///
/// Bad configuration, unreachable backend, refused credentials, or lost leadership (without
/// `--restart`).
pub async fn run(args: RunArgs) -> Result<u8, CliError> {
    let lock = args.backend.lock.clone();
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let mut config = Config::new(identity.clone(), lock.clone()).with_timing(
        args.lease_duration,
        args.renew_deadline,
        args.retry_period,
    );
    config.release_on_cancel = true;
    config
        .validate()
        .map_err(|e| CliError::Config(format!("invalid configuration: {e}")))?;
    let prometheus = match args.metrics_addr {
        Some(_) => Some(crate::serve::recorder()?),
        None => None,
    };
    let (url, backend) = args.backend.open().await?;

    let mut terminate = signal(SignalKind::terminate())
        .map_err(|e| CliError::Other(format!("cannot handle SIGTERM: {e}")))?;
    let mut interrupt = signal(SignalKind::interrupt())
        .map_err(|e| CliError::Other(format!("cannot handle SIGINT: {e}")))?;

    let (terms, mut term_rx) = mpsc::unbounded_channel::<(Leadership, oneshot::Sender<()>)>();
    let callbacks = Callbacks::new().on_started_leading(move |leadership| {
        // The term's work is the command, supervised below: it ends when the term is over *and*
        // the command's tree is gone (the loop drops `gone` then), so that a release or a
        // transfer the elector makes when a term ends from its side (a transfer request, a
        // resign) never lets the next leader start beside our command.
        let (gone, stopped) = oneshot::channel();
        let _ = terms.send((leadership.clone(), gone));
        async move {
            leadership.cancelled().await;
            let _ = stopped.await;
        }
    });
    let elector = Elector::new(config, backend, callbacks)?;
    let handle = elector.handle();
    if let (Some(addr), Some(prometheus)) = (args.metrics_addr, prometheus) {
        crate::serve::serve(addr, handle.clone(), prometheus).await?;
        eprintln!("leasehold: serving http://{addr}/metrics and /healthz");
    }
    let shutdown = CancellationToken::new();
    let mut elector_task = elector.spawn(shutdown.clone());
    eprintln!(
        "leasehold: {identity} campaigns for {lock:?} on {}",
        url.describe()
    );

    let mut stopping = false;
    let outcome = loop {
        tokio::select! {
            _ = terminate.recv() => { stopping = true; break 0; }
            _ = interrupt.recv() => { stopping = true; break 0; }
            finished = &mut elector_task => {
                return match finished {
                    Ok(Ok(())) => Ok(0),
                    Ok(Err(error)) => Err(error.into()),
                    Err(error) => Err(CliError::Other(format!("elector task failed: {error}"))),
                };
            }
            Some((leadership, gone)) = term_rx.recv() => {
                if !leadership.is_valid() {
                    continue;
                }
                let supervised = supervise(&args, &identity, &lock, &leadership, &mut terminate, &mut interrupt).await;
                // The command's tree is gone (or was never started): the term's work ends.
                drop(gone);
                let supervised = match supervised {
                    Ok(supervised) => supervised,
                    Err(error) => {
                        // The command could not start: step down and release before reporting.
                        shutdown.cancel();
                        let _ = elector_task.await;
                        return Err(error);
                    }
                };
                match supervised {
                    Supervised::Exited(code) if args.restart => {
                        eprintln!("leasehold: the command exited with {code}; resigning and campaigning again");
                        handle.resign();
                    }
                    Supervised::Exited(code) => break code,
                    Supervised::Lost if args.restart => {
                        eprintln!("leasehold: leadership lost; the command was stopped; campaigning again");
                    }
                    Supervised::Expired if args.restart => {
                        // The elector may not have noticed yet (it was frozen too): step down.
                        if leadership.is_valid() {
                            handle.resign();
                        }
                        eprintln!("leasehold: the term ran out; the command was killed; campaigning again");
                    }
                    Supervised::Lost | Supervised::Expired => {
                        shutdown.cancel();
                        let _ = elector_task.await;
                        return Err(CliError::LostLeadership { lock });
                    }
                    Supervised::Signalled(code) => { stopping = true; break code; }
                }
            }
        }
    };
    // The command has stopped: only now step down and release, so the next leader's command can
    // never start beside this one.
    shutdown.cancel();
    match elector_task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) if !stopping => return Err(error.into()),
        Ok(Err(error)) => eprintln!("leasehold: while stopping: {error}"),
        Err(error) => eprintln!("leasehold: elector task failed: {error}"),
    }
    Ok(outcome)
}

enum Supervised {
    /// The command exited with this code while we led.
    Exited(u8),
    /// Leadership ended; the command was stopped.
    Lost,
    /// The command ended after the supervisor's kill deadline (the term's validity, less a
    /// margin): leasehold could not act in time (it was frozen), the supervisor killed it.
    Expired,
    /// leasehold was signalled; the command was stopped with this code.
    Signalled(u8),
}

async fn supervise(
    args: &RunArgs,
    identity: &str,
    lock: &str,
    leadership: &Leadership,
    terminate: &mut tokio::signal::unix::Signal,
    interrupt: &mut tokio::signal::unix::Signal,
) -> Result<Supervised, CliError> {
    let env = [
        ("LEASEHOLD_TOKEN", leadership.token().to_string()),
        ("LEASEHOLD_TERM", leadership.term().to_string()),
        ("LEASEHOLD_IDENTITY", identity.to_owned()),
        ("LEASEHOLD_LOCK", lock.to_owned()),
    ];
    eprintln!(
        "leasehold: leading {lock:?} (term {}, token {}); starting {:?}",
        leadership.term(),
        leadership.token(),
        args.command
    );
    // The supervisor kills the tree at the term's validity (less a margin) on its own clock,
    // unless told a later deadline: it holds even while leasehold is frozen.
    let kill_at = |leadership: &Leadership| {
        leadership.deadline().map(|deadline| {
            deadline
                .into_std()
                .checked_sub(DEADLINE_MARGIN)
                .unwrap_or(deadline.into_std())
        })
    };
    let mut child = Child::spawn(&args.command, &env, kill_at(leadership)).await?;
    let grace = |why: &str| capped_grace(args.grace, leadership, why);
    // Renewals move the deadline; the supervisor hears of it within this interval.
    let mut refresh = tokio::time::interval(DEADLINE_REFRESH);
    refresh.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        if let Some(at) = kill_at(leadership) {
            child.set_kill_at(at);
        }
        tokio::select! {
            status = child.wait() => {
                if child.past_kill_at() {
                    eprintln!("leasehold: the term ran out while leasehold could not act; the supervisor killed the command");
                    return Ok(Supervised::Expired);
                }
                let code = status.map(exit_code).unwrap_or(1);
                return Ok(Supervised::Exited(code));
            }
            () = leadership.cancelled() => {
                if leadership.stop_cause() == Some(StopCause::Lost) {
                    // The backend no longer holds our term: someone else may lead already.
                    eprintln!("leasehold: leadership lost; killing the command (SIGKILL)");
                    child.kill().await;
                } else {
                    child.stop(grace("leadership ended")).await;
                }
                return Ok(Supervised::Lost);
            }
            _ = terminate.recv() => {
                let status = child.stop(grace("SIGTERM")).await;
                return Ok(Supervised::Signalled(status.map(exit_code).unwrap_or(0)));
            }
            _ = interrupt.recv() => {
                let status = child.stop(grace("SIGINT")).await;
                return Ok(Supervised::Signalled(status.map(exit_code).unwrap_or(0)));
            }
            _ = refresh.tick() => {}
        }
    }
}

/// How often leasehold passes the term's (renewed) deadline on to the supervisor.
const DEADLINE_REFRESH: Duration = Duration::from_millis(50);

/// The grace before SIGKILL: `--grace`, cut short so the command never runs past the term's
/// validity (after which another candidate may lead). A term already past it gets SIGKILL at
/// once.
fn capped_grace(grace: Duration, leadership: &Leadership, why: &str) -> Duration {
    let left = leadership.deadline().map_or(grace, |deadline| {
        deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .saturating_sub(DEADLINE_MARGIN)
    });
    let capped = grace.min(left);
    eprintln!("leasehold: {why}; stopping the command (SIGTERM, SIGKILL after {capped:?})");
    capped
}
