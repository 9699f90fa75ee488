//! [`Timer`]: a deadline that costs nothing until something has to wait for it.

use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::time::{Instant, Sleep};

/// A sleep allocated on first use and moved to each new deadline. Most deadlines never need one:
/// a request head or a response that is there when first asked for never waits.
#[derive(Default)]
pub struct Timer(Option<Pin<Box<Sleep>>>);

impl Timer {
    /// Whether `deadline` has passed; if not, the task is woken when it does.
    pub fn expired(&mut self, deadline: Instant, cx: &mut Context<'_>) -> bool {
        let sleep = match &mut self.0 {
            Some(sleep) => {
                if sleep.deadline() != deadline {
                    sleep.as_mut().reset(deadline);
                }
                sleep
            }
            None => self.0.insert(Box::pin(tokio::time::sleep_until(deadline))),
        };
        matches!(sleep.as_mut().poll(cx), Poll::Ready(()))
    }
}
