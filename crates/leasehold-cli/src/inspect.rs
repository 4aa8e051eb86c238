//! `leasehold status` and `leasehold watch`.

use std::time::{Duration, SystemTime};

use leasehold::{observe_once, LeaderRecord, LockStatus, Observation, ObservedLock, Observer};

use crate::error::CliError;
use crate::{InspectArgs, TransferArgs};

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn ago(t: SystemTime) -> String {
    match SystemTime::now().duration_since(t) {
        Ok(d) => format!(
            "{} ago",
            humantime::format_duration(Duration::from_millis(ms(d)))
        ),
        Err(e) => format!(
            "in {}",
            humantime::format_duration(Duration::from_millis(ms(e.duration())))
        ),
    }
}

/// Whether the record looks expired: the backend says so (TTL 0), or its last renew plus its
/// lease duration is in the past by this host's clock (for humans only: clocks differ).
fn looks_expired(observation: &Observation, record: &LeaderRecord) -> bool {
    observation.expires_in == Some(Duration::ZERO)
        || record
            .renew_time
            .is_some_and(|renewed| renewed + record.lease_duration < SystemTime::now())
}

fn status_json(lock: &str, backend: &str, observation: &Observation) -> serde_json::Value {
    match observation.record.as_ref().filter(|r| !r.is_vacant()) {
        None => {
            serde_json::json!({"lock": lock, "backend": backend, "holder": null, "state": "free"})
        }
        Some(r) => serde_json::json!({
            "lock": lock,
            "backend": backend,
            "holder": r.holder,
            "token": r.token.map(|t| t.get()),
            "acquire_time": r.acquire_time.map(rfc3339),
            "renew_time": r.renew_time.map(rfc3339),
            "lease_duration_ms": ms(r.lease_duration),
            "expires_in_ms": observation.expires_in.map(ms),
            "transitions": r.transitions,
            "looks_expired": looks_expired(observation, r),
            "state": if looks_expired(observation, r) { "expired" } else { "held" },
        }),
    }
}

/// `leasehold status`.
///
/// # Errors
///
/// Bad URL, unreachable backend, or a read error (a malformed record included).
pub async fn status(args: InspectArgs) -> Result<(), CliError> {
    let lock = &args.backend.lock;
    let (url, backend) = args.backend.open().await?;
    let (_, observation) = observe_once(backend.as_ref(), lock).await?;
    if args.json {
        println!("{}", status_json(lock, &url.describe(), &observation));
        return Ok(());
    }
    println!("lock:        {lock} ({})", url.describe());
    match observation.record.as_ref().filter(|r| !r.is_vacant()) {
        None => println!("holder:      none (the lock is free)"),
        Some(r) => {
            println!("holder:      {}", r.holder);
            if let Some(token) = r.token {
                println!("token:       {token}");
            }
            if let Some(t) = r.acquire_time {
                println!("acquired:    {} ({})", rfc3339(t), ago(t));
            }
            if let Some(t) = r.renew_time {
                println!("renewed:     {} ({})", rfc3339(t), ago(t));
            }
            println!(
                "lease:       {}",
                humantime::format_duration(r.lease_duration)
            );
            if let Some(e) = observation.expires_in {
                println!(
                    "expires in:  {}",
                    humantime::format_duration(Duration::from_millis(ms(e)))
                );
            }
            if r.transitions > 0 {
                println!("transitions: {}", r.transitions);
            }
            let state = if looks_expired(&observation, r) {
                "looks EXPIRED"
            } else {
                "held"
            };
            println!("state:       {state}");
        }
    }
    Ok(())
}

fn leader_line(json: bool, observed: &ObservedLock) -> String {
    let now = rfc3339(SystemTime::now());
    let status = observed.status.as_str();
    let record = observed.record.as_ref();
    if json {
        serde_json::json!({
            "at": now,
            "state": status,
            "leader": observed.leader(),
            "token": observed.token().map(|t| t.get()),
            "last_holder": record.map(|r| r.holder.clone()),
        })
        .to_string()
    } else {
        match (observed.status, record) {
            (LockStatus::Held, Some(r)) => match r.token {
                Some(token) => format!("{now}  leader: {} (token {token})", r.holder),
                None => format!("{now}  leader: {}", r.holder),
            },
            (LockStatus::Expired, Some(r)) => {
                format!("{now}  no leader ({}'s lease ran out)", r.holder)
            }
            _ => format!("{now}  no leader"),
        }
    }
}

