//! The notifier: runs `on_stopped_leading` and `on_new_leader` in order on their own task, so a
//! slow or panicking callback never blocks the elector.

use std::panic::AssertUnwindSafe;

use tokio::sync::mpsc;

use crate::callbacks::Callbacks;

/// A callback to run.
pub(crate) enum Notice {
    /// `on_stopped_leading`.
    Stopped,
    /// `on_new_leader` with the new leader's identity.
    NewLeader(String),
}

pub(crate) async fn notify(callbacks: Callbacks, mut notices: mpsc::UnboundedReceiver<Notice>) {
    while let Some(notice) = notices.recv().await {
        let outcome = match notice {
            Notice::Stopped => callbacks
                .stopped
                .as_ref()
                .map(|f| std::panic::catch_unwind(AssertUnwindSafe(|| f()))),
            Notice::NewLeader(identity) => callbacks
                .new_leader
                .as_ref()
                .map(|f| std::panic::catch_unwind(AssertUnwindSafe(|| f(identity)))),
        };
        if let Some(Err(panic)) = outcome {
            tracing::error!(
                panic = panic_message(&panic),
                "a leader election callback panicked; the elector goes on"
            );
        }
    }
}

pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> &str {
    panic
        .downcast_ref::<&str>()
        .copied()
        .or_else(|| panic.downcast_ref::<String>().map(String::as_str))
        .unwrap_or("(non-string panic payload)")
}
