//! Coordinated leader election (KEP-4355, the `CoordinatedLeaderElection` feature gate): each
//! candidate keeps a `LeaseCandidate` (`coordination.k8s.io/v1beta1`) with its versions, and the
//! apiserver's election controller, not a race, names the holder
//! ([`KubeBackend::with_coordination`](crate::KubeBackend::with_coordination)).
//!
//! The controller pings a candidate by setting `spec.pingTime`; the candidate answers by setting
//! `spec.renewTime`. Only candidates that answered within 5 s are elected; one whose `renewTime`
//! is older than 30 minutes is ignored and collected. So each candidate runs a small task that
//! watches its own `LeaseCandidate`, answers pings, and renews it every five minutes.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::coordination::v1beta1::{LeaseCandidate, LeaseCandidateSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Api, DeleteParams, PostParams, WatchEvent, WatchParams};
use leasehold_core::ConfigError;
use tokio::task::JoinHandle;

use crate::lease;

/// The strategy the apiserver's controller implements.
pub const OLDEST_EMULATION_VERSION: &str = "OldestEmulationVersion";

/// How often a candidate renews its `LeaseCandidate` unasked (client-go: every 5 minutes; the
/// controller ignores one older than 30).
const RENEW_EVERY: Duration = Duration::from_secs(300);

/// A candidate's versions, as the `LeaseCandidate` announces them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Versions {
    pub binary: String,
    pub emulation: String,
}

/// `major.minor.patch`, each a number without a leading zero: what the API accepts.
fn semver(field: &'static str, version: &str) -> Result<(u64, u64, u64), ConfigError> {
    let invalid = |reason: &str| ConfigError::InvalidName {
        field,
        value: version.chars().take(64).collect(),
        reason: reason.to_owned(),
    };
    let parts: Vec<&str> = version.split('.').collect();
    if parts.len() != 3 {
        return Err(invalid(
            "expected MAJOR.MINOR.PATCH, such as 1.33.0 (no leading v)",
        ));
    }
    let mut numbers = [0u64; 3];
    for (slot, part) in numbers.iter_mut().zip(&parts) {
        let number_like = !part.is_empty()
            && part.chars().all(|c| c.is_ascii_digit())
            && !(part.len() > 1 && part.starts_with('0'));
        if !number_like {
            return Err(invalid(
                "each part must be a number without a leading zero, such as 1.33.0",
            ));
        }
        *slot = part
            .parse()
            .map_err(|_| invalid("a part is too large a number"))?;
    }
    Ok((numbers[0], numbers[1], numbers[2]))
}

impl Versions {
    /// Checks both as the API does: semantic versions, emulation not newer than binary.
    pub fn new(binary: &str, emulation: &str) -> Result<Self, ConfigError> {
        let b = semver("binary_version", binary)?;
        let e = semver("emulation_version", emulation)?;
        if e > b {
            return Err(ConfigError::Inconsistent {
                field: "emulation_version",
                rule: "emulation_version <= binary_version",
                detail: format!("{emulation} is newer than {binary}"),
            });
        }
        Ok(Self {
            binary: binary.to_owned(),
            emulation: emulation.to_owned(),
        })
    }
}

/// Whether `identity` can name a `LeaseCandidate` (the controller writes that name into the
/// Lease's `holderIdentity`): at most 253 of `[-._a-zA-Z0-9]`, not `.` or `..`.
pub(crate) fn validate_identity(identity: &str) -> Result<(), ConfigError> {
    let ok = !identity.is_empty()
        && identity.len() <= 253
        && identity != "."
        && identity != ".."
        && identity
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
    if ok {
        Ok(())
    } else {
        Err(ConfigError::InvalidName {
            field: "identity",
            value: identity.chars().take(64).collect(),
            reason: "coordinated election names a LeaseCandidate after the identity: at most 253 \
                     characters of letters, digits, '-', '.' and '_'"
                .to_owned(),
        })
    }
}

/// The candidate's `LeaseCandidate` and the task that keeps it; dropping it stops the task.
#[derive(Debug)]
pub(crate) struct Seat {
    task: std::sync::Mutex<Option<JoinHandle<()>>>,
}

impl Seat {
    /// Stops keeping the `LeaseCandidate`.
    pub fn stop(&self) {
        let task = self
            .task
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(task) = task {
            task.abort();
        }
    }
}

