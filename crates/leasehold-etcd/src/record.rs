//! Decoding an election key into a [`LeaderRecord`]: pure, so that it is tested on arbitrary
//! bytes.

use std::time::Duration;

use leasehold_core::{BackendError, FencingToken, LeaderRecord};

/// A leader record from an election key's `key`, `value` (the holder's identity) and create
/// revision (the token; `None` when negative).
///
/// # Errors
///
/// [`BackendError::MalformedRecord`] when the value is not UTF-8: another program wrote it.
pub(crate) fn decode(
    lock: &str,
    key: &[u8],
    value: &[u8],
    create_revision: i64,
    lease_duration: Duration,
) -> Result<LeaderRecord, BackendError> {
    let holder = std::str::from_utf8(value).map_err(|_| BackendError::MalformedRecord {
        lock: lock.to_owned(),
        detail: format!(
            "election key {:?} holds a value that is not UTF-8; it is left alone until its lease ends",
            String::from_utf8_lossy(&key[..key.len().min(256)])
        ),
    })?;
    Ok(LeaderRecord {
        holder: holder.to_owned(),
        token: u64::try_from(create_revision).ok().map(FencingToken),
        lease_duration,
        acquire_time: None,
        renew_time: None,
        transitions: 0,
        preferred_holder: None,
    })
}

/// The value of a transfer request (`leasehold transfer`) of the term whose key was created at
/// `revision`: `<revision>/<target>`. A request names the term it asks, so a late one never
/// moves a later term.
pub(crate) fn encode_request(revision: i64, target: &str) -> String {
    format!("{revision}/{target}")
}

/// The target a request value asks the term created at `revision` to hand over to; `None` for
/// a request of another term, an empty target, or bytes that are no request (another program
/// wrote them): those are ignored.
pub(crate) fn requested(value: &[u8], revision: i64) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?;
    let (asked, target) = value.split_once('/')?;
    (asked.parse::<i64>().ok()? == revision && !target.is_empty()).then(|| target.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn identities_are_read_and_other_bytes_refused() {
        let r = decode("l", b"l/694d", b"pod-1", 7, Duration::from_secs(15)).unwrap();
        assert_eq!(r.holder, "pod-1");
        assert_eq!(r.token, Some(FencingToken(7)));
        assert!(matches!(
            decode("l", b"l/694d", b"\xff\xfe", 7, Duration::ZERO),
            Err(BackendError::MalformedRecord { .. })
        ));
        for revision in [-1, i64::MIN] {
            let r = decode("l", b"l/1", b"a", revision, Duration::ZERO).unwrap();
            assert_eq!(r.token, None, "{revision}");
        }
    }

    #[test]
    fn requests_name_their_term() {
        let value = encode_request(42, "pod/b");
        assert_eq!(requested(value.as_bytes(), 42).as_deref(), Some("pod/b"));
        assert_eq!(
            requested(value.as_bytes(), 43),
            None,
            "another term's request"
        );
        for garbage in [&b""[..], b"42", b"42/", b"x/b", b"\xff/b", b"/b"] {
            assert_eq!(requested(garbage, 42), None, "{garbage:?}");
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn arbitrary_keys_and_values_decode_or_give_a_typed_error(
            key in proptest::collection::vec(any::<u8>(), 0..300),
            value in prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64),
                any::<String>().prop_map(String::into_bytes),
            ],
            create_revision in any::<i64>(),
            secs in any::<u64>(),
        ) {
            let lease = Duration::from_secs(secs);
            match decode("l", &key, &value, create_revision, lease) {
                Ok(record) => {
                    prop_assert_eq!(record.holder.as_bytes(), &value[..]);
                    let token = (create_revision >= 0)
                        .then(|| FencingToken(create_revision.unsigned_abs()));
                    prop_assert_eq!(record.token, token);
                }
                Err(BackendError::MalformedRecord { detail, .. }) => {
                    prop_assert!(std::str::from_utf8(&value).is_err());
                    prop_assert!(detail.len() < 2048);
                }
                Err(other) => prop_assert!(false, "untyped error {}", other),
            }
        }

        #[test]
        fn arbitrary_request_values_never_panic(
            value in proptest::collection::vec(any::<u8>(), 0..64),
            revision in any::<i64>(),
            target in ".+",
        ) {
            let _ = requested(&value, revision);
            prop_assert_eq!(
                requested(encode_request(revision, &target).as_bytes(), revision),
                Some(target)
            );
        }
    }
}
