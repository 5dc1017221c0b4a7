//! The few Pod fields the GC needs, and how Calico derives a pod's IPs from them (SPEC §4.7).
//!
//! A whole Pod is never kept: [`PodLite`] deserializes only these fields (serde skips the rest
//! without allocating for them) and [`PodFacts`] is what survives.

use std::collections::BTreeMap;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use super::InvalidObject;

pub const ANNOTATION_POD_IP: &str = "cni.projectcalico.org/podIP";
pub const ANNOTATION_POD_IPS: &str = "cni.projectcalico.org/podIPs";
pub const ANNOTATION_AWS_POD_IPS: &str = "vpc.amazonaws.com/pod-ips";

#[derive(Debug, Clone, Default, Deserialize)]
pub struct PodLite {
    #[serde(default)]
    pub metadata: PodMeta,
    #[serde(default)]
    pub spec: PodSpecLite,
    #[serde(default)]
    pub status: PodStatusLite,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodMeta {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub namespace: String,
    #[serde(default)]
    pub uid: String,
    #[serde(default)]
    pub deletion_timestamp: Option<String>,
    #[serde(default, deserialize_with = "calico_annotations")]
    pub annotations: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpecLite {
    #[serde(default)]
    pub node_name: String,
    #[serde(default)]
    pub host_network: bool,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatusLite {
    #[serde(default)]
    pub phase: String,
    #[serde(default)]
    pub reason: String,
    #[serde(default, rename = "podIP")]
    pub pod_ip: String,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
pub struct PodIp {
    #[serde(default)]
    pub ip: String,
}

/// Keeps only the three annotations the GC reads; the rest (often large) are dropped while parsing.
pub(crate) fn calico_annotations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<BTreeMap<String, String>, D::Error> {
    struct Keep;
    impl<'de> serde::de::Visitor<'de> for Keep {
        type Value = BTreeMap<String, String>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a map of annotations")
        }
        fn visit_unit<E>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_none<E>(self) -> Result<Self::Value, E> {
            Ok(BTreeMap::new())
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut kept = BTreeMap::new();
            while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
                if matches!(key.as_ref(), ANNOTATION_POD_IP | ANNOTATION_POD_IPS | ANNOTATION_AWS_POD_IPS) {
                    let value: Option<String> = map.next_value()?;
                    kept.insert(key.into_owned(), value.unwrap_or_default());
                } else {
                    map.next_value::<serde::de::IgnoredAny>()?;
                }
            }
            Ok(kept)
        }
    }
    d.deserialize_any(Keep)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PodPhase {
    #[default]
    Pending,
    Running,
    Succeeded,
    Failed,
    Unknown,
    /// Not a Kubernetes phase, but Calico's converter treats it as finished.
    Completed,
}

impl PodPhase {
    pub fn parse(s: &str) -> PodPhase {
        match s {
            "Running" => PodPhase::Running,
            "Succeeded" => PodPhase::Succeeded,
            "Failed" => PodPhase::Failed,
            "Completed" => PodPhase::Completed,
            "Unknown" => PodPhase::Unknown,
            _ => PodPhase::Pending,
        }
    }

    /// Calico's converter considers a pod in this phase done with its network.
    pub fn finished(self) -> bool {
        matches!(self, PodPhase::Failed | PodPhase::Succeeded | PodPhase::Completed)
    }
}

/// A pod's state apart from its names and addresses: what its phase, status and deletion say.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PodState {
    pub phase: PodPhase,
    pub evicted: bool,
    pub deleting: bool,
    pub host_network: bool,
    pub status_reports_ip: bool,
    pub unparsable_ips: bool,
}

impl PodState {
    /// Calico's converter considers the pod done with its network.
    pub fn finished(&self) -> bool {
        self.phase.finished()
    }
}

/// What the index reads of a pod, borrowed from whatever holds it: [`PodFacts`], or a
/// simulator's compact form. Every fact but the uid, which the index does not keep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PodView<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub node: &'a str,
    pub ips: &'a [IpAddr],
    pub state: PodState,
}

/// A pod as the index reads it ([`PodView`]).
pub trait PodObject {
    fn view(&self) -> PodView<'_>;
}

impl PodObject for PodFacts {
    fn view(&self) -> PodView<'_> {
        PodView { namespace: &self.namespace, name: &self.name, node: &self.node, ips: &self.ips, state: self.state() }
    }
}

/// What the GC knows about one live pod.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PodFacts {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub node: String,
    pub phase: PodPhase,
    /// `status.reason == "Evicted"`.
    pub evicted: bool,
    pub deleting: bool,
    pub host_network: bool,
    /// The pod's status reports at least one IP (`podIP` and `podIPs` both set). Until then every
    /// allocation naming the pod is valid: the CNI allocates before the kubelet reports.
    pub status_reports_ip: bool,
    /// The IPs Calico attributes to the pod, in the converter's order; empty for a finished pod.
    pub ips: Vec<IpAddr>,
    /// Some source of IPs could not be parsed: the GC then treats the pod's allocations as valid.
    pub unparsable_ips: bool,
}

impl PodFacts {
    /// The facts' [`PodState`].
    pub fn state(&self) -> PodState {
        PodState {
            phase: self.phase,
            evicted: self.evicted,
            deleting: self.deleting,
            host_network: self.host_network,
            status_reports_ip: self.status_reports_ip,
            unparsable_ips: self.unparsable_ips,
        }
    }

    /// Calico's converter considers the pod done with its network.
    pub fn finished(&self) -> bool {
        self.state().finished()
    }

