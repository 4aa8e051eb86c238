//! Elector configuration: the seed's fields plus `max_clock_drift`, with validation.

use std::time::Duration;

use serde::Deserialize;

use crate::error::ConfigError;

/// Default [`Config::lease_duration`]: 15 s, as client-go.
pub const DEFAULT_LEASE_DURATION: Duration = Duration::from_secs(15);
/// Default [`Config::renew_deadline`]: 10 s, as client-go.
pub const DEFAULT_RENEW_DEADLINE: Duration = Duration::from_secs(10);
/// Default [`Config::retry_period`]: 2 s, as client-go.
pub const DEFAULT_RETRY_PERIOD: Duration = Duration::from_secs(2);
/// Default [`Config::max_clock_drift`]: clock rates may differ by up to 1 %.
pub const DEFAULT_MAX_CLOCK_DRIFT: f64 = 0.01;

/// Longest duration accepted by [`Config::validate`] for `lease_duration`, `renew_deadline` and
/// `retry_period`: 365 days.
///
/// A lease is a failover timeout: one longer than a year would leave a crashed leader's lock
/// unusable for that long. The bound fits every backend with room to spare (a Kubernetes
/// `leaseDurationSeconds` is an `i32` of seconds, about 68 years; an etcd TTL an `i64` of
/// seconds; a Redis `PX` an `i64` of milliseconds), stays within the range of tokio's timer
/// wheel (about 2 years), and keeps every `Instant + Duration` of the elector far from overflow.
pub const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Longest identity or lock name accepted by [`Config::validate`]; backends may be stricter.
pub const MAX_NAME_LEN: usize = 253;

/// Configuration of one [`Elector`](crate::Elector).
///
/// The fields mirror client-go's `LeaderElectionConfig` and the seed package's `Config`; the
/// namespace of a Kubernetes Lease belongs to the Kubernetes backend, not here.
///
/// Durations deserialize from humantime strings (`"15s"`, `"1500ms"`), so a `Config` can live in
/// a configuration file:
///
/// ```
/// # fn main() -> Result<(), Box<dyn std::error::Error>> {
/// let config: leasehold_core::Config = serde_json::from_str(r#"{
///     "identity": "pod-1",
///     "lease_name": "my-app-leader",
///     "lease_duration": "15s",
///     "renew_deadline": "10s",
///     "retry_period": "2s"
/// }"#)?;
/// config.validate()?;
/// assert!(config.release_on_cancel);
/// # Ok(()) }
/// ```
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// `false` is standalone mode: the elector leads at once and for ever and never touches the
    /// backend (a single replica, local development). Default `true`.
    pub enabled: bool,
    /// Unique identity of this candidate (usually the pod name, or hostname + pid). Required.
    /// Two candidates with one identity would each take the other's lease for its own.
    pub identity: String,
    /// Name of the lock (the Lease name, the etcd election name, the Redis key). Required.
    pub lease_name: String,
    /// How long a lease lasts without renewal: followers take over a crashed leader's lock after
    /// this long. Default 15 s.
    #[serde(with = "humantime_serde")]
    pub lease_duration: Duration,
    /// How long a leader keeps trying to renew before it steps down, measured from the send
    /// instant of its last successful renew. Default 10 s.
    #[serde(with = "humantime_serde")]
    pub renew_deadline: Duration,
    /// Interval between a leader's renewals, and between retries after an error. Default 2 s.
    #[serde(with = "humantime_serde")]
    pub retry_period: Duration,
    /// Release the lock when the elector shuts down (after the leader's work has finished), so a
    /// follower takes over at once instead of after `lease_duration`. Default `true`.
    pub release_on_cancel: bool,
    /// Largest relative difference between the clock rates of two candidates, as a fraction
    /// (0.01 = 1 %). A leader considers itself valid for `lease_duration × (1 − max_clock_drift)`
    /// from the send instant of its last successful renew. Default 0.01.
    pub max_clock_drift: f64,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            enabled: true,
            identity: String::new(),
            lease_name: String::new(),
            lease_duration: DEFAULT_LEASE_DURATION,
            renew_deadline: DEFAULT_RENEW_DEADLINE,
            retry_period: DEFAULT_RETRY_PERIOD,
            release_on_cancel: true,
            max_clock_drift: DEFAULT_MAX_CLOCK_DRIFT,
        }
    }
}

