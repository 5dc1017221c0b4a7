//! Calico's etcd v3 key layout and value shapes (SPEC §4), pure: which key holds an object of a
//! [`Kind`] and name, which keys a kind's list or watch covers, and the conversion between the
//! value libcalico stores under a key and the KDD-shaped body everything above the seam sees.
//!
//! Owns: the key prefixes, the name <-> key mapping (KDD names: `10-0-0-0-26` for blocks,
//! `<node>-<cidrname>` for affinities, the handle ID for handles, `default` for the IPAM
//! config), the v1 IPAM model JSON (`affinity_claim_time`, affinity `deleted` as a bool, no
//! `handleID` or `node`/`cidr` in the value: the key carries them) and the v3 resource JSON
//! (`projectcalico.org/v3`, no `resourceVersion`), and the uid of objects whose value has none.
//! Must not: talk to etcd (the backend in `etcd.rs` does), read the clock, or drop a field it
//! does not know: unknown fields pass through both ways.
//!
//! What has no place in the v1 IPAM model values is not kept: `metadata` labels and annotations
//! of blocks, affinities, handles and the IPAM config (libcalico has none there either).

use std::net::{Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;
use serde_json::{Map, Value, json};

use super::{DatastoreError, DsResult, Kind, Stored};
use crate::model::CALICO_API_VERSION;
use crate::model::names::{cidr_to_etcd_key_part, cidr_to_name, is_affinity_name, plain_affinity_name};

pub const IPAM_ROOT: &str = "/calico/ipam/v2/";
pub const BLOCK_PREFIX: &str = "/calico/ipam/v2/assignment/";
pub const HOST_PREFIX: &str = "/calico/ipam/v2/host/";
/// Affinities of virtual owners (the LoadBalancer controller's `load-balancer`), beside the hosts'.
pub const VIRTUAL_PREFIX: &str = "/calico/ipam/v2/virtual/";
pub const HANDLE_PREFIX: &str = "/calico/ipam/v2/handle/";
pub const IPAM_CONFIG_KEY: &str = "/calico/ipam/v2/config";
pub const RESOURCE_PREFIX: &str = "/calico/resources/v3/projectcalico.org/";
/// The apiVersion libcalico writes into v3 resource values.
pub const V3_API_VERSION: &str = "projectcalico.org/v3";

/// The keys a list or watch of `kind` covers: `[start, end)` in etcd's range terms.
pub fn kind_range(kind: Kind) -> (String, String) {
    match kind {
        Kind::IpamConfig => (IPAM_CONFIG_KEY.to_string(), format!("{IPAM_CONFIG_KEY}\0")),
        // Hosts' and virtual owners' affinities in one range: libcalico keeps nothing between
        // `host/` and `virtual/` (`assignment/`, `config` and `handle/` sort before `host/`), and
        // a stray key there is not an affinity key, so `parse_key` drops it.
        Kind::BlockAffinity => (HOST_PREFIX.to_string(), prefix_end(VIRTUAL_PREFIX)),
        _ => {
            let prefix = kind_prefix(kind);
            let end = prefix_end(&prefix);
            (prefix, end)
        }
    }
}

fn kind_prefix(kind: Kind) -> String {
    match kind {
        Kind::IpamBlock => BLOCK_PREFIX.to_string(),
        Kind::BlockAffinity => HOST_PREFIX.to_string(),
        Kind::IpamHandle => HANDLE_PREFIX.to_string(),
        Kind::IpamConfig => IPAM_CONFIG_KEY.to_string(),
        other => format!("{RESOURCE_PREFIX}{}/", other.plural()),
    }
}

/// The first key after every key starting with `prefix` (etcd's prefix range end).
pub fn prefix_end(prefix: &str) -> String {
    let mut bytes = prefix.as_bytes().to_vec();
    while let Some(last) = bytes.pop() {
        if last < 0xff {
            bytes.push(last + 1);
            return String::from_utf8_lossy(&bytes).into_owned();
        }
    }
    "\0".to_string()
}

fn invalid(kind: Kind, name: &str, why: impl std::fmt::Display) -> DatastoreError {
    DatastoreError::invalid(format!("{} {name:?}: {why}", kind.kind_name()))
}

fn plain_segment(s: &str) -> bool {
    !s.is_empty() && !s.contains('/') && !s.chars().any(char::is_control)
}

/// A plain key segment: not empty, no `/`, no control characters.
fn segment(kind: Kind, name: &str) -> DsResult<()> {
    // A namespaced object's key has two segments, `<namespace>/<name>`.
    if kind.namespaced() {
        return match name.split_once('/') {
            Some((ns, n)) if plain_segment(ns) && plain_segment(n) => Ok(()),
            _ => Err(invalid(kind, name, "is not <namespace>/<name> with two plain key segments")),
        };
    }
    if !plain_segment(name) {
        return Err(invalid(kind, name, "is not usable as an etcd key segment (empty, or holds '/' or control characters)"));
    }
    Ok(())
}

/// The inverse of [`cidr_to_name`] for the CIDRs Calico blocks have: `10-0-0-0-26` ->
/// `10.0.0.0/26`, `fd00-1---122` -> `fd00:1::/122`. `None` if `name` is not such a name.
pub fn cidr_from_name(name: &str) -> Option<IpNet> {
    let (addr, len) = name.rsplit_once('-')?;
    let len: u8 = len.parse().ok()?;
    let dotted = addr.replace('-', ".");
    let cidr = if let Ok(v4) = dotted.parse::<Ipv4Addr>() {
        IpNet::new(v4.into(), len).ok()?
    } else {
        let v6: Ipv6Addr = addr.replace('-', ":").parse().ok()?;
        IpNet::new(v6.into(), len).ok()?
    };
    // Only the canonical spelling names the block (no leading zeros, network address only).
    (cidr.trunc() == cidr && cidr_to_name(&cidr) == name).then_some(cidr)
}

fn family(cidr: &IpNet) -> &'static str {
    match cidr {
        IpNet::V4(_) => "ipv4",
        IpNet::V6(_) => "ipv6",
    }
}

