//! Leader election on a `coordination.k8s.io/v1` Lease, so that several replicas can run and
//! exactly one writes: the others keep their watches and index warm and take over when the
//! leader stops renewing (hot standby).
//!
//! Owns: the Lease (`calico-kube-controllers` in the pod's namespace), the replica's identity
//! and user agent, the "may write" signal the GC loop obeys, the `kube_controllers_leader` gauge,
//! and giving the Lease up on shutdown.
//! Must not: write anything but the Lease, or let a leader keep writing once its Lease could have
//! expired in another replica's eyes: it steps down at the renew deadline, before the Lease
//! duration is over.
//!
//! Split as the rest of the crate: [`decide`] is pure (lease as read, identity, clock, durations
//! → what to write); the campaign loop around it only reads, writes and keeps time. Semantics
//! are client-go's `leaderelection`: acquire a free, expired or own Lease, renew every retry
//! period, compare-and-swap on `resourceVersion` (a 409 is a lost race), `leaseTransitions`
//! counted on every change of holder, and release on shutdown by clearing the holder with a
//! one-second duration.

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use kube::api::{Api, ObjectMeta, PostParams};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::Shared;
use super::ipam_gc::clock::now_millis;
use crate::datastore::kube::status_code;
use crate::model::time::{Millis, format_go_duration};

/// The Lease's name; one per namespace, shared by every replica.
pub const LEASE_NAME: &str = "calico-kube-controllers";
/// Where the Lease lives when `POD_NAMESPACE` is unset (where Calico installs the controller).
pub const DEFAULT_NAMESPACE: &str = "kube-system";
/// client-go's controller-manager defaults are 15 s / 10 s / 2 s. Ours are shorter so a killed
/// leader is replaced within 15 s: its Lease runs out at most 10 s after its last renewal, and a
/// standby notices within one retry period (2 s) more. The renew deadline leaves a leader that
/// cannot reach the API server 3 s between stopping its writes and its Lease expiring.
pub const DEFAULT_LEASE_DURATION: Millis = 10_000;
/// See [`DEFAULT_LEASE_DURATION`].
pub const DEFAULT_RENEW_DEADLINE: Millis = 7_000;
/// See [`DEFAULT_LEASE_DURATION`].
pub const DEFAULT_RETRY_PERIOD: Millis = 2_000;
/// Shutdown waits this long at most for the Lease to be given up; if the API server does not
/// answer in time the Lease simply expires, as if the process had been killed.
const RELEASE_TIMEOUT: Duration = Duration::from_secs(3);

/// The three durations of an election, validated together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    /// How long a Lease stays valid after its last renewal, for the other replicas.
    pub lease: Millis,
    /// A leader that could not renew for this long stops writing.
    pub renew_deadline: Millis,
    /// How often a leader renews and a standby looks at the Lease.
    pub retry_period: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TimingError {
    #[error("the leader election lease duration must be at least 1s (the Lease counts whole seconds), got {0}")]
    LeaseTooShort(String),
    #[error("the leader election retry period must be positive, got {0}")]
    RetryNotPositive(String),
    #[error(
        "the leader election renew deadline ({renew}) must be shorter than the lease duration ({lease}): \
         a leader must stop writing before its Lease can expire for the other replicas"
    )]
    RenewNotBelowLease { renew: String, lease: String },
    #[error(
        "the leader election retry period ({retry}) must be shorter than the renew deadline ({renew}): \
         a leader needs at least one more renewal attempt before it has to step down"
    )]
    RetryNotBelowRenew { retry: String, renew: String },
}

impl Default for Timing {
    fn default() -> Self {
        Timing { lease: DEFAULT_LEASE_DURATION, renew_deadline: DEFAULT_RENEW_DEADLINE, retry_period: DEFAULT_RETRY_PERIOD }
    }
}

