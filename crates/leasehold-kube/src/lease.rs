//! The Lease object: client-go's field rules, and what this crate reads from it.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use leasehold_core::{ConfigError, FencingToken, LeaderRecord, Observation};
use tokio::time::Instant;

/// The label leasehold puts on every Lease it creates or writes, so that one label-selected
/// watch per namespace sees all of them.
pub(crate) const MANAGED_LABEL: &str = "leasehold.rs/managed";
/// The value of [`MANAGED_LABEL`].
pub(crate) const MANAGED_VALUE: &str = "true";
/// The label selector of the namespace watch.
pub(crate) const MANAGED_SELECTOR: &str = "leasehold.rs/managed=true";

/// The annotation that says which term a record belongs to: `/<holder>` on the acquiring write
/// (whose `resourceVersion` is the term's token), `<token>/<holder>` on every renew. Without it,
/// every write would look like a new term to an observer, since the object's version changes
/// with each renew.
pub(crate) const TERM_ANNOTATION: &str = "leasehold.rs/term";

/// The annotation naming a transfer's target, beside `spec.preferredHolder`: an apiserver
/// without the `CoordinatedLeaderElection` feature gate (the default) drops that field.
pub(crate) const PREFERRED_ANNOTATION: &str = "leasehold.rs/preferred-holder";

/// The `spec.strategy` a transfer writes with `spec.preferredHolder` (the API refuses one
/// without the other). A strategy of our own: the apiserver's coordinated election controller
/// acts only on `OldestEmulationVersion`.
pub(crate) const TRANSFER_STRATEGY: &str = "leasehold.rs/transfer";

/// Whether `lease` carries the label, so the namespace watch sees it.
pub(crate) fn labeled(lease: &Lease) -> bool {
    lease
        .metadata
        .labels
        .as_ref()
        .and_then(|labels| labels.get(MANAGED_LABEL))
        .is_some_and(|value| value == MANAGED_VALUE)
}

/// Puts the label on `lease` (keeping every other label: client-go's writes keep ours too).
fn label(lease: &mut Lease) {
    lease
        .metadata
        .labels
        .get_or_insert_with(Default::default)
        .insert(MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned());
}

/// The parts of a Lease spec whose change counts as a change of the record (client-go compares
/// the whole leader election record the same way).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct SpecKey {
    pub holder: String,
    pub duration_seconds: Option<i32>,
    pub acquire: Option<Timestamp>,
    pub renew: Option<Timestamp>,
    pub transitions: Option<i32>,
    /// `spec.preferredHolder`: a transfer under way (see [`transferred`]).
    pub preferred: Option<String>,
}

impl SpecKey {
    pub fn of(lease: &Lease) -> Self {
        let spec = lease.spec.clone().unwrap_or_default();
        let preferred = spec
            .preferred_holder
            .clone()
            .filter(|p| !p.is_empty())
            .or_else(|| annotated_preference(lease, spec.renew_time.as_ref()));
        Self {
            holder: spec.holder_identity.unwrap_or_default(),
            duration_seconds: spec.lease_duration_seconds,
            acquire: spec.acquire_time.map(|t| t.0),
            renew: spec.renew_time.map(|t| t.0),
            transitions: spec.lease_transitions,
            preferred,
        }
    }

    /// The announced lease duration; `None` when missing or not positive.
    pub fn duration(&self) -> Option<Duration> {
        self.duration_seconds
            .and_then(|s| u64::try_from(s).ok())
            .filter(|s| *s > 0)
            .map(Duration::from_secs)
    }

    /// Same holder and same acquire time: the same term.
    pub fn same_term(&self, other: &SpecKey) -> bool {
        self.holder == other.holder && self.acquire == other.acquire
    }

    /// Whether `other` is the same record for expiry: everything equal, except that a transfer
    /// request on a held record (a preferred holder) is no renew: a request to a dead holder
    /// must not extend its lease.
    pub fn same_record(&self, other: &SpecKey) -> bool {
        let request_only = !self.holder.is_empty();
        (
            self.holder.as_str(),
            self.duration_seconds,
            &self.acquire,
            &self.renew,
            self.transitions,
        ) == (
            other.holder.as_str(),
            other.duration_seconds,
            &other.acquire,
            &other.renew,
            other.transitions,
        ) && (request_only || self.preferred == other.preferred)
    }
}

/// Observation state of one lock.
#[derive(Debug, Clone)]
pub(crate) struct Observed {
    pub key: SpecKey,
    pub at: Instant,
}

impl Observed {
    /// Records that the record `key` was seen at `now`: the observation instant moves only when
    /// the record changed (client-go's rule; expiry counts from when this candidate saw the
    /// change, never from a remote timestamp). Returns what the candidate concludes, and whether
    /// the lock is free to take (vacant, or its lease has run out as observed). `fallback` is
    /// the duration assumed when the record announces none; `token` the object's version.
    pub fn see(
        seen: &mut Option<Observed>,
        key: SpecKey,
        token: Option<FencingToken>,
        now: Instant,
        fallback: Duration,
    ) -> (Observation, bool) {
        let since = match seen {
            Some(entry) if entry.key.same_record(&key) => entry.at,
            _ => {
                *seen = Some(Observed {
                    key: key.clone(),
                    at: now,
                });
                now
            }
        };
        let duration = key.duration().unwrap_or(fallback);
        let expires_at = since.checked_add(duration);
        // A transfer's reservation (empty holder, a preferred holder) is held until its lease
        // has run out as observed, like any record; only its target may take it meanwhile.
        let reserved = key.holder.is_empty() && key.preferred.is_some();
        let ran_out = expires_at.is_some_and(|at| now >= at);
        let expired = (key.holder.is_empty() && !reserved) || ran_out;
        let observation = if key.holder.is_empty() && (!reserved || ran_out) {
            Observation::vacant()
        } else {
            let mut record = record_of(&key, duration);
            record.token = token;
            let left = expires_at.map(|at| at.saturating_duration_since(now));
            Observation::held(record, Some(left.unwrap_or(duration)))
        };
        (observation, expired)
    }

