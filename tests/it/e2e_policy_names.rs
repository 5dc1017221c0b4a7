//! End-to-end pieces of the policy-name migrator (SPEC §6.8) on the real test cluster, run from
//! `e2e_controller.rs` on its private cluster (the migrator is cluster-wide; sharing that
//! cluster costs no extra start): default-tier policies planted under pre-3.32 `default.` names
//! beside a new-named one and one of another tier; while there is no `calico-node` DaemonSet the
//! migrator waits and says so (the GC works meanwhile); once a rolled-out DaemonSet exists, the
//! old ones are re-keyed, the others untouched, and a restarted controller changes nothing more.

use std::collections::BTreeMap;
use std::path::Path;

use k8s_openapi::api::apps::v1::DaemonSet;
use kube::api::{Api, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use serde_json::{Value, json};

use crate::support::cluster::TestCluster;
use crate::support::controller::{calico, wait_for};

/// The readiness key of the migrator.
pub const STATUS_KEY: &str = "Controller:policy-name-migrator";

/// What was planted, and where the migrator is told to look for `calico-node`.
pub struct Planted {
    /// The test's namespace: the namespaced policies and the DaemonSet live here.
    pub namespace: String,
    suffix: String,
    client: kube::Client,
    /// (plural, datastore name) -> the object as planted.
    planted: BTreeMap<(&'static str, String), Value>,
}

/// `(kind, plural, namespaced)` of the kinds planted.
const KINDS: [(&str, &str, bool); 3] =
    [("NetworkPolicy", "networkpolicies", true), ("GlobalNetworkPolicy", "globalnetworkpolicies", false), ("StagedNetworkPolicy", "stagednetworkpolicies", true)];

fn api(client: &kube::Client, kind: &str, plural: &str, namespace: Option<&str>) -> Api<DynamicObject> {
    let resource = calico(kind, plural);
    match namespace {
        Some(ns) => Api::namespaced_with(client.clone(), ns, &resource),
        None => Api::all_with(client.clone(), &resource),
    }
}

/// Every policy of the planted kinds in the cluster: (plural, `<ns>/<name>` or name) -> (uid,
/// resourceVersion, spec, labels).
async fn snapshot(client: &kube::Client) -> BTreeMap<(&'static str, String), (String, String, Value, Value)> {
    let mut out = BTreeMap::new();
    for (kind, plural, _) in KINDS {
        for o in api(client, kind, plural, None).list(&ListParams::default()).await.expect("listing policies") {
            let name = match &o.metadata.namespace {
                Some(ns) => format!("{ns}/{}", o.metadata.name.clone().unwrap_or_default()),
                None => o.metadata.name.clone().unwrap_or_default(),
            };
            let labels = serde_json::to_value(&o.metadata.labels).unwrap_or(Value::Null);
            out.insert((plural, name), (o.metadata.uid.clone().unwrap_or_default(), o.metadata.resource_version.clone().unwrap_or_default(), o.data["spec"].clone(), labels));
        }
    }
    out
}

impl Planted {
    /// The environment that points the controller's migrator at this test's `calico-node` and
    /// makes it look again every second.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![("CKC_CALICO_NODE_NAMESPACE", self.namespace.clone()), ("CKC_POLICY_MIGRATOR_INTERVAL", "1s".to_string())]
    }

    /// Plants, in a fresh namespace: `default.allow` (NetworkPolicy), `default.deny-<suffix>`
    /// (GlobalNetworkPolicy), `default.try` (StagedNetworkPolicy), `default.old` annotated with
    /// the v3 name `annotated` (NetworkPolicy): all to be re-keyed; `current` (NetworkPolicy,
    /// already new-named) and `kube-admin.keep-<suffix>` (GlobalNetworkPolicy of another tier):
    /// never touched.
    pub async fn plant(cluster: &TestCluster) -> Planted {
        let client = cluster.client();
        let namespace = cluster.namespace_with_default_service_account(&client, "e2e-pnm").await;
        let suffix = namespace.trim_start_matches("e2e-pnm-").to_string();
        let mut p = Planted { namespace, suffix, client, planted: BTreeMap::new() };
        let spec = |order: i64| json!({"selector": "all()", "order": order, "types": ["Ingress"]});
        p.create(0, "default.allow", spec(10), None).await;
        p.create(1, &format!("default.deny-{}", p.suffix), spec(20), None).await;
        p.create(2, "default.try", spec(30), None).await;
        p.create(0, "default.old", spec(40), Some("annotated")).await;
        p.create(0, "current", spec(50), None).await;
        let mut other_tier = spec(60);
        other_tier["tier"] = json!("kube-admin");
        p.create(1, &format!("kube-admin.keep-{}", p.suffix), other_tier, None).await;
        p
    }

    async fn create(&mut self, kind: usize, name: &str, spec: Value, v3_name: Option<&str>) {
        let (kind, plural, namespaced) = KINDS[kind];
        let ns = namespaced.then_some(self.namespace.as_str());
        let mut meta = json!({"name": name, "labels": {"app": "web", "planted-by": "e2e-policy-names"}});
        if let Some(v3) = v3_name {
            meta["annotations"] = json!({"projectcalico.org/metadata": json!({"name": v3}).to_string()});
        }
        let object: DynamicObject = serde_json::from_value(json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": kind, "metadata": meta, "spec": spec,
        }))
        .unwrap();
        let created = api(&self.client, kind, plural, ns).create(&PostParams::default(), &object).await.unwrap_or_else(|e| panic!("creating {plural} {name}: {e}"));
        let key = match ns {
            Some(ns) => format!("{ns}/{name}"),
            None => name.to_string(),
        };
        self.planted.insert((plural, key), serde_json::to_value(&created).unwrap());
    }

    /// (plural, old name, new name) of the policies that must be re-keyed.
    fn renames(&self) -> Vec<(&'static str, String, String)> {
        let ns = &self.namespace;
        vec![
            ("networkpolicies", format!("{ns}/default.allow"), format!("{ns}/allow")),
            ("globalnetworkpolicies", format!("default.deny-{}", self.suffix), format!("deny-{}", self.suffix)),
            ("stagednetworkpolicies", format!("{ns}/default.try"), format!("{ns}/try")),
            ("networkpolicies", format!("{ns}/default.old"), format!("{ns}/annotated")),
        ]
    }

    /// The policies that must stay exactly as planted.
    fn untouched(&self) -> Vec<(&'static str, String)> {
        vec![("networkpolicies", format!("{}/current", self.namespace)), ("globalnetworkpolicies", format!("kube-admin.keep-{}", self.suffix))]
    }

    /// Waits until the status file's migrator key is ready and says it waits for this test's
    /// `calico-node`, which does not exist; returns the reason.
    pub async fn wait_for_the_migrator_waiting(&self, status_file: &Path) -> String {
        let want = format!("waiting for DaemonSet {}/calico-node", self.namespace);
        let reason = wait_for("the migrator's readiness key saying what it waits for", || async {
            let file: Value = serde_json::from_slice(&std::fs::read(status_file).ok()?).ok()?;
            let key = &file["Readiness"][STATUS_KEY];
            let reason = key["Reason"].as_str()?.to_string();
            (key["Ready"] == true && reason.contains(&want)).then_some(reason)
        })
        .await;
        assert!(reason.contains("it does not exist") && reason.contains("re-keying 4 policies"), "{reason}");
        // Nothing was written meanwhile.
        let now = snapshot(&self.client).await;
        for (key, planted) in &self.planted {
            let (_, rv, _, _) = now.get(key).unwrap_or_else(|| panic!("{key:?} gone while the migrator waits"));
            assert_eq!(Some(rv.as_str()), planted["metadata"]["resourceVersion"].as_str(), "{key:?} written while the migrator waits");
        }
        reason
    }

    /// Creates `calico-node` in the test's namespace, rolled out.
    pub async fn roll_out_calico_node(&self) {
        roll_out_calico_node(&self.client, &self.namespace).await;
    }

    /// Waits until every old-named policy is re-keyed, then checks the copies (spec and labels
    /// as planted, new uids), that the others are untouched, and returns the cluster's policies.
    pub async fn wait_re_keyed(&self) -> BTreeMap<(&'static str, String), (String, String, Value, Value)> {
        let renames = self.renames();
        let now = wait_for("the old-named policies re-keyed", || async {
            let now = snapshot(&self.client).await;
            renames.iter().all(|(plural, old, new)| !now.contains_key(&(*plural, old.clone())) && now.contains_key(&(*plural, new.clone()))).then_some(now)
        })
        .await;
        for (plural, old, new) in &renames {
            let planted = &self.planted[&(*plural, old.clone())];
            let (uid, _, spec, labels) = &now[&(*plural, new.clone())];
            assert_eq!(spec, &planted["spec"], "{plural} {new}: the spec as planted");
            assert_eq!(labels, &planted["metadata"]["labels"], "{plural} {new}: the labels as planted");
            assert_ne!(Some(uid.as_str()), planted["metadata"]["uid"].as_str(), "{plural} {new} is a new object");
        }
        for key in self.untouched() {
            let (_, rv, _, _) = &now[&key];
            assert_eq!(Some(rv.as_str()), self.planted[&key]["metadata"]["resourceVersion"].as_str(), "{key:?} untouched");
        }
        now
    }

    /// With the policies as `after` holds them, waits until the (restarted) controller's
    /// migrator reports a finished round and checks that nothing changed.
    pub async fn assert_nothing_more(&self, status_file: &Path, after: &BTreeMap<(&'static str, String), (String, String, Value, Value)>) {
        wait_for("the restarted migrator's round", || async {
            let file: Value = serde_json::from_slice(&std::fs::read(status_file).ok()?).ok()?;
            (file["Readiness"][STATUS_KEY]["Reason"] == "policy-name-migrator: nothing to re-key").then_some(())
        })
        .await;
        let now = snapshot(&self.client).await;
        assert_eq!(&now, after, "a restarted controller re-keys nothing more");
    }
}