impl Timing {
    pub fn new(lease: Millis, renew_deadline: Millis, retry_period: Millis) -> Result<Self, TimingError> {
        let f = format_go_duration;
        if lease < 1000 {
            return Err(TimingError::LeaseTooShort(f(lease)));
        }
        if retry_period <= 0 {
            return Err(TimingError::RetryNotPositive(f(retry_period)));
        }
        if renew_deadline >= lease {
            return Err(TimingError::RenewNotBelowLease { renew: f(renew_deadline), lease: f(lease) });
        }
        if retry_period >= renew_deadline {
            return Err(TimingError::RetryNotBelowRenew { retry: f(retry_period), renew: f(renew_deadline) });
        }
        Ok(Timing { lease, renew_deadline, retry_period })
    }

    /// `leaseDurationSeconds` as written: rounded up, so others never expire the Lease early.
    fn lease_seconds(&self) -> i32 {
        i32::try_from((self.lease + 999) / 1000).unwrap_or(i32::MAX)
    }
}

/// The fields of a Lease the election reads and writes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LeaseRecord {
    /// `None` (or empty in the object) = free.
    pub holder: Option<String>,
    pub lease_seconds: i32,
    pub acquired: Option<Millis>,
    pub renewed: Option<Millis>,
    pub transitions: i32,
}

/// A Lease as read, and when this replica first saw this version of it (its own monotonic
/// clock: a wall-clock step on this host neither ages nor freshens what it saw).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub record: LeaseRecord,
    pub first_seen: Millis,
}

/// What to do after reading the Lease.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// No Lease yet: create it, held by us.
    Create(LeaseRecord),
    /// Write this record over the version read (a renewal, or a takeover of a free or expired
    /// Lease); a conflict means another replica wrote first.
    Update(LeaseRecord),
    /// Another replica holds a live Lease; look again later. `expires_in`: how long until it
    /// runs out unless renewed, by this replica's reckoning.
    Follow { holder: String, expires_in: Millis },
}

/// The election's decision. A Lease held by someone else is expired only when both its
/// `renewTime` (against our wall clock, `now`) and the moment this replica first saw that
/// version (against our monotonic clock, `mono_now`) lie more than its duration in the past.
/// `renewTime` alone would let a replica whose clock runs ahead, or is stepped forward, take
/// over a live leader (client-go trusts only its own observation for that reason); requiring
/// both costs a standby that has just started one lease duration of waiting at most. Records
/// written carry wall time, as every replica reads them.
pub fn decide(observed: Option<&Observed>, me: &str, now: Millis, mono_now: Millis, timing: &Timing) -> Action {
    let Some(o) = observed else {
        return Action::Create(LeaseRecord {
            holder: Some(me.to_string()),
            lease_seconds: timing.lease_seconds(),
            acquired: Some(now),
            renewed: Some(now),
            transitions: 0,
        });
    };
    let record = &o.record;
    match record.holder.as_deref().filter(|h| !h.is_empty()) {
        Some(holder) if holder == me => Action::Update(LeaseRecord {
            holder: Some(me.to_string()),
            lease_seconds: timing.lease_seconds(),
            acquired: record.acquired.or(Some(now)),
            renewed: Some(now),
            transitions: record.transitions,
        }),
        Some(holder) if expires_in(o, now, mono_now, timing) >= 0 => {
            Action::Follow { holder: holder.to_string(), expires_in: expires_in(o, now, mono_now, timing) }
        }
        // Free (released) or expired: take it over.
        _ => Action::Update(LeaseRecord {
            holder: Some(me.to_string()),
            lease_seconds: timing.lease_seconds(),
            acquired: Some(now),
            renewed: Some(now),
            transitions: record.transitions.saturating_add(1),
        }),
    }
}

/// How long until a Lease held by another replica runs out, by this replica's reckoning: the
/// later of its last renewal (wall) and our first sight of this version (monotonic), each on
/// its own clock. Negative once it ran out.
fn expires_in(o: &Observed, now: Millis, mono_now: Millis, timing: &Timing) -> Millis {
    // A Lease without a duration is read with ours, as client-go reads a missing field as zero
    // but would then take over a live leader at once.
    let duration = if o.record.lease_seconds > 0 { Millis::from(o.record.lease_seconds) * 1000 } else { timing.lease };
    let by_renewal = o.record.renewed.or(o.record.acquired).unwrap_or(0).saturating_add(duration).saturating_sub(now);
    let by_observation = o.first_seen.saturating_add(duration).saturating_sub(mono_now);
    by_renewal.max(by_observation)
}

