//! A stream whose items are reported by a future it drives itself, in its consumer's task.
//!
//! A candidate's watch is a long-lived loop (read who is ahead, watch that key, report, start
//! over) that reports observations from several places, some nested in helper functions. As a
//! task of its own with a channel to its elector, each of thousands of candidates would cost a
//! task and a channel; here the loop is a future owned by the stream and polled whenever the
//! elector polls the stream, and its reports go through a small queue the two share. Dropping the
//! stream drops the loop.

use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures::Stream;

/// Where the driven future reports its items. Each item is boxed: thousands of idle queues
/// should not each hold room for whole items.
pub(crate) struct Reports<T>(Arc<Mutex<VecDeque<Box<T>>>>);

impl<T> Reports<T> {
    /// Queues `item` for the stream's consumer.
    pub fn send(&self, item: T) {
        self.queue().push_back(Box::new(item));
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Box<T>>> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn pop(&self) -> Option<T> {
        self.queue().pop_front().map(|item| *item)
    }
}

/// The stream of what `make`'s future reports; it ends once the future has returned and every
/// report was taken.
pub(crate) fn driven<T, F>(make: impl FnOnce(Reports<T>) -> F) -> Driven<T, F>
where
    F: Future<Output = ()>,
{
    let queue = Arc::new(Mutex::new(VecDeque::new()));
    let future = make(Reports(queue.clone()));
    Driven {
        reports: Reports(queue),
        future: Some(Box::pin(future)),
    }
}

/// See [`driven`].
pub(crate) struct Driven<T, F> {
    reports: Reports<T>,
    /// Boxed, so the stream stays `Unpin` and small to move; `None` once it returned.
    future: Option<Pin<Box<F>>>,
}

impl<T, F: Future<Output = ()>> Stream for Driven<T, F> {
    type Item = T;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<T>> {
        let this = self.get_mut();
        loop {
            if let Some(item) = this.reports.pop() {
                return Poll::Ready(Some(item));
            }
            let Some(future) = this.future.as_mut() else {
                return Poll::Ready(None);
            };
            match future.as_mut().poll(cx) {
                // Its last reports are taken before the stream ends.
                Poll::Ready(()) => this.future = None,
                Poll::Pending => {
                    return this
                        .reports
                        .pop()
                        .map_or(Poll::Pending, |item| Poll::Ready(Some(item)))
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::StreamExt;

    #[tokio::test(start_paused = true)]
    async fn reports_come_in_order_and_the_stream_ends_after_the_last() {
        let mut stream = driven(|tx: Reports<u32>| async move {
            tx.send(1);
            tx.send(2);
            tokio::time::sleep(std::time::Duration::from_secs(1)).await;
            tx.send(3);
        });
        let mut seen = Vec::new();
        while let Some(item) = stream.next().await {
            seen.push(item);
        }
        assert_eq!(seen, [1, 2, 3]);
    }

    #[tokio::test(start_paused = true)]
    async fn dropping_the_stream_drops_the_future() {
        struct Flag(Arc<std::sync::atomic::AtomicBool>);
        impl Drop for Flag {
            fn drop(&mut self) {
                self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            }
        }
        let dropped = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = Flag(dropped.clone());
        let mut stream = driven(|tx: Reports<u32>| async move {
            let _flag = flag;
            tx.send(1);
            std::future::pending::<()>().await;
        });
        assert_eq!(stream.next().await, Some(1));
        assert!(!dropped.load(std::sync::atomic::Ordering::SeqCst));
        drop(stream);
        assert!(dropped.load(std::sync::atomic::Ordering::SeqCst));
    }
}