impl Drop for Seat {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Seat {
    /// Starts keeping the `LeaseCandidate` `identity` for `lock`.
    pub fn start(api: Api<LeaseCandidate>, lock: &str, identity: &str, versions: Versions) -> Self {
        let keeper = Keeper {
            api,
            lock: lock.to_owned(),
            identity: identity.to_owned(),
            versions,
        };
        Self {
            task: std::sync::Mutex::new(Some(tokio::spawn(keeper.run()))),
        }
    }
}

/// Removes the `LeaseCandidate` of a candidate that stopped campaigning.
pub(crate) async fn remove(api: &Api<LeaseCandidate>, identity: &str) -> Result<(), kube::Error> {
    match api.delete(identity, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => Ok(()),
        Err(error) => Err(error),
    }
}

struct Keeper {
    api: Api<LeaseCandidate>,
    lock: String,
    identity: String,
    versions: Versions,
}

/// Whether the controller's ping has not been answered.
fn pinged(candidate: &LeaseCandidate) -> bool {
    let Some(spec) = &candidate.spec else {
        return false;
    };
    match (&spec.ping_time, &spec.renew_time) {
        (Some(ping), Some(renew)) => renew.0 < ping.0,
        (Some(_), None) => true,
        _ => false,
    }
}

impl Keeper {
    fn wanted(&self, existing: Option<&LeaseCandidate>) -> LeaseCandidate {
        let mut candidate = existing.cloned().unwrap_or_else(|| LeaseCandidate {
            metadata: ObjectMeta {
                name: Some(self.identity.clone()),
                ..ObjectMeta::default()
            },
            spec: None,
        });
        let spec = candidate
            .spec
            .get_or_insert_with(LeaseCandidateSpec::default);
        spec.lease_name.clone_from(&self.lock);
        spec.binary_version.clone_from(&self.versions.binary);
        spec.emulation_version = Some(self.versions.emulation.clone());
        spec.strategy = OLDEST_EMULATION_VERSION.to_owned();
        spec.renew_time = Some(lease::now());
        candidate
    }

    /// Creates or renews the `LeaseCandidate` (answering any ping); returns its version.
    async fn renew(&self) -> Result<String, kube::Error> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let existing = self.api.get_opt(&self.identity).await?;
            let written = match &existing {
                None => {
                    self.api
                        .create(&PostParams::default(), &self.wanted(None))
                        .await
                }
                Some(current) => {
                    self.api
                        .replace(
                            &self.identity,
                            &PostParams::default(),
                            &self.wanted(Some(current)),
                        )
                        .await
                }
            };
            match written {
                Ok(candidate) => {
                    return Ok(candidate.metadata.resource_version.unwrap_or_default())
                }
                Err(kube::Error::Api(status)) if status.code == 409 && attempts < 3 => continue,
                Err(error) => return Err(error),
            }
        }
    }

    /// Renews, then answers pings from a watch of the candidate, until the watch ends; renews
    /// every [`RENEW_EVERY`] meanwhile.
    async fn serve(&self) -> Result<(), kube::Error> {
        let version = self.renew().await?;
        let params = WatchParams::default()
            .fields(&format!("metadata.name={}", self.identity))
            .timeout(290);
        let mut events = self.api.watch(&params, &version).await?.boxed();
        let mut renew = tokio::time::interval(RENEW_EVERY);
        renew.tick().await;
        loop {
            tokio::select! {
                _ = renew.tick() => { self.renew().await?; }
                event = events.next() => match event {
                    None => return Ok(()),
                    Some(Err(error)) => return Err(error),
                    Some(Ok(WatchEvent::Added(c) | WatchEvent::Modified(c))) => {
                        if pinged(&c) {
                            self.renew().await?;
                        }
                    }
                    // Deleted (by the garbage collector, or an operator): write it again.
                    Some(Ok(WatchEvent::Deleted(_))) => { self.renew().await?; }
                    Some(Ok(WatchEvent::Bookmark(_))) => {}
                    Some(Ok(WatchEvent::Error(status))) => {
                        tracing::debug!(message = %status.message, "LeaseCandidate watch ended");
                        return Ok(());
                    }
                },
            }
        }
    }

    async fn run(self) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.serve().await {
                Ok(()) => backoff = Duration::from_millis(200),
                Err(error) => {
                    tracing::warn!(
                        %error,
                        identity = %self.identity,
                        lock = %self.lock,
                        "cannot keep the LeaseCandidate (grant get, list, watch, create, update \
                         and delete on leasecandidates, apiGroup coordination.k8s.io; is the \
                         CoordinatedLeaderElection feature gate and the v1beta1 API on?); \
                         retrying"
                    );
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                }
            }
            tokio::time::sleep(backoff).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_follow_the_api_rules() {
        assert!(Versions::new("1.33.0", "1.32.0").is_ok());
        assert!(Versions::new("1.33.0", "1.33.0").is_ok());
        for (b, e) in [
            ("v1.33.0", "1.33.0"),
            ("1.33", "1.33"),
            ("1.033.0", "1.0.0"),
            ("1.a.0", "1.0.0"),
        ] {
            assert!(
                matches!(Versions::new(b, e), Err(ConfigError::InvalidName { .. })),
                "{b} {e}"
            );
        }
        assert!(matches!(
            Versions::new("1.32.0", "1.33.0"),
            Err(ConfigError::Inconsistent { .. })
        ));
        assert!(validate_identity("pod-1.example_x").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", &"x".repeat(254)] {
            assert!(validate_identity(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_ping_is_pending_until_renew_time_catches_up() {
        let t = |s: i64| {
            Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::from_second(s).unwrap(),
            ))
        };
        let mut c = LeaseCandidate::default();
        assert!(!pinged(&c));
        let spec = LeaseCandidateSpec {
            ping_time: t(10),
            ..LeaseCandidateSpec::default()
        };
        c.spec = Some(spec.clone());
        assert!(pinged(&c));
        c.spec = Some(LeaseCandidateSpec {
            renew_time: t(9),
            ..spec.clone()
        });
        assert!(pinged(&c));
        c.spec = Some(LeaseCandidateSpec {
            renew_time: t(10),
            ..spec
        });
        assert!(!pinged(&c));
    }
}