/// Whether a leader whose last successful renewal was sent at `renewed` (monotonic clock) must
/// stop writing now.
pub fn renew_deadline_passed(renewed: Millis, now: Millis, timing: &Timing) -> bool {
    now.saturating_sub(renewed) >= timing.renew_deadline
}

/// The record that gives the Lease up (client-go's ReleaseOnCancel): no holder and a one-second
/// duration, so a standby takes it at its next look instead of waiting the Lease out.
pub fn released(record: &LeaseRecord, now: Millis) -> LeaseRecord {
    LeaseRecord { holder: None, lease_seconds: 1, acquired: Some(now), renewed: Some(now), transitions: record.transitions }
}

/// This replica's name in the Lease: `POD_NAME` (unique in the namespace), else the host name
/// with the process id (two processes on one host must not share a name, or both would think
/// they hold the Lease), else a random name.
pub fn identity(pod_name: Option<&str>, hostname: Option<&str>, pid: u32, random: u64) -> String {
    if let Some(pod) = pod_name.map(str::trim).filter(|p| !p.is_empty()) {
        return pod.to_string();
    }
    match hostname.map(str::trim).filter(|h| !h.is_empty()) {
        Some(host) => format!("{host}_{pid}"),
        None => format!("calico-kube-controllers-{random:08x}_{pid}"),
    }
}

/// [`identity`] from the environment: `POD_NAME`, the kernel's host name, the process id.
pub fn identity_from_env() -> String {
    let pod = std::env::var("POD_NAME").ok();
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname").ok().or_else(|| std::env::var("HOSTNAME").ok());
    let random = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.subsec_nanos() as u64).unwrap_or(0);
    identity(pod.as_deref(), host.as_deref(), std::process::id(), random ^ (u64::from(std::process::id()) << 32))
}

/// `POD_NAMESPACE`, else [`DEFAULT_NAMESPACE`].
pub fn namespace_from_env() -> String {
    std::env::var("POD_NAMESPACE").ok().filter(|n| !n.trim().is_empty()).unwrap_or_else(|| DEFAULT_NAMESPACE.to_string())
}

/// The User-Agent of every API call, naming the replica, so the API server's audit log tells
/// replicas apart. Only printable ASCII survives (a header value must not carry anything else).
pub fn user_agent(identity: &str) -> String {
    let clean: String = identity.chars().map(|c| if (' '..='~').contains(&c) && c != '(' && c != ')' { c } else { '_' }).collect();
    format!("calico-kube-controllers/{} ({clean})", env!("CARGO_PKG_VERSION"))
}

#[derive(Debug, Clone)]
pub struct ElectionOptions {
    pub identity: String,
    pub namespace: String,
    pub timing: Timing,
}

