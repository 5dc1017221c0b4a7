//! The watch seam: one event protocol for every list + watch of a kind, whatever the backend
//! (Kubernetes watches, etcd watches, the memory backend's broadcast), so the shell that feeds
//! the index is written once.
//!
//! Owns: [`WatchEvent`], [`WatchFailure`] and the [`WatchStream`] type every backend returns.
//! Must not: import tokio or kube (part of the pure core), buffer objects, or decode them: a
//! [`Stored`] travels as the backend returned it and the consumer trims it on arrival.
//!
//! The protocol, per stream: `Init`, `InitApply`*, `InitDone` on the first list and again on
//! every relist (after an expiry or a compaction), then `Apply` / `Delete` in the order the
//! backend committed them. A consumer replaces what it holds of the kind at `InitDone`: an
//! object it holds that the relist did not show is gone. `Error` reports a failure and never
//! ends the stream: the backend retries by itself and relists (`Init` again) if it has to.

use std::pin::Pin;

use futures::Stream;

use super::Stored;

/// One step of a list + watch.
#[derive(Debug, Clone, PartialEq)]
pub enum WatchEvent {
    /// A (re)list begins.
    Init,
    /// One object of the list in progress.
    InitApply(Stored),
    /// The list is complete: the objects since `Init` are the whole kind.
    InitDone,
    /// An object was created or changed.
    Apply(Stored),
    /// An object was deleted; the body is its last known state.
    Delete(Stored),
    /// The watch failed; the stream goes on.
    Error(WatchFailure),
    /// The watch is established again where it broke off, so nothing was missed: no list
    /// follows, and this is the good news that ends a failure (etcd resumes from a revision).
    Resumed,
}

/// Why a watch failed, classified where it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WatchFailure {
    /// The HTTP-like code when the server refused the watch for good (401, 403, 404: no
    /// permission, no such resource): retrying will not fix it and readiness says so.
    /// `None` for routine failures (connection lost, expired, 5xx) that the retry absorbs.
    pub refused: Option<u16>,
    pub message: String,
}

impl WatchFailure {
    pub fn transient(message: impl Into<String>) -> Self {
        WatchFailure { refused: None, message: message.into() }
    }
    pub fn refused(code: u16, message: impl Into<String>) -> Self {
        WatchFailure { refused: Some(code), message: message.into() }
    }
}

/// A list + watch of one kind. It ends only when its backend is gone.
pub type WatchStream = Pin<Box<dyn Stream<Item = WatchEvent> + Send>>;
