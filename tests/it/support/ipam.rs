//! Building Calico IPAM state in a test cluster the way the CNI plugin leaves it: blocks with
//! allocations and attributes, the handles that count them, and host affinities. Test plumbing.

use calico_kube_controllers::model::names::{affinity_name, cidr_to_name, handle_object_name};
use kube::Client;
use kube::api::{Api, DynamicObject, PostParams};
use serde_json::{Value, json};

use crate::support::controller::calico;

/// One allocation: ordinal, handle ID, and the attribute's `secondary` map.
pub struct Alloc<'a> {
    pub ordinal: u32,
    pub handle: &'a str,
    pub secondary: Value,
}

/// A pod allocation's attributes, as the CNI plugin writes them.
pub fn pod_attrs(namespace: &str, pod: &str, node: &str) -> Value {
    json!({"namespace": namespace, "pod": pod, "node": node, "timestamp": "2026-01-02 03:04:05.1 +0000 UTC"})
}

/// A tunnel address's attributes (`ipipTunnelAddress`, `vxlanTunnelAddress`, `wireguardTunnelAddress`).
pub fn tunnel_attrs(node: &str, kind: &str) -> Value {
    json!({"node": node, "type": kind})
}

pub struct Ipam {
    pub blocks: Api<DynamicObject>,
    pub handles: Api<DynamicObject>,
    pub affinities: Api<DynamicObject>,
}

impl Ipam {
    pub fn new(client: &Client) -> Self {
        Ipam {
            blocks: Api::all_with(client.clone(), &calico("IPAMBlock", "ipamblocks")),
            handles: Api::all_with(client.clone(), &calico("IPAMHandle", "ipamhandles")),
            affinities: Api::all_with(client.clone(), &calico("BlockAffinity", "blockaffinities")),
        }
    }