/// `leasehold watch`: one line per leader change until interrupted, from an [`Observer`]:
/// the backend's watch, and no polling while a leader holds the lock.
///
/// # Errors
///
/// Bad URL or unreachable backend at start; later outages are retried.
pub async fn watch(args: InspectArgs) -> Result<(), CliError> {
    let lock = args.backend.lock.clone();
    let (_, backend) = args.backend.open().await?;
    let observer = Observer::start(backend, lock).map_err(leasehold::ElectorError::from)?;
    let mut changes = observer.subscribe();
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    let mut last_error = None;
    let mut printed = None;
    loop {
        let observed = changes.borrow_and_update().clone();
        if observed.last_error != last_error {
            if let Some(error) = &observed.last_error {
                eprintln!("leasehold: {error}; retrying");
            }
            last_error = observed.last_error.clone();
        }
        let key = (
            observed.status,
            observed.leader().map(str::to_owned),
            observed.token(),
        );
        if observed.status != LockStatus::Unknown && printed.as_ref() != Some(&key) {
            println!("{}", leader_line(args.json, &observed));
            printed = Some(key);
        }
        tokio::select! {
            _ = &mut interrupted => break,
            changed = changes.changed() => if changed.is_err() { break },
        }
    }
    observer.stop().await;
    Ok(())
}

/// `leasehold transfer`: asks the leader to hand over to `--to`, and waits until it leads.
///
/// # Errors
///
/// Bad URL or target, unreachable backend, a backend without transfer (etcd), or
/// [`CliError::TransferIncomplete`] when the target does not lead within `--timeout`.
pub async fn transfer(args: TransferArgs) -> Result<(), CliError> {
    let to = args.to.clone();
    if to.is_empty() || to.chars().any(char::is_control) {
        return Err(CliError::Config(format!(
            "invalid --to {to:?}: an identity is not empty and has no control characters"
        )));
    }
    let lock = args.backend.lock.clone();
    let (_, backend) = args.backend.open().await?;
    // Follow first, so that the hand-over cannot happen unseen between the request and the
    // watch.
    let observer =
        Observer::start(backend.clone(), lock.clone()).map_err(leasehold::ElectorError::from)?;
    let before = observer.ready().await;
    if before.leader() == Some(to.as_str()) {
        report_transfer(args.json, &lock, &to, &before, "already leads");
        observer.stop().await;
        return Ok(());
    }
    let asked = backend.request_transfer(&lock, &to).await?;
    let Some(from) = asked.holder().map(str::to_owned) else {
        observer.stop().await;
        return Err(CliError::TransferIncomplete(format!(
            "nobody leads {lock:?}: there is no leader to hand over; nothing was written"
        )));
    };
    let mut changes = observer.subscribe();
    let waited = tokio::time::timeout(
        args.timeout,
        changes.wait_for(|seen| seen.leader() == Some(to.as_str())),
    )
    .await;
    let now = observer.current();
    observer.stop().await;
    match waited {
        Ok(Ok(_)) => {
            report_transfer(
                args.json,
                &lock,
                &to,
                &now,
                &format!("took over from {from}"),
            );
            Ok(())
        }
        _ => Err(CliError::TransferIncomplete(
            match (now.status, now.leader()) {
                (LockStatus::Held, Some(leader)) if leader == from => format!(
                    "{from} still leads {lock:?} after {:?}: it did not hand over (an elector \
                 without transfer, such as client-go or an older leasehold, ignores the request)",
                    args.timeout
                ),
                (LockStatus::Held, Some(leader)) => {
                    format!("{leader} leads {lock:?} now, not {to}")
                }
                _ => format!(
                    "{from} handed over, but {to} did not take {lock:?} within {:?}; after the \
                 reserved window anyone may take it",
                    args.timeout
                ),
            },
        )),
    }
}

fn report_transfer(json: bool, lock: &str, to: &str, seen: &ObservedLock, how: &str) {
    if json {
        println!(
            "{}",
            serde_json::json!({
                "lock": lock,
                "leader": to,
                "token": seen.token().map(|t| t.get()),
                "outcome": how,
            })
        );
    } else {
        match seen.token() {
            Some(token) => println!("{to} leads {lock} (token {token}): {how}"),
            None => println!("{to} leads {lock}: {how}"),
        }
    }
}
