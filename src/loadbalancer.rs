//! The LoadBalancer IP controller's rules, pure (SPEC §6.6): which Services Calico gives an
//! address, what each one asks for, and, against what the IPAM blocks show allocated under its
//! handle, what to release, what to assign and what `status.loadBalancer.ingress` should say.
//!
//! Owns: `assignIPs` ([`AssignMode`]); upstream's "is this Service Calico's" rule ([`is_managed`]);
//! the request read from a Service's annotations and spec ([`LbRequest`], its typed errors); the
//! handle ID ([`handle_id`]) and the attributes of an LB allocation; which allocations of a block
//! are the controller's ([`holdings`], [`by_handle`]) and the few Service fields it keeps
//! ([`slim_service`]); and the per-Service decision ([`decide`], over a handle's holdings
//! [`decide_held`]: the one call the controller and `leak-scan` both make, so the scan's
//! `lb-unwanted` leaks are exactly what the controller releases).
//! Must not: do I/O or read the clock (the caller passes the time); assign anything while the
//! caller's views of Services, IPAM blocks and IP pools are not whole (`synced: false` makes
//! [`decide`] return an empty decision, which is the fix for projectcalico/calico#12503); touch a
//! status entry that is not Calico's on a Service Calico no longer manages.
//!
//! Upstream: `kube-controllers/pkg/controllers/loadbalancer/loadbalancer_controller.go`
//! (`IsCalicoManagedLoadBalancer`, `syncService`, `parseAnnotations`, `resolvePools`, `assignIP`,
//! `needsStatusUpdate`, `removeCalicoIPFromStatus`, `createHandle`), `libcalico-go/lib/ipam/ipam.go`
//! (`AutoAssign`, `AssignIP`, which pools they use). See `notes/lb-research.md` Part 1.
//!
//! # What the caller does with a [`Decision`]
//!
//! Release first (by address, under the Service's handle), then write `ingress` when it is
//! `Some` (it lists what is held once the releases are done, never the assignments, whose
//! addresses only IPAM knows), then assign: the specific addresses one by one with `AssignIP`,
//! the rest in one `AutoAssign` with the counts and pools given. The blocks' watch then shows the
//! new allocations and the next decision writes them into the status. Deciding again with the
//! allocations applied assigns and releases nothing (tested as a property).
//!
//! # Departures from upstream, each for a reason
//!
//! * An `assignIPs` value other than `AllServices` or `RequestedServicesOnly` (only reachable
//!   through a KubeControllersConfiguration that says so; the merge defaults it) is an error
//!   ([`UnknownAssignMode`]): the caller then manages nothing and releases nothing until it is
//!   fixed. Upstream manages nothing and so releases every address it gave out, on a typo.
//! * Surplus addresses are released: more than one per family, or one of a family the Service no
//!   longer wants (dual-stack changed to single-stack). Upstream never trims them, so a Service
//!   that got a second address of one family (projectcalico/calico#12503) kept both. The one kept
//!   is the one the status already shows, else the first in `tracked`.
//! * Each family is counted on its own (upstream's `To16` test zeroes the IPv6 count as soon as
//!   any address is held, so a dual-stack Service whose IPv6 failed once never gets one).
//! * Each pool annotation constrains its own family only; an IPv6 address of a Service with only
//!   `ipv4pools` comes from, and is kept in, the Automatic LB pools as without annotations.
//!   Upstream releases that address (it is in neither list) and, with the count fixed, would then
//!   assign and release it every round. An empty list (`[]`) counts as absent: upstream releases
//!   everything of that family for it yet passes no restriction to IPAM, which would flap too.
//! * `spec.loadBalancerIP` is a request like the annotation: changing it releases the old
//!   address. Upstream reads it only when assigning, so a change is ignored.
//! * A request that cannot be met is an error when read, not when IPAM refuses it: a pool CIDR
//!   that is no LB pool's CIDR (IPAM would refuse it every round), a specific address in no LB
//!   pool, a Service without `spec.ipFamilies` (upstream would want nothing and, with the
//!   surplus rule, release what it holds) or with an unknown `ipFamilyPolicy`. As for every
//!   request error, nothing is released or assigned and the status stays.
//! * An annotation whose value is empty or `null` is absent, as `RequestedServicesOnly` already
//!   reads it (upstream's JSON decoder fails on an empty value).
//! * No LB pools left: a Service Calico no longer manages keeps its foreign status entries
//!   (upstream writes an empty list, wiping another controller's address).
//! * A family is not auto-assigned when no enabled pool could give it (the requested ones, or the
//!   Automatic LB pools of that family): the decision says so ([`Problem::NoUsablePool`]) instead
//!   of an `AutoAssign` that fails every round.
//! * The status is compared as a set without duplicates and written v4 first, then v6; upstream
//!   writes Go map order.

use std::collections::BTreeMap;
use std::net::IpAddr;

use ipnet::IpNet;
use serde_json::{json, Map, Value};
use sha2::{Digest, Sha256};

use crate::host_endpoints::{base64_url, go_ip};
use crate::model::block::{Affinity, AttrMap, BlockView};
use crate::model::names::ordinal_to_ip;
use crate::model::time::{format_go_utc, Millis};

pub const ANNOTATION_IPV4_POOLS: &str = "projectcalico.org/ipv4pools";
pub const ANNOTATION_IPV6_POOLS: &str = "projectcalico.org/ipv6pools";
pub const ANNOTATION_LOAD_BALANCER_IPS: &str = "projectcalico.org/loadBalancerIPs";
/// `spec.loadBalancerClass` that names Calico.
pub const CALICO_CLASS: &str = "calico";
/// The `Hostname` of every LB assignment (`v3.VirtualLoadBalancer`); blocks get the affinity
/// [`LB_AFFINITY`].
pub use crate::ipam::assign::{Family, LB_AFFINITY, LB_HOST};
/// An IPPool's `allowedUses` entry, and the `IntendedUse` of every LB assignment.
pub const LB_USE: &str = "LoadBalancer";
const HANDLE_PREFIX: &str = "lb-";
/// The `type` attribute of an LB allocation.
const ALLOCATION_TYPE: &str = "LoadBalancer";

// -------------------------------------------------------------------------------------------------
// Configuration and which Services are Calico's.

/// `spec.controllers.loadBalancer.assignIPs`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AssignMode {
    /// Every `LoadBalancer` Service without a foreign `loadBalancerClass`.
    AllServices,
    /// Only Services of class `calico` or that ask through an annotation or `spec.loadBalancerIP`.
    RequestedServicesOnly,
}

/// An `assignIPs` this controller does not know: it then manages no Service and releases nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("loadBalancer.assignIPs {0:?} is neither AllServices nor RequestedServicesOnly: no LoadBalancer address is assigned or released until it is")]
pub struct UnknownAssignMode(pub String);

impl AssignMode {
    /// Exact strings, as upstream compares them (its API admits nothing else).
    pub fn from_config(value: &str) -> Result<AssignMode, UnknownAssignMode> {
        match value {
            "AllServices" => Ok(AssignMode::AllServices),
            "RequestedServicesOnly" => Ok(AssignMode::RequestedServicesOnly),
            other => Err(UnknownAssignMode(other.to_string())),
        }
    }
}

fn annotation<'a>(service: &'a Value, key: &str) -> Option<&'a str> {
    service["metadata"]["annotations"][key].as_str().filter(|v| !v.is_empty())
}

fn spec_str<'a>(service: &'a Value, field: &str) -> Option<&'a str> {
    service["spec"][field].as_str().filter(|v| !v.is_empty())
}

/// `spec.type: LoadBalancer`, whatever its class: only such a Service can hold a Calico address.
pub fn is_load_balancer(service: &Value) -> bool {
    service["spec"]["type"].as_str() == Some("LoadBalancer")
}

/// Upstream's `IsCalicoManagedLoadBalancer`: type `LoadBalancer`, and for `AllServices` no class
/// or class `calico`; for `RequestedServicesOnly` class `calico`, or no class and a request (a
/// non-empty pool or address annotation, or `spec.loadBalancerIP`).
pub fn is_managed(service: &Value, mode: AssignMode) -> bool {
    if !is_load_balancer(service) {
        return false;
    }
    // Upstream tests the pointer, so an empty class is a foreign class.
    let class = service["spec"]["loadBalancerClass"].as_str();
    match mode {
        AssignMode::AllServices => class.is_none_or(|c| c == CALICO_CLASS),
        AssignMode::RequestedServicesOnly => {
            if class == Some(CALICO_CLASS) {
                return true;
            }
            let requested = [ANNOTATION_IPV4_POOLS, ANNOTATION_IPV6_POOLS, ANNOTATION_LOAD_BALANCER_IPS].iter().any(|k| annotation(service, k).is_some())
                || spec_str(service, "loadBalancerIP").is_some();
            requested && class.is_none()
        }
    }
}

// -------------------------------------------------------------------------------------------------
// LB pools.

/// An IPPool that allows `LoadBalancer` use and is not being deleted: the pools upstream keeps
/// (disabled ones included: they still resolve names and keep their addresses).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbPool {
    pub name: String,
    /// Masked to its network.
    pub cidr: IpNet,
    /// `assignmentMode: Manual`: only a Service that names the pool gets its addresses.
    pub manual: bool,
    /// `disabled: true`: holds its addresses but gives no new ones.
    pub disabled: bool,
}

impl LbPool {
    /// `None` for a pool that is not an LB pool (other uses, deleting, unparsable CIDR).
    pub fn from_ip_pool(pool: &Value) -> Option<LbPool> {
        let spec = &pool["spec"];
        let uses = spec["allowedUses"].as_array()?;
        if !uses.iter().any(|u| u.as_str() == Some(LB_USE)) || !pool["metadata"]["deletionTimestamp"].is_null() {
            return None;
        }
        let cidr = spec["cidr"].as_str()?.parse::<IpNet>().ok()?.trunc();
        Some(LbPool {
            name: pool["metadata"]["name"].as_str().unwrap_or_default().to_string(),
            cidr,
            manual: spec["assignmentMode"].as_str() == Some("Manual"),
            disabled: spec["disabled"].as_bool().unwrap_or(false),
        })
    }
}

