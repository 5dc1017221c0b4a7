//! The GC loop's clock: wall time in milliseconds for the decisions (leak `since`, grace
//! periods, backoff due times), read in one place so loop tests can run on tokio's paused clock.
//!
//! Owns: [`Clock`] and the process-wide [`now_millis`].
//! Must not: be read by the pure core (`ipam` takes `now` from here, through its caller).

use crate::model::time::Millis;

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// Where the loop's `now` comes from.
#[derive(Debug, Clone, Copy)]
pub enum Clock {
    /// The system clock: production.
    System,
    /// `origin` plus the time tokio's clock advanced since `started`: with a paused runtime the
    /// grace periods and backoffs move exactly as far as the test advances time.
    Tokio { origin: Millis, started: tokio::time::Instant },
}

impl Clock {
    /// A clock that follows tokio's (paused, in tests), starting at `origin`.
    pub fn tokio_from(origin: Millis) -> Clock {
        Clock::Tokio { origin, started: tokio::time::Instant::now() }
    }

    pub fn now(&self) -> Millis {
        match self {
            Clock::System => now_millis(),
            Clock::Tokio { origin, started } => origin + started.elapsed().as_millis() as Millis,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_as_far_as_tokio_time_does() {
        let c = Clock::tokio_from(1_000);
        assert_eq!(c.now(), 1_000);
        tokio::time::advance(std::time::Duration::from_millis(2_500)).await;
        assert_eq!(c.now(), 3_500);
    }
}