    /// What was last seen, if that was a live holder other than `identity` at `now`: a deleted
    /// Lease is not a release, so its last holder is respected until its observed expiry.
    pub fn live_holder(
        &self,
        identity: &str,
        now: Instant,
        fallback: Duration,
    ) -> Option<Observation> {
        if self.key.holder.is_empty() || self.key.holder == identity {
            return None;
        }
        let duration = self.key.duration().unwrap_or(fallback);
        let left = self
            .at
            .checked_add(duration)
            .map_or(duration, |at| at.saturating_duration_since(now));
        (!left.is_zero()).then(|| Observation::held(record_of(&self.key, duration), Some(left)))
    }
}

/// The name part of a label key, or a label value: at most 63 characters, alphanumeric at both
/// ends, `-`, `_`, `.` and alphanumerics between.
fn label_name_ok(s: &str) -> bool {
    s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && s.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
        && s.chars().last().is_some_and(|c| c.is_ascii_alphanumeric())
}

/// Checks a label as the API does (`[prefix/]name` keys, DNS-subdomain prefixes, 63-character
/// names and values), and keeps our own label ours.
pub(crate) fn validate_label(key: &str, value: &str) -> Result<(), ConfigError> {
    let invalid = |field: &'static str, given: &str, reason: &str| ConfigError::InvalidName {
        field,
        value: given.chars().take(300).collect(),
        reason: reason.to_owned(),
    };
    let (prefix, name) = match key.rsplit_once('/') {
        Some((prefix, name)) => (Some(prefix), name),
        None => (None, key),
    };
    if !label_name_ok(name) {
        return Err(invalid(
            "label key",
            key,
            "the name part must be 1-63 characters, alphanumeric at both ends, with '-', '_' or '.' between",
        ));
    }
    if let Some(prefix) = prefix {
        let dns = prefix.len() <= 253
            && prefix.split('.').all(|part| {
                !part.is_empty()
                    && part.len() <= 63
                    && part
                        .chars()
                        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
                    && !part.starts_with('-')
                    && !part.ends_with('-')
            });
        if !dns {
            return Err(invalid(
                "label key",
                key,
                "the prefix must be a DNS subdomain (lowercase, dots, at most 253 characters)",
            ));
        }
    }
    if !value.is_empty() && !label_name_ok(value) {
        return Err(invalid(
            "label value",
            value,
            "a value is empty or 1-63 characters, alphanumeric at both ends, with '-', '_' or '.' between",
        ));
    }
    if key == MANAGED_LABEL && value != MANAGED_VALUE {
        return Err(invalid(
            "label key",
            key,
            "leasehold.rs/managed is leasehold's own label (the namespace watch selects on it)",
        ));
    }
    Ok(())
}

/// Why a record cannot be used, if it cannot: a holder identity that is not an identity.
pub(crate) fn malformed(key: &SpecKey) -> Option<String> {
    if key.holder.chars().any(char::is_control) {
        return Some(format!(
            "holderIdentity {:?} contains control characters: it was not written by a leader elector",
            key.holder.chars().take(64).collect::<String>()
        ));
    }
    None
}

pub(crate) fn now() -> MicroTime {
    // MicroTime carries microseconds: truncate so what we write is what we read back.
    let now = Timestamp::now();
    MicroTime(Timestamp::from_microsecond(now.as_microsecond()).unwrap_or(now))
}

fn wall(t: Option<&Timestamp>) -> Option<SystemTime> {
    t.map(|t| SystemTime::from(*t))
}

/// The fencing token of the term `lease` records: from [`TERM_ANNOTATION`] when it names the
/// Lease's holder, else the object's version (a record another program wrote, such as client-go:
/// its version still orders it against our terms).
pub(crate) fn term_token_of(lease: &Lease) -> Option<FencingToken> {
    let holder = lease
        .spec
        .as_ref()
        .and_then(|spec| spec.holder_identity.as_deref())
        .unwrap_or_default();
    let annotated = lease
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TERM_ANNOTATION))
        .and_then(|value| value.split_once('/'))
        .filter(|(_, named)| *named == holder);
    match annotated {
        Some(("", _)) | None => token_of(lease),
        Some((digits, _)) => digits.parse::<u64>().ok().map(FencingToken),
    }
}

/// Marks `lease` as written by `holder`'s term `token` (`None`: the acquiring write).
fn mark_term(lease: &mut Lease, holder: &str, token: Option<FencingToken>) {
    let value = match token {
        Some(token) => format!("{token}/{holder}"),
        None => format!("/{holder}"),
    };
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(TERM_ANNOTATION.to_owned(), value);
}

/// The object's version, as a number: the token of the term an acquiring write begins.
pub(crate) fn token_of(lease: &Lease) -> Option<FencingToken> {
    lease
        .metadata
        .resource_version
        .as_deref()
        .and_then(|rv| rv.parse::<u64>().ok())
        .map(FencingToken)
}

