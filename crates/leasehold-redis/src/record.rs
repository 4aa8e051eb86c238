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
    /// A transfer's target, on a reservation (empty holder).
    #[serde(default)]
    preferred: Option<String>,
}

/// A wall-clock time from milliseconds since the epoch; `None` for 0 or for a time the
/// platform's `SystemTime` cannot hold (`UNIX_EPOCH + u64::MAX ms` fits on Linux, not on every
/// platform).
fn wall(ms: u64) -> Option<SystemTime> {
    (ms > 0)
        .then(|| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
        .flatten()
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
        preferred_holder: stored.preferred.filter(|p| !p.is_empty()),
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

    use proptest::prelude::*;

    fn is_typed(result: &Result<LeaderRecord, BackendError>) -> bool {
        matches!(result, Ok(_) | Err(BackendError::MalformedRecord { .. }))
    }

    /// JSON values of every kind, nested a little: what a foreign writer might put in the key.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(serde_json::Value::from),
                proptest::collection::hash_map(any::<String>(), inner, 0..4)
                    .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn arbitrary_bytes_decode_or_give_a_typed_error(
            raw in proptest::collection::vec(any::<u8>(), 0..256),
            pttl in any::<i64>(),
        ) {
            prop_assert!(is_typed(&parse("l", &raw)));
            let observed = observe("l", Some(&raw), pttl);
            let typed = matches!(observed, Ok(_) | Err(BackendError::MalformedRecord { .. }));
            prop_assert!(typed);
        }

        #[test]
        fn records_with_any_field_values_decode_or_give_a_typed_error(
            v in prop_oneof![Just(1u64), any::<u64>()],
            holder in any::<String>(),
            token in any::<u64>(),
            lease_ms in any::<u64>(),
            acquired_ms in any::<u64>(),
            renewed_ms in any::<u64>(),
            transitions in any::<u64>(),
            pttl in any::<i64>(),
        ) {
            let raw = serde_json::json!({
                "v": v, "holder": holder, "token": token, "lease_ms": lease_ms,
                "acquired_ms": acquired_ms, "renewed_ms": renewed_ms, "transitions": transitions,
            })
            .to_string();
            let parsed = parse("l", raw.as_bytes());
            if v == 1 {
                let record = parsed.expect("a version 1 record with fields in range");
                prop_assert_eq!(&record.holder, &holder);
                prop_assert_eq!(record.token, Some(FencingToken(token)));
                prop_assert_eq!(record.lease_duration, Duration::from_millis(lease_ms));
                prop_assert_eq!(record.acquire_time.is_some(), acquired_ms > 0);
                let observed = observe("l", Some(raw.as_bytes()), pttl).expect("parsed above");
                let expected = u64::try_from(pttl).ok().map(Duration::from_millis);
                prop_assert_eq!(observed.expires_in, expected);
            } else {
                let is_malformed = matches!(parsed, Err(BackendError::MalformedRecord { .. }));
                prop_assert!(is_malformed);
            }
        }

        #[test]
        fn arbitrary_json_fields_decode_or_give_a_typed_error(
            fields in proptest::collection::hash_map(
                prop_oneof![
                    Just("v".to_owned()), Just("holder".to_owned()), Just("token".to_owned()),
                    Just("lease_ms".to_owned()), Just("acquired_ms".to_owned()),
                    Just("renewed_ms".to_owned()), Just("transitions".to_owned()),
                    any::<String>(),
                ],
                json(),
                0..9,
            ),
        ) {
            let raw = serde_json::Value::Object(fields.into_iter().collect()).to_string();
            prop_assert!(is_typed(&parse("l", raw.as_bytes())));
        }
    }
}
