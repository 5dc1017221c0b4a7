//! The executor task: runs the plans the GC loop computed, so the task that owns the index never
//! waits on the network. It receives one [`Job`] at a time, executes its plan through the
//! datastore (every call under a timeout), re-reads the pods the plan asked to re-validate and
//! the nodes whose deletion it asked to prove, and sends a [`JobResult`] back.
//!
//! Owns: the per-call timeout and the succeeded / failed / timed-out call counts, the
//! re-validation reads (SPEC §5.7: NotFound is an answer, any other failure leaves the pod out
//! so its leak waits instead of being released blind; for a node only NotFound proves it deleted),
//! and finishing the job in progress when the loop shuts down.
//! Must not: decide anything, touch the index, or run two jobs at once (the loop sends the next
//! job only after the previous result arrived).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde_json::Value;
use tokio::sync::mpsc;

use crate::datastore::{
    ClusterKind, ClusterReader, Datastore, DatastoreError, DsResult, ErrorKind, ExecuteOptions, Expect, Kind, PlanOutcome, Precondition, Stored,
    WatchStream, execute_plan,
};
use crate::ipam::plan::Plan;
use crate::model::PodFacts;
use crate::model::time::Millis;
use crate::datastore::GoneProof;
use crate::runtime::watch::{Object, Source, decode_stored};

/// A datastore call that has not answered in this long is given up and counted as timed out;
/// its item fails as transient and backs off. Long enough for an apiserver under load (its own
/// request timeout is 60 s for writes, and kube's client reads for up to 295 s), short enough
/// that one hung connection does not hold a cleanup of thousands of nodes for minutes.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// One plan to execute and the pods to re-read after it.
#[derive(Debug)]
pub struct Job {
    /// The executable part of a pass's plan (possibly empty: a job of re-validation reads or
    /// node reads only).
    pub plan: Plan,
    pub now: Millis,
    pub cooldown_secs: u32,
    /// (namespace, pod) of confirmed leaks to re-read.
    pub revalidate: Vec<(String, String)>,
    /// Nodes missing from the Node cache to read: a NotFound proves one deleted.
    pub prove_gone: Vec<String>,
}

/// Datastore calls made by one job, by how they ended.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CallCounts {
    pub succeeded: u64,
    pub failed: u64,
    pub timed_out: u64,
}

#[derive(Debug)]
pub struct JobResult {
    /// The plan that was executed, back to its owner for the backoff bookkeeping.
    pub plan: Plan,
    pub outcome: PlanOutcome,
    /// Re-read pods (`None` = NotFound), for the next pass.
    pub fresh: BTreeMap<(String, String), Option<PodFacts>>,
    /// The nodes of `Job::prove_gone` that the read found deleted (NotFound). A node that was
    /// there, or whose read failed, is left out: it stays unproven and is read again next round.
    /// Each with the Kubernetes Node whose NotFound proved it.
    pub nodes_gone: Vec<(String, String)>,
    pub calls: CallCounts,
}

#[derive(Default)]
struct Tally {
    succeeded: AtomicU64,
    failed: AtomicU64,
    timed_out: AtomicU64,
}

impl Tally {
    fn counts(&self) -> CallCounts {
        CallCounts {
            succeeded: self.succeeded.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            timed_out: self.timed_out.load(Ordering::Relaxed),
        }
    }

    /// Runs `call` under `timeout` and counts how it ended.
    async fn timed<T>(&self, timeout: Duration, what: impl FnOnce() -> String, call: impl Future<Output = DsResult<T>>) -> DsResult<T> {
        match tokio::time::timeout(timeout, call).await {
            Ok(Ok(v)) => {
                self.succeeded.fetch_add(1, Ordering::Relaxed);
                Ok(v)
            }
            Ok(Err(e)) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
                Err(e)
            }
            Err(_) => {
                self.timed_out.fetch_add(1, Ordering::Relaxed);
                Err(DatastoreError::new(ErrorKind::Transient, format!("{} timed out after {}s", what(), timeout.as_secs_f64())))
            }
        }
    }
}

/// The datastore as the executor sees it: every call of the wrapped one under a timeout, counted.
struct Timed<'a, D> {
    inner: &'a D,
    timeout: Duration,
    tally: &'a Tally,
}