// -------------------------------------------------------------------------------------------------
// The request.

/// What a managed Service asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbRequest {
    /// `Some`: exactly these addresses (the `loadBalancerIPs` annotation, else
    /// `spec.loadBalancerIP`), at most one per family, in the order written. They decide the
    /// families; `ipFamilies` plays no part.
    pub addresses: Option<Vec<IpAddr>>,
    /// The LB pools named in `ipv4pools`, never empty when `Some`.
    pub v4_pools: Option<Vec<IpNet>>,
    pub v6_pools: Option<Vec<IpNet>>,
    /// Whether one address of the family is wanted.
    pub want_v4: bool,
    pub want_v6: bool,
}

/// Why a Service's request cannot be read. Nothing is released or assigned for it and its status
/// stays; the message is for an Event on the Service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("annotation {annotation} is not a JSON list of strings: {message}")]
    NotJsonList { annotation: &'static str, message: String },
    #[error("annotation {annotation}: {entry:?} is neither a CIDR nor the name of an IP pool that allows LoadBalancer use")]
    UnknownPool { annotation: &'static str, entry: String },
    #[error("annotation {annotation}: {cidr} is not an {} pool", .family.as_str())]
    PoolFamily { annotation: &'static str, cidr: IpNet, family: Family },
    #[error("annotation {annotation}: {cidr} is not the CIDR of an IP pool that allows LoadBalancer use")]
    NotLoadBalancerPool { annotation: &'static str, cidr: IpNet },
    #[error("{source_field}: {text:?} is not an IP address")]
    BadAddress { source_field: &'static str, text: String },
    #[error("annotation projectcalico.org/loadBalancerIPs: at most one IPv4 and one IPv6 address, got {v4} IPv4 and {v6} IPv6")]
    TooManyAddresses { v4: usize, v6: usize },
    #[error("{ip} is in no IP pool that allows LoadBalancer use")]
    AddressNotInPool { ip: IpAddr },
    #[error("spec.ipFamilies: {0}")]
    IpFamilies(String),
    #[error("spec.ipFamilyPolicy {0:?} is not SingleStack, PreferDualStack or RequireDualStack")]
    IpFamilyPolicy(String),
}

impl RequestError {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            RequestError::NotJsonList { .. } => "annotation_json",
            RequestError::UnknownPool { .. } => "unknown_pool",
            RequestError::PoolFamily { .. } => "pool_family",
            RequestError::NotLoadBalancerPool { .. } => "not_lb_pool",
            RequestError::BadAddress { .. } => "bad_address",
            RequestError::TooManyAddresses { .. } => "too_many_addresses",
            RequestError::AddressNotInPool { .. } => "address_not_in_pool",
            RequestError::IpFamilies(_) => "ip_families",
            RequestError::IpFamilyPolicy(_) => "ip_family_policy",
        }
    }
}

/// An annotation's JSON list of strings; `None` when absent, empty, `null` or `[]`.
fn string_list(service: &Value, key: &'static str) -> Result<Option<Vec<String>>, RequestError> {
    let Some(text) = annotation(service, key) else { return Ok(None) };
    let list: Option<Vec<String>> = serde_json::from_str(text).map_err(|e| RequestError::NotJsonList { annotation: key, message: e.to_string() })?;
    Ok(list.filter(|l| !l.is_empty()))
}

/// Upstream's `resolvePools`: a CIDR (masked, as Go's `ParseCIDR`) or an LB pool's name; then the
/// family, and (ours) that the CIDR is an LB pool's.
fn resolve_pools(service: &Value, key: &'static str, family: Family, pools: &[LbPool]) -> Result<Option<Vec<IpNet>>, RequestError> {
    let Some(entries) = string_list(service, key)? else { return Ok(None) };
    let mut out = Vec::with_capacity(entries.len());
    for entry in entries {
        let cidr = match entry.parse::<IpNet>() {
            Ok(net) => net.trunc(),
            Err(_) => pools.iter().rev().find(|p| p.name == entry).map(|p| p.cidr).ok_or(RequestError::UnknownPool { annotation: key, entry: entry.clone() })?,
        };
        if Family::of_net(&cidr) != family {
            return Err(RequestError::PoolFamily { annotation: key, cidr, family });
        }
        if !pools.iter().any(|p| p.cidr == cidr) {
            return Err(RequestError::NotLoadBalancerPool { annotation: key, cidr });
        }
        if !out.contains(&cidr) {
            out.push(cidr);
        }
    }
    Ok(Some(out))
}

fn parse_ip(text: &str, source_field: &'static str) -> Result<IpAddr, RequestError> {
    text.trim().parse::<IpAddr>().map(go_ip).map_err(|_| RequestError::BadAddress { source_field, text: text.to_string() })
}

impl LbRequest {
    /// Reads a managed Service's request against the LB pools (every [`LbPool`], disabled ones
    /// included).
    pub fn from_service(service: &Value, pools: &[LbPool]) -> Result<LbRequest, RequestError> {
        let v4_pools = resolve_pools(service, ANNOTATION_IPV4_POOLS, Family::V4, pools)?;
        let v6_pools = resolve_pools(service, ANNOTATION_IPV6_POOLS, Family::V6, pools)?;
        let mut addresses = match string_list(service, ANNOTATION_LOAD_BALANCER_IPS)? {
            Some(list) => {
                let ips = list.iter().map(|t| parse_ip(t, ANNOTATION_LOAD_BALANCER_IPS)).collect::<Result<Vec<_>, _>>()?;
                let v4 = ips.iter().filter(|ip| ip.is_ipv4()).count();
                let v6 = ips.len() - v4;
                if v4 > 1 || v6 > 1 {
                    return Err(RequestError::TooManyAddresses { v4, v6 });
                }
                Some(ips)
            }
            None => None,
        };
        if addresses.is_none()
            && let Some(text) = spec_str(service, "loadBalancerIP")
        {
            addresses = Some(vec![parse_ip(text, "spec.loadBalancerIP")?]);
        }
        if let Some(ips) = &addresses {
            if let Some(ip) = ips.iter().find(|ip| !pools.iter().any(|p| p.cidr.contains(*ip))) {
                return Err(RequestError::AddressNotInPool { ip: *ip });
            }
            let want_v4 = ips.iter().any(|ip| ip.is_ipv4());
            let want_v6 = ips.iter().any(|ip| ip.is_ipv6());
            return Ok(LbRequest { addresses, v4_pools, v6_pools, want_v4, want_v6 });
        }
        let (want_v4, want_v6) = wanted_families(service)?;
        Ok(LbRequest { addresses: None, v4_pools, v6_pools, want_v4, want_v6 })
    }

    pub fn wants(&self, family: Family) -> bool {
        match family {
            Family::V4 => self.want_v4,
            Family::V6 => self.want_v6,
        }
    }

    fn pools(&self, family: Family) -> Option<&Vec<IpNet>> {
        match family {
            Family::V4 => self.v4_pools.as_ref(),
            Family::V6 => self.v6_pools.as_ref(),
        }
    }

    fn address(&self, family: Family) -> Option<IpAddr> {
        self.addresses.as_ref()?.iter().copied().find(|ip| Family::of(*ip) == family)
    }
}

/// The families `spec.ipFamilies` lists, the first only for `SingleStack` (the API server
/// always sets both fields on a Service with a cluster IP, which every LoadBalancer has).
fn wanted_families(service: &Value) -> Result<(bool, bool), RequestError> {
    let listed = service["spec"]["ipFamilies"].as_array().filter(|l| !l.is_empty()).ok_or_else(|| RequestError::IpFamilies("missing or empty".into()))?;
    let mut families = Vec::with_capacity(2);
    for f in listed {
        let family = match f.as_str() {
            Some("IPv4") => Family::V4,
            Some("IPv6") => Family::V6,
            _ => return Err(RequestError::IpFamilies(format!("{f} is not IPv4 or IPv6"))),
        };
        if !families.contains(&family) {
            families.push(family);
        }
    }
    match service["spec"]["ipFamilyPolicy"].as_str() {
        Some("SingleStack") => families.truncate(1),
        None | Some("PreferDualStack" | "RequireDualStack") => {}
        Some(other) => return Err(RequestError::IpFamilyPolicy(other.to_string())),
    }
    Ok((families.contains(&Family::V4), families.contains(&Family::V6)))
}

// -------------------------------------------------------------------------------------------------
// Handles and attributes.

/// Upstream's `createHandle`: `lb-` and the unpadded URL-safe base64 of the SHA-256 of
/// `<name>-<namespace>-<uid>` lowercased, with `-`, `_` and `.` removed (mixed case, 46 bytes at
/// most, so upstream's cut to 253 never applies). The UID makes a recreated Service another one.
pub fn handle_id(name: &str, namespace: &str, uid: &str) -> String {
    let digest = Sha256::digest(format!("{name}-{namespace}-{uid}").to_lowercase().as_bytes());
    let mut out = String::from(HANDLE_PREFIX);
    out.extend(base64_url(&digest).chars().filter(|c| !matches!(c, '-' | '_' | '.')));
    out
}

/// The allocation attributes (`secondary`) of an LB address: upstream's `service`, `namespace`,
/// `type` and `timestamp` (Go's `time.Now().UTC().String()`, here of `now`). No `node`: the IPAM
/// GC leaves addresses without one alone.
pub fn allocation_attributes(name: &str, namespace: &str, now: Millis) -> AttrMap {
    AttrMap::new([("namespace", namespace), ("service", name), ("timestamp", &format_go_utc(now)), ("type", ALLOCATION_TYPE)])
}

/// Which Service a handle's addresses belong to, as the block attributes name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
    pub handle: String,
}

impl ServiceKey {
    pub fn of_service(service: &Value) -> ServiceKey {
        let meta = &service["metadata"];
        let name = meta["name"].as_str().unwrap_or_default();
        let namespace = meta["namespace"].as_str().unwrap_or_default();
        ServiceKey { namespace: namespace.into(), name: name.into(), handle: handle_id(name, namespace, meta["uid"].as_str().unwrap_or_default()) }
    }

    /// Whether `service` is this key's Service: a recreated one of the same name has another UID,
    /// so another handle, and does not own the old one's addresses.
    pub fn is_of(&self, service: &Value) -> bool {
        ServiceKey::of_service(service) == *self
    }
}

// -------------------------------------------------------------------------------------------------
// What the controller reads: the Services' few fields, and the blocks' LB addresses.

/// The fields of a Service the decision and the status write read, with `revision` as its
/// `resourceVersion`; the rest (ports, selector, managed fields, other annotations) is never kept.
pub fn slim_service(service: &Value, revision: &str) -> Value {
    let meta = &service["metadata"];
    let annotations: Map<String, Value> = meta["annotations"].as_object().map(|a| a.iter().filter(|(k, _)| k.starts_with("projectcalico.org/")).map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
    let spec = &service["spec"];
    json!({
        "metadata": {"name": meta["name"], "namespace": meta["namespace"], "uid": meta["uid"], "resourceVersion": revision, "annotations": annotations},
        "spec": {"type": spec["type"], "loadBalancerClass": spec["loadBalancerClass"], "loadBalancerIP": spec["loadBalancerIP"], "ipFamilies": spec["ipFamilies"], "ipFamilyPolicy": spec["ipFamilyPolicy"]},
        "status": {"loadBalancer": service["status"]["loadBalancer"]},
    })
}

/// One LoadBalancer address as its block shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbHolding {
    /// Whose it is, as the allocation's attributes name the Service and its handle.
    pub key: ServiceKey,
    pub ip: IpAddr,
    /// The block's object name and CIDR.
    pub block: String,
    pub cidr: IpNet,
    pub ordinal: u32,
    /// `sequenceNumberForAllocation` of the ordinal: a release must fail if it moved on.
    pub sequence: u64,
}

/// The addresses of a readable block that are the controller's, in ordinal order: none in a block
/// a host owns (those are pods' and tunnels', the GC's); elsewhere every allocation with a handle,
/// not cooling down (`releasedAt`), naming its Service (`namespace` and `service`), of
/// `type: LoadBalancer` or under an `lb-` handle.
pub fn holdings(view: &BlockView<'_>) -> Vec<LbHolding> {
    if matches!(view.affinity, Affinity::Host(_)) {
        return Vec::new();
    }
    let mut out = Vec::new();
    for slot in view.slots() {
        let a = slot.attribute;
        let (Some(handle), None) = (a.handle_id.as_deref(), a.released_at.as_deref()) else { continue };
        let (Some(namespace), Some(name)) = (a.attr("namespace"), a.attr("service")) else { continue };
        if a.attr("type") != Some(ALLOCATION_TYPE) && !handle.starts_with(HANDLE_PREFIX) {
            continue;
        }
        out.push(LbHolding {
            key: ServiceKey { namespace: namespace.into(), name: name.into(), handle: handle.into() },
            ip: ordinal_to_ip(&view.cidr, slot.ordinal),
            block: view.block.name().to_string(),
            cidr: view.cidr,
            ordinal: slot.ordinal,
            sequence: slot.sequence,
        });
    }
    out
}

/// The handle IDs a block names that cannot be read as one (not an IPAMBlock, or refused by
/// [`BlockView`]), unless a host owns it: what those handles hold is unknown, so the controller
/// leaves their Services as they are.
pub fn unreadable_block_handles(block: &Value) -> Vec<String> {
    if matches!(Affinity::parse(block["spec"]["affinity"].as_str()), Affinity::Host(_)) {
        return Vec::new();
    }
    block["spec"]["attributes"].as_array().into_iter().flatten().filter_map(|a| a["handle_id"].as_str()).map(str::to_string).collect()
}

/// Every handle's holdings, sorted by block CIDR then ordinal whatever order they come in (the
/// order [`decide`] is given them decides which address of a family is kept); the key is the
/// first holding's.
pub fn by_handle(holdings: impl IntoIterator<Item = LbHolding>) -> BTreeMap<String, (ServiceKey, Vec<LbHolding>)> {
    let mut all: Vec<LbHolding> = holdings.into_iter().collect();
    all.sort_by_key(|h| (h.cidr, h.ordinal));
    let mut out: BTreeMap<String, (ServiceKey, Vec<LbHolding>)> = BTreeMap::new();
    for h in all {
        out.entry(h.key.handle.clone()).or_insert_with(|| (h.key.clone(), Vec::new())).1.push(h);
    }
    out
}

// -------------------------------------------------------------------------------------------------
// The decision.

/// Addresses to have IPAM choose, in one `AutoAssign`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AutoAssign {
    pub v4: u8,
    pub v6: u8,
    /// `Some`: only these pools (`IPv4Pools`); `None`: IPAM's choice among the Automatic LB pools.
    pub v4_pools: Option<Vec<IpNet>>,
    pub v6_pools: Option<Vec<IpNet>>,
}

