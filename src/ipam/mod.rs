//! The pure IPAM core: the allocation index, GC decisions, the plan they produce and the
//! release write.
//!
//! Nothing here imports tokio, kube or the clock: callers pass `now` and execute the plans.

pub mod intern;
pub mod gc;
pub mod index;
pub mod plan;
pub mod release;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod guard_tests;