pub(crate) fn record_of(key: &SpecKey, duration: Duration) -> LeaderRecord {
    LeaderRecord {
        holder: key.holder.clone(),
        token: None,
        lease_duration: duration,
        acquire_time: wall(key.acquire.as_ref()),
        renew_time: wall(key.renew.as_ref()),
        transitions: key
            .transitions
            .and_then(|t| u64::try_from(t).ok())
            .unwrap_or(0),
        preferred_holder: key.preferred.clone(),
    }
}

/// A new Lease held by `identity`.
pub(crate) fn fresh(name: &str, identity: &str, seconds: i32) -> Lease {
    let now = now();
    let mut labels = std::collections::BTreeMap::new();
    labels.insert(MANAGED_LABEL.to_owned(), MANAGED_VALUE.to_owned());
    let mut lease = Lease {
        metadata: ObjectMeta {
            name: Some(name.to_owned()),
            labels: Some(labels),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(identity.to_owned()),
            lease_duration_seconds: Some(seconds),
            acquire_time: Some(now.clone()),
            renew_time: Some(now),
            lease_transitions: Some(0),
            ..LeaseSpec::default()
        }),
    };
    mark_term(&mut lease, identity, None);
    lease
}

/// `current` taken by `identity` (a new term): client-go bumps `leaseTransitions` when the
/// holder changes.
pub(crate) fn taken(current: &Lease, identity: &str, seconds: i32) -> Lease {
    let mut lease = current.clone();
    label(&mut lease);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let transitions = spec.lease_transitions.unwrap_or(0);
    let same = spec.holder_identity.as_deref() == Some(identity);
    let now = now();
    spec.holder_identity = Some(identity.to_owned());
    spec.lease_duration_seconds = Some(seconds);
    spec.acquire_time = Some(now.clone());
    spec.renew_time = Some(now);
    spec.lease_transitions = Some(if same {
        transitions
    } else {
        transitions.saturating_add(1)
    });
    mark_term(&mut lease, identity, None);
    clear_reservation(&mut lease);
    lease
}

/// The target [`PREFERRED_ANNOTATION`] names, if it was written together with the Lease's
/// current `renewTime`: `<renewTime in µs>/<identity>`. Another program's later write (a
/// client-go takeover keeps our annotations) changes `renewTime`, and so retires it.
fn annotated_preference(lease: &Lease, renew: Option<&MicroTime>) -> Option<String> {
    let value = lease
        .metadata
        .annotations
        .as_ref()?
        .get(PREFERRED_ANNOTATION)?;
    let (micros, to) = value.split_once('/')?;
    let written = renew?.0.as_microsecond();
    (micros.parse::<i64>().ok() == Some(written) && !to.is_empty()).then(|| to.to_owned())
}

/// Removes a transfer's reservation (ours: a foreign `strategy` is kept).
fn clear_reservation(lease: &mut Lease) {
    if let Some(annotations) = lease.metadata.annotations.as_mut() {
        annotations.remove(PREFERRED_ANNOTATION);
    }
    if let Some(spec) = lease.spec.as_mut() {
        spec.preferred_holder = None;
        if spec.strategy.as_deref() == Some(TRANSFER_STRATEGY) {
            spec.strategy = None;
        }
    }
}

/// `mine` handed over to `to`: released (empty holder, times now), announcing `seconds` of
/// lease for the reservation, with `to` in `spec.preferredHolder` (and our `spec.strategy`,
/// which the API requires beside it) and in [`PREFERRED_ANNOTATION`], which survives an
/// apiserver that drops the fields.
pub(crate) fn transferred(mine: &Lease, to: &str, seconds: i32) -> Lease {
    let mut lease = released(mine);
    lease
        .spec
        .get_or_insert_with(LeaseSpec::default)
        .lease_duration_seconds = Some(seconds);
    prefer(&mut lease, to);
    lease
}

/// Names `to` as the preferred holder: `spec.preferredHolder` with a `spec.strategy` (kept, or
/// ours), and [`PREFERRED_ANNOTATION`], bound to the Lease's `renewTime`.
fn prefer(lease: &mut Lease, to: &str) {
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.preferred_holder = Some(to.to_owned());
    if spec.strategy.as_deref().is_none_or(str::is_empty) {
        spec.strategy = Some(TRANSFER_STRATEGY.to_owned());
    }
    let renew = spec.renew_time.as_ref().map_or(0, |t| t.0.as_microsecond());
    lease
        .metadata
        .annotations
        .get_or_insert_with(Default::default)
        .insert(PREFERRED_ANNOTATION.to_owned(), format!("{renew}/{to}"));
}

/// `current`, held, with a request to its holder to hand over to `to`: `spec.preferredHolder`
/// (Kubernetes' own signal to a holder that a better one exists; the `strategy` the API requires
/// beside it is kept, or ours) and [`PREFERRED_ANNOTATION`]. The term is untouched.
pub(crate) fn asked_to_transfer(current: &Lease, to: &str) -> Lease {
    let mut lease = current.clone();
    // Still the acquiring write's mark: its version is the term's token; say so, since this
    // write changes the version.
    let holder = current
        .spec
        .as_ref()
        .and_then(|s| s.holder_identity.clone())
        .unwrap_or_default();
    let acquiring = current
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(TERM_ANNOTATION))
        .is_some_and(|mark| *mark == format!("/{holder}"));
    if let Some(token) = term_token_of(current).filter(|_| acquiring) {
        mark_term(&mut lease, &holder, Some(token));
    }
    prefer(&mut lease, to);
    lease
}

