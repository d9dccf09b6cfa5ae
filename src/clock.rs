//! The time source. Production reads the system clock; tests move a manual one, so time-based
//! behaviour (expiry, windows) is tested without sleeping.

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use chrono::{DateTime, Utc};

#[derive(Clone)]
pub struct Clock {
    /// Added to the system time, in milliseconds; moved only by a [`ManualClock`].
    offset_ms: Arc<AtomicI64>,
}

impl Clock {
    pub fn system() -> Self {
        Self {
            offset_ms: Arc::new(AtomicI64::new(0)),
        }
    }

    /// A clock that runs with the system clock but can be moved forward by the returned handle.
    pub fn adjustable() -> (Self, ManualClock) {
        let clock = Self::system();
        let handle = ManualClock {
            offset_ms: Arc::clone(&clock.offset_ms),
        };
        (clock, handle)
    }

    pub fn now(&self) -> DateTime<Utc> {
        Utc::now() + chrono::Duration::milliseconds(self.offset_ms.load(Ordering::Relaxed))
    }

    pub fn now_secs(&self) -> i64 {
        self.now().timestamp()
    }
}

impl std::fmt::Debug for Clock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clock")
            .field("offset_ms", &self.offset_ms.load(Ordering::Relaxed))
            .finish()
    }
}

/// Moves an adjustable [`Clock`].
#[derive(Clone, Debug)]
pub struct ManualClock {
    offset_ms: Arc<AtomicI64>,
}

impl ManualClock {
    pub fn advance(&self, by: chrono::Duration) {
        self.offset_ms
            .fetch_add(by.num_milliseconds(), Ordering::Relaxed);
    }
}