/// Ends a campaign: stop renewing, give the Lease up, report done.
pub struct ElectionHandle {
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl ElectionHandle {
    /// Stops campaigning and gives the Lease up if this replica holds it. Call after the GC loop
    /// finished its writes. Returns within [`RELEASE_TIMEOUT`] and a little.
    pub async fn resign(self) {
        let _ = self.stop.send(true);
        let _ = tokio::time::timeout(RELEASE_TIMEOUT + Duration::from_secs(1), self.task).await;
    }
}

/// Starts campaigning; the receiver says whether this replica may write (true only while it
/// holds the Lease and renewed it within the renew deadline).
pub fn spawn(client: kube::Client, opts: ElectionOptions, shared: Arc<Shared>) -> (watch::Receiver<bool>, ElectionHandle) {
    let (may_write, rx) = watch::channel(false);
    let (stop, stop_rx) = watch::channel(false);
    let campaign = Campaign { api: Api::namespaced(client, &opts.namespace), opts, shared, may_write };
    tracing::info!(identity = %campaign.opts.identity, namespace = %campaign.opts.namespace, lease = LEASE_NAME, "leader election started");
    let task = tokio::spawn(campaign.run(stop_rx));
    (rx, ElectionHandle { stop, task })
}

/// One attempt's result.
enum Attempt {
    /// We hold the Lease; the write was sent at this monotonic time.
    Holding { sent: Millis },
    /// Another replica holds the Lease until `expires` (wall clock) unless it renews.
    Following { holder: String, expires_in: Millis },
    /// Another replica wrote the Lease between our read and our write.
    LostRace,
}

/// The version of the Lease last read, and when it was first seen.
struct Seen {
    version: String,
    first_seen: Millis,
}

struct Campaign {
    api: Api<Lease>,
    opts: ElectionOptions,
    shared: Arc<Shared>,
    may_write: watch::Sender<bool>,
}

async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

fn millis(d: Millis) -> Duration {
    Duration::from_millis(d.max(0) as u64)
}

impl Campaign {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        let timing = self.opts.timing;
        let epoch = Instant::now();
        let mono = move || epoch.elapsed().as_millis() as Millis;
        let mut seen: Option<Seen> = None;
        // Monotonic time of the last renewal sent while holding the Lease; `Some` = leading.
        let mut renewed: Option<Millis> = None;
        let mut followed: Option<String> = None;
        loop {
            let mut wait = timing.retry_period;
            let step_down_at = renewed.map(|t| epoch + millis(t + timing.renew_deadline));
            let result = tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = sleep_until_opt(step_down_at) => None,
                r = tokio::time::timeout(millis(timing.renew_deadline), self.attempt(&mut seen, mono())) => Some(r),
            };
            match result {
                None => {}
                Some(Err(_)) => tracing::warn!(timeout = %format_go_duration(timing.renew_deadline), "Lease request timed out"),
                Some(Ok(Err(e))) => tracing::warn!(error = %e, "Lease request failed"),
                Some(Ok(Ok(Attempt::Holding { sent }))) => {
                    renewed = Some(sent);
                    followed = None;
                    self.set_leading(true, "acquired the Lease");
                }
                Some(Ok(Ok(Attempt::Following { holder, expires_in }))) => {
                    renewed = None;
                    // Look again right after the Lease would run out rather than up to a retry
                    // period later: a dead leader is replaced that much sooner.
                    wait = (expires_in + 1).clamp(1, timing.retry_period);
                    self.set_leading(false, "another replica holds the Lease");
                    if followed.as_deref() != Some(&holder) {
                        tracing::info!(leader = %holder, "following");
                        followed = Some(holder);
                    }
                }
                Some(Ok(Ok(Attempt::LostRace))) => {
                    // Only a replica that judged our Lease expired writes it while we hold it.
                    renewed = None;
                    self.set_leading(false, "another replica wrote the Lease first");
                }
            }
            if let Some(t) = renewed
                && renew_deadline_passed(t, mono(), &timing)
            {
                renewed = None;
                self.set_leading(false, "could not renew the Lease within the renew deadline");
            }
            let step_down_at = renewed.map(|t| epoch + millis(t + timing.renew_deadline));
            tokio::select! {
                biased;
                _ = stop.changed() => break,
                _ = sleep_until_opt(step_down_at) => {}
                _ = tokio::time::sleep(millis(wait)) => {}
            }
        }
        let held = renewed.is_some();
        self.set_leading(false, "shutting down");
        if held {
            match tokio::time::timeout(RELEASE_TIMEOUT, self.release()).await {
                Ok(Ok(true)) => tracing::info!("Lease released"),
                Ok(Ok(false)) => {}
                Ok(Err(e)) => tracing::warn!(error = %e, "releasing the Lease failed; it expires on its own"),
                Err(_) => tracing::warn!("releasing the Lease timed out; it expires on its own"),
            }
        }
    }

    fn set_leading(&self, leading: bool, why: &str) {
        let was = self.may_write.send_replace(leading);
        if was != leading {
            if leading {
                tracing::info!(identity = %self.opts.identity, why, "became the leader: writing");
            } else {
                tracing::info!(identity = %self.opts.identity, why, "stopped leading: not writing");
            }
            self.shared.metrics(|m| m.leader = leading);
        }
    }

    async fn get(&self) -> Result<Option<Lease>, kube::Error> {
        let got = self.api.get_opt(LEASE_NAME).await;
        self.shared.api.observe("get", "leases", 200, &got);
        got
    }

    async fn replace(&self, lease: &Lease) -> Result<Lease, kube::Error> {
        let r = self.api.replace(LEASE_NAME, &PostParams::default(), lease).await;
        self.shared.api.observe("update", "leases", 200, &r);
        r
    }

    async fn attempt(&self, seen: &mut Option<Seen>, mono_now: Millis) -> Result<Attempt, kube::Error> {
        let now = now_millis();
        let lease = self.get().await?;
        let observed = lease.as_ref().map(|l| {
            let version = l.metadata.resource_version.clone().unwrap_or_default();
            let first_seen = match seen {
                Some(s) if s.version == version => s.first_seen,
                _ => mono_now,
            };
            *seen = Some(Seen { version, first_seen });
            Observed { record: record_of(l), first_seen }
        });
        let written = match (decide(observed.as_ref(), &self.opts.identity, now, mono_now, &self.opts.timing), lease) {
            (Action::Follow { holder, expires_in }, _) => return Ok(Attempt::Following { holder, expires_in }),
            (Action::Create(record), _) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(LEASE_NAME.into()), namespace: Some(self.opts.namespace.clone()), ..Default::default() },
                    spec: Some(write_record(LeaseSpec::default(), &record)),
                };
                let r = self.api.create(&PostParams::default(), &lease).await;
                self.shared.api.observe("create", "leases", 201, &r);
                r.map(|_| ())
            }
            (Action::Update(record), Some(mut lease)) => {
                if observed.as_ref().is_some_and(|o| o.record.holder != record.holder) {
                    tracing::info!(previous = ?observed.as_ref().and_then(|o| o.record.holder.clone()), transitions = record.transitions, "taking the Lease over");
                }
                // The read resourceVersion stays in the body: the replace is a compare-and-swap.
                lease.spec = Some(write_record(lease.spec.take().unwrap_or_default(), &record));
                self.replace(&lease).await.map(|_| ())
            }
            // decide() updates only a Lease it read.
            (Action::Update(_), None) => return Ok(Attempt::LostRace),
        };
        match written {
            Ok(()) => Ok(Attempt::Holding { sent: mono_now }),
            Err(e) if status_code(&e) == 409 => Ok(Attempt::LostRace),
            Err(e) => Err(e),
        }
    }

    /// Gives the Lease up if we still hold it; true if it was written.
    async fn release(&self) -> Result<bool, kube::Error> {
        let Some(mut lease) = self.get().await? else { return Ok(false) };
        let record = record_of(&lease);
        if record.holder.as_deref() != Some(self.opts.identity.as_str()) {
            return Ok(false);
        }
        lease.spec = Some(write_record(lease.spec.take().unwrap_or_default(), &released(&record, now_millis())));
        self.replace(&lease).await.map(|_| true)
    }
}