/// `mine` with a new `renewTime` and our own `leaseDurationSeconds`: a renew never republishes
/// a duration someone else wrote (followers judge expiry by the announced duration).
pub(crate) fn renewed(mine: &Lease, duration_seconds: i32, token: FencingToken) -> Lease {
    let mut lease = mine.clone();
    label(&mut lease);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    spec.renew_time = Some(now());
    spec.lease_duration_seconds = Some(duration_seconds);
    let holder = spec.holder_identity.clone().unwrap_or_default();
    mark_term(&mut lease, &holder, Some(token));
    lease
}

/// `mine` released as client-go releases: empty holder, duration 1 s, times now.
pub(crate) fn released(mine: &Lease) -> Lease {
    let mut lease = mine.clone();
    label(&mut lease);
    let spec = lease.spec.get_or_insert_with(LeaseSpec::default);
    let now = now();
    spec.holder_identity = Some(String::new());
    spec.lease_duration_seconds = Some(1);
    spec.acquire_time = Some(now.clone());
    spec.renew_time = Some(now);
    if let Some(annotations) = lease.metadata.annotations.as_mut() {
        annotations.remove(TERM_ANNOTATION);
    }
    clear_reservation(&mut lease);
    lease
}

/// A Lease as a client-go candidate compares it: its `LeaderElectionRecord`, whose JSON bytes
/// it keeps and compares with each new read, refreshing the instant it observed the record only
/// when they differ. `acquireTime` and `renewTime` are `metav1.Time` there, encoded in whole
/// seconds (RFC 3339, fraction dropped, i.e. rounded down) or `null` for the zero time; absent
/// fields read as zero values.
#[derive(Debug, Clone, PartialEq, Eq)]
struct ClientGoView {
    holder: String,
    duration_seconds: i32,
    acquire: Option<i64>,
    renew: Option<i64>,
    transitions: i32,
    preferred_holder: String,
    strategy: String,
}

impl ClientGoView {
    fn of(lease: &Lease) -> Self {
        let spec = lease.spec.as_ref();
        let text =
            |f: fn(&LeaseSpec) -> Option<&String>| spec.and_then(f).cloned().unwrap_or_default();
        Self {
            holder: text(|s| s.holder_identity.as_ref()),
            duration_seconds: spec.and_then(|s| s.lease_duration_seconds).unwrap_or(0),
            acquire: spec
                .and_then(|s| s.acquire_time.as_ref())
                .and_then(|t| whole_second(t.0)),
            renew: spec
                .and_then(|s| s.renew_time.as_ref())
                .and_then(|t| whole_second(t.0)),
            transitions: spec.and_then(|s| s.lease_transitions).unwrap_or(0),
            preferred_holder: text(|s| s.preferred_holder.as_ref()),
            strategy: text(|s| s.strategy.as_ref()),
        }
    }
}

/// `t` as `metav1.Time` encodes it: the whole second, rounded down (also before 1970), or
/// `None` for Go's zero time (0001-01-01T00:00:00Z exactly), which encodes as `null`.
fn whole_second(t: Timestamp) -> Option<i64> {
    /// Go's zero `time.Time`, in seconds since the Unix epoch.
    const GO_ZERO_TIME: i64 = -62_135_596_800;
    let (second, nanos) = (t.as_second(), t.subsec_nanosecond());
    if second == GO_ZERO_TIME && nanos == 0 {
        return None;
    }
    // jiff keeps the fraction's sign with the seconds': -1.5 s is (-1, -500 ms).
    Some(if nanos < 0 { second - 1 } else { second })
}

/// `true` when a client-go candidate that saw `before` would see `after` as a change of the
/// record (and so count the lease from when it saw `after`); `false` when the two are the same
/// to it, e.g. a renew within the same wall-clock second as the write it replaced.
pub(crate) fn client_go_notices(before: &Lease, after: &Lease) -> bool {
    ClientGoView::of(before) != ClientGoView::of(after)
}

/// `leaseDurationSeconds` for a lease duration: a whole number of seconds, at least 1.
pub(crate) fn duration_seconds(duration: Duration) -> Result<i32, ConfigError> {
    let unsupported = |reason: &str| ConfigError::Unsupported {
        field: "lease_duration",
        value: duration,
        backend: "kubernetes",
        reason: reason.to_owned(),
    };
    if duration.subsec_nanos() != 0 || duration.as_secs() == 0 {
        return Err(unsupported(
            "a Lease's leaseDurationSeconds is a whole number of seconds, at least 1 (use e.g. \"15s\")",
        ));
    }
    i32::try_from(duration.as_secs()).map_err(|_| unsupported("too long for leaseDurationSeconds"))
}

