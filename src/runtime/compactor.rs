//! The etcd compactor, as upstream's kube-controllers runs it on the etcd datastore (SPEC §0
//! step 6; kube-apiserver's compactor, which upstream reuses): every `COMPACTION_PERIOD` /
//! `etcdV3CompactionPeriod` (default 10m, 0 disables) one round of
//! [`EtcdDatastore::compact_round`], so etcd keeps one period of history for slow watchers.
//!
//! Owns: the period (re-read when the configuration changes), running rounds only while this
//! replica leads, and carrying the round state between rounds.
//! Must not: compact in a dry run (never started there) or on a standby, or stop on an error
//! (logged, the next period tries again).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use super::Shared;
use crate::datastore::etcd::{CompactState, EtcdDatastore};
use crate::model::time::Millis;

/// Runs until the configuration channel closes.
pub async fn run(ds: EtcdDatastore, shared: Arc<Shared>, may_write: watch::Receiver<bool>) {
    let mut config = shared.config.subscribe();
    let mut state = CompactState::default();
    let mut said: Option<Millis> = None;
    loop {
        let period = config.borrow_and_update().run.compaction_period;
        if said != Some(period) {
            if period <= 0 {
                tracing::info!("periodic etcd compaction disabled (COMPACTION_PERIOD / etcdV3CompactionPeriod is 0)");
            } else {
                tracing::info!(period_ms = period, "periodic etcd compaction, by the leader");
            }
            said = Some(period);
        }
        if period <= 0 {
            if config.changed().await.is_err() {
                return;
            }
            continue;
        }
        let deadline = Instant::now() + Duration::from_millis(period as u64);
        let mut period_changed = false;
        loop {
            tokio::select! {
                () = tokio::time::sleep_until(deadline) => break,
                changed = config.changed() => {
                    if changed.is_err() {
                        return;
                    }
                    // Other settings changing does not restart the period.
                    if config.borrow_and_update().run.compaction_period != period {
                        period_changed = true;
                        break;
                    }
                }
            }
        }
        if period_changed || !*may_write.borrow() {
            continue;
        }
        match ds.compact_round(state).await {
            Ok((next, compacted)) => {
                state = next;
                if let Some(revision) = compacted {
                    tracing::info!(revision, "etcd compacted");
                }
            }
            Err(e) => tracing::warn!(error = %e, "etcd compaction round failed; trying again next period"),
        }
    }
}