impl<D: Datastore> Datastore for Timed<'_, D> {
    async fn get(&self, kind: Kind, name: &str) -> DsResult<Stored> {
        self.tally.timed(self.timeout, || format!("get {} {name}", kind.plural()), self.inner.get(kind, name)).await
    }
    async fn list(&self, kind: Kind) -> DsResult<Vec<Stored>> {
        self.tally.timed(self.timeout, || format!("list {}", kind.plural()), self.inner.list(kind)).await
    }
    async fn create(&self, kind: Kind, name: &str, value: Value) -> DsResult<Stored> {
        self.tally.timed(self.timeout, || format!("create {} {name}", kind.plural()), self.inner.create(kind, name, value)).await
    }
    async fn update(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        self.tally.timed(self.timeout, || format!("update {} {}", kind.plural(), object.name), self.inner.update(kind, object)).await
    }
    async fn update_status(&self, kind: Kind, object: &Stored) -> DsResult<Stored> {
        self.tally.timed(self.timeout, || format!("update {}/status {}", kind.plural(), object.name), self.inner.update_status(kind, object)).await
    }
    async fn delete(&self, kind: Kind, name: &str, precondition: &Precondition) -> DsResult<()> {
        self.tally.timed(self.timeout, || format!("delete {} {name}", kind.plural()), self.inner.delete(kind, name, precondition)).await
    }
    async fn calico_node(&self, name: &str) -> DsResult<crate::datastore::CalicoNodeView> {
        self.tally.timed(self.timeout, || format!("get calico node {name}"), self.inner.calico_node(name)).await
    }
    /// The backend's own soft delete (two calls in KDD, one in etcd), under one timeout each
    /// step would have had.
    async fn soft_delete(&self, kind: Kind, object: &Stored) -> DsResult<()> {
        self.tally.timed(self.timeout * 2, || format!("delete {} {}", kind.plural(), object.name), self.inner.soft_delete(kind, object)).await
    }
    /// Checked and marked, then deleted (two calls in KDD), under the soft delete's timeout.
    async fn soft_delete_if(&self, kind: Kind, name: &str, precondition: &Precondition, expect: &[Expect]) -> DsResult<()> {
        self.tally.timed(self.timeout * 2, || format!("delete {} {name}", kind.plural()), self.inner.soft_delete_if(kind, name, precondition, expect)).await
    }
    fn watch(&self, kind: Kind) -> WatchStream {
        self.inner.watch(kind)
    }
    fn keeps_calico_nodes(&self) -> bool {
        self.inner.keeps_calico_nodes()
    }
    fn handle_object_name(&self, id: &str) -> String {
        self.inner.handle_object_name(id)
    }
    fn affinity_object_name(&self, host: &str, cidr: &ipnet::IpNet) -> String {
        self.inner.affinity_object_name(host, cidr)
    }
}

#[derive(Clone)]
pub struct ExecutorOptions {
    pub call_timeout: Duration,
    pub execute: ExecuteOptions,
}

impl Default for ExecutorOptions {
    fn default() -> Self {
        ExecutorOptions { call_timeout: CALL_TIMEOUT, execute: ExecuteOptions::default() }
    }
}

/// The executor task ended (it panicked or the runtime is shutting down).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the plan executor is gone")]
pub struct ExecutorGone;

/// The loop's end of the executor: send a job, receive its result.
pub struct Executor {
    jobs: mpsc::Sender<Job>,
    pub results: mpsc::Receiver<JobResult>,
    task: tokio::task::JoinHandle<()>,
}

impl Executor {
    /// Starts the executor task on `ds` (plans) and `cluster` (re-validation reads).
    pub fn spawn<D, C>(ds: Arc<D>, cluster: Arc<C>, opts: ExecutorOptions) -> Executor
    where
        D: Datastore + 'static,
        C: ClusterReader + 'static,
    {
        // One job at a time: the loop never has two plans in flight.
        let (jobs, mut job_rx) = mpsc::channel::<Job>(1);
        let (result_tx, results) = mpsc::channel(1);
        let task = tokio::spawn(async move {
            while let Some(job) = job_rx.recv().await {
                let result = run_job(&*ds, &*cluster, &opts, job).await;
                if result_tx.send(result).await.is_err() {
                    return;
                }
            }
        });
        Executor { jobs, results, task }
    }

    /// Hands `job` to the executor. The loop calls this only with no job in flight, so the
    /// one-slot queue always has room; `Err` if the task is gone (the job is dropped).
    pub fn send(&self, job: Job) -> Result<(), ExecutorGone> {
        self.jobs.try_send(job).map_err(|_| ExecutorGone)
    }
}

