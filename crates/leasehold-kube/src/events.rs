//! Kubernetes Events on leadership changes (opt-in, [`KubeBackend::with_events`](crate::KubeBackend::with_events)),
//! as client-go's `EventRecorder` reports them: `"<identity> became leader"` and
//! `"<identity> stopped leading"`, reason `LeaderElection`, type `Normal`, regarding the Lease.

use std::time::{SystemTime, UNIX_EPOCH};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, PostParams};
use leasehold_core::LeaderEvent;

/// The default `reportingController` of our Events.
pub const DEFAULT_REPORTING_CONTROLLER: &str = "leasehold.rs/elector";

/// Posts Events for one namespace.
#[derive(Clone)]
pub(crate) struct Reporter {
    pub events: Api<Event>,
    pub leases: Api<Lease>,
    pub namespace: String,
    pub controller: String,
    /// Warned once about a failure to post (RBAC): the election goes on regardless.
    pub warned: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

/// The longest prefix of `s` of at most `max` bytes, on a character boundary.
fn cut(s: &str, max: usize) -> &str {
    let mut end = s.len().min(max);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// The Event for `event` of `identity` on the Lease `lock` (whose uid and version are filled in
/// when the Lease could be read).
pub(crate) fn event_of(
    namespace: &str,
    controller: &str,
    lock: &str,
    identity: &str,
    lease: Option<&Lease>,
    event: LeaderEvent,
    now: SystemTime,
) -> Event {
    let (action, what) = match event {
        LeaderEvent::BecameLeader { .. } => ("BecameLeader", "became leader"),
        _ => ("StoppedLeading", "stopped leading"),
    };
    let nanos = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let micro = Timestamp::try_from(now)
        .ok()
        .and_then(|t| Timestamp::from_microsecond(t.as_microsecond()).ok())
        .unwrap_or(Timestamp::UNIX_EPOCH);
    Event {
        metadata: ObjectMeta {
            // client-go's form: the object's name and the time in hex; a Lease name is a DNS
            // subdomain, and so, cut to leave room for the suffix, is this.
            name: Some(format!("{}.{nanos:x}", cut(lock, 200))),
            namespace: Some(namespace.to_owned()),
            ..ObjectMeta::default()
        },
        event_time: Some(MicroTime(micro)),
        reporting_controller: Some(controller.to_owned()),
        reporting_instance: Some(cut(identity, 128).to_owned()),
        action: Some(action.to_owned()),
        reason: Some("LeaderElection".to_owned()),
        note: Some(cut(&format!("{identity} {what}"), 1024).to_owned()),
        type_: Some("Normal".to_owned()),
        regarding: Some(ObjectReference {
            api_version: Some("coordination.k8s.io/v1".to_owned()),
            kind: Some("Lease".to_owned()),
            name: Some(lock.to_owned()),
            namespace: Some(namespace.to_owned()),
            uid: lease.and_then(|l| l.metadata.uid.clone()),
            resource_version: lease.and_then(|l| l.metadata.resource_version.clone()),
            ..ObjectReference::default()
        }),
        ..Event::default()
    }
}

impl Reporter {
    /// Posts the Event on a task of its own: never blocks or fails the election.
    pub fn post(&self, lock: &str, identity: &str, event: LeaderEvent) {
        let reporter = self.clone();
        let (lock, identity) = (lock.to_owned(), identity.to_owned());
        let now = SystemTime::now();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        runtime.spawn(async move {
            // The Lease's uid lets `kubectl describe lease` find the Event.
            let lease = reporter.leases.get_opt(&lock).await.ok().flatten();
            let posted = event_of(
                &reporter.namespace,
                &reporter.controller,
                &lock,
                &identity,
                lease.as_ref(),
                event,
                now,
            );
            if let Err(error) = reporter
                .events
                .create(&PostParams::default(), &posted)
                .await
            {
                if !reporter
                    .warned
                    .swap(true, std::sync::atomic::Ordering::Relaxed)
                {
                    tracing::warn!(
                        %error,
                        lock,
                        "cannot post a leader election Event (grant create on events, apiGroup \
                         events.k8s.io); the election is not affected; further failures are \
                         logged at debug"
                    );
                } else {
                    tracing::debug!(%error, lock, "cannot post a leader election Event");
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use leasehold_core::FencingToken;

    #[test]
    fn events_follow_client_go_and_the_api_rules() {
        let long = "x".repeat(300);
        let e = event_of(
            "ns",
            DEFAULT_REPORTING_CONTROLLER,
            &"l".repeat(253),
            &long,
            None,
            LeaderEvent::BecameLeader {
                token: FencingToken(1),
            },
            UNIX_EPOCH + std::time::Duration::from_nanos(1_700_000_000_123_456_789),
        );
        let name = e.metadata.name.clone().unwrap_or_default();
        assert!(name.len() <= 253, "{}", name.len());
        assert_eq!(e.reason.as_deref(), Some("LeaderElection"));
        assert_eq!(e.type_.as_deref(), Some("Normal"));
        assert_eq!(e.reporting_instance.as_ref().map(String::len), Some(128));
        assert!(e
            .note
            .as_deref()
            .is_some_and(|n| n.ends_with(" became leader")));
        let regarding = e.regarding.unwrap_or_default();
        assert_eq!(regarding.kind.as_deref(), Some("Lease"));
        assert_eq!(
            e.event_time.map(|t| t.0.subsec_nanosecond() % 1000),
            Some(0),
            "MicroTime precision"
        );
        assert_eq!(cut("aé", 2), "a");
    }
}