impl AutoAssign {
    pub fn is_empty(&self) -> bool {
        self.v4 == 0 && self.v6 == 0
    }
}

/// Something a decision could not do, for the log and an Event on the Service.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Problem {
    #[error(transparent)]
    Request(RequestError),
    #[error("no IP pool allows LoadBalancer use")]
    NoLoadBalancerPools,
    #[error("no enabled IP pool can give an {} address", .0.as_str())]
    NoUsablePool(Family),
}

impl Problem {
    /// A bounded label for metrics.
    pub fn category(&self) -> &'static str {
        match self {
            Problem::Request(e) => e.category(),
            Problem::NoLoadBalancerPools => "no_lb_pools",
            Problem::NoUsablePool(_) => "no_usable_pool",
        }
    }
}

/// What to do for one Service (or one handle whose Service is gone).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub key: ServiceKey,
    /// Addresses held under the handle that are no longer wanted.
    pub release: Vec<IpAddr>,
    /// Requested addresses not held yet, for `AssignIP`.
    pub assign_specific: Vec<IpAddr>,
    pub assign_auto: AutoAssign,
    /// `Some`: the `status.loadBalancer.ingress` to write (the whole list); `None`: it is right.
    pub ingress: Option<Vec<Value>>,
    pub problems: Vec<Problem>,
}

impl Decision {
    fn none(key: &ServiceKey) -> Decision {
        Decision { key: key.clone(), release: Vec::new(), assign_specific: Vec::new(), assign_auto: AutoAssign::default(), ingress: None, problems: Vec::new() }
    }

    /// Nothing to release, assign or write.
    pub fn is_noop(&self) -> bool {
        self.release.is_empty() && self.assign_specific.is_empty() && self.assign_auto.is_empty() && self.ingress.is_none()
    }
}

fn ingress_entries(service: &Value) -> &[Value] {
    service["status"]["loadBalancer"]["ingress"].as_array().map(Vec::as_slice).unwrap_or_default()
}

fn entry_ip(entry: &Value) -> Option<IpAddr> {
    entry["ip"].as_str()?.parse::<IpAddr>().ok().map(go_ip)
}

/// The ingress that lists exactly `held`, `None` when the status already does (as a set without
/// duplicates; upstream's `needsStatusUpdate`).
fn ingress_of(service: &Value, held: &[IpAddr]) -> Option<Vec<Value>> {
    let current = ingress_entries(service);
    let mut seen: Vec<IpAddr> = Vec::with_capacity(current.len());
    let matches = current.len() == held.len()
        && current.iter().all(|e| match entry_ip(e) {
            Some(ip) if held.contains(&ip) && !seen.contains(&ip) => {
                seen.push(ip);
                true
            }
            _ => false,
        });
    (!matches).then(|| held.iter().map(|ip| json!({"ip": ip.to_string()})).collect())
}

/// Upstream's `removeCalicoIPFromStatus`: the status without Calico's addresses, every other
/// entry as it is; `None` when none of them is there.
fn ingress_without(service: &Value, ours: &[IpAddr]) -> Option<Vec<Value>> {
    let current = ingress_entries(service);
    let kept: Vec<Value> = current.iter().filter(|e| entry_ip(e).is_none_or(|ip| !ours.contains(&ip))).cloned().collect();
    (kept.len() != current.len()).then_some(kept)
}

