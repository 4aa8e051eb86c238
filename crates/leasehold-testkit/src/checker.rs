//! The safety checker: no two leaders at once, fencing tokens strictly increasing.

use std::fmt;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use leasehold_core::{FencingToken, Leadership};
use tokio::time::Instant;

/// One term as the checker saw it, on the process' monotonic clock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Interval {
    /// The elector's identity.
    pub identity: String,
    /// The term's fencing token.
    pub token: FencingToken,
    /// When the elector began the term.
    pub start: Instant,
    /// When its leadership ended: the earlier of its step-down and its validity. `None` while
    /// the term lasts.
    pub end: Option<Instant>,
}

/// A broken guarantee.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SafetyViolation {
    /// Two electors led at the same time.
    #[error("two leaders at once: {first:?} and {second:?}")]
    Overlap {
        /// The earlier term.
        first: Box<Interval>,
        /// The term that began before the first one ended.
        second: Box<Interval>,
    },
    /// A term's token was not greater than the term before it.
    #[error("fencing token did not increase: {earlier:?} then {later:?}")]
    TokenOrder {
        /// The earlier term.
        earlier: Box<Interval>,
        /// The later term, whose token is not greater.
        later: Box<Interval>,
    },
}

/// What the checker verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SafetyReport {
    /// Every term, in start order.
    pub intervals: Vec<Interval>,
}

impl SafetyReport {
    /// The tokens, in start order.
    pub fn tokens(&self) -> Vec<FencingToken> {
        self.intervals.iter().map(|i| i.token).collect()
    }
}

impl fmt::Display for SafetyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} terms, no overlap, tokens increasing",
            self.intervals.len()
        )
    }
}

/// Records every elector's leadership intervals and tokens on one monotonic clock, and checks
/// them. Clones share the record.
#[derive(Debug, Clone, Default)]
pub struct SafetyChecker {
    intervals: Arc<Mutex<Vec<Interval>>>,
}

impl SafetyChecker {
    /// An empty checker.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records the term `leadership` of `identity`; its end is recorded when the term ends.
    /// Call it at the top of `on_started_leading`.
    pub fn track(&self, identity: &str, leadership: &Leadership) {
        let index = {
            let mut all = self.lock();
            all.push(Interval {
                identity: identity.to_owned(),
                token: leadership.token(),
                start: leadership.started_at(),
                end: None,
            });
            all.len() - 1
        };
        let intervals = self.intervals.clone();
        let leadership = leadership.clone();
        tokio::spawn(async move {
            leadership.cancelled().await;
            let end = leadership.ended_at().unwrap_or_else(Instant::now);
            intervals.lock().unwrap_or_else(PoisonError::into_inner)[index].end = Some(end);
        });
    }

    /// Every interval recorded so far, in start order.
    pub fn intervals(&self) -> Vec<Interval> {
        let mut all = self.lock().clone();
        all.sort_by_key(|i| i.start);
        all
    }

    /// Checks every pair of terms: no overlap (an open term counts as lasting for ever), and
    /// tokens strictly increasing in start order.
    ///
    /// # Errors
    ///
    /// The first [`SafetyViolation`] found.
    pub fn verify(&self) -> Result<SafetyReport, SafetyViolation> {
        let intervals = self.intervals();
        for (i, first) in intervals.iter().enumerate() {
            for second in &intervals[i + 1..] {
                if first.end.is_none_or(|end| second.start < end) {
                    return Err(SafetyViolation::Overlap {
                        first: Box::new(first.clone()),
                        second: Box::new(second.clone()),
                    });
                }
            }
        }
        self.verify_tokens()
    }

    /// The longest time two recorded terms overlapped (an open term lasts until now); zero when
    /// none did. For backends whose protocol admits a bounded overlap (a lock deleted from
    /// outside hands on at once): the bound is asserted on this.
    pub fn longest_overlap(&self) -> Duration {
        let now = Instant::now();
        let intervals = self.intervals();
        let mut longest = Duration::ZERO;
        for (i, first) in intervals.iter().enumerate() {
            for second in &intervals[i + 1..] {
                let end = first.end.unwrap_or(now).min(second.end.unwrap_or(now));
                longest = longest.max(end.saturating_duration_since(second.start));
            }
        }
        longest
    }

    /// Checks that tokens strictly increase in start order, whatever the overlaps.
    ///
    /// # Errors
    ///
    /// The first [`SafetyViolation::TokenOrder`] found.
    pub fn verify_tokens(&self) -> Result<SafetyReport, SafetyViolation> {
        let intervals = self.intervals();
        for pair in intervals.windows(2) {
            if pair[1].token <= pair[0].token {
                return Err(SafetyViolation::TokenOrder {
                    earlier: Box::new(pair[0].clone()),
                    later: Box::new(pair[1].clone()),
                });
            }
        }
        Ok(SafetyReport { intervals })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<Interval>> {
        self.intervals
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn iv(id: &str, token: u64, start: Instant, end: Option<Instant>) -> Interval {
        Interval {
            identity: id.into(),
            token: FencingToken(token),
            start,
            end,
        }
    }

    fn checker(intervals: Vec<Interval>) -> SafetyChecker {
        let c = SafetyChecker::new();
        *c.lock() = intervals;
        c
    }

    #[test]
    fn detects_overlap_and_token_order() {
        let t = Instant::now();
        let s = Duration::from_secs;
        let ok = checker(vec![
            iv("a", 1, t, Some(t + s(1))),
            iv("b", 2, t + s(1), Some(t + s(2))),
            iv("a", 5, t + s(3), None),
        ]);
        assert_eq!(ok.verify().expect("safe").tokens().len(), 3);
        let overlap = checker(vec![
            iv("a", 1, t, Some(t + s(2))),
            iv("b", 2, t + s(1), Some(t + s(3))),
        ]);
        assert!(matches!(
            overlap.verify(),
            Err(SafetyViolation::Overlap { .. })
        ));
        let open = checker(vec![iv("a", 1, t, None), iv("b", 2, t + s(9), None)]);
        assert!(matches!(
            open.verify(),
            Err(SafetyViolation::Overlap { .. })
        ));
        let order = checker(vec![
            iv("a", 3, t, Some(t + s(1))),
            iv("b", 3, t + s(2), Some(t + s(3))),
        ]);
        assert!(matches!(
            order.verify(),
            Err(SafetyViolation::TokenOrder { .. })
        ));
    }
}
