//! End-to-end leader election: replicas of the built binary on one private cluster (the GC is
//! cluster-wide), told apart by POD_NAME and so by User-Agent in the API server's audit log.
//! Exactly one leads and only it writes IPAM objects; a killed leader is replaced within 15 s
//! and the new leader frees a leak made after the kill; a SIGTERM'd leader gives the Lease up so
//! the standby leads within seconds; a dry-run replica never touches the Lease.

use std::process::Command;
use std::time::{Duration, Instant};

use calico_kube_controllers::model::names::handle_object_name;

use crate::support::cluster::private_cluster;
use crate::support::controller::{ChildGuard, DEADLINE, free_port, http_get, setup};
use crate::support::audit::{self, now_ms};
use crate::support::ha::{LEASE_NAMESPACE, add_gone_allocation, lease, lease_holder, leader_gauge, replica, sole_leader, start_replica};

/// The longest a standby may take to lead after its leader died: lease 10 s, plus the 2 s retry
/// period in which the last renewal is first seen, plus one retry period to notice, plus slack
/// for a scrape.
const KILL_TAKEOVER: Duration = Duration::from_secs(15);
/// After a clean shutdown the Lease is free at once; the standby's next look (every 2 s) takes it.
const TERM_TAKEOVER: Duration = Duration::from_secs(5);

