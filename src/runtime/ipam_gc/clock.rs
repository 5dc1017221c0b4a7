//! The GC loop's clocks: a monotonic reading for every duration the loop measures (leak grace,
//! the two observations of empty blocks and orphan handles, backoff due times) and the wall
//! clock for timestamps written by others and for reports, read in one place so loop tests can
//! run on tokio's paused clock and step the wall clock on its own.
//!
//! Owns: [`Clock`] and the process-wide [`now_millis`].
//! Must not: be read by the pure core (`ipam` takes a [`PassTime`] from here, through its caller).

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};

use crate::model::time::{Millis, PassTime};

/// Milliseconds since the Unix epoch, from the system clock.
pub fn now_millis() -> Millis {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as Millis).unwrap_or(0)
}

/// Where the loop's time comes from. The monotonic reading starts at the wall time of the
/// clock's creation, so in a run whose wall clock never steps the two agree.
#[derive(Debug, Clone)]
pub enum Clock {
    /// Production: `std::time::Instant` since `started`, and the system clock.
    System { origin: Millis, started: std::time::Instant },
    /// Tests: `origin` plus the time tokio's clock advanced since `started` (with a paused runtime
    /// the grace periods and backoffs move exactly as far as the test advances time); the wall
    /// clock is that plus a step the test may change at any time, as an NTP correction or an
    /// operator's `date -s` would.
    Tokio { origin: Millis, started: tokio::time::Instant, wall_step: Arc<AtomicI64> },
}

impl Clock {
    pub fn system() -> Clock {
        Clock::System { origin: now_millis(), started: std::time::Instant::now() }
    }

    /// A clock that follows tokio's (paused, in tests), starting at `origin`.
    pub fn tokio_from(origin: Millis) -> Clock {
        Clock::Tokio { origin, started: tokio::time::Instant::now(), wall_step: Arc::default() }
    }

    /// Steps this clock's wall time (and its clones') by `ms`, leaving the monotonic one alone.
    /// Only a test clock steps; the system clock is the machine's.
    pub fn step_wall(&self, ms: Millis) {
        if let Clock::Tokio { wall_step, .. } = self {
            wall_step.fetch_add(ms, Ordering::Relaxed);
        }
    }

    /// The monotonic reading alone (backoff, retry timers).
    pub fn mono(&self) -> Millis {
        match self {
            Clock::System { origin, started } => origin + started.elapsed().as_millis() as Millis,
            Clock::Tokio { origin, started, .. } => origin + started.elapsed().as_millis() as Millis,
        }
    }

    pub fn now(&self) -> PassTime {
        let mono = self.mono();
        let wall = match self {
            Clock::System { .. } => now_millis(),
            Clock::Tokio { wall_step, .. } => mono + wall_step.load(Ordering::Relaxed),
        };
        PassTime { wall, mono }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_tokio_clock_moves_only_as_far_as_tokio_time_does() {
        let c = Clock::tokio_from(1_000);
        assert_eq!(c.now(), PassTime { wall: 1_000, mono: 1_000 });
        tokio::time::advance(std::time::Duration::from_millis(2_500)).await;
        assert_eq!(c.now(), PassTime { wall: 3_500, mono: 3_500 });
    }

    #[tokio::test(start_paused = true)]
    async fn stepping_the_wall_clock_leaves_the_monotonic_one_alone() {
        let c = Clock::tokio_from(1_000);
        let seen_by_loop = c.clone();
        c.step_wall(-600_000);
        assert_eq!(seen_by_loop.now(), PassTime { wall: -599_000, mono: 1_000 });
        tokio::time::advance(std::time::Duration::from_millis(10)).await;
        assert_eq!(seen_by_loop.now().mono, 1_010);
    }

    #[test]
    fn the_system_clocks_start_together() {
        let c = Clock::system();
        let t = c.now();
        assert!((t.wall - t.mono).abs() < 1_000, "{t:?}");
    }
}