fn block_key(cidr: &IpNet) -> String {
    format!("{BLOCK_PREFIX}{}/block/{}", family(cidr), cidr_to_etcd_key_part(cidr))
}

/// Whose affinity a key holds: a host's (`host/`) or a virtual owner's (`virtual/`, spec.type
/// `virtual`). The KDD name is the same for both (`<node>-<cidrname>`), as in KDD itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum AffinityType {
    Host,
    Virtual,
}

impl AffinityType {
    fn prefix(self) -> &'static str {
        match self {
            AffinityType::Host => HOST_PREFIX,
            AffinityType::Virtual => VIRTUAL_PREFIX,
        }
    }

    /// From an affinity's `spec.type`: libcalico writes none, or `host`, for hosts.
    fn of_body(body: &Value) -> Self {
        match body.get("spec").and_then(|s| s.get("type")).and_then(Value::as_str) {
            Some("virtual") => AffinityType::Virtual,
            _ => AffinityType::Host,
        }
    }
}

fn affinity_key(ty: AffinityType, node: &str, cidr: &IpNet) -> String {
    format!("{}{node}/{}/block/{}", ty.prefix(), family(cidr), cidr_to_etcd_key_part(cidr))
}

fn cidr_from_key_part(part: &str) -> Option<IpNet> {
    let (addr, len) = part.rsplit_once('-')?;
    let cidr: IpNet = format!("{addr}/{len}").parse().ok()?;
    (cidr.trunc() == cidr).then_some(cidr)
}

/// The keys that may hold `kind`/`name`. One key for every kind but the
/// affinity, whose KDD name `<node>-<cidrname>` splits more than one way when the CIDR is IPv6;
/// names longer than Kubernetes allows (hashed) cannot be mapped back and are `Invalid`.
pub fn candidate_keys(kind: Kind, name: &str) -> DsResult<Vec<String>> {
    segment(kind, name)?;
    match kind {
        Kind::IpamBlock => {
            let cidr = cidr_from_name(name).ok_or_else(|| invalid(kind, name, "on etcd a block is named for its CIDR (10-0-0-0-26)"))?;
            Ok(vec![block_key(&cidr)])
        }
        Kind::BlockAffinity => {
            let mut keys = Vec::new();
            for (i, _) in name.match_indices('-') {
                let (node, cidr_name) = (&name[..i], &name[i + 1..]);
                if node.is_empty() {
                    continue;
                }
                if let Some(cidr) = cidr_from_name(cidr_name) {
                    keys.push(affinity_key(AffinityType::Host, node, &cidr));
                    keys.push(affinity_key(AffinityType::Virtual, node, &cidr));
                }
            }
            if keys.is_empty() {
                return Err(invalid(kind, name, "on etcd an affinity is named <node>-<cidrname> (n1-10-0-0-0-26)"));
            }
            // IPv4 names have one reading; IPv6 ones may have several, which the backend tries in
            // turn; each reading is a host's key or a virtual owner's, the host's first.
            Ok(keys)
        }
        Kind::IpamHandle => Ok(vec![format!("{HANDLE_PREFIX}{name}")]),
        Kind::IpamConfig if name == "default" => Ok(vec![IPAM_CONFIG_KEY.to_string()]),
        Kind::IpamConfig => Err(invalid(kind, name, "the IPAM configuration is the singleton \"default\"")),
        other => Ok(vec![format!("{RESOURCE_PREFIX}{}/{name}", other.plural())]),
    }
}