/// The decision for the Service `key` names, given the Service as the caller sees it (`None`
/// when gone), the addresses the IPAM blocks show allocated under `key.handle` (oldest first
/// when the caller knows, else any stable order) and every [`LbPool`].
///
/// `synced` must be false while any of the caller's views (Services, the IPAM blocks, IP pools)
/// has not finished its first list or is relisting: the decision is then empty, because an
/// address the blocks have not shown yet would be assigned a second time (projectcalico/calico
/// #12503) and a pool not listed yet would look gone.
pub fn decide(service: Option<&Value>, key: &ServiceKey, mode: AssignMode, tracked: &[IpAddr], lb_pools: &[LbPool], synced: bool) -> Decision {
    let mut d = Decision::none(key);
    if !synced {
        return d;
    }
    let mut held: Vec<IpAddr> = Vec::with_capacity(tracked.len());
    for ip in tracked.iter().map(|ip| go_ip(*ip)) {
        if !held.contains(&ip) {
            held.push(ip);
        }
    }
    let service = service.filter(|s| key.is_of(s));
    let managed = service.is_some_and(|s| is_managed(s, mode));
    let service = match service {
        Some(s) if managed && !lb_pools.is_empty() => s,
        // Gone, not Calico's, or no LB pool left (upstream checks that first): everything goes.
        _ => {
            if let Some(s) = service {
                if managed {
                    d.problems.push(Problem::NoLoadBalancerPools);
                    // Nothing held: the status may be another controller's, as upstream leaves it.
                    if !held.is_empty() {
                        d.ingress = ingress_of(s, &[]);
                    }
                } else if !held.is_empty() && is_load_balancer(s) {
                    // On a type change the API server has cleared the status already.
                    d.ingress = ingress_without(s, &held);
                }
            }
            d.release = held;
            return d;
        }
    };
    let request = match LbRequest::from_service(service, lb_pools) {
        Ok(r) => r,
        Err(e) => {
            d.problems.push(Problem::Request(e));
            return d;
        }
    };

    let in_status: Vec<IpAddr> = ingress_entries(service).iter().filter_map(entry_ip).collect();
    let mut kept: Vec<IpAddr> = Vec::with_capacity(2);
    for family in [Family::V4, Family::V6] {
        let of_family = held.iter().copied().filter(|ip| Family::of(*ip) == family);
        let (mut allowed, refused): (Vec<IpAddr>, Vec<IpAddr>) = of_family.partition(|ip| allowed_address(&request, family, *ip, lb_pools));
        d.release.extend(refused);
        // The address clients already see stays; `sort_by_key` is stable, so ties keep `tracked`'s order.
        allowed.sort_by_key(|ip| !in_status.contains(ip));
        let mut allowed = allowed.into_iter();
        if request.wants(family) {
            if let Some(first) = allowed.next() {
                kept.push(first);
            } else if let Some(ip) = request.address(family) {
                d.assign_specific.push(ip);
            } else {
                let requested = request.pools(family);
                let usable = match requested {
                    Some(nets) => nets.iter().any(|n| lb_pools.iter().any(|p| p.cidr == *n && !p.disabled)),
                    None => lb_pools.iter().any(|p| Family::of_net(&p.cidr) == family && !p.manual && !p.disabled),
                };
                if !usable {
                    d.problems.push(Problem::NoUsablePool(family));
                } else if family == Family::V4 {
                    d.assign_auto.v4 = 1;
                    d.assign_auto.v4_pools = requested.cloned();
                } else {
                    d.assign_auto.v6 = 1;
                    d.assign_auto.v6_pools = requested.cloned();
                }
            }
        }
        d.release.extend(allowed);
    }
    d.ingress = ingress_of(service, &kept);
    d
}

/// Whether a held address of `family` still matches the request: the requested address; else in
/// a requested pool of its family; else not in a Manual LB pool. An address whose pool was
/// deleted or stopped allowing LoadBalancer use is kept, as upstream keeps it: one pool edit
/// must not give every Service in it a new address.
fn allowed_address(request: &LbRequest, family: Family, ip: IpAddr, lb_pools: &[LbPool]) -> bool {
    if request.addresses.is_some() {
        return request.address(family) == Some(ip);
    }
    match request.pools(family) {
        Some(nets) => nets.iter().any(|n| n.contains(&ip)),
        None => !lb_pools.iter().any(|p| p.manual && p.cidr.contains(&ip)),
    }
}