impl Config {
    /// A configuration with the defaults and the two required fields set.
    pub fn new(identity: impl Into<String>, lease_name: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            lease_name: lease_name.into(),
            ..Self::default()
        }
    }

    /// Sets the three durations at once (lease, renew deadline, retry period).
    pub fn with_timing(
        mut self,
        lease_duration: Duration,
        renew_deadline: Duration,
        retry_period: Duration,
    ) -> Self {
        self.lease_duration = lease_duration;
        self.renew_deadline = renew_deadline;
        self.retry_period = retry_period;
        self
    }

    /// Checks every rule of the configuration.
    ///
    /// Rules (ARCHITECTURE.md, invariant 9):
    /// - `identity` and `lease_name` are non-empty, at most [`MAX_NAME_LEN`] bytes, without
    ///   control characters;
    /// - every duration is non-zero and at most [`MAX_DURATION`];
    /// - `lease_duration > renew_deadline > retry_period × 1.2`;
    /// - `renew_deadline + retry_period <= lease_duration`;
    /// - `max_clock_drift` is finite and in `[0, 0.5)`, and
    ///   `renew_deadline < lease_duration × (1 − max_clock_drift)`, so a leader steps down before
    ///   its lease can expire on a faster clock.
    ///
    /// In standalone mode (`enabled = false`) only `identity` is checked.
    ///
    /// # Errors
    ///
    /// The first rule broken, as a [`ConfigError`] that names the field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_name("identity", &self.identity)?;
        if !self.enabled {
            return Ok(());
        }
        check_name("lease_name", &self.lease_name)?;
        for (field, value) in [
            ("lease_duration", self.lease_duration),
            ("renew_deadline", self.renew_deadline),
            ("retry_period", self.retry_period),
        ] {
            if value.is_zero() {
                return Err(ConfigError::ZeroDuration { field });
            }
            if value > MAX_DURATION {
                return Err(ConfigError::TooLarge {
                    field,
                    value,
                    max: MAX_DURATION,
                });
            }
        }
        // From here every duration is at most MAX_DURATION: their sums cannot overflow.
        if !self.max_clock_drift.is_finite() || !(0.0..0.5).contains(&self.max_clock_drift) {
            return Err(ConfigError::ClockDrift {
                value: self.max_clock_drift,
            });
        }
        if self.renew_deadline >= self.lease_duration {
            return Err(ConfigError::Inconsistent {
                field: "renew_deadline",
                rule: "renew_deadline < lease_duration",
                detail: format!(
                    "renew_deadline is {:?} but lease_duration is {:?}",
                    self.renew_deadline, self.lease_duration
                ),
            });
        }
        if self.renew_deadline.as_secs_f64() <= self.retry_period.as_secs_f64() * 1.2 {
            return Err(ConfigError::Inconsistent {
                field: "retry_period",
                rule: "retry_period × 1.2 < renew_deadline",
                detail: format!(
                    "retry_period is {:?} and renew_deadline is {:?}",
                    self.retry_period, self.renew_deadline
                ),
            });
        }
        if self.renew_deadline + self.retry_period > self.lease_duration {
            return Err(ConfigError::Inconsistent {
                field: "lease_duration",
                rule: "renew_deadline + retry_period <= lease_duration",
                detail: format!(
                    "{:?} + {:?} exceeds lease_duration {:?}",
                    self.renew_deadline, self.retry_period, self.lease_duration
                ),
            });
        }
        if self.renew_deadline >= self.valid_for() {
            return Err(ConfigError::Inconsistent {
                field: "max_clock_drift",
                rule: "renew_deadline < lease_duration × (1 − max_clock_drift)",
                detail: format!(
                    "with drift {} a lease is only trusted for {:?}, not more than renew_deadline {:?}",
                    self.max_clock_drift,
                    self.valid_for(),
                    self.renew_deadline
                ),
            });
        }
        Ok(())
    }

    /// How long a successful acquire or renew keeps this candidate valid, measured from its send
    /// instant: `lease_duration × (1 − max_clock_drift)`.
    ///
    /// Computed in integer nanoseconds with the margin `lease_duration × max_clock_drift` rounded
    /// up, so the result is never above `lease_duration` (a float product could round up past
    /// it). Never panics, whatever the configuration: a drift that is NaN or at least 1 gives
    /// zero, a negative drift gives `lease_duration` ([`validate`](Self::validate) refuses both).
    pub fn valid_for(&self) -> Duration {
        let drift = self.max_clock_drift;
        if drift.is_nan() || drift >= 1.0 {
            return Duration::ZERO;
        }
        if drift <= 0.0 {
            return self.lease_duration;
        }
        let nanos = self.lease_duration.as_nanos();
        // `as` from f64 to an integer saturates; the product is finite and non-negative here.
        let margin = ((nanos as f64) * drift).ceil() as u128;
        let valid = nanos.saturating_sub(margin);
        let secs = u64::try_from(valid / NANOS_PER_SEC).unwrap_or(u64::MAX);
        let subsec = u32::try_from(valid % NANOS_PER_SEC).unwrap_or(0);
        Duration::new(secs, subsec)
    }
}