fn record_of(lease: &Lease) -> LeaseRecord {
    let Some(spec) = lease.spec.as_ref() else { return LeaseRecord::default() };
    LeaseRecord {
        holder: spec.holder_identity.clone().filter(|h| !h.is_empty()),
        lease_seconds: spec.lease_duration_seconds.unwrap_or(0),
        acquired: spec.acquire_time.as_ref().map(|t| t.0.as_millisecond()),
        renewed: spec.renew_time.as_ref().map(|t| t.0.as_millisecond()),
        transitions: spec.lease_transitions.unwrap_or(0),
    }
}

/// `record` written over `spec`; fields the election does not own (strategy, preferred holder)
/// are kept.
fn write_record(mut spec: LeaseSpec, record: &LeaseRecord) -> LeaseSpec {
    let time = |ms: Option<Millis>| ms.and_then(|ms| k8s_openapi::jiff::Timestamp::from_millisecond(ms).ok()).map(MicroTime);
    spec.holder_identity = record.holder.clone();
    spec.lease_duration_seconds = Some(record.lease_seconds);
    spec.acquire_time = time(record.acquired);
    spec.renew_time = time(record.renewed);
    spec.lease_transitions = Some(record.transitions);
    spec
}

#[cfg(test)]
mod tests {
    use super::*;

