//! `leasehold status` and `leasehold watch`.

use std::time::{Duration, SystemTime};

use futures::StreamExt;
use leasehold::{Candidate, LeaderRecord, Observation};

use crate::backend::BackendUrl;
use crate::error::CliError;
use crate::InspectArgs;

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
    let url = BackendUrl::parse(&args.backend.backend)?;
    let lock = &args.backend.lock;
    let backend = url.connect(lock, args.backend.connect_timeout).await?;
    let observation = backend.read(lock).await?;
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

fn leader_line(json: bool, observation: &Observation) -> String {
    let now = rfc3339(SystemTime::now());
    let record = observation.record.as_ref().filter(|r| !r.is_vacant());
    if json {
        serde_json::json!({
            "at": now,
            "leader": record.map(|r| r.holder.clone()),
            "token": record.and_then(|r| r.token).map(|t| t.get()),
        })
        .to_string()
    } else {
        match record {
            Some(r) => match r.token {
                Some(token) => format!("{now}  leader: {} (token {token})", r.holder),
                None => format!("{now}  leader: {}", r.holder),
            },
            None => format!("{now}  no leader"),
        }
    }
}

/// `leasehold watch`: one line per leader change until interrupted.
///
/// # Errors
///
/// Bad URL or unreachable backend at start; later outages are retried.
pub async fn watch(args: InspectArgs) -> Result<(), CliError> {
    let url = BackendUrl::parse(&args.backend.backend)?;
    let lock = args.backend.lock.clone();
    let backend = url.connect(&lock, args.backend.connect_timeout).await?;
    let observer = Candidate::new(
        lock.clone(),
        format!("leasehold-watch-{}", std::process::id()),
        Duration::from_secs(15),
    );
    let mut last: Option<Option<(String, Option<u64>)>> = None;
    let mut print = |observation: &Observation| {
        let key = observation
            .record
            .as_ref()
            .filter(|r| !r.is_vacant())
            .map(|r| (r.holder.clone(), r.token.map(|t| t.get())));
        if last.as_ref() != Some(&key) {
            println!("{}", leader_line(args.json, observation));
            last = Some(key);
        }
    };
    let interrupted = tokio::signal::ctrl_c();
    tokio::pin!(interrupted);
    loop {
        let mut events = match backend.watch(&observer).await {
            Ok(events) => Some(events),
            Err(error) => {
                eprintln!("leasehold: watch failed ({error}); retrying");
                None
            }
        };
        match backend.read(&lock).await {
            Ok(observation) => print(&observation),
            Err(error) => eprintln!("leasehold: read failed: {error}"),
        }
        while let Some(stream) = events.as_mut() {
            tokio::select! {
                _ = &mut interrupted => return Ok(()),
                event = stream.next() => match event {
                    Some(Ok(observation)) => print(&observation),
                    Some(Err(error)) => {
                        eprintln!("leasehold: watch interrupted ({error}); reconnecting");
                        events = None;
                    }
                    None => events = None,
                },
            }
        }
        tokio::select! {
            _ = &mut interrupted => return Ok(()),
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
