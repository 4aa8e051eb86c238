//! The record stored in the lock key, and its parsing.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leasehold_core::{BackendError, FencingToken, LeaderRecord, Observation};
use serde::Deserialize;

#[derive(Debug, Deserialize)]
struct Stored {
    v: u32,
    holder: String,
    token: u64,
    lease_ms: u64,
    #[serde(default)]
    acquired_ms: u64,
    #[serde(default)]
    renewed_ms: u64,
    #[serde(default)]
    transitions: u64,
}

fn wall(ms: u64) -> Option<SystemTime> {
    (ms > 0).then(|| UNIX_EPOCH + Duration::from_millis(ms))
}

/// Parses a stored value.
///
/// # Errors
///
/// [`BackendError::MalformedRecord`] when `raw` is not a leasehold record.
pub(crate) fn parse(lock: &str, raw: &[u8]) -> Result<LeaderRecord, BackendError> {
    let malformed = |detail: String| BackendError::MalformedRecord {
        lock: lock.to_owned(),
        detail,
    };
    let stored: Stored = serde_json::from_slice(raw).map_err(|e| {
        let shown = String::from_utf8_lossy(&raw[..raw.len().min(64)]).into_owned();
        malformed(format!(
            "the key holds {shown:?}, not a leasehold record ({e}); it is left alone until its TTL ends"
        ))
    })?;
    if stored.v != 1 {
        return Err(malformed(format!(
            "record version {} is not understood by this leasehold; upgrade it",
            stored.v
        )));
    }
    Ok(LeaderRecord {
        holder: stored.holder,
        token: Some(FencingToken(stored.token)),
        lease_duration: Duration::from_millis(stored.lease_ms),
        acquire_time: wall(stored.acquired_ms),
        renew_time: wall(stored.renewed_ms),
        transitions: stored.transitions,
    })
}

/// An observation from a raw value (`None` = no key) and its PTTL in milliseconds.
pub(crate) fn observe(
    lock: &str,
    raw: Option<&[u8]>,
    pttl_ms: i64,
) -> Result<Observation, BackendError> {
    match raw {
        None | Some(b"") => Ok(Observation::vacant()),
        Some(raw) => {
            let record = parse(lock, raw)?;
            let expires_in = u64::try_from(pttl_ms).ok().map(Duration::from_millis);
            Ok(Observation::held(record, expires_in))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_records_and_refuses_garbage() {
        let raw = br#"{"v":1,"holder":"a","token":1732500000000001,"lease_ms":2000,"acquired_ms":5,"renewed_ms":6,"transitions":3}"#;
        let r = parse("l", raw).unwrap();
        assert_eq!(r.holder, "a");
        assert_eq!(r.token, Some(FencingToken(1_732_500_000_000_001)));
        assert_eq!(r.lease_duration, Duration::from_millis(2000));
        assert_eq!(r.transitions, 3);
        for bad in [
            &b"garbage"[..],
            b"{}",
            br#"{"v":2,"holder":"a","token":1,"lease_ms":1}"#,
            b"\xff\xfe",
        ] {
            assert!(matches!(
                parse("l", bad),
                Err(BackendError::MalformedRecord { .. })
            ));
        }
        let o = observe("l", Some(raw), 1500).unwrap();
        assert_eq!(o.expires_in, Some(Duration::from_millis(1500)));
        assert_eq!(observe("l", None, -2).unwrap(), Observation::vacant());
        assert_eq!(observe("l", Some(raw), -1).unwrap().expires_in, None);
    }
}