const NANOS_PER_SEC: u128 = 1_000_000_000;

fn check_name(field: &'static str, value: &str) -> Result<(), ConfigError> {
    if value.trim().is_empty() {
        return Err(ConfigError::Empty { field });
    }
    if value.len() > MAX_NAME_LEN {
        return Err(ConfigError::TooLong {
            field,
            len: value.len(),
            max: MAX_NAME_LEN,
        });
    }
    if value.chars().any(char::is_control) {
        return Err(ConfigError::InvalidName {
            field,
            value: value.to_owned(),
            reason: "it contains control characters".into(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Config {
        Config::new("a", "lock")
    }

    fn field_of(err: ConfigError) -> &'static str {
        err.field()
    }

    #[test]
    fn defaults_are_clients_go_and_valid() {
        let c = ok();
        assert_eq!(c.lease_duration, Duration::from_secs(15));
        assert_eq!(c.renew_deadline, Duration::from_secs(10));
        assert_eq!(c.retry_period, Duration::from_secs(2));
        assert!(c.enabled && c.release_on_cancel);
        c.validate().expect("defaults are valid");
    }

    #[test]
    fn empty_names_are_refused() {
        let mut c = ok();
        c.identity = " ".into();
        assert_eq!(field_of(c.validate().unwrap_err()), "identity");
        let mut c = ok();
        c.lease_name.clear();
        assert_eq!(field_of(c.validate().unwrap_err()), "lease_name");
        let mut c = ok();
        c.lease_name = "a\nb".into();
        assert!(matches!(c.validate(), Err(ConfigError::InvalidName { .. })));
        let mut c = ok();
        c.identity = "x".repeat(300);
        assert!(matches!(
            c.validate(),
            Err(ConfigError::TooLong { len: 300, .. })
        ));
    }

    #[test]
    fn zero_durations_are_refused() {
        for field in ["lease_duration", "renew_deadline", "retry_period"] {
            let mut c = ok();
            match field {
                "lease_duration" => c.lease_duration = Duration::ZERO,
                "renew_deadline" => c.renew_deadline = Duration::ZERO,
                _ => c.retry_period = Duration::ZERO,
            }
            assert_eq!(
                c.validate().unwrap_err(),
                ConfigError::ZeroDuration { field }
            );
        }
    }

    #[test]
    fn inconsistent_durations_are_refused() {
        let s = Duration::from_secs;
        let c = ok().with_timing(s(10), s(10), s(2));
        assert_eq!(field_of(c.validate().unwrap_err()), "renew_deadline");
        let c = ok().with_timing(s(15), s(10), s(9));
        assert_eq!(field_of(c.validate().unwrap_err()), "retry_period");
        let c = ok().with_timing(s(15), s(12), s(4));
        assert_eq!(field_of(c.validate().unwrap_err()), "lease_duration");
        let mut c = ok().with_timing(s(15), s(12), s(2));
        c.max_clock_drift = 0.25;
        assert_eq!(field_of(c.validate().unwrap_err()), "max_clock_drift");
        for bad in [f64::NAN, -0.1, 0.5, f64::INFINITY] {
            let mut c = ok();
            c.max_clock_drift = bad;
            assert_eq!(field_of(c.validate().unwrap_err()), "max_clock_drift");
        }
    }

    #[test]
    fn standalone_needs_only_an_identity() {
        let mut c = Config {
            enabled: false,
            identity: "solo".into(),
            ..Config::default()
        };
        c.retry_period = Duration::ZERO;
        c.validate().expect("standalone ignores timing");
        c.identity.clear();
        assert_eq!(field_of(c.validate().unwrap_err()), "identity");
    }

    #[test]
    fn deserializes_humantime_and_rejects_unknown_fields() {
        let c: Config = serde_json::from_str(
            r#"{"identity":"a","lease_name":"l","lease_duration":"3s","renew_deadline":"2s","retry_period":"500ms"}"#,
        )
        .expect("valid json");
        assert_eq!(c.retry_period, Duration::from_millis(500));
        c.validate().expect("valid");
        let err = serde_json::from_str::<Config>(r#"{"identity":"a","lease_nme":"l"}"#)
            .expect_err("typo is refused");
        assert!(err.to_string().contains("lease_nme"), "{err}");
        let err = serde_json::from_str::<Config>(r#"{"retry_period":"2 parsecs"}"#)
            .expect_err("bad duration");
        assert!(err.to_string().contains("expected a duration"), "{err}");
    }

    /// `u64::MAX` seconds, the longest `Duration` with whole seconds.
    const HUGE: Duration = Duration::from_secs(u64::MAX);

    fn too_large(field: &'static str, value: Duration) -> ConfigError {
        ConfigError::TooLarge {
            field,
            value,
            max: MAX_DURATION,
        }
    }

    #[test]
    fn huge_durations_are_refused_naming_the_field() {
        let s = Duration::from_secs;
        // Each case is consistent apart from its size, so only the bound can refuse it.
        let cases = [
            (ok().with_timing(HUGE, s(10), s(2)), "lease_duration", HUGE),
            (
                ok().with_timing(Duration::MAX, s(10), s(2)),
                "lease_duration",
                Duration::MAX,
            ),
            (
                ok().with_timing(Duration::MAX, HUGE - s(3), s(2)),
                "lease_duration",
                Duration::MAX,
            ),
            (
                ok().with_timing(MAX_DURATION + Duration::from_nanos(1), s(10), s(2)),
                "lease_duration",
                MAX_DURATION + Duration::from_nanos(1),
            ),
        ];
        for (config, field, value) in cases {
            assert_eq!(
                config.validate(),
                Err(too_large(field, value)),
                "{config:?}"
            );
        }
        // The order of the checks names the largest field first; each field is bounded.
        let c = ok().with_timing(MAX_DURATION, MAX_DURATION + s(1), s(2));
        assert_eq!(
            c.validate(),
            Err(too_large("renew_deadline", MAX_DURATION + s(1)))
        );
        let c = ok().with_timing(MAX_DURATION, s(10), Duration::MAX);
        assert_eq!(c.validate(), Err(too_large("retry_period", Duration::MAX)));
        // The bound itself is accepted.
        ok().with_timing(MAX_DURATION, s(10), s(2))
            .validate()
            .expect("MAX_DURATION is accepted");
        let message = too_large("lease_duration", HUGE).to_string();
        assert!(message.contains("lease_duration"), "{message}");
    }

    #[test]
    fn serde_string_of_u64_max_seconds_is_refused() {
        let parsed = serde_json::from_str::<Config>(
            r#"{"identity":"a","lease_name":"l","lease_duration":"18446744073709551615s"}"#,
        );
        match parsed {
            // humantime reads it as u64::MAX seconds: validate must refuse it.
            Ok(config) => assert_eq!(
                config.validate(),
                Err(too_large("lease_duration", config.lease_duration))
            ),
            Err(error) => assert!(error.to_string().contains("lease_duration"), "{error}"),
        }
    }

    #[test]
    fn zero_drift_with_a_huge_lease_does_not_panic() {
        let mut c = ok().with_timing(HUGE, Duration::from_secs(10), Duration::from_secs(2));
        c.max_clock_drift = 0.0;
        assert_eq!(c.validate(), Err(too_large("lease_duration", HUGE)));
        assert!(c.valid_for() <= HUGE);
        c.lease_duration = Duration::MAX;
        assert!(c.valid_for() <= Duration::MAX);
    }

    #[test]
    fn odd_drifts_give_typed_errors_or_work() {
        let below_half = 0.5f64.next_down();
        let subnormal = f64::from_bits(1);
        let s = Duration::from_secs;
        for lease in [s(15), s(30), MAX_DURATION, HUGE, Duration::MAX] {
            for drift in [
                0.0,
                -0.0,
                subnormal,
                -subnormal,
                f64::MIN_POSITIVE,
                0.01,
                below_half,
                0.5,
                0.5f64.next_up(),
                1.0,
                -0.01,
                -1.0,
                f64::NAN,
                -f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                f64::MAX,
                f64::MIN,
            ] {
                let mut c = ok().with_timing(lease, s(10), s(2));
                c.max_clock_drift = drift;
                let valid_for = c.valid_for();
                assert!(valid_for <= lease, "{lease:?} {drift}: {valid_for:?}");
                match c.validate() {
                    Ok(()) => {
                        assert!((0.0..0.5).contains(&drift), "{lease:?} {drift}");
                        assert!(lease <= MAX_DURATION, "{lease:?} {drift}");
                        assert!(c.renew_deadline < valid_for, "{lease:?} {drift}");
                    }
                    Err(error) => {
                        let field = error.field();
                        assert!(
                            ["lease_duration", "max_clock_drift"].contains(&field),
                            "{lease:?} {drift}: {error}"
                        );
                    }
                }
            }
        }
        // Near 0.5 a lease is trusted for about half its duration.
        let mut c = ok().with_timing(s(30), s(10), s(2));
        c.max_clock_drift = below_half;
        c.validate().expect("30 s × (1 − 0.4999…) > 10 s");
        assert!(c.valid_for() <= s(15) && c.valid_for() > s(15) - Duration::from_nanos(2));
        // A subnormal drift still takes something off: the bound is rounded down, never up.
        let mut c = ok();
        c.max_clock_drift = subnormal;
        c.validate().expect("a subnormal drift is a valid fraction");
        assert!(c.valid_for() < c.lease_duration);
        // Unusable drifts trust the lease for nothing.
        for drift in [f64::NAN, 1.0, 2.0, f64::INFINITY] {
            c.max_clock_drift = drift;
            assert_eq!(c.valid_for(), Duration::ZERO, "{drift}");
        }
        // The default drift gives exactly 99 %.
        assert_eq!(ok().valid_for(), Duration::from_millis(14_850));
    }
}