    /// Creates the block `cidr` (affine to `node` if given, with its confirmed BlockAffinity)
    /// holding `allocs`, and creates or extends each allocation's handle. Returns the block name.
    pub async fn block(&self, cidr: &str, node: Option<&str>, allocs: &[Alloc<'_>]) -> String {
        let block = block_object(cidr, node, allocs);
        let name = block.metadata.name.clone().expect("a named block");
        self.blocks.create(&PostParams::default(), &block).await.unwrap_or_else(|e| panic!("creating block {cidr}: {e}"));
        let mut counts: Vec<(&str, u32)> = Vec::new();
        for a in allocs {
            match counts.iter_mut().find(|(h, _)| *h == a.handle) {
                Some((_, n)) => *n += 1,
                None => counts.push((a.handle, 1)),
            }
        }
        for (handle, n) in counts {
            let object_name = handle_object_name(handle);
            match self.handles.get_opt(&object_name).await.expect("reading a handle") {
                Some(mut h) => {
                    h.data["spec"]["block"][cidr] = json!(n);
                    self.handles.replace(&object_name, &PostParams::default(), &h).await.expect("extending a handle");
                }
                None => {
                    let h = handle_object(handle, cidr, n);
                    self.handles.create(&PostParams::default(), &h).await.unwrap_or_else(|e| panic!("creating handle {handle:?}: {e}"));
                }
            }
        }
        if let Some(node) = node {
            self.affinities.create(&PostParams::default(), &affinity_object(node, cidr)).await.expect("creating an affinity");
        }
        name
    }

    /// The block's `spec`, or `None` once it is deleted.
    pub async fn block_spec(&self, name: &str) -> Option<Value> {
        self.blocks.get_opt(name).await.expect("reading a block").map(|b| b.data["spec"].clone())
    }

    pub async fn handle_exists(&self, handle: &str) -> bool {
        self.handles.get_opt(&handle_object_name(handle)).await.expect("reading a handle").is_some()
    }

    pub async fn affinity_exists(&self, node: &str, cidr: &str) -> bool {
        let net: ipnet::IpNet = cidr.parse().expect("a CIDR");
        self.affinities.get_opt(&affinity_name(node, &net)).await.expect("reading an affinity").is_some()
    }

    /// Names of every object of the three IPAM kinds.
    pub async fn all_names(&self) -> Vec<String> {
        let mut out = Vec::new();
        for api in [&self.blocks, &self.handles, &self.affinities] {
            let list = api.list(&Default::default()).await.expect("listing IPAM objects");
            out.extend(list.items.into_iter().filter_map(|o| o.metadata.name));
        }
        out
    }
}

/// The IPAMBlock `cidr` (affine to `node` if given) holding `allocs`, as the CNI writes one:
/// attributes in allocation order, per-ordinal sequence numbers, the rest unallocated.
pub fn block_object(cidr: &str, node: Option<&str>, allocs: &[Alloc<'_>]) -> DynamicObject {
    let net: ipnet::IpNet = cidr.parse().expect("a CIDR");
    let size = 1u32 << (u32::from(net.max_prefix_len()) - u32::from(net.prefix_len()));
    let mut allocations = vec![Value::Null; size as usize];
    let mut attributes = Vec::new();
    let mut seq = serde_json::Map::new();
    for (i, a) in allocs.iter().enumerate() {
        allocations[a.ordinal as usize] = json!(i);
        attributes.push(json!({"handle_id": a.handle, "secondary": a.secondary}));
        seq.insert(a.ordinal.to_string(), json!(i + 1));
    }
    let unallocated: Vec<u32> = (0..size).filter(|o| !allocs.iter().any(|a| a.ordinal == *o)).collect();
    let affinity = node.map(|n| format!("host:{n}"));
    DynamicObject::new(&cidr_to_name(&net), &calico("IPAMBlock", "ipamblocks")).data(json!({"spec": {
        "cidr": cidr, "affinity": affinity, "strictAffinity": false, "deleted": false,
        "allocations": allocations, "unallocated": unallocated, "attributes": attributes,
        "sequenceNumber": allocs.len() + 1, "sequenceNumberForAllocation": seq,
    }}))
}

/// The IPAMHandle `id` counting `count` addresses in block `cidr`.
pub fn handle_object(id: &str, cidr: &str, count: u32) -> DynamicObject {
    DynamicObject::new(&handle_object_name(id), &calico("IPAMHandle", "ipamhandles"))
        .data(json!({"spec": {"handleID": id, "block": {cidr: count}, "deleted": false}}))
}

/// `node`'s confirmed host affinity for block `cidr`.
pub fn affinity_object(node: &str, cidr: &str) -> DynamicObject {
    let net: ipnet::IpNet = cidr.parse().expect("a CIDR");
    DynamicObject::new(&affinity_name(node, &net), &calico("BlockAffinity", "blockaffinities"))
        .data(json!({"spec": {"cidr": cidr, "node": node, "state": "confirmed", "type": "host", "deleted": "false"}}))
}

/// Adds `alloc` to the existing block `name` the way the CNI does, as a compare-and-swap
/// update retried on conflict (the block's handle object is not touched). Returns the
/// conflicts met on the way.
pub async fn add_allocation(blocks: &Api<DynamicObject>, name: &str, alloc: &Alloc<'_>) -> u32 {
    let mut conflicts = 0;
    loop {
        let mut block = blocks.get(name).await.expect("reading the block");
        let spec = &mut block.data["spec"];
        let ordinal = alloc.ordinal;
        assert!(spec["allocations"][ordinal as usize].is_null(), "ordinal {ordinal} is taken: {spec}");
        let attrs = spec["attributes"].as_array_mut().expect("attributes");
        attrs.push(json!({"handle_id": alloc.handle, "secondary": alloc.secondary}));
        let index = attrs.len() - 1;
        spec["allocations"][ordinal as usize] = json!(index);
        let unallocated: Vec<Value> =
            spec["unallocated"].as_array().expect("unallocated").iter().filter(|o| o.as_u64() != Some(u64::from(ordinal))).cloned().collect();
        spec["unallocated"] = Value::Array(unallocated);
        let seq = spec["sequenceNumber"].as_u64().unwrap_or(0) + 1;
        spec["sequenceNumber"] = json!(seq);
        if !spec["sequenceNumberForAllocation"].is_object() {
            spec["sequenceNumberForAllocation"] = json!({});
        }
        spec["sequenceNumberForAllocation"][ordinal.to_string()] = json!(seq);
        match blocks.replace(name, &PostParams::default(), &block).await {
            Ok(_) => return conflicts,
            Err(kube::Error::Api(status)) if status.code == 409 && conflicts < 20 => conflicts += 1,
            Err(e) => panic!("adding ordinal {ordinal} to block {name} ({conflicts} conflicts before): {e}"),
        }
    }
}