/// [`decide`] on a whole view for the Service `key` names (as the caller found it by namespace
/// and name: `None` when gone) over what its handle holds (as [`by_handle`] gives it). The
/// controller acts on this decision and `leak-scan` reports its `release` as `lb-unwanted`, so
/// the two never disagree on which addresses a Service no longer wants: gone (or recreated,
/// another UID), no longer Calico's (type or class changed), asking for another address or
/// pool, a family it no longer wants, a surplus second address. A Service whose request cannot
/// be read keeps its addresses.
pub fn decide_held(service: Option<&Value>, key: &ServiceKey, mode: AssignMode, holding: &[LbHolding], lb_pools: &[LbPool]) -> Decision {
    let tracked: Vec<IpAddr> = holding.iter().map(|h| h.ip).collect();
    decide(service, key, mode, &tracked, lb_pools, true)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const UID: &str = "0C5E2A1B-8F3D-4A6E-9B7C-1D2E3F405060";

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| ip(s)).collect()
    }

    fn pool(name: &str, cidr: &str, manual: bool) -> LbPool {
        LbPool { name: name.into(), cidr: cidr.parse().unwrap(), manual, disabled: false }
    }

    /// An Automatic v4 and v6 pool and a Manual v4 and v6 pool.
    fn pools() -> Vec<LbPool> {
        vec![pool("lb-v4", "10.0.0.0/24", false), pool("lb-v6", "fd00::/120", false), pool("manual-v4", "10.1.0.0/24", true), pool("manual-v6", "fd01::/120", true)]
    }

    fn svc(annotations: Value, spec: Value, ingress: &[&str]) -> Value {
        let mut s = json!({"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": "web", "namespace": "shop", "uid": UID, "annotations": annotations},
            "spec": {"type": "LoadBalancer", "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack"},
            "status": {"loadBalancer": {"ingress": ingress.iter().map(|i| json!({"ip": i})).collect::<Vec<_>>()}}});
        for (k, v) in spec.as_object().unwrap() {
            s["spec"][k] = v.clone();
        }
        s
    }

    fn plain(ingress: &[&str]) -> Value {
        svc(json!({}), json!({}), ingress)
    }

    fn dual(ingress: &[&str]) -> Value {
        svc(json!({}), json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}), ingress)
    }

    fn run(s: &Value, tracked: &[&str]) -> Decision {
        decide(Some(s), &ServiceKey::of_service(s), AssignMode::AllServices, &ips(tracked), &pools(), true)
    }

    fn ingress(list: &[&str]) -> Option<Vec<Value>> {
        Some(list.iter().map(|i| json!({"ip": i})).collect())
    }

    // --- Configuration and is_managed (notes §1.1, §1.2) -------------------------------------

    #[test]
    fn assign_ips_is_read_exactly_and_an_unknown_value_is_an_error_not_a_mode() {
        assert_eq!(AssignMode::from_config("AllServices"), Ok(AssignMode::AllServices));
        assert_eq!(AssignMode::from_config("RequestedServicesOnly"), Ok(AssignMode::RequestedServicesOnly));
        for bad in ["", "allservices", "Requested", "None"] {
            let e = AssignMode::from_config(bad).unwrap_err();
            assert!(e.to_string().contains("no LoadBalancer address is assigned or released"), "{e}");
        }
    }

    #[test]
    fn only_load_balancer_services_are_managed() {
        for t in ["ClusterIP", "NodePort", "ExternalName", ""] {
            let s = svc(json!({}), json!({"type": t}), &[]);
            assert!(!is_managed(&s, AssignMode::AllServices) && !is_managed(&s, AssignMode::RequestedServicesOnly), "{t}");
        }
        let mut untyped = plain(&[]);
        untyped["spec"].as_object_mut().unwrap().remove("type");
        assert!(!is_managed(&untyped, AssignMode::AllServices));
    }

    #[test]
    fn all_services_manages_every_service_without_a_foreign_class() {
        assert!(is_managed(&plain(&[]), AssignMode::AllServices));
        assert!(is_managed(&svc(json!({}), json!({"loadBalancerClass": "calico"}), &[]), AssignMode::AllServices));
        assert!(!is_managed(&svc(json!({}), json!({"loadBalancerClass": "metallb.io/metallb"}), &[]), AssignMode::AllServices));
        assert!(!is_managed(&svc(json!({}), json!({"loadBalancerClass": ""}), &[]), AssignMode::AllServices), "an empty class is set, as Go's pointer is");
        assert!(is_managed(&svc(json!({}), json!({"loadBalancerClass": null}), &[]), AssignMode::AllServices));
    }

    #[test]
    fn requested_services_only_needs_class_calico_or_a_request_without_a_foreign_class() {
        let m = AssignMode::RequestedServicesOnly;
        assert!(!is_managed(&plain(&[]), m));
        assert!(is_managed(&svc(json!({}), json!({"loadBalancerClass": "calico"}), &[]), m));
        for key in [ANNOTATION_IPV4_POOLS, ANNOTATION_IPV6_POOLS, ANNOTATION_LOAD_BALANCER_IPS] {
            assert!(is_managed(&svc(json!({key: "[\"x\"]"}), json!({}), &[]), m), "{key}");
            assert!(!is_managed(&svc(json!({key: ""}), json!({}), &[]), m), "{key}: empty is no request");
            assert!(!is_managed(&svc(json!({key: "[\"x\"]"}), json!({"loadBalancerClass": "other"}), &[]), m), "{key} with a foreign class");
        }
        assert!(is_managed(&svc(json!({}), json!({"loadBalancerIP": "10.0.0.9"}), &[]), m));
        assert!(!is_managed(&svc(json!({}), json!({"loadBalancerIP": ""}), &[]), m));
        assert!(!is_managed(&svc(json!({"other": "x"}), json!({}), &[]), m));
    }

    #[test]
    fn lb_pools_are_pools_allowing_load_balancer_use_and_not_being_deleted() {
        let p = |spec: Value, meta: Value| LbPool::from_ip_pool(&json!({"metadata": meta, "spec": spec}));
        assert_eq!(
            p(json!({"cidr": "10.0.0.7/24", "allowedUses": ["LoadBalancer"], "assignmentMode": "Manual", "disabled": true}), json!({"name": "a"})),
            Some(LbPool { name: "a".into(), cidr: "10.0.0.0/24".parse().unwrap(), manual: true, disabled: true })
        );
        assert_eq!(p(json!({"cidr": "10.0.0.0/24", "allowedUses": ["LoadBalancer"]}), json!({"name": "a"})).map(|p| p.manual), Some(false));
        assert_eq!(p(json!({"cidr": "10.0.0.0/24", "allowedUses": ["Workload", "Tunnel"]}), json!({"name": "a"})), None);
        assert_eq!(p(json!({"cidr": "10.0.0.0/24"}), json!({"name": "a"})), None, "no allowedUses means Workload and Tunnel");
        assert_eq!(p(json!({"cidr": "10.0.0.0/24", "allowedUses": ["LoadBalancer"]}), json!({"name": "a", "deletionTimestamp": "2026-01-01T00:00:00Z"})), None);
        assert_eq!(p(json!({"cidr": "nope", "allowedUses": ["LoadBalancer"]}), json!({"name": "a"})), None);
    }

    // --- The request (notes §1.9) --------------------------------------------------------------

    fn request(annotations: Value, spec: Value) -> Result<LbRequest, RequestError> {
        LbRequest::from_service(&svc(annotations, spec, &[]), &pools())
    }

    #[test]
    fn pool_annotations_take_cidrs_masked_or_lb_pool_names_of_their_family() {
        let r = request(json!({ANNOTATION_IPV4_POOLS: "[\"10.0.0.9/24\", \"manual-v4\"]", ANNOTATION_IPV6_POOLS: "[\"lb-v6\"]"}), json!({})).unwrap();
        assert_eq!(r.v4_pools, Some(vec!["10.0.0.0/24".parse().unwrap(), "10.1.0.0/24".parse().unwrap()]));
        assert_eq!(r.v6_pools, Some(vec!["fd00::/120".parse().unwrap()]));
        assert_eq!(r.addresses, None);
        let e = request(json!({ANNOTATION_IPV4_POOLS: "[\"fd00::/120\"]"}), json!({})).unwrap_err();
        assert_eq!(e.category(), "pool_family");
        assert_eq!(request(json!({ANNOTATION_IPV6_POOLS: "[\"lb-v4\"]"}), json!({})).unwrap_err().category(), "pool_family");
        let e = request(json!({ANNOTATION_IPV4_POOLS: "[\"nosuch\"]"}), json!({})).unwrap_err();
        assert_eq!(e, RequestError::UnknownPool { annotation: ANNOTATION_IPV4_POOLS, entry: "nosuch".into() });
        assert_eq!(request(json!({ANNOTATION_IPV4_POOLS: "[\"10.9.0.0/24\"]"}), json!({})).unwrap_err().category(), "not_lb_pool");
        assert_eq!(request(json!({ANNOTATION_IPV4_POOLS: "[\"10.0.0.0/16\"]"}), json!({})).unwrap_err().category(), "not_lb_pool", "IPAM wants a pool's exact CIDR");
        for bad in ["10.0.0.0/24", "{\"a\": 1}", "[1]", "[\"a\""] {
            assert_eq!(request(json!({ANNOTATION_IPV4_POOLS: bad}), json!({})).unwrap_err().category(), "annotation_json", "{bad}");
        }
    }

    #[test]
    fn empty_null_and_empty_list_annotations_are_absent() {
        for empty in ["", "null", "[]"] {
            let r = request(json!({ANNOTATION_IPV4_POOLS: empty, ANNOTATION_IPV6_POOLS: empty, ANNOTATION_LOAD_BALANCER_IPS: empty}), json!({})).unwrap();
            assert_eq!((r.v4_pools, r.v6_pools, r.addresses), (None, None, None), "{empty:?}");
        }
    }

    #[test]
    fn load_balancer_ips_allow_one_address_per_family_in_an_lb_pool() {
        let r = request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"fd00::5\", \"10.0.0.5\"]"}), json!({})).unwrap();
        assert_eq!(r.addresses, Some(ips(&["fd00::5", "10.0.0.5"])), "in the order written");
        assert!(r.want_v4 && r.want_v6, "the addresses decide the families, not ipFamilies");
        let r = request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"::ffff:10.0.0.5\"]"}), json!({})).unwrap();
        assert_eq!(r.addresses, Some(ips(&["10.0.0.5"])), "an IPv4-mapped address is IPv4, as Go's To4");
        assert_eq!(request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.5\", \"10.0.0.6\"]"}), json!({})).unwrap_err(), RequestError::TooManyAddresses { v4: 2, v6: 0 });
        assert_eq!(request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"fd00::5\", \"fd00::6\"]"}), json!({})).unwrap_err().category(), "too_many_addresses");
        assert_eq!(request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.300\"]"}), json!({})).unwrap_err().category(), "bad_address");
        assert_eq!(request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.0/24\"]"}), json!({})).unwrap_err().category(), "bad_address");
        assert_eq!(request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"192.168.0.1\"]"}), json!({})).unwrap_err(), RequestError::AddressNotInPool { ip: ip("192.168.0.1") });
        assert!(request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.1.0.1\"]"}), json!({})).is_ok(), "a Manual pool's address may be asked for");
    }

    #[test]
    fn spec_load_balancer_ip_is_the_request_only_without_the_annotation() {
        let r = request(json!({}), json!({"loadBalancerIP": "10.0.0.7"})).unwrap();
        assert_eq!(r.addresses, Some(ips(&["10.0.0.7"])));
        let r = request(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.8\"]"}), json!({"loadBalancerIP": "10.0.0.7"})).unwrap();
        assert_eq!(r.addresses, Some(ips(&["10.0.0.8"])));
        assert_eq!(request(json!({}), json!({"loadBalancerIP": "nope"})).unwrap_err(), RequestError::BadAddress { source_field: "spec.loadBalancerIP", text: "nope".into() });
    }

    #[test]
    fn families_come_from_ip_families_one_for_single_stack_up_to_two_for_dual_stack() {
        let fam = |spec: Value| request(json!({}), spec).map(|r| (r.want_v4, r.want_v6));
        assert_eq!(fam(json!({"ipFamilies": ["IPv6"], "ipFamilyPolicy": "SingleStack"})), Ok((false, true)));
        assert_eq!(fam(json!({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "SingleStack"})), Ok((false, true)), "SingleStack: the first family");
        assert_eq!(fam(json!({"ipFamilies": ["IPv6", "IPv4"], "ipFamilyPolicy": "PreferDualStack"})), Ok((true, true)));
        assert_eq!(fam(json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"})), Ok((true, true)));
        assert_eq!(fam(json!({"ipFamilies": ["IPv4"], "ipFamilyPolicy": "PreferDualStack"})), Ok((true, false)), "a single-family cluster");
        assert_eq!(fam(json!({"ipFamilies": ["IPv4", "IPv4"], "ipFamilyPolicy": null})), Ok((true, false)));
        assert_eq!(fam(json!({"ipFamilies": []})).unwrap_err().category(), "ip_families");
        assert_eq!(fam(json!({"ipFamilies": null})).unwrap_err().category(), "ip_families");
        assert_eq!(fam(json!({"ipFamilies": ["IPv5"]})).unwrap_err().category(), "ip_families");
        assert_eq!(fam(json!({"ipFamilyPolicy": "TripleStack"})).unwrap_err(), RequestError::IpFamilyPolicy("TripleStack".into()));
    }

    // --- Handles and attributes (notes §1.5, §1.6) ---------------------------------------------

    #[test]
    fn handle_ids_are_upstreams_create_handle() {
        // Expected values computed independently with Python (hashlib.sha256, base64.urlsafe_b64encode
        // without padding, '-', '_', '.' removed); the first digest had two '_' in it.
        for (name, ns, uid, want) in [
            ("web", "shop", UID, "lb-hnsmBbAtcGbV99oI7edi5AEz5QlsYk1Kt8NOdlwic"),
            ("My-LB", "Default", "abc", "lb-dGhen0g44H86YFhjkCyrNI930oMchQ31SUHTWsf5Mas"),
        ] {
            assert_eq!(handle_id(name, ns, uid), want, "{name}/{ns}");
        }
        assert_eq!(handle_id("my-lb", "default", "ABC"), handle_id("My-LB", "Default", "abc"), "lowercased before hashing");
        assert_eq!(ServiceKey::of_service(&plain(&[])).handle, "lb-hnsmBbAtcGbV99oI7edi5AEz5QlsYk1Kt8NOdlwic");
    }

    #[test]
    fn allocation_attributes_are_service_namespace_type_and_a_go_utc_timestamp() {
        let now = crate::model::time::parse_rfc3339("2026-01-02T03:04:05.120Z").unwrap();
        let attrs = allocation_attributes("web", "shop", now);
        let get = |k: &str| attrs.get(k);
        assert_eq!(get("service"), Some("web"));
        assert_eq!(get("namespace"), Some("shop"));
        assert_eq!(get("type"), Some("LoadBalancer"));
        assert_eq!(get("timestamp"), Some("2026-01-02 03:04:05.12 +0000 UTC"));
        assert_eq!(get("node"), None, "no node: the IPAM GC leaves LB addresses alone");
        assert_eq!(attrs.len(), 4);
    }

    // --- The decision (notes §1.8, §1.10, §1.13) ------------------------------------------------

    #[test]
    fn a_new_service_gets_one_automatic_address_of_its_family_and_no_status_yet() {
        let d = run(&plain(&[]), &[]);
        assert_eq!(d.assign_auto, AutoAssign { v4: 1, v6: 0, v4_pools: None, v6_pools: None });
        assert!(d.release.is_empty() && d.assign_specific.is_empty() && d.ingress.is_none() && d.problems.is_empty(), "{d:?}");
    }

    #[test]
    fn a_held_address_is_kept_and_written_into_the_status_once() {
        let d = run(&plain(&[]), &["10.0.0.4"]);
        assert!(d.release.is_empty() && d.assign_auto.is_empty());
        assert_eq!(d.ingress, ingress(&["10.0.0.4"]));
        assert!(run(&plain(&["10.0.0.4"]), &["10.0.0.4"]).is_noop(), "in step");
    }

    #[test]
    fn the_status_is_compared_as_a_set_and_written_v4_first() {
        assert!(run(&dual(&["fd00::4", "10.0.0.4"]), &["10.0.0.4", "fd00::4"]).is_noop(), "order does not matter");
        assert_eq!(run(&dual(&[]), &["fd00::4", "10.0.0.4"]).ingress, ingress(&["10.0.0.4", "fd00::4"]));
        assert_eq!(run(&dual(&["10.0.0.4", "10.0.0.4"]), &["10.0.0.4", "fd00::4"]).ingress, ingress(&["10.0.0.4", "fd00::4"]), "a duplicate is no match");
        assert_eq!(run(&plain(&["10.0.0.4", "10.0.0.9"]), &["10.0.0.4"]).ingress, ingress(&["10.0.0.4"]), "an address Calico does not hold goes");
        let mut hostname = plain(&[]);
        hostname["status"]["loadBalancer"]["ingress"] = json!([{"hostname": "lb.example.com"}]);
        assert_eq!(run(&hostname, &["10.0.0.4"]).ingress, ingress(&["10.0.0.4"]));
    }

    #[test]
    fn a_dual_stack_service_whose_ipv6_failed_once_still_gets_one_fixing_upstreams_to16_bug() {
        let d = run(&dual(&["10.0.0.4"]), &["10.0.0.4"]);
        assert_eq!(d.assign_auto, AutoAssign { v4: 0, v6: 1, v4_pools: None, v6_pools: None });
        assert!(d.release.is_empty() && d.ingress.is_none());
        let d = run(&dual(&["fd00::4"]), &["fd00::4"]);
        assert_eq!((d.assign_auto.v4, d.assign_auto.v6), (1, 0), "the other direction worked upstream too");
    }

    #[test]
    fn surplus_addresses_of_one_family_are_released_keeping_the_one_in_the_status_fixing_12503() {
        // After a restart upstream assigned a fresh address beside the historical one and kept both.
        let d = run(&plain(&["10.0.0.9"]), &["10.0.0.4", "10.0.0.9"]);
        assert_eq!(d.release, ips(&["10.0.0.4"]));
        assert!(d.assign_auto.is_empty() && d.ingress.is_none());
        let d = run(&plain(&["10.0.0.4", "10.0.0.9"]), &["10.0.0.9", "10.0.0.4"]);
        assert_eq!(d.release, ips(&["10.0.0.4"]), "both shown: the first tracked stays");
        assert_eq!(d.ingress, ingress(&["10.0.0.9"]));
        let d = run(&dual(&[]), &["fd00::1", "10.0.0.4", "fd00::2", "10.0.0.5"]);
        assert_eq!(d.release, ips(&["10.0.0.5", "fd00::2"]));
        assert_eq!(d.ingress, ingress(&["10.0.0.4", "fd00::1"]));
    }

    #[test]
    fn a_family_the_service_no_longer_wants_is_released() {
        let d = run(&plain(&["10.0.0.4", "fd00::4"]), &["10.0.0.4", "fd00::4"]);
        assert_eq!(d.release, ips(&["fd00::4"]), "dual-stack changed to single-stack");
        assert_eq!(d.ingress, ingress(&["10.0.0.4"]));
    }

    #[test]
    fn nothing_is_decided_until_every_view_is_whole_fixing_12503() {
        let s = plain(&["10.0.0.9"]);
        let d = decide(Some(&s), &ServiceKey::of_service(&s), AssignMode::AllServices, &[], &[], false);
        assert!(d.is_noop() && d.problems.is_empty(), "no assignment beside an address the blocks have not shown yet, no release for a pool not listed yet");
    }

    #[test]
    fn load_balancer_ips_release_every_other_address_and_assign_the_missing_ones() {
        let s = svc(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.7\", \"fd00::7\"]"}), json!({}), &["10.0.0.4"]);
        let d = run(&s, &["10.0.0.4", "fd00::7"]);
        assert_eq!(d.release, ips(&["10.0.0.4"]));
        assert_eq!(d.assign_specific, ips(&["10.0.0.7"]));
        assert!(d.assign_auto.is_empty(), "no automatic address beside specific ones");
        assert_eq!(d.ingress, ingress(&["fd00::7"]));
        let s = svc(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.7\"]"}), json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "RequireDualStack"}), &[]);
        let d = run(&s, &["fd00::4"]);
        assert_eq!((d.release, d.assign_specific), (ips(&["fd00::4"]), ips(&["10.0.0.7"])), "the addresses decide the families");
    }

    #[test]
    fn a_changed_spec_load_balancer_ip_releases_the_old_address() {
        let s = svc(json!({}), json!({"loadBalancerIP": "10.0.0.8"}), &["10.0.0.7"]);
        let d = run(&s, &["10.0.0.7"]);
        assert_eq!((d.release, d.assign_specific), (ips(&["10.0.0.7"]), ips(&["10.0.0.8"])));
        assert_eq!(d.ingress, ingress(&[]));
    }

    #[test]
    fn pool_annotations_keep_only_addresses_in_the_named_pools_each_for_its_own_family() {
        let s = svc(json!({ANNOTATION_IPV4_POOLS: "[\"manual-v4\"]"}), json!({"ipFamilies": ["IPv4", "IPv6"], "ipFamilyPolicy": "PreferDualStack"}), &[]);
        let d = run(&s, &["10.0.0.4", "fd00::4"]);
        assert_eq!(d.release, ips(&["10.0.0.4"]), "the v4 address is not in the named pool; the v6 one stays (upstream released it)");
        assert_eq!(d.assign_auto, AutoAssign { v4: 1, v6: 0, v4_pools: Some(vec!["10.1.0.0/24".parse().unwrap()]), v6_pools: None });
        assert_eq!(d.ingress, ingress(&["fd00::4"]));
        let d = run(&s, &["10.1.0.4"]);
        assert_eq!(d.assign_auto, AutoAssign { v4: 0, v6: 1, v4_pools: None, v6_pools: None }, "v6 from the Automatic pools");
        assert!(d.release.is_empty());
    }

    #[test]
    fn without_annotations_manual_pool_addresses_are_released_and_those_of_a_gone_pool_kept() {
        let d = run(&plain(&[]), &["10.1.0.4"]);
        assert_eq!(d.release, ips(&["10.1.0.4"]), "upstream: no annotation but the address is from a Manual pool");
        assert_eq!(d.assign_auto.v4, 1);
        let d = run(&plain(&["10.9.0.4"]), &["10.9.0.4"]);
        assert!(d.release.is_empty() && d.assign_auto.is_empty(), "its pool is gone or no longer LB: kept, as upstream (one pool edit must not readdress every Service)");
        assert_eq!(d.ingress, None);
    }

    #[test]
    fn a_request_that_cannot_be_read_releases_nothing_assigns_nothing_and_keeps_the_status() {
        for bad in [json!({ANNOTATION_IPV4_POOLS: "not json"}), json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.5\", \"10.0.0.6\"]"}), json!({ANNOTATION_IPV4_POOLS: "[\"gone-pool\"]"})] {
            let s = svc(bad.clone(), json!({}), &["10.0.0.4", "10.0.0.9"]);
            let d = run(&s, &["10.0.0.4", "10.1.0.4"]);
            assert!(d.is_noop(), "{bad}: {d:?}");
            assert!(matches!(d.problems.as_slice(), [Problem::Request(_)]), "{bad}: {:?}", d.problems);
            assert!(!d.problems[0].to_string().is_empty());
        }
    }

    #[test]
    fn a_gone_service_releases_everything_and_writes_no_status() {
        let s = plain(&["10.0.0.4"]);
        let key = ServiceKey::of_service(&s);
        let d = decide(None, &key, AssignMode::AllServices, &ips(&["10.0.0.4", "fd00::4"]), &pools(), true);
        assert_eq!(d.release, ips(&["10.0.0.4", "fd00::4"]));
        assert!(d.ingress.is_none() && d.assign_auto.is_empty());
        let mut recreated = s.clone();
        recreated["metadata"]["uid"] = json!("another");
        let d = decide(Some(&recreated), &key, AssignMode::AllServices, &ips(&["10.0.0.4"]), &pools(), true);
        assert_eq!(d.release, ips(&["10.0.0.4"]), "a Service recreated under the same name is another Service");
        assert!(d.ingress.is_none(), "and its status is its own");
    }

    #[test]
    fn a_service_no_longer_managed_loses_only_calicos_status_entries() {
        let mut s = svc(json!({}), json!({"loadBalancerClass": "metallb"}), &["10.0.0.4", "192.168.9.9"]);
        s["status"]["loadBalancer"]["ingress"].as_array_mut().unwrap().push(json!({"hostname": "x.example.com"}));
        let d = run(&s, &["10.0.0.4"]);
        assert_eq!(d.release, ips(&["10.0.0.4"]));
        assert_eq!(d.ingress, Some(vec![json!({"ip": "192.168.9.9"}), json!({"hostname": "x.example.com"})]));
        assert!(d.assign_auto.is_empty());
        assert_eq!(run(&s, &[]), Decision::none(&ServiceKey::of_service(&s)), "nothing held: the status is another controller's");
        let nodeport = svc(json!({}), json!({"type": "NodePort"}), &["10.0.0.4"]);
        let d = run(&nodeport, &["10.0.0.4"]);
        assert_eq!((d.release, d.ingress), (ips(&["10.0.0.4"]), None), "a type change: the API server cleared the status");
        let requested_only = decide(Some(&plain(&["10.0.0.4"])), &ServiceKey::of_service(&s), AssignMode::RequestedServicesOnly, &ips(&["10.0.0.4"]), &pools(), true);
        assert_eq!((requested_only.release, requested_only.ingress), (ips(&["10.0.0.4"]), ingress(&[])));
    }

    #[test]
    fn without_lb_pools_held_addresses_are_released_and_an_empty_status_is_written() {
        let s = plain(&["10.0.0.4"]);
        let d = decide(Some(&s), &ServiceKey::of_service(&s), AssignMode::AllServices, &ips(&["10.0.0.4"]), &[], true);
        assert_eq!((d.release, d.ingress), (ips(&["10.0.0.4"]), ingress(&[])));
        assert_eq!(d.problems, vec![Problem::NoLoadBalancerPools]);
        let d = decide(Some(&s), &ServiceKey::of_service(&s), AssignMode::AllServices, &[], &[], true);
        assert!(d.is_noop(), "nothing held: the status is left alone (another controller may own it)");
        assert_eq!(d.problems, vec![Problem::NoLoadBalancerPools]);
        let foreign = svc(json!({}), json!({"loadBalancerClass": "metallb"}), &["10.0.0.4", "192.168.9.9"]);
        let d = decide(Some(&foreign), &ServiceKey::of_service(&foreign), AssignMode::AllServices, &ips(&["10.0.0.4"]), &[], true);
        assert_eq!(d.ingress, ingress(&["192.168.9.9"]), "upstream wrote an empty list here, wiping the other controller's address");
    }

    #[test]
    fn a_family_no_enabled_pool_can_give_is_not_auto_assigned_but_reported() {
        let v4_only = vec![pool("lb-v4", "10.0.0.0/24", false), pool("manual-v6", "fd01::/120", true)];
        let s = dual(&[]);
        let d = decide(Some(&s), &ServiceKey::of_service(&s), AssignMode::AllServices, &[], &v4_only, true);
        assert_eq!((d.assign_auto.v4, d.assign_auto.v6), (1, 0));
        assert_eq!(d.problems, vec![Problem::NoUsablePool(Family::V6)]);
        assert_eq!(d.problems[0].category(), "no_usable_pool");
        let mut disabled = pools();
        disabled[0].disabled = true;
        let d = decide(Some(&plain(&[])), &ServiceKey::of_service(&s), AssignMode::AllServices, &[], &disabled, true);
        assert!(d.assign_auto.is_empty() && d.problems == vec![Problem::NoUsablePool(Family::V4)]);
        let d = decide(Some(&plain(&["10.0.0.4"])), &ServiceKey::of_service(&s), AssignMode::AllServices, &ips(&["10.0.0.4"]), &disabled, true);
        assert!(d.is_noop(), "a disabled pool keeps its addresses: {d:?}");
    }

    // --- What the blocks hold, and the decision over it (shared with leak-scan) ---------------

    fn block(affinity: &str, slots: &[(u32, Value)]) -> crate::model::IpamBlock {
        let mut allocations = vec![Value::Null; 4];
        let mut attributes = Vec::new();
        for (i, (ordinal, attr)) in slots.iter().enumerate() {
            allocations[*ordinal as usize] = json!(i);
            attributes.push(attr.clone());
        }
        serde_json::from_value(json!({"metadata": {"name": "10-0-0-4-30"}, "spec": {"cidr": "10.0.0.4/30", "affinity": affinity,
            "allocations": allocations, "unallocated": [], "attributes": attributes, "sequenceNumberForAllocation": {"1": 7}}}))
        .unwrap()
    }

    fn lb_attr(handle: &str, name: &str) -> Value {
        json!({"handle_id": handle, "secondary": {"namespace": "shop", "service": name, "type": "LoadBalancer", "timestamp": "t"}})
    }

    #[test]
    fn holdings_are_the_allocations_the_controller_owns_in_blocks_no_host_owns() {
        let slots = [
            (0, lb_attr("lb-a", "web")),
            (1, json!({"handle_id": "lb-b", "secondary": {"namespace": "shop", "service": "api"}})),
            (2, json!({"handle_id": "k8s-pod-network.x", "secondary": {"namespace": "shop", "pod": "p", "node": "n1"}})),
            (3, json!({"handle_id": "lb-c", "secondary": {"namespace": "shop", "service": "old"}, "releasedAt": "2026-01-01T00:00:00Z"})),
        ];
        let b = block("virtual:load-balancer", &slots);
        let held = holdings(&BlockView::from_block(&b).unwrap());
        let got: Vec<(&str, &str, IpAddr, u64)> = held.iter().map(|h| (h.key.handle.as_str(), h.key.name.as_str(), h.ip, h.sequence)).collect();
        assert_eq!(got, vec![("lb-a", "web", ip("10.0.0.4"), 0), ("lb-b", "api", ip("10.0.0.5"), 7)], "typed or under an lb- handle; not a pod's, not cooling down");
        assert_eq!(held[0].block, "10-0-0-4-30");
        let untyped = block("", &[(0, json!({"handle_id": "other", "secondary": {"namespace": "shop", "service": "web", "type": "LoadBalancer"}})), (1, json!({"handle_id": "lb-d", "secondary": {"service": "web"}}))]);
        assert_eq!(holdings(&BlockView::from_block(&untyped).unwrap()).len(), 1, "a block without affinity counts; a holding names its namespace");
        let host = block("host:n1", &slots);
        assert!(holdings(&BlockView::from_block(&host).unwrap()).is_empty(), "a host's block holds no LB address");
        let raw = serde_json::to_value(&b).unwrap();
        assert_eq!(unreadable_block_handles(&raw), ["lb-a", "lb-b", "k8s-pod-network.x", "lb-c"]);
        assert!(unreadable_block_handles(&serde_json::to_value(&host).unwrap()).is_empty());
    }

    #[test]
    fn by_handle_groups_in_block_then_ordinal_order_whatever_the_input_order() {
        let h = |handle: &str, cidr: &str, ordinal: u32| {
            let cidr: IpNet = cidr.parse().unwrap();
            LbHolding { key: ServiceKey { namespace: "shop".into(), name: handle.into(), handle: handle.into() }, ip: ordinal_to_ip(&cidr, ordinal), block: String::new(), cidr, ordinal, sequence: 0 }
        };
        let grouped = by_handle(vec![h("lb-a", "10.0.0.8/30", 0), h("lb-b", "10.0.0.4/30", 1), h("lb-a", "10.0.0.4/30", 3), h("lb-a", "10.0.0.4/30", 2)]);
        let a: Vec<IpAddr> = grouped["lb-a"].1.iter().map(|h| h.ip).collect();
        assert_eq!(a, ips(&["10.0.0.6", "10.0.0.7", "10.0.0.8"]));
        assert_eq!(grouped["lb-b"].1.len(), 1);
    }

    /// What `decide_held` releases of `held` (addresses under `s`'s handle) for `service`.
    fn unwanted(service: Option<&Value>, s: &Value, mode: AssignMode, held: &[&str]) -> Vec<IpAddr> {
        let key = ServiceKey::of_service(s);
        let holding: Vec<LbHolding> = ips(held)
            .into_iter()
            .map(|ip| LbHolding { key: key.clone(), ip, block: String::new(), cidr: IpNet::new(ip, if ip.is_ipv4() { 24 } else { 120 }).unwrap().trunc(), ordinal: 0, sequence: 0 })
            .collect();
        decide_held(service, &key, mode, &holding, &pools()).release
    }

    #[test]
    fn decide_held_releases_exactly_what_the_service_no_longer_wants() {
        let s = plain(&["10.0.0.4"]);
        let all = AssignMode::AllServices;
        assert!(unwanted(Some(&s), &s, all, &["10.0.0.4"]).is_empty(), "still wanted");
        assert_eq!(unwanted(None, &s, all, &["10.0.0.4"]), ips(&["10.0.0.4"]), "the Service is gone");
        let cluster_ip = svc(json!({}), json!({"type": "ClusterIP"}), &[]);
        assert_eq!(unwanted(Some(&cluster_ip), &s, all, &["10.0.0.4"]), ips(&["10.0.0.4"]), "a ClusterIP Service now");
        let other_class = svc(json!({}), json!({"loadBalancerClass": "metallb.io/metallb"}), &["10.0.0.4"]);
        assert_eq!(unwanted(Some(&other_class), &s, all, &["10.0.0.4"]), ips(&["10.0.0.4"]), "another controller's class now");
        let asks_other = svc(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.9\"]"}), json!({}), &["10.0.0.4"]);
        assert_eq!(unwanted(Some(&asks_other), &s, all, &["10.0.0.4"]), ips(&["10.0.0.4"]), "it asks for another address");
        let other_pool = svc(json!({ANNOTATION_IPV4_POOLS: "[\"manual-v4\"]"}), json!({}), &["10.0.0.4"]);
        assert_eq!(unwanted(Some(&other_pool), &s, all, &["10.0.0.4"]), ips(&["10.0.0.4"]), "it asks for another pool");
        assert_eq!(unwanted(Some(&s), &s, all, &["10.0.0.4", "10.0.0.5"]), ips(&["10.0.0.5"]), "a surplus second address of one family");
        assert_eq!(unwanted(Some(&s), &s, all, &["fd00::4"]), ips(&["fd00::4"]), "a family it does not want");
        let mut recreated = s.clone();
        recreated["metadata"]["uid"] = json!("another");
        assert_eq!(unwanted(Some(&recreated), &s, all, &["10.0.0.4"]), ips(&["10.0.0.4"]), "another Service of that name");
        let bad = svc(json!({ANNOTATION_IPV4_POOLS: "oops"}), json!({}), &["10.0.0.4"]);
        assert!(unwanted(Some(&bad), &s, all, &["10.0.0.4"]).is_empty(), "an unreadable request keeps its addresses");
    }

    #[test]
    fn decide_held_in_requested_services_only_keeps_only_requesting_services_addresses() {
        let m = AssignMode::RequestedServicesOnly;
        let s = plain(&["10.0.0.4"]);
        assert_eq!(unwanted(Some(&s), &s, m, &["10.0.0.4"]), ips(&["10.0.0.4"]), "asks for nothing: not managed");
        let calico = svc(json!({}), json!({"loadBalancerClass": "calico"}), &["10.0.0.4"]);
        assert!(unwanted(Some(&calico), &calico, m, &["10.0.0.4"]).is_empty());
        let pinned = svc(json!({ANNOTATION_LOAD_BALANCER_IPS: "[\"10.0.0.4\"]"}), json!({}), &["10.0.0.4"]);
        assert!(unwanted(Some(&pinned), &pinned, m, &["10.0.0.4"]).is_empty());
    }

    #[test]
    fn a_slim_service_keeps_only_the_fields_the_decision_and_the_status_write_read() {
        let v = json!({
            "metadata": {"name": "web", "namespace": "default", "uid": "u", "annotations": {"projectcalico.org/ipv4pools": "[]", "other": "x"}, "managedFields": [{}]},
            "spec": {"type": "LoadBalancer", "ports": [{"port": 80}], "selector": {"a": "b"}, "ipFamilies": ["IPv4"]},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.1"}]}}
        });
        let s = slim_service(&v, "7");
        assert_eq!(s["metadata"]["annotations"], json!({"projectcalico.org/ipv4pools": "[]"}));
        assert_eq!(s["metadata"]["resourceVersion"], "7");
        assert!(s["spec"].get("ports").is_none() && s["metadata"].get("managedFields").is_none());
        assert_eq!(s["status"]["loadBalancer"]["ingress"][0]["ip"], "192.0.2.1");
        assert_eq!(ServiceKey::of_service(&s), ServiceKey::of_service(&v), "the same Service for the decision");
    }

    // --- Properties -----------------------------------------------------------------------------

    fn arb_service() -> impl Strategy<Value = Value> {
        let pools_ann = prop_oneof![Just(None), Just(Some("[\"lb-v4\"]")), Just(Some("[\"manual-v4\"]")), Just(Some("[\"lb-v4\", \"10.1.0.0/24\"]")), Just(Some("oops"))];
        let pools6_ann = prop_oneof![Just(None), Just(Some("[\"manual-v6\"]")), Just(Some("[\"fd00::/120\"]")), Just(Some("[]"))];
        let ips_ann = prop_oneof![4 => Just(None), 1 => Just(Some("[\"10.0.0.1\"]")), 1 => Just(Some("[\"10.1.0.2\", \"fd00::1\"]")), 1 => Just(Some("[\"10.0.0.1\", \"10.0.0.2\"]"))];
        let spec_ip = prop_oneof![4 => Just(None), 1 => Just(Some("10.0.0.2")), 1 => Just(Some("fd01::1"))];
        let families = prop_oneof![Just(json!(["IPv4"])), Just(json!(["IPv6"])), Just(json!(["IPv4", "IPv6"])), Just(json!(["IPv6", "IPv4"]))];
        let policy = prop_oneof![Just("SingleStack"), Just("PreferDualStack"), Just("RequireDualStack")];
        let class = prop_oneof![4 => Just(None), 1 => Just(Some("calico")), 1 => Just(Some("other"))];
        let kind = prop_oneof![6 => Just("LoadBalancer"), 1 => Just("ClusterIP")];
        let status = proptest::collection::vec(arb_ip(), 0..3);
        (pools_ann, pools6_ann, ips_ann, spec_ip, families, policy, class, kind, status).prop_map(|(p4, p6, lbips, spec_ip, families, policy, class, kind, status)| {
            let mut ann = serde_json::Map::new();
            for (k, v) in [(ANNOTATION_IPV4_POOLS, p4), (ANNOTATION_IPV6_POOLS, p6), (ANNOTATION_LOAD_BALANCER_IPS, lbips)] {
                if let Some(v) = v {
                    ann.insert(k.into(), json!(v));
                }
            }
            let status: Vec<String> = status.iter().map(IpAddr::to_string).collect();
            let mut s = svc(Value::Object(ann), json!({"ipFamilies": families, "ipFamilyPolicy": policy, "type": kind}), &status.iter().map(String::as_str).collect::<Vec<_>>());
            if let Some(ip) = spec_ip {
                s["spec"]["loadBalancerIP"] = json!(ip);
            }
            if let Some(c) = class {
                s["spec"]["loadBalancerClass"] = json!(c);
            }
            s
        })
    }

    fn arb_ip() -> impl Strategy<Value = IpAddr> {
        prop_oneof![
            (0u8..2, 0u8..4).prop_map(|(net, host)| IpAddr::from([10, net, 0, host])),
            (0u16..2, 0u16..4).prop_map(|(net, host)| IpAddr::from([0xfd00 + net, 0, 0, 0, 0, 0, 0, host])),
            Just(ip("10.9.0.1")),
        ]
    }

    fn arb_pools() -> impl Strategy<Value = Vec<LbPool>> {
        proptest::sample::subsequence(pools(), 0..=4).prop_flat_map(|ps| {
            let n = ps.len();
            (Just(ps), proptest::collection::vec(proptest::bool::weighted(0.2), n)).prop_map(|(mut ps, off)| {
                ps.iter_mut().zip(off).for_each(|(p, d)| p.disabled = d);
                ps
            })
        })
    }

    /// What the shell does with a decision: releases, writes the status, assigns (an automatic
    /// address is the first free one of the first pool IPAM could use).
    fn apply(d: &Decision, service: &mut Value, tracked: &[IpAddr], lb_pools: &[LbPool]) -> Vec<IpAddr> {
        let mut after: Vec<IpAddr> = tracked.iter().copied().filter(|ip| !d.release.contains(ip)).collect();
        if let Some(ingress) = &d.ingress {
            service["status"]["loadBalancer"]["ingress"] = Value::Array(ingress.clone());
        }
        after.extend(&d.assign_specific);
        for (family, n, requested) in [(Family::V4, d.assign_auto.v4, &d.assign_auto.v4_pools), (Family::V6, d.assign_auto.v6, &d.assign_auto.v6_pools)] {
            if n == 0 {
                continue;
            }
            let from = lb_pools.iter().find(|p| !p.disabled && Family::of_net(&p.cidr) == family && requested.as_ref().map_or(!p.manual, |r| r.contains(&p.cidr))).expect("auto assigned from a usable pool");
            let free = from.cidr.hosts().find(|ip| !after.contains(ip)).unwrap();
            after.push(free);
        }
        after
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn decisions_are_consistent_bounded_and_reach_a_fixed_point(
            mut s in arb_service(), tracked in proptest::collection::vec(arb_ip(), 0..5), lb_pools in arb_pools(),
            requested_only in any::<bool>(), gone in proptest::bool::weighted(0.1),
        ) {
            let mode = if requested_only { AssignMode::RequestedServicesOnly } else { AssignMode::AllServices };
            let key = ServiceKey::of_service(&s);
            let d = decide((!gone).then_some(&s), &key, mode, &tracked, &lb_pools, true);
            for ip in &d.release {
                prop_assert!(tracked.contains(ip), "released {} it does not hold", ip);
                prop_assert!(!d.assign_specific.contains(ip), "released and assigned {}", ip);
            }
            for ip in &d.assign_specific {
                prop_assert!(!tracked.contains(ip), "assigns {} it holds", ip);
            }
            if matches!(d.problems.first(), Some(Problem::Request(_))) {
                prop_assert!(d.is_noop(), "a request error changed something: {:?}", d);
            }
            let after = apply(&d, &mut s, &tracked, &lb_pools);
            let mut distinct = after.clone();
            distinct.sort();
            distinct.dedup();
            let v4 = distinct.iter().filter(|ip| ip.is_ipv4()).count();
            let v6 = distinct.len() - v4;
            let request_error = matches!(d.problems.first(), Some(Problem::Request(_)));
            if !request_error {
                prop_assert!(v4 <= 1 && v6 <= 1, "wants {:?}", distinct);
            }
            if gone || !is_managed(&s, mode) || lb_pools.is_empty() {
                prop_assert!(after.is_empty(), "kept {:?} for a Service Calico does not manage", after);
            }
            // Applied, the allocations are a fixed point; the status follows one round later.
            let again = decide((!gone).then_some(&s), &key, mode, &after, &lb_pools, true);
            prop_assert!(again.release.is_empty() && again.assign_specific.is_empty() && again.assign_auto.is_empty(), "second round: {:?}", again);
            if d.assign_specific.is_empty() && d.assign_auto.is_empty() {
                prop_assert!(again.is_noop(), "nothing assigned, yet the second round does {:?}", again);
            }
            if let Some(ingress) = &again.ingress {
                s["status"]["loadBalancer"]["ingress"] = Value::Array(ingress.clone());
            }
            let third = decide((!gone).then_some(&s), &key, mode, &after, &lb_pools, true);
            prop_assert!(third.is_noop(), "third round: {:?}", third);
            // What leak-scan asks of the kept addresses, as holdings: none is unwanted.
            let holding: Vec<LbHolding> = after.iter().map(|ip| LbHolding { key: key.clone(), ip: *ip, block: String::new(), cidr: IpNet::from(*ip), ordinal: 0, sequence: 0 }).collect();
            let scanned = decide_held((!gone).then_some(&s), &key, mode, &by_handle(holding).remove(&key.handle).map(|(_, h)| h).unwrap_or_default(), &lb_pools);
            prop_assert!(scanned.release.is_empty(), "kept {:?} but leak-scan would call {:?} unwanted", after, scanned.release);
        }

        #[test]
        fn an_unsynced_view_never_changes_anything(s in arb_service(), tracked in proptest::collection::vec(arb_ip(), 0..5), lb_pools in arb_pools()) {
            let d = decide(Some(&s), &ServiceKey::of_service(&s), AssignMode::AllServices, &tracked, &lb_pools, false);
            prop_assert!(d.is_noop());
        }
    }
}