impl Drop for Executor {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn run_job<D: Datastore, C: ClusterReader>(ds: &D, cluster: &C, opts: &ExecutorOptions, job: Job) -> JobResult {
    let tally = Tally::default();
    let timed = Timed { inner: ds, timeout: opts.call_timeout, tally: &tally };
    let outcome = if crate::runtime::ipam_gc::gating::plan_is_empty(&job.plan) {
        PlanOutcome::default()
    } else {
        execute_plan(&timed, &job.plan, job.now, job.cooldown_secs, &opts.execute).await
    };
    // After one read failed (not a NotFound: the apiserver is down, slow or refusing), the rest
    // of this job's reads are not tried: each would wait out its timeout for the same answer and
    // hold the executor for minutes. What they would have confirmed stays unconfirmed (kept) and
    // is asked again by a later round. The first read goes alone, as that probe; once it is
    // answered the rest go `READ_BATCH` at a time, and a batch with a failure ends the reads.
    let mut failing = false;
    let mut skipped = 0usize;
    let mut keys: Vec<(String, String)> = Vec::with_capacity(job.revalidate.len());
    let mut seen = std::collections::BTreeSet::new();
    for key in job.revalidate {
        if seen.insert(key.clone()) {
            keys.push(key);
        }
    }
    let mut fresh = BTreeMap::new();
    let mut at = 0;
    while at < keys.len() && !failing {
        let chunk = &keys[at..keys.len().min(at + if at == 0 { 1 } else { READ_BATCH })];
        let reads: Vec<_> = chunk.iter().map(|key| reread_pod(cluster, &tally, opts.call_timeout, key)).collect();
        for (key, answer) in chunk.iter().zip(futures::future::join_all(reads).await) {
            match answer {
                Ok(facts) => {
                    fresh.insert(key.clone(), facts);
                }
                Err(Unread::Undecodable) => {}
                Err(Unread::Failed) => failing = true,
            }
        }
        at += chunk.len();
    }
    skipped += keys.len() - at;
    let mut nodes_gone = Vec::new();
    let mut at = 0;
    while at < job.prove_gone.len() && !failing {
        let chunk = &job.prove_gone[at..job.prove_gone.len().min(at + if at == 0 { 1 } else { READ_BATCH })];
        let reads: Vec<_> = chunk.iter().map(|name| prove_node_gone(ds, cluster, &tally, opts.call_timeout, name)).collect();
        for answer in futures::future::join_all(reads).await {
            match answer {
                Ok(Some(gone)) => nodes_gone.push(gone),
                Ok(None) => {}
                Err(Unread::Undecodable | Unread::Failed) => failing = true,
            }
        }
        at += chunk.len();
    }
    skipped += job.prove_gone.len() - at;
    if skipped > 0 {
        tracing::warn!(skipped, "re-validation reads skipped after a failed read; asked again by a later round");
    }
    JobResult { plan: job.plan, outcome, fresh, nodes_gone, calls: tally.counts() }
}

/// Re-validation reads in flight at once after the first has answered.
const READ_BATCH: usize = 8;

/// Why a re-read gave no answer to act on.
enum Unread {
    /// The pod was there but did not decode: its leak is kept.
    Undecodable,
    /// The read failed (not a NotFound): the job's remaining reads are not tried.
    Failed,
}

/// The pod as it is now (`None`: NotFound).
async fn reread_pod<C: ClusterReader>(cluster: &C, tally: &Tally, timeout: Duration, key: &(String, String)) -> Result<Option<PodFacts>, Unread> {
    let read = tally.timed(timeout, || format!("get pods {}/{}", key.0, key.1), cluster.get(ClusterKind::Pod, &key.0, &key.1)).await;
    match read {
        Ok(stored) => match decode_stored(Source::Pods, &stored).0 {
            Ok(Object::Pod(p)) => Ok(Some(*p)),
            _ => {
                tracing::warn!(namespace = %key.0, pod = %key.1, "re-read pod did not decode; leak kept");
                Err(Unread::Undecodable)
            }
        },
        Err(e) if e.is_not_found() => Ok(None),
        Err(e) => {
            tracing::warn!(namespace = %key.0, pod = %key.1, error = %e, "re-validation read failed; leak kept");
            Err(Unread::Failed)
        }
    }
}

/// `Some((node, the Kubernetes Node whose NotFound proved it))` if the node is proven deleted.
async fn prove_node_gone<D: Datastore, C: ClusterReader>(
    ds: &D,
    cluster: &C,
    tally: &Tally,
    timeout: Duration,
    name: &str,
) -> Result<Option<(String, String)>, Unread> {
    // In etcd the allocations name Calico Nodes: the Kubernetes Node that proves one gone is
    // the one its orchRef names (SPEC §9.3); in KDD they are one and the same.
    let view = tally.timed(timeout, || format!("get calico node {name}"), ds.calico_node(name)).await;
    let k8s_name = match view.map(|v| v.proof(name)) {
        Ok(GoneProof::KubernetesNode(k)) => k,
        Ok(GoneProof::CalicoNodeMissing) => {
            tracing::info!(node = %name, "no Calico Node of that name: the node is gone");
            // No Kubernetes Node proved it: a same-named one changes nothing (SPEC §9.3).
            return Ok(Some((name.to_string(), String::new())));
        }
        Ok(GoneProof::Never) => {
            tracing::debug!(node = %name, "Calico Node without a Kubernetes orchestrator reference; never taken as deleted");
            return Ok(None);
        }
        Err(e) => {
            tracing::warn!(node = %name, error = %e, "Calico Node read failed; the node is not proven deleted");
            return Err(Unread::Failed);
        }
    };
    match tally.timed(timeout, || format!("get nodes {k8s_name}"), cluster.get(ClusterKind::Node, "", &k8s_name)).await {
        Err(e) if e.is_not_found() => Ok(Some((name.to_string(), k8s_name))),
        Ok(_) => {
            tracing::info!(node = %name, kubernetes_node = %k8s_name, "node missing from the Node cache exists; its addresses are kept");
            Ok(None)
        }
        Err(e) => {
            tracing::warn!(node = %name, error = %e, "node read failed; the node is not proven deleted");
            Err(Unread::Failed)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::datastore::{ErrorKind, MemoryCluster, MemoryDatastore};

    fn job(pods: usize, nodes: usize) -> Job {
        Job {
            plan: Plan::default(),
            now: 0,
            cooldown_secs: 0,
            revalidate: (0..pods).map(|i| ("ns".to_string(), format!("p{i}"))).collect(),
            prove_gone: (0..nodes).map(|i| format!("n{i}")).collect(),
        }
    }

    async fn run(cluster: &Arc<MemoryCluster>, job: Job) -> JobResult {
        let mut exec = Executor::spawn(Arc::new(MemoryDatastore::new()), cluster.clone(), ExecutorOptions::default());
        exec.send(job).unwrap();
        exec.results.recv().await.unwrap()
    }

    #[tokio::test]
    async fn after_one_failed_read_the_rest_of_the_jobs_reads_wait_for_a_later_round() {
        let cluster = Arc::new(MemoryCluster::new());
        // The apiserver answers: every pod and node is read (all NotFound here).
        let r = run(&cluster, job(20, 3)).await;
        assert_eq!((cluster.get_count(ClusterKind::Pod), cluster.get_count(ClusterKind::Node)), (20, 3));
        assert_eq!((r.fresh.len(), r.nodes_gone.len()), (20, 3));

        // It fails: one read is tried, not twenty-three timeouts in a row; nothing is confirmed.
        let cluster = Arc::new(MemoryCluster::new());
        cluster.inject_get(ClusterKind::Pod, ErrorKind::Transient, 100);
        let r = run(&cluster, job(20, 3)).await;
        assert_eq!((cluster.get_count(ClusterKind::Pod), cluster.get_count(ClusterKind::Node)), (1, 0));
        assert!(r.fresh.is_empty() && r.nodes_gone.is_empty(), "an unread pod or node is never taken as gone");

        // A failed node read stops the node reads after it.
        let cluster = Arc::new(MemoryCluster::new());
        cluster.inject_get(ClusterKind::Node, ErrorKind::Transient, 100);
        let r = run(&cluster, job(2, 3)).await;
        assert_eq!((cluster.get_count(ClusterKind::Pod), cluster.get_count(ClusterKind::Node)), (2, 1));
        assert!(r.nodes_gone.is_empty());
    }

    /// A cluster whose reads take a while, counting how many are in flight at once.
    struct Slow {
        inner: MemoryCluster,
        in_flight: AtomicU64,
        most: AtomicU64,
    }

    impl ClusterReader for Slow {
        fn watch(&self, kind: ClusterKind) -> WatchStream {
            self.inner.watch(kind)
        }
        async fn get(&self, kind: ClusterKind, namespace: &str, name: &str) -> DsResult<Stored> {
            let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
            self.most.fetch_max(now, Ordering::SeqCst);
            tokio::time::sleep(Duration::from_millis(5)).await;
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            self.inner.get(kind, namespace, name).await
        }
        async fn list_each(&self, kind: ClusterKind, sink: &mut (dyn FnMut(Stored) + Send)) -> DsResult<u64> {
            self.inner.list_each(kind, sink).await
        }
        async fn serves(&self, kind: ClusterKind) -> DsResult<bool> {
            self.inner.serves(kind).await
        }
        async fn healthz(&self) -> Result<(), String> {
            self.inner.healthz().await
        }
    }

    #[tokio::test]
    async fn once_the_first_read_answers_the_rest_go_several_at_a_time() {
        let cluster = Arc::new(Slow { inner: MemoryCluster::new(), in_flight: AtomicU64::new(0), most: AtomicU64::new(0) });
        let mut exec = Executor::spawn(Arc::new(MemoryDatastore::new()), cluster.clone(), ExecutorOptions::default());
        exec.send(job(30, 20)).unwrap();
        let r = exec.results.recv().await.unwrap();
        assert_eq!((r.fresh.len(), r.nodes_gone.len()), (30, 20), "every pod and node read");
        assert_eq!(cluster.most.load(Ordering::SeqCst), READ_BATCH as u64, "reads batched, and never more than a batch at once");
        assert_eq!(cluster.inner.get_count(ClusterKind::Pod), 30);
    }
}
