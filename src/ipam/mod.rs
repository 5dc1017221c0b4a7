//! The pure IPAM core: the allocation index, GC decisions, the plan they produce, the
//! release write, and the assignment planner (assign) for the LoadBalancer controller.
//!
//! Nothing here imports tokio, kube or the clock: callers pass `now` and execute the plans.

pub mod intern;
pub mod handles;
pub mod gc;
pub mod index;
pub mod assign;
pub mod plan;
pub mod release;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod guard_tests;