    /// Trims a pod to its facts. An unparsable IP is reported (second value) without losing the
    /// pod: its allocations then stay valid, as upstream treats IP parse errors.
    pub fn from_lite(pod: &PodLite) -> (PodFacts, Option<InvalidObject>) {
        let ann = &pod.metadata.annotations;
        let deleting = pod.metadata.deletion_timestamp.is_some();
        let phase = PodPhase::parse(&pod.status.phase);
        let status_ips: Vec<&str> = pod.status.pod_ips.iter().map(|p| p.ip.as_str()).filter(|s| !s.is_empty()).collect();
        let torn_down = deleting
            && (ann.get(ANNOTATION_POD_IP).is_some_and(|v| v.is_empty())
                || ann.get(ANNOTATION_AWS_POD_IPS).is_some_and(|v| v.is_empty()));
        let mut facts = PodFacts {
            namespace: pod.metadata.namespace.clone(),
            name: pod.metadata.name.clone(),
            uid: pod.metadata.uid.clone(),
            node: pod.spec.node_name.clone(),
            phase,
            evicted: pod.status.reason == "Evicted",
            deleting,
            host_network: pod.spec.host_network,
            status_reports_ip: !pod.status.pod_ip.is_empty() && !status_ips.is_empty(),
            ips: Vec::new(),
            unparsable_ips: false,
        };
        if facts.finished() || torn_down {
            return (facts, None);
        }
        // The first non-empty source wins, in the converter's order.
        let split = |s: &str| s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(String::from).collect::<Vec<_>>();
        let sources: [Vec<String>; 5] = [
            status_ips.iter().map(|s| s.to_string()).collect(),
            split(&pod.status.pod_ip),
            ann.get(ANNOTATION_POD_IPS).map(|s| split(s)).unwrap_or_default(),
            ann.get(ANNOTATION_POD_IP).map(|s| split(s)).unwrap_or_default(),
            ann.get(ANNOTATION_AWS_POD_IPS).map(|s| split(s)).unwrap_or_default(),
        ];
        let chosen = sources.into_iter().find(|s| !s.is_empty()).unwrap_or_default();
        let mut bad = Vec::new();
        for text in chosen {
            // Annotations carry CIDRs (`10.0.0.5/32`); status carries bare addresses.
            let addr = text.split('/').next().unwrap_or("");
            match addr.parse::<IpAddr>() {
                Ok(ip) if !facts.ips.contains(&ip) => facts.ips.push(ip),
                Ok(_) => {}
                Err(_) => bad.push(text),
            }
        }
        let invalid = (!bad.is_empty()).then(|| {
            facts.unparsable_ips = true;
            InvalidObject::new(
                "Pod",
                &format!("{}/{}", facts.namespace, facts.name),
                format!("unparsable pod IP(s) {bad:?}; its allocations are kept"),
            )
        });
        (facts, invalid)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn facts(v: serde_json::Value) -> (PodFacts, Option<InvalidObject>) {
        PodFacts::from_lite(&serde_json::from_value(v).unwrap())
    }

    #[test]
    fn status_ips_win_over_annotations() {
        let (f, bad) = facts(json!({
            "metadata": {"name": "p", "namespace": "ns", "uid": "u", "annotations": {
                "cni.projectcalico.org/podIPs": "10.0.0.9/32", "unrelated": "x"}},
            "spec": {"nodeName": "n1"},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}, {"ip": "fd00::5"}]}
        }));
        assert!(bad.is_none());
        assert_eq!(f.ips, vec!["10.0.0.5".parse::<IpAddr>().unwrap(), "fd00::5".parse().unwrap()]);
        assert!(f.status_reports_ip);
    }

    #[test]
    fn annotations_are_used_when_status_is_empty_and_only_calico_ones_are_kept() {
        let pod: PodLite = serde_json::from_value(json!({
            "metadata": {"name": "p", "namespace": "ns", "annotations": {
                "cni.projectcalico.org/podIPs": "10.0.0.9/32,fd00::9/128", "big": "x".repeat(1000)}},
            "status": {"phase": "Pending"}
        })).unwrap();
        assert_eq!(pod.metadata.annotations.len(), 1);
        let (f, _) = PodFacts::from_lite(&pod);
        assert_eq!(f.ips.len(), 2);
        assert!(!f.status_reports_ip);
    }

    #[test]
    fn finished_and_torn_down_pods_have_no_ips() {
        let (f, _) = facts(json!({"metadata": {"name": "p", "namespace": "ns"},
            "status": {"phase": "Succeeded", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]}}));
        assert!(f.ips.is_empty() && f.finished());
        let (f, _) = facts(json!({"metadata": {"name": "p", "namespace": "ns", "deletionTimestamp": "2026-01-01T00:00:00Z",
            "annotations": {"cni.projectcalico.org/podIP": ""}},
            "status": {"phase": "Running", "podIP": "10.0.0.5", "podIPs": [{"ip": "10.0.0.5"}]}}));
        assert!(f.ips.is_empty() && f.deleting);
    }

    #[test]
    fn unparsable_ips_are_reported_and_flagged_not_dropped() {
        let (f, bad) = facts(json!({"metadata": {"name": "p", "namespace": "ns"},
            "status": {"phase": "Running", "podIP": "10.0.0.999", "podIPs": [{"ip": "10.0.0.999"}]}}));
        assert!(f.unparsable_ips);
        let bad = bad.unwrap();
        assert_eq!(bad.name, "ns/p");
        assert!(bad.problem.contains("10.0.0.999"));
    }
}
