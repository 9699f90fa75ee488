//! [`Timer`]: a deadline that costs nothing until something has to wait for it.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// A sleep allocated on first use and moved to each new deadline. Most deadlines never need one:
/// a request head or a response that is there when first asked for never waits.
///
/// A deadline that moves later (the next request on a kept-alive connection, the next event of a
/// stream) leaves the sleep where it is: when it fires early, it is moved on then. Moving a sleep
/// takes it out of the runtime's timer wheel and puts it back, which for every request or event
/// cost more than the rest of the deadline's upkeep; this way a busy connection moves its sleep
/// about once a timeout.
#[derive(Default)]
pub struct Timer(Option<Pin<Box<Sleep>>>);

impl Timer {
    /// Whether `deadline` has passed; if not, the task is woken by then.
    pub fn expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let sleep = match &mut self.0 {
            Some(sleep) => {
                if sleep.deadline() > deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self.0.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        while sleep.as_mut().poll(cx) == Poll::Ready(()) {
            if sleep.deadline() >= deadline {
                return true;
            }
            // It fired at a deadline that has since moved on.
            sleep.as_mut().reset(deadline);
        }
        false
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// Polls `timer` for `deadline` once, as a task would.
    async fn check(timer: &mut Timer, deadline: Instant) -> bool {
        std::future::poll_fn(|cx| Poll::Ready(timer.expired(deadline, cx))).await
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_fires_when_it_passes_however_it_moved() {
        let start = Instant::now();
        let mut timer = Timer::default();
        assert!(!check(&mut timer, start + Duration::from_secs(10)).await);
        // Moved later: not expired at the old deadline, expired at the new one.
        tokio::time::advance(Duration::from_secs(11)).await;
        assert!(!check(&mut timer, start + Duration::from_secs(20)).await);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(check(&mut timer, start + Duration::from_secs(20)).await);
        // Moved earlier: expired at the earlier one.
        assert!(!check(&mut timer, start + Duration::from_secs(60)).await);
        assert!(!check(&mut timer, start + Duration::from_secs(30)).await);
        tokio::time::advance(Duration::from_secs(10)).await;
        assert!(check(&mut timer, start + Duration::from_secs(30)).await);
    }

    #[tokio::test(start_paused = true)]
    async fn a_waiting_task_is_woken_at_the_moved_deadline() {
        let start = Instant::now();
        let mut timer = Timer::default();
        assert!(!check(&mut timer, start + Duration::from_secs(1)).await);
        // The deadline moves on before the first one passes; the task waits for the new one.
        let woke = std::future::poll_fn(|cx| {
            if timer.expired(start + Duration::from_secs(5), cx) {
                Poll::Ready(Instant::now())
            } else {
                Poll::Pending
            }
        })
        .await;
        assert_eq!(woke - start, Duration::from_secs(5));
    }
}