/// The key `body` (a KDD-shaped object named `name`) is written to: derived from the name and
/// checked against the body's own CIDR and node, so a body never lands under another object's key.
pub fn key_for_write(kind: Kind, name: &str, body: &Value) -> DsResult<String> {
    let spec = body.get("spec");
    let field = |f: &str| spec.and_then(|s| s.get(f)).and_then(Value::as_str);
    match kind {
        Kind::IpamBlock => {
            let key = candidate_keys(kind, name)?.remove(0);
            if let Some(c) = field("cidr") {
                let cidr: IpNet = c.parse().map_err(|_| invalid(kind, name, format!("spec.cidr {c:?} is not a CIDR")))?;
                if cidr_to_name(&cidr) != name {
                    return Err(invalid(kind, name, format!("is not the name of its spec.cidr {c}")));
                }
            }
            Ok(key)
        }
        Kind::BlockAffinity => {
            let (Some(node), Some(c)) = (field("node"), field("cidr")) else {
                return Err(invalid(kind, name, "an affinity needs spec.node and spec.cidr"));
            };
            segment(kind, node)?;
            let cidr: IpNet = c.parse().map_err(|_| invalid(kind, name, format!("spec.cidr {c:?} is not a CIDR")))?;
            if !is_affinity_name(name, node, &cidr) {
                return Err(invalid(kind, name, format!("is not the name of the affinity of {node} for {c}")));
            }
            Ok(affinity_key(AffinityType::of_body(body), node, &cidr))
        }
        _ => Ok(candidate_keys(kind, name)?.remove(0)),
    }
}

/// What a key of `kind` names: `None` for keys in the kind's range that hold no such object
/// (the IPAM host markers `/calico/ipam/v2/host/<node>`, stray keys).
pub fn parse_key(kind: Kind, key: &str) -> Option<KeyInfo> {
    match kind {
        Kind::IpamBlock => {
            let rest = key.strip_prefix(BLOCK_PREFIX)?;
            let (_family, part) = rest.split_once("/block/")?;
            let cidr = cidr_from_key_part(part)?;
            (block_key(&cidr) == key).then(|| KeyInfo { name: cidr_to_name(&cidr), node: None, cidr: Some(cidr), virtual_owner: false })
        }
        Kind::BlockAffinity => {
            let (ty, rest) = match key.strip_prefix(HOST_PREFIX) {
                Some(rest) => (AffinityType::Host, rest),
                None => (AffinityType::Virtual, key.strip_prefix(VIRTUAL_PREFIX)?),
            };
            let mut parts = rest.split('/');
            let (node, _family, block, part) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
            if parts.next().is_some() || block != "block" || node.is_empty() {
                return None;
            }
            let cidr = cidr_from_key_part(part)?;
            // The plain name, never KDD's hashed one: the key holds node and CIDR in full.
            (affinity_key(ty, node, &cidr) == key).then(|| KeyInfo { name: plain_affinity_name(node, &cidr), node: Some(node.to_string()), cidr: Some(cidr), virtual_owner: ty == AffinityType::Virtual })
        }
        Kind::IpamHandle => {
            let id = key.strip_prefix(HANDLE_PREFIX)?;
            (!id.is_empty() && !id.contains('/')).then(|| KeyInfo { name: id.to_string(), node: None, cidr: None, virtual_owner: false })
        }
        Kind::IpamConfig => (key == IPAM_CONFIG_KEY).then(|| KeyInfo { name: "default".into(), node: None, cidr: None, virtual_owner: false }),
        other => {
            let name = key.strip_prefix(&kind_prefix(other))?;
            segment(other, name).is_ok().then(|| KeyInfo { name: name.to_string(), node: None, cidr: None, virtual_owner: false })
        }
    }
}

/// What a key says about its object.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    /// The KDD name the object travels under above the seam.
    pub name: String,
    pub node: Option<String>,
    pub cidr: Option<IpNet>,
    /// An affinity key under `virtual/` (its object's spec.type is `virtual`).
    pub virtual_owner: bool,
}

/// The uid of an object whose stored value carries none: stable for the life of the key
/// (etcd's create revision), UUID-shaped so that nothing downstream trips over its form.
pub fn uid_from_create_revision(create_revision: i64) -> String {
    format!("00000000-0000-0000-0000-{:012x}", create_revision.max(0))
}

fn rename(map: &mut Map<String, Value>, from: &str, to: &str) {
    if let Some(v) = map.remove(from) {
        map.insert(to.to_string(), v);
    }
}

fn spec_of(kind: Kind, name: &str, body: &Value) -> DsResult<Map<String, Value>> {
    body.get("spec").and_then(Value::as_object).cloned().ok_or_else(|| invalid(kind, name, "has no spec object"))
}

/// The value libcalico keeps under the key, from a KDD-shaped body.
/// The object's own name in its metadata: a workload endpoint's `<namespace>/<name>` is split
/// into its `namespace` and `name`.
fn set_name(meta: &mut Map<String, Value>, kind: Kind, name: &str) {
    match name.split_once('/').filter(|_| kind.namespaced()) {
        Some((ns, n)) => {
            meta.insert("namespace".into(), Value::String(ns.to_string()));
            meta.insert("name".into(), Value::String(n.to_string()));
        }
        None => {
            meta.insert("name".into(), Value::String(name.to_string()));
        }
    }
}