    const ME: &str = "replica-a";
    const NOW: Millis = 1_000_000;

    fn held_by(holder: &str, renewed: Millis, first_seen: Millis) -> Observed {
        Observed {
            record: LeaseRecord { holder: Some(holder.into()), lease_seconds: 10, acquired: Some(renewed - 60_000), renewed: Some(renewed), transitions: 3 },
            first_seen,
        }
    }

    #[test]
    fn a_missing_lease_is_created_held_by_us_with_no_transitions() {
        let Action::Create(r) = decide(None, ME, NOW, NOW, &Timing::default()) else { panic!("expected Create") };
        assert_eq!(r, LeaseRecord { holder: Some(ME.into()), lease_seconds: 10, acquired: Some(NOW), renewed: Some(NOW), transitions: 0 });
    }

    #[test]
    fn a_released_lease_is_taken_at_once_and_counts_a_transition() {
        let o = Observed { record: released(&held_by("replica-b", NOW, NOW).record, NOW), first_seen: NOW };
        let Action::Update(r) = decide(Some(&o), ME, NOW, NOW, &Timing::default()) else { panic!("expected Update") };
        assert_eq!((r.holder.as_deref(), r.transitions, r.acquired), (Some(ME), 4, Some(NOW)));
    }

    #[test]
    fn a_live_lease_of_another_replica_is_not_taken() {
        let o = held_by("replica-b", NOW - 9_000, NOW - 9_000);
        assert_eq!(decide(Some(&o), ME, NOW, NOW, &Timing::default()), Action::Follow { holder: "replica-b".into(), expires_in: 1_000 });
    }

    #[test]
    fn an_expired_lease_is_taken_over_with_transitions_plus_one() {
        let o = held_by("replica-b", NOW - 10_001, NOW - 10_001);
        let Action::Update(r) = decide(Some(&o), ME, NOW, NOW, &Timing::default()) else { panic!("expected Update") };
        assert_eq!(r, LeaseRecord { holder: Some(ME.into()), lease_seconds: 10, acquired: Some(NOW), renewed: Some(NOW), transitions: 4 });
    }

    #[test]
    fn an_old_renew_time_seen_only_just_now_is_waited_out_first() {
        // A standby that just started, or whose clock runs ahead of the leader's: the renewal
        // looks old, but this replica has not watched the Lease stay still for a full duration.
        let o = held_by("replica-b", NOW - 600_000, NOW - 2_000);
        assert!(matches!(decide(Some(&o), ME, NOW, NOW, &Timing::default()), Action::Follow { .. }));
        assert!(matches!(decide(Some(&o), ME, NOW + 8_001, NOW + 8_001, &Timing::default()), Action::Update(_)));
    }

    #[test]
    fn a_wall_clock_stepped_forward_here_never_takes_over_a_live_lease() {
        // The leader renewed 2 s ago and we saw that version 2 s ago; then this host's wall clock
        // jumps an hour ahead: by renewTime the Lease looks long dead, by our own observation it
        // is not, and it is not taken.
        let o = held_by("replica-b", NOW - 2_000, NOW - 2_000);
        let stepped = NOW + 3_600_000;
        assert!(matches!(decide(Some(&o), ME, stepped, NOW, &Timing::default()), Action::Follow { expires_in: 8_000, .. }));
        // A full duration of our own observation later, with the leader silent, it is.
        assert!(matches!(decide(Some(&o), ME, stepped + 8_001, NOW + 8_001, &Timing::default()), Action::Update(_)));
    }

    #[test]
    fn a_renew_time_ahead_of_our_clock_delays_the_takeover() {
        let o = held_by("replica-b", NOW + 5_000, NOW - 20_000);
        assert!(matches!(decide(Some(&o), ME, NOW, NOW, &Timing::default()), Action::Follow { .. }));
    }

