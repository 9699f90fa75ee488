//! [`Timer`]: a deadline that costs nothing until something has to wait for it.

use std::pin::Pin;
use std::task::{Context, Poll, Waker};

use tokio::time::{Instant, Sleep};

/// A sleep allocated on first use and moved to each new deadline. Most deadlines never need one:
/// a request head or a response that is there when first asked for never waits.
///
/// A deadline that moves later (the next request on a kept-alive connection, the next event of a
/// stream) leaves the sleep where it is: when it fires early, it is moved on then. Moving a sleep
/// takes it out of the runtime's timer wheel and puts it back, which for every request or event
/// cost more than the rest of the deadline's upkeep; this way a busy connection moves its sleep
/// about once a timeout.
///
/// A sleep that has not fired, and was last polled by the task that asks again, is not polled
/// again: it will wake that task in time. (A poll of tokio's sleep checks the task's budget and
/// the runtime, and registers the waker again; a connection asked its timers three times a
/// request.) Which task that was is kept in the sleep's allocation: a timer is part of every
/// connection, and making the timer itself larger cost more (in moves and allocations) than the
/// polls it saved.
#[derive(Default)]
pub struct Timer(Option<Pin<Box<Armed>>>);

pin_project_lite::pin_project! {
    struct Armed {
        #[pin]
        sleep: Sleep,
        // The task the sleep wakes, as of its last poll (the sleep holds the same waker).
        waker: Option<Waker>,
    }
}

impl Timer {
    /// Whether `deadline` has passed; if not, the task is woken by then.
    pub fn expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let armed = match &mut self.0 {
            Some(armed) => {
                let this = armed.as_mut().project();
                if this.sleep.deadline() > deadline {
                    this.sleep.reset(deadline);
                } else if !this.sleep.is_elapsed() && wakes(this.waker, cx) {
                    return false;
                }
                armed
            }
            None => self.0.insert(Box::pin(Armed {
                sleep: tokio::time::sleep_until(deadline),
                waker: None,
            })),
        };
        let mut this = armed.as_mut().project();
        while this.sleep.as_mut().poll(cx) == Poll::Ready(()) {
            if this.sleep.deadline() >= deadline {
                return true;
            }
            // It fired at a deadline that has since moved on.
            this.sleep.as_mut().reset(deadline);
        }
        if !wakes(this.waker, cx) {
            *this.waker = Some(cx.waker().clone());
        }
        false
    }
}

/// Whether `waker` wakes the task polling with `cx`.
fn wakes(waker: &Option<Waker>, cx: &Context<'_>) -> bool {
    waker
        .as_ref()
        .is_some_and(|waker| waker.will_wake(cx.waker()))
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
    async fn a_timer_another_task_armed_wakes_the_task_that_asks_now() {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut timer = Timer::default();
        // Armed by a task that then ends, and asked by this one for the same deadline.
        let mut timer = tokio::spawn(async move {
            assert!(!check(&mut timer, deadline).await);
            timer
        })
        .await
        .expect("the arming task");
        let asked = std::future::poll_fn(|cx| {
            if timer.expired(deadline, cx) {
                Poll::Ready(Instant::now())
            } else {
                Poll::Pending
            }
        });
        let woke = tokio::time::timeout(Duration::from_secs(60), asked).await;
        assert_eq!(woke.map(|at| at - deadline), Ok(Duration::ZERO));
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