pub fn to_etcd_value(kind: Kind, name: &str, body: &Value) -> DsResult<Vec<u8>> {
    let value = match kind {
        Kind::IpamBlock => {
            let mut spec = spec_of(kind, name, body)?;
            rename(&mut spec, "affinityClaimTime", "affinity_claim_time");
            // Deprecated, KDD-only and required there; not part of the etcd model.
            spec.remove("strictAffinity");
            Value::Object(spec)
        }
        Kind::BlockAffinity => {
            let mut spec = spec_of(kind, name, body)?;
            for key_field in ["node", "cidr"] {
                spec.remove(key_field);
            }
            // The key says host or virtual (`key_for_write`); libcalico's value has no type.
            if spec.get("type").and_then(Value::as_str).is_some_and(|t| t.is_empty() || t == "host" || t == "virtual") {
                spec.remove("type");
            }
            let deleted = match spec.get("deleted") {
                Some(Value::String(s)) => s.eq_ignore_ascii_case("true"),
                Some(Value::Bool(b)) => *b,
                _ => false,
            };
            spec.insert("deleted".into(), Value::Bool(deleted));
            Value::Object(spec)
        }
        Kind::IpamHandle => {
            let mut spec = spec_of(kind, name, body)?;
            if let Some(id) = spec.remove("handleID")
                && id.as_str() != Some(name)
            {
                return Err(invalid(kind, name, format!("spec.handleID {id} is not the key's handle ID")));
            }
            Value::Object(spec)
        }
        Kind::IpamConfig => {
            let mut spec = spec_of(kind, name, body)?;
            rename(&mut spec, "strictAffinity", "strict_affinity");
            rename(&mut spec, "autoAllocateBlocks", "auto_allocate_blocks");
            Value::Object(spec)
        }
        _ => {
            let mut object = body.as_object().cloned().ok_or_else(|| invalid(kind, name, "is not a JSON object"))?;
            object.insert("apiVersion".into(), Value::String(V3_API_VERSION.into()));
            object.insert("kind".into(), Value::String(kind.kind_name().into()));
            let meta = object.entry("metadata").or_insert_with(|| json!({}));
            let meta = meta.as_object_mut().ok_or_else(|| invalid(kind, name, "metadata is not an object"))?;
            // etcd's mod revision is the resource version; libcalico never stores it.
            meta.remove("resourceVersion");
            set_name(meta, kind, name);
            Value::Object(object)
        }
    };
    serde_json::to_vec(&value).map_err(|e| invalid(kind, name, format!("does not encode: {e}")))
}