/// Creates `calico-node` in `namespace` and writes its status, through the status subresource
/// (no controller-manager runs here), as a finished rollout of one pod.
pub async fn roll_out_calico_node(client: &kube::Client, namespace: &str) {
    let daemonsets: Api<DaemonSet> = Api::namespaced(client.clone(), namespace);
    let labels = json!({"k8s-app": "calico-node"});
    let ds: DaemonSet = serde_json::from_value(json!({
        "metadata": {"name": "calico-node"},
        "spec": {"selector": {"matchLabels": labels}, "template": {"metadata": {"labels": labels}, "spec": {"containers": [{"name": "calico-node", "image": "registry.invalid/calico-node:1"}]}}},
    }))
    .unwrap();
    let created = daemonsets.create(&PostParams::default(), &ds).await.expect("creating the calico-node DaemonSet");
    let generation = created.metadata.generation.unwrap_or(1);
    let status = json!({"status": {
        "observedGeneration": generation, "desiredNumberScheduled": 1, "currentNumberScheduled": 1, "updatedNumberScheduled": 1,
        "numberReady": 1, "numberAvailable": 1, "numberUnavailable": 0, "numberMisscheduled": 0,
    }});
    daemonsets.patch_status("calico-node", &PatchParams::default(), &Patch::Merge(&status)).await.expect("writing the DaemonSet's status");
}