    #[test]
    fn our_own_lease_is_renewed_keeping_acquire_time_and_transitions() {
        let o = held_by(ME, NOW - 2_000, NOW - 2_000);
        let Action::Update(r) = decide(Some(&o), ME, NOW, NOW, &Timing::default()) else { panic!("expected Update") };
        assert_eq!(r, LeaseRecord { holder: Some(ME.into()), lease_seconds: 10, acquired: Some(NOW - 62_000), renewed: Some(NOW), transitions: 3 });
    }

    #[test]
    fn our_own_lease_is_renewed_even_after_it_expired() {
        // Same pod name after a container restart: the Lease is still ours.
        let o = held_by(ME, NOW - 60_000, NOW - 60_000);
        let Action::Update(r) = decide(Some(&o), ME, NOW, NOW, &Timing::default()) else { panic!("expected Update") };
        assert_eq!(r.transitions, 3);
    }

    #[test]
    fn a_leader_steps_down_at_the_renew_deadline_before_its_lease_can_expire() {
        let t = Timing::default();
        assert!(!renew_deadline_passed(100, 100 + 6_999, &t));
        assert!(renew_deadline_passed(100, 100 + 7_000, &t));
        assert!(t.renew_deadline < t.lease, "stepping down happens before others may take over");
    }

    #[test]
    fn a_released_lease_has_no_holder_and_a_one_second_duration() {
        let r = released(&held_by(ME, NOW, NOW).record, NOW + 5);
        assert_eq!(r, LeaseRecord { holder: None, lease_seconds: 1, acquired: Some(NOW + 5), renewed: Some(NOW + 5), transitions: 3 });
    }

    #[test]
    fn timings_are_validated_together() {
        assert_eq!(Timing::new(10_000, 7_000, 2_000), Ok(Timing::default()));
        assert!(matches!(Timing::new(10_000, 10_000, 2_000), Err(TimingError::RenewNotBelowLease { .. })));
        assert!(matches!(Timing::new(10_000, 7_000, 7_000), Err(TimingError::RetryNotBelowRenew { .. })));
        assert!(matches!(Timing::new(500, 300, 100), Err(TimingError::LeaseTooShort(_))));
        assert!(matches!(Timing::new(10_000, 7_000, 0), Err(TimingError::RetryNotPositive(_))));
        let msg = Timing::new(5_000, 6_000, 1_000).unwrap_err().to_string();
        assert!(msg.contains("renew deadline (6s)") && msg.contains("lease duration (5s)"), "{msg}");
        assert_eq!(Timing::new(1_500, 1_000, 500).unwrap().lease_seconds(), 2, "rounded up, never early");
    }

    #[test]
    fn identity_is_the_pod_name_else_host_and_pid_else_random() {
        assert_eq!(identity(Some("ckc-7d9f"), Some("node1"), 42, 7), "ckc-7d9f");
        assert_eq!(identity(Some(" "), Some("node1\n"), 42, 7), "node1_42");
        assert_eq!(identity(None, None, 42, 0xabc), "calico-kube-controllers-00000abc_42");
    }

    #[test]
    fn the_user_agent_names_the_replica_in_printable_ascii() {
        let ua = user_agent("pod-a");
        assert!(ua.starts_with("calico-kube-controllers/") && ua.ends_with(" (pod-a)"), "{ua}");
        assert!(user_agent("a\u{e9}(b)\n").ends_with(" (a__b__)"));
    }

    #[test]
    fn a_record_survives_the_lease_spec_round_trip() {
        let r = LeaseRecord { holder: Some(ME.into()), lease_seconds: 10, acquired: Some(NOW - 5), renewed: Some(NOW), transitions: 2 };
        let lease = Lease { spec: Some(write_record(LeaseSpec { strategy: Some("x".into()), ..Default::default() }, &r)), ..Default::default() };
        assert_eq!(record_of(&lease), r);
        assert_eq!(lease.spec.unwrap().strategy.as_deref(), Some("x"), "fields we do not own are kept");
    }
}