/// The KDD-shaped object for a key's value. `mod_revision` becomes the CAS token; the uid is the
/// value's own `metadata.uid` (v3 resources) or [`uid_from_create_revision`].
pub fn from_etcd_value(kind: Kind, key: &str, value: &[u8], mod_revision: i64, create_revision: i64) -> DsResult<Stored> {
    let info = parse_key(kind, key).ok_or_else(|| DatastoreError::invalid(format!("{key:?} is not the key of a {}", kind.kind_name())))?;
    let name = info.name.clone();
    // libcalico reads an empty affinity value as {} (legacy writers).
    let parsed: Value = if value.iter().all(u8::is_ascii_whitespace) {
        json!({})
    } else {
        serde_json::from_slice(value).map_err(|e| DatastoreError::invalid(format!("{key}: the value is not JSON: {e}")))?
    };
    let Value::Object(mut object) = parsed else {
        return Err(DatastoreError::invalid(format!("{key}: the value is not a JSON object")));
    };
    let revision = mod_revision.to_string();
    let derived_uid = uid_from_create_revision(create_revision);
    let wrap = |spec: Map<String, Value>, uid: &str| {
        json!({
            "apiVersion": CALICO_API_VERSION, "kind": kind.kind_name(),
            "metadata": {"name": name, "resourceVersion": revision, "uid": uid},
            "spec": spec,
        })
    };
    let (uid, body) = match kind {
        Kind::IpamBlock => {
            rename(&mut object, "affinity_claim_time", "affinityClaimTime");
            object.entry("strictAffinity").or_insert(Value::Bool(false));
            (derived_uid.clone(), wrap(object, &derived_uid))
        }
        Kind::BlockAffinity => {
            let deleted = matches!(object.get("deleted"), Some(Value::Bool(true))) || object.get("deleted").and_then(Value::as_str).is_some_and(|s| s.eq_ignore_ascii_case("true"));
            object.insert("deleted".into(), Value::String(deleted.to_string()));
            object.insert("node".into(), Value::String(info.node.clone().unwrap_or_default()));
            object.insert("cidr".into(), Value::String(info.cidr.map(|c| c.to_string()).unwrap_or_default()));
            // The key, not the value, says whose affinity it is.
            if info.virtual_owner {
                object.insert("type".into(), Value::String("virtual".into()));
            } else if object.contains_key("type") {
                object.insert("type".into(), Value::String("host".into()));
            }
            (derived_uid.clone(), wrap(object, &derived_uid))
        }
        Kind::IpamHandle => {
            object.insert("handleID".into(), Value::String(name.clone()));
            (derived_uid.clone(), wrap(object, &derived_uid))
        }
        Kind::IpamConfig => {
            rename(&mut object, "strict_affinity", "strictAffinity");
            rename(&mut object, "auto_allocate_blocks", "autoAllocateBlocks");
            (derived_uid.clone(), wrap(object, &derived_uid))
        }
        _ => {
            object.insert("apiVersion".into(), Value::String(CALICO_API_VERSION.into()));
            object.insert("kind".into(), Value::String(kind.kind_name().into()));
            let meta = object.entry("metadata").or_insert_with(|| json!({}));
            let Some(meta) = meta.as_object_mut() else {
                return Err(DatastoreError::invalid(format!("{key}: metadata is not an object")));
            };
            let uid = meta.get("uid").and_then(Value::as_str).filter(|u| !u.is_empty()).map(str::to_string).unwrap_or(derived_uid);
            set_name(meta, kind, &name);
            meta.insert("resourceVersion".into(), Value::String(revision.clone()));
            meta.insert("uid".into(), Value::String(uid.clone()));
            (uid, Value::Object(object))
        }
    };
    Ok(Stored { name, revision, uid, value: body })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::names::affinity_name;

    fn cidr(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn a_workload_endpoint_is_keyed_by_namespace_and_name_and_keeps_both_in_its_metadata() {
        let name = "web/node--1-k8s-pod--a-eth0";
        let key = "/calico/resources/v3/projectcalico.org/workloadendpoints/web/node--1-k8s-pod--a-eth0";
        assert_eq!(candidate_keys(Kind::WorkloadEndpoint, name).unwrap(), [key]);
        for bad in ["no-namespace", "a/b/c", "/b", "a/"] {
            assert!(candidate_keys(Kind::WorkloadEndpoint, bad).is_err(), "{bad}");
        }
        assert!(candidate_keys(Kind::BgpPeer, "a/b").is_err(), "only endpoints are namespaced");
        assert_eq!(parse_key(Kind::WorkloadEndpoint, key).unwrap().name, name);
        assert!(parse_key(Kind::WorkloadEndpoint, "/calico/resources/v3/projectcalico.org/workloadendpoints/web").is_none());
        let body = json!({"metadata": {"name": "ignored"}, "spec": {"node": "node-1", "pod": "pod-a"}});
        let value = to_etcd_value(Kind::WorkloadEndpoint, name, &body).unwrap();
        let stored: Value = serde_json::from_slice(&value).unwrap();
        assert_eq!((stored["metadata"]["namespace"].as_str(), stored["metadata"]["name"].as_str()), (Some("web"), Some("node--1-k8s-pod--a-eth0")));
        assert_eq!(stored["kind"], "WorkloadEndpoint");
        let back = from_etcd_value(Kind::WorkloadEndpoint, key, &value, 7, 5).unwrap();
        assert_eq!(back.name, name);
        assert_eq!(back.value["metadata"]["name"], "node--1-k8s-pod--a-eth0");
        assert_eq!(back.value["spec"]["node"], "node-1");
        assert_eq!(candidate_keys(Kind::FelixConfiguration, "node.n1").unwrap(), ["/calico/resources/v3/projectcalico.org/felixconfigurations/node.n1"]);
    }

    #[test]
    fn keys_follow_calicos_layout() {
        assert_eq!(candidate_keys(Kind::IpamBlock, "10-0-0-0-26").unwrap(), ["/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26"]);
        assert_eq!(candidate_keys(Kind::IpamBlock, "fd00-1---122").unwrap(), ["/calico/ipam/v2/assignment/ipv6/block/fd00:1::-122"]);
        assert_eq!(candidate_keys(Kind::BlockAffinity, "node-1-10-0-0-0-26").unwrap()[0], "/calico/ipam/v2/host/node-1/ipv4/block/10.0.0.0-26");
        assert_eq!(candidate_keys(Kind::IpamHandle, "k8s-pod-network.abc").unwrap(), ["/calico/ipam/v2/handle/k8s-pod-network.abc"]);
        assert_eq!(candidate_keys(Kind::IpamConfig, "default").unwrap(), ["/calico/ipam/v2/config"]);
        assert_eq!(candidate_keys(Kind::IpPool, "default-ipv4-ippool").unwrap(), ["/calico/resources/v3/projectcalico.org/ippools/default-ipv4-ippool"]);
        assert_eq!(candidate_keys(Kind::KubeControllersConfiguration, "default").unwrap(), ["/calico/resources/v3/projectcalico.org/kubecontrollersconfigurations/default"]);
        assert_eq!(kind_range(Kind::IpamHandle), ("/calico/ipam/v2/handle/".to_string(), "/calico/ipam/v2/handle0".to_string()));
        assert_eq!(kind_range(Kind::IpamConfig).1, "/calico/ipam/v2/config\0");
    }

    #[test]
    fn names_that_map_to_no_key_are_invalid_not_guessed() {
        for (kind, name) in [
            (Kind::IpamBlock, "conformance-block"),
            (Kind::IpamBlock, "10-0-0-1-26"), // not a network address
            (Kind::IpamBlock, "010-0-0-0-26"),
            (Kind::BlockAffinity, "node-only"),
            (Kind::IpamHandle, "a/b"),
            (Kind::IpamHandle, ""),
            (Kind::IpamConfig, "other"),
        ] {
            assert_eq!(candidate_keys(kind, name).unwrap_err().kind, super::super::ErrorKind::Invalid, "{kind:?} {name}");
        }
    }

    #[test]
    fn etcd_keys_keep_handle_ids_and_long_node_names_as_they_are_not_kdds_object_names() {
        // Upper case: KDD names the object by the lowercased ID; etcd's key is the ID itself.
        let id = "k8s-pod-network.AbC123";
        let key = candidate_keys(Kind::IpamHandle, id).unwrap().remove(0);
        assert_eq!(key, "/calico/ipam/v2/handle/k8s-pod-network.AbC123");
        assert_eq!(parse_key(Kind::IpamHandle, &key).unwrap().name, id);
        let body = json!({"spec": {"handleID": id, "block": {"10.0.0.0/26": 1}, "deleted": false}});
        assert_eq!(key_for_write(Kind::IpamHandle, id, &body).unwrap(), key);
        // A node name so long that KDD hashes the affinity's name: etcd's key holds it whole,
        // and the name above the seam is the plain one, which maps back to that key.
        let node = "n".repeat(250);
        let net = cidr("10.0.0.0/26");
        assert_ne!(affinity_name(&node, &net), plain_affinity_name(&node, &net), "KDD hashes this one");
        let key = format!("/calico/ipam/v2/host/{node}/ipv4/block/10.0.0.0-26");
        let info = parse_key(Kind::BlockAffinity, &key).unwrap();
        assert_eq!(info.name, plain_affinity_name(&node, &net));
        assert_eq!(candidate_keys(Kind::BlockAffinity, &info.name).unwrap(), [key.clone(), key.replace("/v2/host/", "/v2/virtual/")]);
        let body = json!({"spec": {"node": node, "cidr": "10.0.0.0/26", "state": "confirmed"}});
        for name in [plain_affinity_name(&node, &net), affinity_name(&node, &net)] {
            assert_eq!(key_for_write(Kind::BlockAffinity, &name, &body).unwrap(), key, "both names write the one key");
        }
    }

    #[test]
    fn virtual_owners_affinities_live_under_virtual_with_their_type_in_the_key_only() {
        let net = cidr("203.0.113.0/29");
        let name = plain_affinity_name("load-balancer", &net);
        let key = "/calico/ipam/v2/virtual/load-balancer/ipv4/block/203.0.113.0-29";
        let (start, end) = kind_range(Kind::BlockAffinity);
        for k in [key, "/calico/ipam/v2/host/n1/ipv4/block/10.0.0.0-26"] {
            assert!(start.as_str() <= k && k < end.as_str(), "{k} is in the affinities' range");
        }
        for other in ["/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26", "/calico/ipam/v2/handle/h", "/calico/ipam/v2/config", "/calico/resources/v3/projectcalico.org/ippools/p"] {
            assert!(!(start.as_str() <= other && other < end.as_str()), "{other} is outside it");
        }
        assert_eq!(parse_key(Kind::BlockAffinity, "/calico/ipam/v2/virtual/load-balancer"), None);
        assert_eq!(parse_key(Kind::BlockAffinity, "/calico/ipam/v2/other/n1/ipv4/block/10.0.0.0-26"), None);
        let info = parse_key(Kind::BlockAffinity, key).unwrap();
        assert_eq!((info.name.as_str(), info.node.as_deref(), info.virtual_owner), (name.as_str(), Some("load-balancer"), true));
        assert!(candidate_keys(Kind::BlockAffinity, &name).unwrap().contains(&key.to_string()));
        let body = json!({"spec": {"node": "load-balancer", "cidr": "203.0.113.0/29", "type": "virtual", "state": "pending", "deleted": "false"}});
        assert_eq!(key_for_write(Kind::BlockAffinity, &name, &body).unwrap(), key);
        let mut host = body.clone();
        host["spec"]["type"] = json!("host");
        assert_eq!(key_for_write(Kind::BlockAffinity, &name, &host).unwrap(), key.replace("/virtual/", "/host/"));
        // libcalico's value: state and deleted only.
        let bytes = to_etcd_value(Kind::BlockAffinity, &name, &body).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), json!({"state": "pending", "deleted": false}));
        let back = from_etcd_value(Kind::BlockAffinity, key, &bytes, 9, 8).unwrap();
        let typed: crate::model::BlockAffinity = back.decode().unwrap();
        assert_eq!((typed.spec.affinity_type.as_str(), typed.spec.node.as_str(), typed.spec.cidr.as_str()), ("virtual", "load-balancer", "203.0.113.0/29"));
        assert!(!typed.spec.is_host(), "the GC's index leaves it alone");
        // Under host/, the key wins over a value that says otherwise.
        let host_key = key.replace("/virtual/", "/host/");
        let odd = from_etcd_value(Kind::BlockAffinity, &host_key, br#"{"state":"confirmed","type":"virtual"}"#, 9, 8).unwrap();
        assert_eq!(odd.value["spec"]["type"], "host");
    }

    #[test]
    fn an_ipv6_affinity_name_has_every_reading_as_a_candidate() {
        let name = affinity_name("n1-fd00", &cidr("1::/122"));
        let keys = candidate_keys(Kind::BlockAffinity, &name).unwrap();
        assert!(keys.contains(&"/calico/ipam/v2/host/n1-fd00/ipv6/block/1::-122".to_string()), "{keys:?}");
        assert!(keys.contains(&"/calico/ipam/v2/host/n1/ipv6/block/fd00:1::-122".to_string()), "{keys:?}");
    }

    #[test]
    fn every_key_parses_back_to_the_name_it_came_from() {
        for c in ["10.0.0.0/26", "192.168.255.192/26", "fd00:1::/122", "2001:db8::40/122"] {
            let net = cidr(c);
            let name = cidr_to_name(&net);
            assert_eq!(cidr_from_name(&name), Some(net));
            let key = candidate_keys(Kind::IpamBlock, &name).unwrap().remove(0);
            assert_eq!(parse_key(Kind::IpamBlock, &key).unwrap().name, name);
            let aff = affinity_name("worker-1", &net);
            let keys = candidate_keys(Kind::BlockAffinity, &aff).unwrap();
            let right = keys.iter().find(|k| k.contains("/worker-1/")).expect("the true reading is a candidate");
            let info = parse_key(Kind::BlockAffinity, right).unwrap();
            assert_eq!((info.name.as_str(), info.node.as_deref(), info.cidr), (aff.as_str(), Some("worker-1"), Some(net)));
        }
        assert_eq!(parse_key(Kind::BlockAffinity, "/calico/ipam/v2/host/node1"), None, "host markers are no affinities");
        assert_eq!(parse_key(Kind::IpamBlock, "/calico/ipam/v2/assignment/ipv4/block/10.0.0.1-26"), None);
        assert_eq!(parse_key(Kind::IpPool, "/calico/resources/v3/projectcalico.org/ippools/p1").unwrap().name, "p1");
    }

    #[test]
    fn writes_check_the_body_against_the_name() {
        let aff = json!({"spec": {"node": "n1", "cidr": "10.0.0.0/26", "state": "confirmed"}});
        assert_eq!(key_for_write(Kind::BlockAffinity, "n1-10-0-0-0-26", &aff).unwrap(), "/calico/ipam/v2/host/n1/ipv4/block/10.0.0.0-26");
        assert!(key_for_write(Kind::BlockAffinity, "n2-10-0-0-0-26", &aff).is_err());
        let block = json!({"spec": {"cidr": "10.0.0.64/26"}});
        assert!(key_for_write(Kind::IpamBlock, "10-0-0-0-26", &block).is_err());
        let handle = json!({"spec": {"handleID": "other", "block": {}}});
        assert!(to_etcd_value(Kind::IpamHandle, "h1", &handle).is_err());
    }

    #[test]
    fn ipam_values_are_libcalicos_v1_model_and_unknown_fields_survive() {
        let block = json!({
            "apiVersion": CALICO_API_VERSION, "kind": "IPAMBlock", "metadata": {"name": "10-0-0-0-30"},
            "spec": {"cidr": "10.0.0.0/30", "affinity": "host:n1", "affinityClaimTime": "2026-01-01T00:00:00Z", "strictAffinity": false,
                     "allocations": [0, null, null, null], "unallocated": [1, 2, 3],
                     "attributes": [{"handle_id": "h", "secondary": {"node": "n1"}, "futureAttr": 1}],
                     "sequenceNumber": 7, "sequenceNumberForAllocation": {"0": 6}, "deleted": false, "futureField": [1]}
        });
        let bytes = to_etcd_value(Kind::IpamBlock, "10-0-0-0-30", &block).unwrap();
        let etcd: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(etcd["affinity_claim_time"], "2026-01-01T00:00:00Z");
        assert!(etcd.get("affinityClaimTime").is_none() && etcd.get("strictAffinity").is_none() && etcd.get("metadata").is_none());
        assert_eq!(etcd["sequenceNumberForAllocation"]["0"], 6);
        let back = from_etcd_value(Kind::IpamBlock, "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-30", &bytes, 12, 9).unwrap();
        assert_eq!((back.name.as_str(), back.revision.as_str()), ("10-0-0-0-30", "12"));
        assert_eq!(back.uid, uid_from_create_revision(9));
        assert_eq!(back.value["metadata"]["resourceVersion"], "12");
        assert_eq!(back.value["spec"], block["spec"], "the spec round-trips whole");
        let typed: crate::model::IpamBlock = back.decode().unwrap();
        assert_eq!(typed.spec.sequence_number, 7);

        let aff = json!({"spec": {"node": "n1", "cidr": "10.0.0.0/26", "state": "confirmed", "deleted": "false", "type": "host"}});
        let bytes = to_etcd_value(Kind::BlockAffinity, "n1-10-0-0-0-26", &aff).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), json!({"state": "confirmed", "deleted": false}));
        let back = from_etcd_value(Kind::BlockAffinity, "/calico/ipam/v2/host/n1/ipv4/block/10.0.0.0-26", &bytes, 3, 3).unwrap();
        assert_eq!(back.value["spec"], json!({"node": "n1", "cidr": "10.0.0.0/26", "state": "confirmed", "deleted": "false"}));
        let _: crate::model::BlockAffinity = back.decode().unwrap();
        let legacy = from_etcd_value(Kind::BlockAffinity, "/calico/ipam/v2/host/n1/ipv4/block/10.0.0.0-26", b"", 3, 3).unwrap();
        assert_eq!(legacy.value["spec"]["deleted"], "false");

        let handle = json!({"spec": {"handleID": "k8s-pod-network.c1", "block": {"10.0.0.0/26": 2}, "deleted": false}});
        let bytes = to_etcd_value(Kind::IpamHandle, "k8s-pod-network.c1", &handle).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), json!({"block": {"10.0.0.0/26": 2}, "deleted": false}));
        let back = from_etcd_value(Kind::IpamHandle, "/calico/ipam/v2/handle/k8s-pod-network.c1", &bytes, 4, 4).unwrap();
        assert_eq!(back.value["spec"], handle["spec"]);

        let cfg = json!({"spec": {"strictAffinity": true, "autoAllocateBlocks": false, "maxBlocksPerHost": 2}});
        let bytes = to_etcd_value(Kind::IpamConfig, "default", &cfg).unwrap();
        assert_eq!(serde_json::from_slice::<Value>(&bytes).unwrap(), json!({"strict_affinity": true, "auto_allocate_blocks": false, "maxBlocksPerHost": 2}));
        assert_eq!(from_etcd_value(Kind::IpamConfig, IPAM_CONFIG_KEY, &bytes, 5, 5).unwrap().value["spec"], cfg["spec"]);
    }

    #[test]
    fn v3_resources_are_stored_whole_without_their_resource_version() {
        let pool = json!({"apiVersion": CALICO_API_VERSION, "kind": "IPPool",
            "metadata": {"name": "p1", "resourceVersion": "77", "uid": "u-1", "labels": {"a": "b"}},
            "spec": {"cidr": "10.0.0.0/16", "blockSize": 26}});
        let bytes = to_etcd_value(Kind::IpPool, "p1", &pool).unwrap();
        let etcd: Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(etcd["apiVersion"], V3_API_VERSION);
        assert!(etcd["metadata"].get("resourceVersion").is_none());
        let back = from_etcd_value(Kind::IpPool, "/calico/resources/v3/projectcalico.org/ippools/p1", &bytes, 80, 70).unwrap();
        assert_eq!((back.uid.as_str(), back.revision.as_str()), ("u-1", "80"));
        assert_eq!(back.value["metadata"]["labels"]["a"], "b");
        assert_eq!(back.value["apiVersion"], CALICO_API_VERSION);
    }

    #[test]
    fn policies_are_keyed_by_plural_and_namespace_as_libcalico_keys_them() {
        let cases = [
            (Kind::NetworkPolicy, "web/default.allow", "/calico/resources/v3/projectcalico.org/networkpolicies/web/default.allow"),
            (Kind::StagedNetworkPolicy, "web/allow", "/calico/resources/v3/projectcalico.org/stagednetworkpolicies/web/allow"),
            (Kind::GlobalNetworkPolicy, "default.deny", "/calico/resources/v3/projectcalico.org/globalnetworkpolicies/default.deny"),
            (Kind::StagedGlobalNetworkPolicy, "deny", "/calico/resources/v3/projectcalico.org/stagedglobalnetworkpolicies/deny"),
        ];
        for (kind, name, key) in cases {
            assert_eq!(candidate_keys(kind, name).unwrap(), [key], "{kind:?}");
            assert_eq!(parse_key(kind, key).map(|k| k.name), Some(name.to_string()));
            let body = json!({"metadata": {"name": name.rsplit('/').next().unwrap()}, "spec": {"selector": "all()"}});
            let value: Value = serde_json::from_slice(&to_etcd_value(kind, name, &body).unwrap()).unwrap();
            assert_eq!((value["kind"].as_str(), value["apiVersion"].as_str()), (Some(kind.kind_name()), Some(V3_API_VERSION)));
            assert_eq!(value["metadata"]["namespace"].as_str(), name.split_once('/').map(|(ns, _)| ns));
        }
        assert!(candidate_keys(Kind::StagedNetworkPolicy, "no-namespace").is_err());
        assert!(candidate_keys(Kind::GlobalNetworkPolicy, "a/b").is_err(), "cluster-wide: one segment");
    }

    #[test]
    fn garbage_values_are_invalid_not_panics() {
        for v in [&b"{"[..], b"[1]", b"\xff\xfe", b"null", b"42"] {
            for kind in Kind::ALL {
                let (start, _) = kind_range(kind);
                let key = match kind {
                    Kind::IpamBlock => "/calico/ipam/v2/assignment/ipv4/block/10.0.0.0-26".to_string(),
                    Kind::BlockAffinity => "/calico/ipam/v2/host/n/ipv4/block/10.0.0.0-26".to_string(),
                    Kind::IpamConfig => start,
                    _ => format!("{start}x"),
                };
                assert_eq!(from_etcd_value(kind, &key, v, 1, 1).unwrap_err().kind, super::super::ErrorKind::Invalid);
            }
        }
        assert!(from_etcd_value(Kind::IpamHandle, "/calico/other", b"{}", 1, 1).is_err());
    }
}
