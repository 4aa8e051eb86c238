//! Rows and notification payloads, and how they become records and observations.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use leasehold_core::{BackendError, FencingToken, LeaderRecord, Observation};
use serde::Deserialize;

/// A lock's row as the statements return it (see `sql::columns`).
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub(crate) struct Row {
    pub holder: String,
    pub token: i64,
    pub lease_ms: i64,
    pub acquired_ms: i64,
    pub renewed_ms: i64,
    pub transitions: i64,
    /// Until the lease ends, by the server's clock, when the row was read (0: ended).
    pub remaining_ms: i64,
    /// A transfer's target while the row is reserved for it (empty otherwise).
    #[serde(default)]
    pub preferred: String,
}

impl Row {
    /// From the columns of a statement's row, starting at column `first`.
    pub fn from_sql(row: &tokio_postgres::Row, first: usize) -> Result<Row, tokio_postgres::Error> {
        Ok(Row {
            holder: row.try_get(first)?,
            token: row.try_get(first + 1)?,
            lease_ms: row.try_get(first + 2)?,
            acquired_ms: row.try_get(first + 3)?,
            renewed_ms: row.try_get(first + 4)?,
            transitions: row.try_get(first + 5)?,
            remaining_ms: row.try_get(first + 6)?,
            preferred: row.try_get(first + 7)?,
        })
    }

    /// Whether the lease may still run (by the server's clock when the row was read).
    pub fn live(&self) -> bool {
        self.remaining_ms > 0
    }

    /// The record, or why the row is not a leasehold record.
    pub fn record(&self, lock: &str) -> Result<LeaderRecord, BackendError> {
        let malformed = |what: String| BackendError::MalformedRecord {
            lock: lock.to_owned(),
            detail: format!(
                "the row holds {what}, not a leasehold record (holder {:?}); it is left alone \
                 until its expires_at has passed",
                truncate(&self.holder)
            ),
        };
        let token = u64::try_from(self.token)
            .ok()
            .filter(|t| *t >= 1)
            .ok_or_else(|| malformed(format!("token {}", self.token)))?;
        let lease_ms = u64::try_from(self.lease_ms)
            .ok()
            .filter(|ms| *ms >= 1)
            .ok_or_else(|| malformed(format!("lease_ms {}", self.lease_ms)))?;
        Ok(LeaderRecord {
            holder: self.holder.clone(),
            token: Some(FencingToken(token)),
            lease_duration: Duration::from_millis(lease_ms),
            acquire_time: wall(self.acquired_ms),
            renew_time: wall(self.renewed_ms),
            transitions: u64::try_from(self.transitions).unwrap_or(0),
            preferred_holder: Some(self.preferred.clone()).filter(|p| !p.is_empty()),
        })
    }

    /// What a candidate learns from the row: free once its lease ended or it was released;
    /// held (with the server-reported remaining time) while live; a live row that is not a
    /// leasehold record is a [`BackendError::MalformedRecord`].
    pub fn observe(&self, lock: &str) -> Result<Observation, BackendError> {
        if !self.live() && !self.holder.is_empty() {
            return Ok(Observation::vacant());
        }
        if !self.live() && self.record(lock).is_err() {
            return Ok(Observation::vacant());
        }
        let record = self.record(lock)?;
        if record.reserved_for().is_some() && self.live() {
            // Reserved by a transfer until the lease ends.
            let remaining = Duration::from_millis(u64::try_from(self.remaining_ms).unwrap_or(0));
            return Ok(Observation::held(record, Some(remaining)));
        }
        if record.is_vacant() {
            // Released: free, but with the token of the term that ended, so that a leader told
            // late of an earlier term's release knows it is old news.
            return Ok(Observation {
                record: Some(record),
                expires_in: None,
            });
        }
        let remaining = Duration::from_millis(u64::try_from(self.remaining_ms).unwrap_or(0));
        Ok(Observation::held(record, Some(remaining)))
    }
}

/// A notification on the table's channel, written by its trigger.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub(crate) enum Event {
    /// An insert or update of `lock`: the row as written.
    Written {
        lock: String,
        #[serde(flatten)]
        row: Row,
    },
    /// `lock`'s row was deleted.
    Gone { lock: String, gone: bool },
    /// The table was truncated: every lock's row is gone.
    All { all: bool },
}

impl Event {
    pub fn parse(payload: &str) -> Option<Event> {
        serde_json::from_str(payload).ok()
    }

    /// The lock it concerns (`None`: every lock).
    pub fn lock(&self) -> Option<&str> {
        match self {
            Event::Written { lock, .. } | Event::Gone { lock, .. } => Some(lock),
            Event::All { .. } => None,
        }
    }
}

fn truncate(s: &str) -> &str {
    match s.char_indices().nth(64) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// A wall-clock time from milliseconds since the epoch; `None` for 0 or less.
fn wall(ms: i64) -> Option<SystemTime> {
    u64::try_from(ms)
        .ok()
        .filter(|ms| *ms > 0)
        .and_then(|ms| UNIX_EPOCH.checked_add(Duration::from_millis(ms)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(holder: &str, token: i64, lease_ms: i64, remaining_ms: i64) -> Row {
        Row {
            holder: holder.into(),
            token,
            lease_ms,
            acquired_ms: 1,
            renewed_ms: 2,
            transitions: 3,
            remaining_ms,
            preferred: String::new(),
        }
    }

    #[test]
    fn live_rows_are_held_with_the_server_reported_time() {
        let seen = row("a", 7, 2000, 1500).observe("l").expect("valid");
        assert_eq!(seen.holder(), Some("a"));
        assert_eq!(seen.expires_in, Some(Duration::from_millis(1500)));
        assert_eq!(seen.record.and_then(|r| r.token), Some(FencingToken(7)));
    }

    #[test]
    fn ended_or_released_rows_are_vacant() {
        assert_eq!(row("a", 7, 2000, 0).observe("l"), Ok(Observation::vacant()));
        for remaining in [0, 10] {
            let released = row("", 7, 2000, remaining).observe("l").expect("valid");
            assert_eq!(released.holder(), None);
            assert_eq!(released.expires_in, None);
            // The ended term's token, so a newer leader can tell a late release is old.
            assert_eq!(released.record.and_then(|r| r.token), Some(FencingToken(7)));
        }
        // Garbage whose time has passed may be taken over.
        assert_eq!(row("x", -1, 0, 0).observe("l"), Ok(Observation::vacant()));
    }

    #[test]
    fn live_garbage_is_malformed() {
        for r in [row("x", 0, 2000, 5), row("x", 3, 0, 5), row("x", -4, -1, 5)] {
            assert!(matches!(
                r.observe("l"),
                Err(BackendError::MalformedRecord { .. })
            ));
        }
    }

    #[test]
    fn events_parse() {
        let written = r#"{"lock":"l","holder":"a","token":3,"lease_ms":10,"acquired_ms":1,"renewed_ms":2,"transitions":0,"remaining_ms":9}"#;
        assert!(matches!(Event::parse(written), Some(Event::Written { .. })));
        assert_eq!(
            Event::parse(r#"{"lock":"l","gone":true}"#).and_then(|e| e.lock().map(str::to_owned)),
            Some("l".to_owned())
        );
        assert!(matches!(
            Event::parse(r#"{"all":true}"#),
            Some(Event::All { .. })
        ));
        assert_eq!(Event::parse("garbage"), None);
    }
}
