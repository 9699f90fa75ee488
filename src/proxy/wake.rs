//! Waits on shutdown tokens, kept off a request's way.
//!
//! - [`WhenWoken`]: a future polled only when it may have become ready. A wait on a shutdown token
//!   is polled with everything else its task waits for, and polling it takes two locks (the
//!   token's and its notifier's) even when nothing happened to the token. A connection's task is
//!   polled several times a request for reasons that are never the token; wrapped, the wait is
//!   polled on the first poll and then only after it woke the task itself.
//! - [`Cut`]: the expiry of `drain_timeout`, which a request learns of from a flag that its
//!   connection's task sets, rather than from a wait of its own on the token (a clone of the
//!   token, its registration and its removal took some 1,300 instructions a stream).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};

use futures_util::task::AtomicWaker;
use tokio_util::sync::CancellationToken;

/// `future`, polled on the first poll and after it woke its task.
pub struct WhenWoken<F> {
    future: F,
    woken: Arc<Woken>,
    /// `woken` as a waker: the one `future` is polled with.
    waker: Waker,
}

/// Whether a [`WhenWoken`] future woke since it was last polled, and the task to wake then.
struct Woken {
    since_poll: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Woken {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.since_poll.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl<F: Future + Unpin> WhenWoken<F> {
    pub fn new(future: F) -> Self {
        let woken = Arc::new(Woken {
            since_poll: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        WhenWoken {
            future,
            waker: Waker::from(Arc::clone(&woken)),
            woken,
        }
    }
}

impl<F: Future + Unpin> Future for WhenWoken<F> {
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.get_mut();
        // Registered before the flag is read, so a wake in between is not lost.
        this.woken.task.register(cx.waker());
        if !this.woken.since_poll.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        Pin::new(&mut this.future).poll(&mut Context::from_waker(&this.waker))
    }
}

/// The expiry of `drain_timeout`, as a worker's requests see it. `token` is cancelled then. A
/// request polled by its client connection's task looks at [`Cut::is_seen`] alone, which costs it
/// no lock and no wait registered with the token: the connection's task watches the token from the
/// moment the drain begins (the cut never comes before it), and when the token wakes it, it marks
/// the cut seen ([`Cut::see`]) and polls its request again. What runs in a task of its own (a
/// waiting stream's relay) does the same with its own wait on the token.
#[derive(Clone)]
pub struct Cut {
    pub token: CancellationToken,
    seen: CutFlag,
}

impl Cut {
    pub fn new(token: CancellationToken) -> Cut {
        Cut {
            token,
            seen: CutFlag(Arc::default()),
        }
    }

    /// Notes that `token` is cancelled, for the requests polled next.
    pub fn see(&self) {
        self.seen.0.store(true, Ordering::Release);
    }

    pub fn is_seen(&self) -> bool {
        self.seen.is_seen()
    }

    /// What a stream keeps of the cut: the flag alone (a token's clone takes its lock).
    pub fn flag(&self) -> CutFlag {
        self.seen.clone()
    }
}

/// Whether a [`Cut`] has been seen.
#[derive(Clone)]
pub struct CutFlag(Arc<AtomicBool>);

impl CutFlag {
    pub fn is_seen(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio_util::sync::CancellationToken;

    use super::*;

    #[tokio::test]
    async fn a_wait_is_told_of_a_cancel_that_comes_while_it_waits() {
        let token = CancellationToken::new();
        let mut wait = WhenWoken::new(Box::pin(token.clone().cancelled_owned()));
        // Polled often before the cancel, as a busy connection's task is.
        for _ in 0..3 {
            let polled = std::future::poll_fn(|cx| Poll::Ready(Pin::new(&mut wait).poll(cx))).await;
            assert!(polled.is_pending());
        }
        let cancel = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(10)).await;
            token.cancel();
        });
        tokio::time::timeout(Duration::from_secs(5), wait)
            .await
            .expect("woken by the cancel");
        cancel.await.expect("cancel task");
    }
}