/// A Lease name must be a DNS-1123 subdomain.
pub(crate) fn validate_name(name: &str) -> Result<(), ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidName {
        field: "lease_name",
        value: name.to_owned(),
        reason: format!("a Lease name must be a DNS-1123 subdomain: {reason}"),
    };
    if name.len() > 253 {
        return Err(invalid("at most 253 characters"));
    }
    if !name
        .chars()
        .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
    {
        return Err(invalid("only lowercase letters, digits, '-' and '.'"));
    }
    let alnum = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    if !alnum(name.chars().next()) || !alnum(name.chars().last()) {
        return Err(invalid("it must start and end with a letter or digit"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_durations_follow_kubernetes_rules() {
        for ok in ["a", "my-app-leader", "a.b-c.1"] {
            validate_name(ok).unwrap();
        }
        for bad in ["", "My-App", "-a", "a-", "a_b", "a/b"] {
            assert_eq!(
                validate_name(bad).unwrap_err().field(),
                "lease_name",
                "{bad}"
            );
        }
        assert_eq!(duration_seconds(Duration::from_secs(15)).unwrap(), 15);
        for bad in [
            Duration::from_millis(1500),
            Duration::ZERO,
            Duration::from_millis(500),
        ] {
            assert_eq!(duration_seconds(bad).unwrap_err().field(), "lease_duration");
        }
    }

    #[test]
    fn leases_with_missing_fields_are_read() {
        let empty = Lease::default();
        let key = SpecKey::of(&empty);
        assert_eq!(key.holder, "");
        assert_eq!(key.duration(), None);
        assert!(malformed(&key).is_none());
        let record = record_of(&key, Duration::from_secs(1));
        assert_eq!(record.transitions, 0);
        let mut odd = fresh("x", "a", 15);
        odd.spec.as_mut().unwrap().lease_duration_seconds = Some(-3);
        assert_eq!(SpecKey::of(&odd).duration(), None);
        odd.spec.as_mut().unwrap().holder_identity = Some("bad\u{1}".into());
        assert!(malformed(&SpecKey::of(&odd)).is_some());
    }

    fn with_version(mut lease: Lease, version: &str) -> Lease {
        lease.metadata.resource_version = Some(version.into());
        lease
    }

    #[test]
    fn a_term_keeps_its_token_through_renews_and_a_foreign_record_has_its_version() {
        let acquired = with_version(fresh("x", "a", 15), "100");
        assert_eq!(term_token_of(&acquired), Some(FencingToken(100)));
        let renewed = with_version(renewed(&acquired, 15, FencingToken(100)), "107");
        assert_eq!(term_token_of(&renewed), Some(FencingToken(100)));
        // client-go takes the Lease over, keeping our annotation: it names another holder.
        let mut foreign = renewed.clone();
        foreign.spec.as_mut().unwrap().holder_identity = Some("go".into());
        let foreign = with_version(foreign, "130");
        assert_eq!(term_token_of(&foreign), Some(FencingToken(130)));
        // Our next acquire starts a term of its own.
        let again = with_version(taken(&foreign, "a", 15), "140");
        assert_eq!(term_token_of(&again), Some(FencingToken(140)));
        let gone = released(&again);
        assert!(gone
            .metadata
            .annotations
            .as_ref()
            .is_none_or(|a| !a.contains_key(TERM_ANNOTATION)));
        let mut garbage = renewed;
        garbage
            .metadata
            .annotations
            .get_or_insert_with(Default::default)
            .insert(TERM_ANNOTATION.into(), "x9/a".into());
        assert_eq!(term_token_of(&garbage), None);
    }

    #[test]
    fn a_transfer_request_keeps_the_terms_token_and_is_no_renew() {
        let acquired = with_version(fresh("x", "a", 15), "100");
        let asked = with_version(asked_to_transfer(&acquired, "c"), "105");
        assert_eq!(term_token_of(&asked), Some(FencingToken(100)));
        let (before, after) = (SpecKey::of(&acquired), SpecKey::of(&asked));
        assert_eq!(after.preferred.as_deref(), Some("c"));
        assert!(
            before.same_record(&after),
            "a request does not extend the holder's lease"
        );
        // A reservation is another record than a release.
        let reserved = transferred(&asked, "c", 15);
        let mut plain = reserved.clone();
        plain.spec.as_mut().unwrap().preferred_holder = None;
        plain.metadata.annotations = None;
        assert!(!SpecKey::of(&reserved).same_record(&SpecKey::of(&plain)));
    }

    #[test]
    fn our_annotation_does_not_outlive_the_write_it_came_with() {
        let mut reserved = transferred(&with_version(fresh("x", "a", 15), "1"), "c", 15);
        // The apiserver without the feature gate drops the fields; the annotation remains.
        reserved.spec.as_mut().unwrap().preferred_holder = None;
        reserved.spec.as_mut().unwrap().strategy = None;
        assert_eq!(SpecKey::of(&reserved).preferred.as_deref(), Some("c"));
        // client-go takes it and later releases, keeping our annotations: no reservation.
        let mut go = reserved.clone();
        let spec = go.spec.as_mut().unwrap();
        spec.holder_identity = Some(String::new());
        spec.renew_time = Some(MicroTime(Timestamp::from_second(1_900_000_000).unwrap()));
        assert_eq!(SpecKey::of(&go).preferred, None);
    }

    #[test]
    fn labels_follow_the_api_rules() {
        for (key, value) in [
            ("app", "x"),
            ("app.kubernetes.io/name", "my-controller"),
            ("example.com/empty", ""),
            ("leasehold.rs/managed", "true"),
        ] {
            assert_eq!(validate_label(key, value), Ok(()), "{key}={value}");
        }
        for (key, value) in [
            ("", "x"),
            ("-app", "x"),
            ("Example.com/app", "x"),
            ("app", "-x"),
            ("app", &"v".repeat(64)),
            (&"k".repeat(64), "x"),
            ("a b", "x"),
            ("leasehold.rs/managed", "false"),
        ] {
            assert!(
                matches!(
                    validate_label(key, value),
                    Err(ConfigError::InvalidName { .. })
                ),
                "{key}={value}"
            );
        }
    }

    #[test]
    fn takeover_and_release_follow_client_go() {
        let lease = fresh("x", "a", 15);
        let spec = lease.spec.clone().unwrap();
        assert_eq!(spec.lease_transitions, Some(0));
        let taken_by_b = taken(&lease, "b", 15);
        assert_eq!(taken_by_b.spec.as_ref().unwrap().lease_transitions, Some(1));
        let again_b = taken(&taken_by_b, "b", 15);
        assert_eq!(again_b.spec.as_ref().unwrap().lease_transitions, Some(1));
        let released = released(&again_b);
        let spec = released.spec.unwrap();
        assert_eq!(spec.holder_identity.as_deref(), Some(""));
        assert_eq!(spec.lease_duration_seconds, Some(1));
        let t = now().0;
        assert_eq!(t.subsec_nanosecond() % 1000, 0, "microsecond precision");
    }

    fn key(holder: &str, renew_second: i64, seconds: i32) -> SpecKey {
        SpecKey {
            holder: holder.into(),
            duration_seconds: Some(seconds),
            acquire: Some(Timestamp::from_second(1_700_000_000).unwrap()),
            renew: Some(Timestamp::from_second(renew_second).unwrap()),
            transitions: Some(0),
            preferred: None,
        }
    }

    #[test]
    fn expiry_counts_from_when_the_change_was_seen() {
        let t0 = Instant::now();
        let fallback = Duration::from_secs(15);
        let mut seen = None;
        let (o, free) = Observed::see(&mut seen, key("a", 10, 3), None, t0, fallback);
        assert!(!free);
        assert_eq!(o.expires_in, Some(Duration::from_secs(3)));
        // The same record seen again later: the lease still counts from the first sight.
        let later = t0 + Duration::from_millis(2500);
        let (o, free) = Observed::see(&mut seen, key("a", 10, 3), None, later, fallback);
        assert!(!free);
        assert_eq!(o.expires_in, Some(Duration::from_millis(500)));
        let (_, free) = Observed::see(
            &mut seen,
            key("a", 10, 3),
            None,
            t0 + Duration::from_secs(3),
            fallback,
        );
        assert!(free, "expired at first sight + announced duration");
        // A changed record (a renew) restarts the count from now.
        let renewed_at = t0 + Duration::from_secs(4);
        let (o, free) = Observed::see(
            &mut seen,
            key("a", 11, 3),
            Some(FencingToken(9)),
            renewed_at,
            fallback,
        );
        assert!(!free);
        assert_eq!(o.expires_in, Some(Duration::from_secs(3)));
        assert_eq!(o.record.and_then(|r| r.token), Some(FencingToken(9)));
        // An empty holder is a release: free at once, and vacant.
        let (o, free) = Observed::see(&mut seen, key("", 12, 1), None, renewed_at, fallback);
        assert!(free && o.record.is_none());
    }

    #[test]
    fn a_deleted_leases_last_holder_is_respected_until_its_observed_expiry() {
        let t0 = Instant::now();
        let fallback = Duration::from_secs(15);
        let seen = Observed {
            key: key("a", 10, 3),
            at: t0,
        };
        let left = seen.live_holder("b", t0 + Duration::from_secs(1), fallback);
        assert_eq!(
            left.and_then(|o| o.expires_in),
            Some(Duration::from_secs(2))
        );
        assert!(seen
            .live_holder("b", t0 + Duration::from_secs(3), fallback)
            .is_none());
        assert!(
            seen.live_holder("a", t0, fallback).is_none(),
            "our own term is not in our way"
        );
        let missing = Observed {
            key: SpecKey {
                duration_seconds: None,
                ..key("a", 10, 3)
            },
            at: t0,
        };
        let left = missing.live_holder("b", t0, fallback);
        assert_eq!(
            left.and_then(|o| o.expires_in),
            Some(fallback),
            "no duration: the fallback"
        );
    }

    #[test]
    fn a_renew_writes_our_own_duration_over_a_foreign_one() {
        let mut lease = fresh("x", "a", 15);
        lease.spec.as_mut().unwrap().lease_duration_seconds = Some(3);
        let renewed = renewed(&lease, 15, FencingToken(1));
        let spec = renewed.spec.unwrap();
        assert_eq!(spec.lease_duration_seconds, Some(15));
        assert_eq!(spec.holder_identity.as_deref(), Some("a"));
        assert_eq!(
            spec.acquire_time,
            lease.spec.unwrap().acquire_time,
            "the same term"
        );
    }

    fn at(second: i64, nanos: i32) -> Timestamp {
        Timestamp::new(second, nanos).expect("in range")
    }

    fn with_renew(lease: &Lease, renew: Timestamp) -> Lease {
        let mut lease = lease.clone();
        lease.spec.get_or_insert_with(LeaseSpec::default).renew_time = Some(MicroTime(renew));
        lease
    }

    #[test]
    fn whole_seconds_round_down_like_metav1_time() {
        assert_eq!(whole_second(at(0, 0)), Some(0));
        assert_eq!(whole_second(at(0, 999_999_000)), Some(0));
        assert_eq!(whole_second(at(1, 0)), Some(1));
        assert_eq!(whole_second(at(1_700_000_000, 1_000)), Some(1_700_000_000));
        // Before 1970: 1969-12-31T23:59:59.5Z is "23:59:59Z" in RFC 3339, second -1.
        assert_eq!(whole_second(at(0, -500_000_000)), Some(-1));
        assert_eq!(whole_second(at(-1, 0)), Some(-1));
        assert_eq!(whole_second(at(-1, -1_000)), Some(-2));
        assert_eq!(whole_second(at(-2, 0)), Some(-2));
        // Go's zero time is null; a microsecond after it is not.
        assert_eq!(whole_second(at(-62_135_596_800, 0)), None);
        assert_eq!(
            whole_second(at(-62_135_596_800, 1_000)),
            Some(-62_135_596_800)
        );
        assert_eq!(
            whole_second(Timestamp::MIN),
            Some(Timestamp::MIN.as_second())
        );
        assert_eq!(
            whole_second(Timestamp::MAX),
            Some(Timestamp::MAX.as_second())
        );
    }

    #[test]
    fn client_go_sees_a_renew_only_when_its_second_changes() {
        let base = with_renew(&fresh("x", "a", 3), at(1_700_000_000, 100_000_000));
        let same = |s, n| !client_go_notices(&base, &with_renew(&base, at(s, n)));
        assert!(same(1_700_000_000, 100_000_000), "an identical write");
        assert!(same(1_700_000_000, 600_000_000), "later in the same second");
        assert!(
            same(1_700_000_000, 999_999_000),
            "the second's last microsecond"
        );
        assert!(same(1_700_000_000, 0), "the second's first microsecond");
        assert!(!same(1_700_000_001, 0), "the next second begins");
        assert!(!same(1_699_999_999, 999_999_000), "the second before");
        // Before 1970 the boundary is at whole seconds too, not at zero.
        let early = with_renew(&base, at(0, -400_000_000));
        assert!(!client_go_notices(
            &early,
            &with_renew(&base, at(0, -900_000_000))
        ));
        assert!(client_go_notices(&early, &with_renew(&base, at(0, 0))));
        assert!(client_go_notices(
            &early,
            &with_renew(&base, at(-1, -1_000))
        ));
        // A missing renewTime is null; so is Go's zero time.
        let mut none = base.clone();
        none.spec.as_mut().unwrap().renew_time = None;
        assert!(client_go_notices(&base, &none));
        assert!(!client_go_notices(
            &none,
            &with_renew(&none, at(-62_135_596_800, 0))
        ));
        assert!(client_go_notices(
            &none,
            &with_renew(&none, at(-62_135_596_800, 1_000))
        ));
    }

    #[test]
    fn client_go_sees_every_other_field_of_its_record() {
        let base = with_renew(&fresh("x", "a", 3), at(1_700_000_000, 100_000_000));
        let changed = |f: fn(&mut LeaseSpec)| {
            let mut lease = base.clone();
            f(lease.spec.as_mut().unwrap());
            client_go_notices(&base, &lease)
        };
        assert!(changed(|s| s.holder_identity = Some("b".into())));
        assert!(changed(|s| s.lease_duration_seconds = Some(4)));
        assert!(changed(|s| s.lease_transitions = Some(1)));
        assert!(changed(|s| s.preferred_holder = Some("b".into())));
        assert!(changed(
            |s| s.strategy = Some("OldestEmulationVersion".into())
        ));
        assert!(changed(|s| {
            s.acquire_time = Some(MicroTime(at(1_700_000_001, 0)));
        }));
        assert!(!changed(|s| {
            s.acquire_time = s
                .acquire_time
                .as_ref()
                .map(|t| MicroTime(at(t.0.as_second(), 999_999_000)));
        }));
        // Absent fields are the zero values.
        assert!(!changed(|s| s.preferred_holder = Some(String::new())));
        assert!(!changed(|s| s.strategy = None));
        let mut zero = base.clone();
        let spec = zero.spec.as_mut().unwrap();
        spec.lease_transitions = None;
        assert!(!client_go_notices(&zero, &{
            let mut l = zero.clone();
            l.spec.as_mut().unwrap().lease_transitions = Some(0);
            l
        }));
        let empty_spec = Lease {
            spec: Some(LeaseSpec::default()),
            ..Lease::default()
        };
        assert!(!client_go_notices(&Lease::default(), &empty_spec));
        // Metadata is not part of the record.
        let mut other = base.clone();
        other.metadata.resource_version = Some("99".into());
        assert!(!client_go_notices(&base, &other));
    }

    use proptest::prelude::*;

    fn timestamp() -> impl Strategy<Value = Timestamp> {
        prop_oneof![
            (Timestamp::MIN.as_second()..=Timestamp::MAX.as_second())
                .prop_filter_map("in jiff's range", |s| Timestamp::from_second(s).ok()),
            (
                Timestamp::MIN.as_second()..=Timestamp::MAX.as_second(),
                -999_999_999..=999_999_999i32,
            )
                .prop_filter_map("in jiff's range", |(s, n)| Timestamp::new(s, n).ok()),
            Just(Timestamp::MIN),
            Just(Timestamp::MAX),
            Just(Timestamp::UNIX_EPOCH),
        ]
    }

    fn lease() -> impl Strategy<Value = Lease> {
        (
            proptest::option::of(any::<String>()),
            proptest::option::of(prop_oneof![
                any::<i32>(),
                Just(i32::MIN),
                Just(i32::MAX),
                Just(0),
                Just(-1),
            ]),
            proptest::option::of(timestamp()),
            proptest::option::of(timestamp()),
            proptest::option::of(any::<i32>()),
            proptest::option::of(prop_oneof![
                any::<String>(),
                any::<u64>().prop_map(|n| n.to_string()),
                any::<i64>().prop_map(|n| n.to_string()),
            ]),
            any::<bool>(),
        )
            .prop_map(
                |(holder, seconds, acquire, renew, transitions, resource_version, has_spec)| {
                    Lease {
                        metadata: ObjectMeta {
                            name: Some("x".into()),
                            resource_version,
                            ..ObjectMeta::default()
                        },
                        spec: has_spec.then(|| LeaseSpec {
                            holder_identity: holder,
                            lease_duration_seconds: seconds,
                            acquire_time: acquire.map(MicroTime),
                            renew_time: renew.map(MicroTime),
                            lease_transitions: transitions,
                            ..LeaseSpec::default()
                        }),
                    }
                },
            )
    }

    /// Everything this crate reads from or writes over a Lease, on `lease`.
    fn decode_all(lease: &Lease) {
        let key = SpecKey::of(lease);
        let duration = key.duration();
        if let Some(duration) = duration {
            assert!(duration >= Duration::from_secs(1));
            assert!(duration <= Duration::from_secs(i32::MAX.unsigned_abs().into()));
        }
        let _ = malformed(&key);
        let record = record_of(&key, duration.unwrap_or(Duration::from_secs(15)));
        assert_eq!(record.holder, key.holder);
        let _ = token_of(lease);
        let _ = term_token_of(lease);
        let _ = key.same_term(&SpecKey::of(&taken(lease, "me", 15)));
        let taken = taken(lease, "me", i32::MAX);
        let transitions = taken.spec.as_ref().and_then(|s| s.lease_transitions);
        assert!(transitions.is_some());
        let _ = SpecKey::of(&renewed(lease, 1, FencingToken(1)));
        let _ = SpecKey::of(&released(lease));
        assert!(!client_go_notices(lease, lease));
        let _ = client_go_notices(lease, &renewed(lease, 1, FencingToken(1)));
    }

    /// JSON values of every kind, a little nested, and strings shaped like the Lease's times.
    fn json() -> impl Strategy<Value = serde_json::Value> {
        let leaf = prop_oneof![
            Just(serde_json::Value::Null),
            any::<bool>().prop_map(serde_json::Value::from),
            any::<i64>().prop_map(serde_json::Value::from),
            any::<u64>().prop_map(serde_json::Value::from),
            any::<f64>().prop_map(serde_json::Value::from),
            any::<String>().prop_map(serde_json::Value::from),
            prop_oneof![
                Just("9999-12-31T23:59:59.999999Z"),
                Just("-009999-01-01T00:00:00Z"),
                Just("1970-01-01T00:00:00Z"),
                Just("2024-02-30T25:61:61Z"),
                Just("2024-01-01T00:00:00.123456789+99:99"),
                Just(""),
            ]
            .prop_map(serde_json::Value::from),
        ];
        leaf.prop_recursive(2, 8, 3, |inner| {
            proptest::collection::vec(inner, 0..3).prop_map(serde_json::Value::from)
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1024))]

        #[test]
        fn leases_with_any_field_values_are_read_without_panic(lease in lease()) {
            decode_all(&lease);
            // Its JSON (times truncated to microseconds; years outside 0..=9999 do not read
            // back, an error) decodes without panic too.
            let json = serde_json::to_vec(&lease).expect("a Lease serializes");
            if let Ok(back) = serde_json::from_slice::<Lease>(&json) {
                decode_all(&back);
                prop_assert_eq!(SpecKey::of(&back).holder, SpecKey::of(&lease).holder);
            }
        }

        #[test]
        fn arbitrary_json_into_a_lease_is_an_error_or_read_without_panic(
            fields in proptest::collection::vec(
                (
                    prop_oneof![
                        Just("holderIdentity"), Just("leaseDurationSeconds"),
                        Just("acquireTime"), Just("renewTime"), Just("leaseTransitions"),
                        Just("preferredHolder"), Just("strategy"), Just("unknown"),
                    ],
                    json(),
                ),
                0..6,
            ),
            resource_version in json(),
        ) {
            let spec: serde_json::Map<String, serde_json::Value> =
                fields.into_iter().map(|(k, v)| (k.to_owned(), v)).collect();
            let raw = serde_json::json!({
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": { "name": "x", "resourceVersion": resource_version },
                "spec": spec,
            })
            .to_string();
            if let Ok(lease) = serde_json::from_str::<Lease>(&raw) {
                decode_all(&lease);
            }
        }

        #[test]
        fn any_lease_duration_gives_seconds_or_a_typed_error(
            secs in prop_oneof![any::<u64>(), 0..100u64, Just(u64::MAX)],
            nanos in prop_oneof![Just(0u32), 0..1_000_000_000u32],
        ) {
            let duration = Duration::new(secs, nanos);
            match duration_seconds(duration) {
                Ok(seconds) => prop_assert_eq!(u64::try_from(seconds).ok(), Some(secs)),
                Err(error) => prop_assert_eq!(error.field(), "lease_duration"),
            }
        }

        #[test]
        fn arbitrary_bytes_into_a_lease_are_an_error_or_read_without_panic(
            raw in proptest::collection::vec(any::<u8>(), 0..256),
        ) {
            if let Ok(lease) = serde_json::from_slice::<Lease>(&raw) {
                decode_all(&lease);
            }
        }
    }
}