async fn wait_freed(s: &crate::support::controller::Setup, ordinal: usize, handle: &str, what: &str) -> Duration {
    let started = Instant::now();
    loop {
        let block = s.blocks.get(&s.block_name).await.expect("reading the block");
        let h = s.handles.get_opt(&handle_object_name(handle)).await.expect("reading the handle");
        if block.data["spec"]["allocations"][ordinal].is_null() && h.is_none() {
            assert!(!block.data["spec"]["allocations"][1].is_null(), "the live pod's IP stays allocated");
            return started.elapsed();
        }
        assert!(started.elapsed() < DEADLINE, "{what} not freed in {DEADLINE:?}: {}", block.data["spec"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn signal(guard: &ChildGuard, sig: &str) {
    let pid = guard.child.id().to_string();
    assert!(Command::new("kill").args([sig, &pid]).status().expect("kill").success(), "kill {sig} {pid}");
}

#[tokio::test]
async fn one_of_two_replicas_leads_and_alone_writes_and_a_killed_leader_is_replaced() {
    let cluster = private_cluster();
    let s = setup(&cluster).await;
    let a = replica(&cluster, "ha-a", &[]);
    let b = replica(&cluster, "ha-b", &[]);

    let started = Instant::now();
    let first = sole_leader(&cluster, &[&a, &b], DEADLINE).await;
    let (leader, follower) = if first == 0 { (a, b) } else { (b, a) };
    eprintln!("{} leads, {} follows ({:.1} s after start)", leader.name, follower.name, started.elapsed().as_secs_f64());
    let freed = wait_freed(&s, 2, &s.gone_handle, "the gone pod's IP").await;
    eprintln!("gone pod's IP {} freed {:.1} s after the election", s.gone_ip, freed.as_secs_f64());

    // The follower computes passes too (its report shows the cluster) but writes nothing.
    assert_eq!(http_get(follower.port, "/readiness").await.map(|r| r.0), Some(200), "a follower is ready");
    assert_eq!(http_get(follower.port, "/leak-report").await.map(|r| r.0), Some(200), "a follower serves the report");
    let events = audit::read(cluster.dir.as_ref().unwrap());
    let writes: Vec<_> = events.iter().filter(|e| e.is_ipam_write() && e.user_agent.starts_with("calico-kube-controllers/")).collect();
    assert!(writes.iter().any(|e| e.sent_by(leader.name)), "the leader's writes are in the audit log: {events:#?}");
    let strays: Vec<_> = writes.iter().filter(|e| !e.sent_by(leader.name)).collect();
    assert!(strays.is_empty(), "IPAM writes from a replica that does not lead: {strays:#?}");
    assert!(
        !events.iter().any(|e| e.resource == "leases" && e.verb == "update" && e.sent_by(follower.name)),
        "the follower never wrote the Lease"
    );
    // Executing a plan starts with reading the object to change; a follower never gets that far
    // (its view comes from watches alone), even when the leader got to every write first.
    let follower_reads: Vec<_> = events.iter().filter(|e| e.verb == "get" && e.is_ipam() && e.sent_by(follower.name)).collect();
    assert!(follower_reads.is_empty(), "the follower started executing plans: {follower_reads:#?}");

    // SIGKILL: no release, the Lease must run out.
    let mut leader = leader;
    let killed_at = now_ms();
    let killed = Instant::now();
    leader.guard.child.kill().expect("SIGKILL");
    let _ = leader.guard.child.wait();
    let (handle, ip) = add_gone_allocation(&s, 3, "gone-after-kill").await;
    let survivor = [&follower];
    sole_leader(&cluster, &survivor, Duration::from_secs(30)).await;
    let takeover = killed.elapsed();
    eprintln!("SIGKILL takeover: {} leads {:.1} s after {} was killed", follower.name, takeover.as_secs_f64(), leader.name);
    assert!(takeover <= KILL_TAKEOVER, "takeover took {takeover:?}, more than {KILL_TAKEOVER:?}");
    wait_freed(&s, 3, &handle, "the leak made after the kill").await;
    eprintln!("new leak {ip} freed {:.1} s after the kill", killed.elapsed().as_secs_f64());

    // The standby saw the new leak confirmed for about 8 s before the dead leader's Lease ran
    // out: had it executed plans while following, its reads and writes of IPAM objects would
    // show up before its takeover (the acquireTime it wrote; one clock, one machine).
    let spec = lease(&cluster).await.and_then(|l| l.spec).expect("the Lease");
    let acquired_ms = spec.acquire_time.as_ref().map(|t| t.0.as_millisecond()).expect("acquireTime");
    assert!(spec.lease_transitions.unwrap_or(0) >= 1, "a takeover counts a transition: {spec:?}");
    let events = audit::read(cluster.dir.as_ref().unwrap());
    let ipam = |name: &str| events.iter().filter(|e| e.is_ipam() && e.verb != "list" && e.verb != "watch" && e.sent_by(name)).collect::<Vec<_>>();
    let standby = ipam(follower.name);
    assert!(standby.iter().any(|e| e.is_ipam_write()), "the new leader freed the new leak");
    let early: Vec<_> = standby.iter().filter(|e| e.received_ms < acquired_ms).collect();
    assert!(early.is_empty(), "the standby touched IPAM objects before it took over at {acquired_ms}: {early:#?}");
    assert!(ipam(leader.name).iter().all(|e| e.received_ms <= killed_at), "the killed leader wrote after its death?");
}

#[tokio::test]
async fn a_sigtermed_leader_gives_the_lease_up_and_the_standby_leads_within_seconds() {
    let cluster = private_cluster();
    let a = replica(&cluster, "term-a", &[]);
    let b = replica(&cluster, "term-b", &[]);
    let first = sole_leader(&cluster, &[&a, &b], DEADLINE).await;
    let (mut leader, standby) = if first == 0 { (a, b) } else { (b, a) };
    // Let the leader renew a few times, so that only a release (not expiry) can explain a quick
    // takeover: the Lease would otherwise stay valid about 10 s after the signal.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let termed_at = now_ms();
    let termed = Instant::now();
    signal(&leader.guard, "-TERM");
    let mut saw_free = false;
    let mut exited = None;
    loop {
        if exited.is_none()
            && let Some(status) = leader.guard.child.try_wait().expect("waiting for the leader")
        {
            assert!(status.success(), "exit status after SIGTERM: {status}");
            exited = Some(termed.elapsed());
        }
        let l = lease(&cluster).await.expect("the Lease");
        match lease_holder(&l) {
            None => saw_free = true,
            Some(h) if h == standby.name && leader_gauge(standby.port).await == Some(1.0) => break,
            _ => {}
        }
        assert!(termed.elapsed() < TERM_TAKEOVER, "standby not leading {TERM_TAKEOVER:?} after SIGTERM (Lease free seen: {saw_free})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let takeover = termed.elapsed();
    eprintln!(
        "SIGTERM handover: {} leads {:.2} s after {} got SIGTERM (leader exited after {:?}, Lease seen free: {saw_free})",
        standby.name,
        takeover.as_secs_f64(),
        leader.name,
        exited.map(|d| d.as_secs_f64())
    );
    // The release is the old leader's last Lease update, sent after the signal.
    let events = audit::read(cluster.dir.as_ref().unwrap());
    assert!(
        events.iter().any(|e| e.resource == "leases" && e.namespace == LEASE_NAMESPACE && e.verb == "update" && e.sent_by(leader.name) && e.received_ms >= termed_at),
        "no Lease update (the release) from {} after SIGTERM",
        leader.name
    );
}

#[tokio::test]
async fn a_dry_run_replica_never_creates_the_lease() {
    let cluster = private_cluster();
    let port = free_port();
    let _dry = start_replica(&cluster, "dry-a", port, &["--dry-run"]);
    let started = Instant::now();
    while http_get(port, "/readiness").await.map(|r| r.0) != Some(200) {
        assert!(started.elapsed() < DEADLINE, "dry-run replica not ready in {DEADLINE:?}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Several election periods (2 s) after sync.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(leader_gauge(port).await, Some(0.0), "a dry-run replica never leads");
    assert!(lease(&cluster).await.is_none(), "a dry-run replica created the Lease");
    let touched: Vec<_> = audit::read(cluster.dir.as_ref().unwrap()).into_iter().filter(|e| e.resource == "leases" && e.sent_by("dry-a")).collect();
    assert!(touched.is_empty(), "a dry-run replica touched the Lease: {touched:#?}");
}
