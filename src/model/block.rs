//! IPAMBlock: one CIDR's allocation table, as the KDD CRD (and, with aliases, etcd) stores it.
//!
//! Owns the wire type, the checks that turn it into a trusted [`BlockView`], and calicoctl's block
//! validator (SPEC §7.1 step 8), which must hold after every write we make.

use std::borrow::Cow;
use std::collections::BTreeMap;

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::meta::Object;
use super::names::{block_size, cidr_to_name};
use super::time::{parse_rfc3339, Millis};
use super::InvalidObject;

pub type IpamBlock = Object<IpamBlockSpec>;

pub const KIND: &str = "IPAMBlock";
/// Calico pre-allocates Windows' reserved addresses to this handle; they are never garbage.
pub const WINDOWS_RESERVED_HANDLE: &str = "windows-reserved-ipam-handle";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamBlockSpec {
    pub cidr: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<String>,
    #[serde(default, alias = "affinity_claim_time", skip_serializing_if = "Option::is_none")]
    pub affinity_claim_time: Option<String>,
    #[serde(default)]
    pub allocations: Vec<Option<u32>>,
    #[serde(default)]
    pub unallocated: Vec<u32>,
    #[serde(default)]
    pub attributes: Vec<AllocationAttribute>,
    #[serde(default)]
    pub sequence_number: u64,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub sequence_number_for_allocation: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    /// Required by the v1 CRD, deprecated and ignored by Calico.
    #[serde(default)]
    pub strict_affinity: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct AllocationAttribute {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub handle_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secondary: Option<AttrMap>,
    #[serde(default, rename = "alternateOwnerAttrs", skip_serializing_if = "Option::is_none")]
    pub alternate_owner_attrs: Option<BTreeMap<String, String>>,
    #[serde(default, rename = "releasedAt", skip_serializing_if = "Option::is_none")]
    pub released_at: Option<String>,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

impl AllocationAttribute {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.secondary.as_ref()?.get(key).filter(|v| !v.is_empty())
    }
    /// Whether `secondary` has the key at all, even with an empty value.
    pub fn has_attr(&self, key: &str) -> bool {
        self.secondary.as_ref().is_some_and(|m| m.get(key).is_some())
    }
    /// The attributes the GC reads, in one pass over `secondary`: each as [`Self::attr`] reads
    /// it ("" when absent or empty), and whether a `vmi-name` key is there at all.
    pub fn owner(&self) -> OwnerAttrs<'_> {
        let mut o = [None::<&str>; 5];
        for (k, v) in self.secondary.iter().flat_map(AttrMap::iter) {
            let i = match k {
                "namespace" => 0,
                "pod" => 1,
                "node" => 2,
                "type" => 3,
                "vmi-name" => 4,
                _ => continue,
            };
            // The first of a repeated key, as `AttrMap::get` finds it.
            o[i].get_or_insert(v);
        }
        let s = |i: usize| o[i].unwrap_or("");
        OwnerAttrs { namespace: s(0), pod: s(1), node: s(2), alloc_type: s(3), vmi: s(4), vm: o[4].is_some() }
    }
}

/// What an allocation's attributes say about its owner, as the GC reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OwnerAttrs<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub node: &'a str,
    pub alloc_type: &'a str,
    pub vmi: &'a str,
    /// A `vmi-name` key is present, even an empty one.
    pub vm: bool,
}

/// A small string map in input order: an allocation's `secondary` has four or five keys. Keys
/// and values are kept back to back in one string with where each ends, two allocations per
/// address where a vector of `String` pairs takes one per key and value (and a `BTreeMap` node
/// half a kilobyte), and a reader touches one buffer instead of eight.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct AttrMap {
    text: Box<str>,
    /// End offsets in `text`: key, value, key, value...
    ends: Box<[u32]>,
}

impl AttrMap {
    /// The pairs in their order; a repeated key is kept (`get` finds the first).
    pub fn new<K: AsRef<str>, V: AsRef<str>>(pairs: impl IntoIterator<Item = (K, V)>) -> AttrMap {
        let mut text = String::new();
        let mut ends = Vec::new();
        for (k, v) in pairs {
            for part in [k.as_ref(), v.as_ref()] {
                text.push_str(part);
                ends.push(u32::try_from(text.len()).expect("attributes shorter than 4 GiB"));
            }
        }
        AttrMap { text: text.into_boxed_str(), ends: ends.into_boxed_slice() }
    }
    pub fn len(&self) -> usize {
        self.ends.len() / 2
    }
    pub fn is_empty(&self) -> bool {
        self.ends.is_empty()
    }
    /// The pairs in their order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> + '_ {
        self.ends.chunks_exact(2).scan(0usize, |start, e| {
            let (k, v) = (e[0] as usize, e[1] as usize);
            let pair = (&self.text[*start..k], &self.text[k..v]);
            *start = v;
            Some(pair)
        })
    }
    pub fn get(&self, key: &str) -> Option<&str> {
        self.iter().find(|(k, _)| *k == key).map(|(_, v)| v)
    }
    /// Heap bytes held (for memory accounting).
    pub fn heap_bytes(&self) -> usize {
        self.text.len() + self.ends.len() * 4
    }
}

impl std::fmt::Debug for AttrMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

impl From<BTreeMap<String, String>> for AttrMap {
    fn from(m: BTreeMap<String, String>) -> Self {
        AttrMap::new(m)
    }
}

/// Writes `(key, value)` pairs as a JSON map, in their order: the map types kept as vectors.
pub(crate) fn serialize_pairs<S: serde::Serializer, K: Serialize, V: Serialize>(pairs: &[(K, V)], s: S) -> Result<S::Ok, S::Error> {
    use serde::ser::SerializeMap;
    let mut m = s.serialize_map(Some(pairs.len()))?;
    for (k, v) in pairs {
        m.serialize_entry(k, v)?;
    }
    m.end()
}

impl Serialize for AttrMap {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut m = s.serialize_map(Some(self.len()))?;
        for (k, v) in self.iter() {
            m.serialize_entry(k, v)?;
        }
        m.end()
    }
}

impl<'de> Deserialize<'de> for AttrMap {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Pairs;
        impl<'de> serde::de::Visitor<'de> for Pairs {
            type Value = AttrMap;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of strings")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<AttrMap, A::Error> {
                // Keys and values are borrowed from the input where it allows (no escapes) and
                // copied once, into the map's one string.
                let mut v: Vec<(Cow<'de, str>, Cow<'de, str>)> = Vec::with_capacity(map.size_hint().unwrap_or(4).min(16));
                while let Some((k, val)) = map.next_entry::<BorrowedOrOwned<'de>, Option<BorrowedOrOwned<'de>>>()? {
                    // A repeated key keeps its last value, as a map would.
                    let val = val.map_or(Cow::Borrowed(""), |b| b.0);
                    match v.iter_mut().find(|(key, _)| *key == k.0) {
                        Some(slot) => slot.1 = val,
                        None => v.push((k.0, val)),
                    }
                }
                Ok(AttrMap::new(v))
            }
        }
        d.deserialize_map(Pairs)
    }
}

/// A string borrowed from the input when it has no escapes (serde's `Cow` always copies).
struct BorrowedOrOwned<'de>(Cow<'de, str>);

impl<'de> Deserialize<'de> for BorrowedOrOwned<'de> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Text;
        impl<'de> serde::de::Visitor<'de> for Text {
            type Value = BorrowedOrOwned<'de>;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BorrowedOrOwned(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BorrowedOrOwned(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(BorrowedOrOwned(Cow::Owned(v)))
            }
        }
        d.deserialize_str(Text)
    }
}

/// The affinity a block is claimed with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Affinity {
    None,
    Host(String),
    /// `virtual:<name>`, e.g. the LoadBalancer controller's `virtual:load-balancer`.
    Virtual(String),
}

impl Affinity {
    pub fn parse(text: Option<&str>) -> Affinity {
        match text {
            None | Some("") => Affinity::None,
            Some(t) => match t.split_once(':') {
                Some(("host", h)) => Affinity::Host(h.to_string()),
                Some(("virtual", v)) => Affinity::Virtual(v.to_string()),
                // An affinity with no recognised type is treated as a host name, as the library does.
                _ => Affinity::Host(t.to_string()),
            },
        }
    }

    pub fn host(&self) -> Option<&str> {
        match self {
            Affinity::Host(h) => Some(h),
            _ => None,
        }
    }
}

/// A block that passed [`BlockView::from_block`]: the CIDR is a network, the object is named for
/// it, the allocation table has one slot per address, and every slot points at an existing attribute.
#[derive(Debug, Clone)]
pub struct BlockView<'a> {
    pub cidr: IpNet,
    pub size: u32,
    pub affinity: Affinity,
    pub block: &'a IpamBlock,
}

/// What one allocated ordinal holds.
#[derive(Debug, Clone, Copy)]
pub struct SlotRef<'a> {
    pub ordinal: u32,
    pub attribute: &'a AllocationAttribute,
    /// `sequenceNumberForAllocation[ordinal]`, 0 if absent (as upstream).
    pub sequence: u64,
}

impl<'a> BlockView<'a> {
    pub fn from_block(block: &'a IpamBlock) -> Result<BlockView<'a>, InvalidObject> {
        let name = block.name();
        let bad = |p: String| InvalidObject::new(KIND, name, p);
        let spec = &block.spec;
        let cidr: IpNet = spec.cidr.parse().map_err(|_| bad(format!("cidr {:?} is not a CIDR", spec.cidr)))?;
        if cidr.network() != cidr.addr() {
            return Err(bad(format!("cidr {cidr} has host bits set")));
        }
        let size = block_size(&cidr).ok_or_else(|| bad(format!("cidr {cidr} is larger than any Calico block (/20, /116)")))?;
        // Calico reads and writes a block by the name its CIDR encodes, so a block stored under
        // another name is not the block for its CIDR: indexed, it would stand in for the real one
        // (its allocations judged, its releases written to the wrong object).
        let expected = cidr_to_name(&cidr);
        if name != expected {
            return Err(bad(format!("name {name:?} does not match cidr {cidr} (whose block is named {expected:?})")));
        }
        if spec.allocations.len() != size as usize {
            return Err(bad(format!("allocations has {} entries, block {cidr} has {size} addresses", spec.allocations.len())));
        }
        for (ordinal, slot) in spec.allocations.iter().enumerate() {
            if let Some(a) = slot
                && *a as usize >= spec.attributes.len() {
                    return Err(bad(format!("ordinal {ordinal} points at attribute {a}, only {} exist", spec.attributes.len())));
                }
        }
        Ok(BlockView { cidr, size, affinity: Affinity::parse(spec.affinity.as_deref()), block })
    }

    /// Every allocated ordinal in ascending order.
    pub fn slots(&self) -> impl Iterator<Item = SlotRef<'a>> + '_ {
        let spec = &self.block.spec;
        // The per-ordinal sequence numbers are keyed by decimal strings: read them once per
        // block (sorted by ordinal) and walk them beside the ordinals, rather than formatting and
        // looking up a key for every address.
        let seqs = sequence_table(spec);
        let mut next = 0usize;
        spec.allocations.iter().enumerate().filter_map(move |(ordinal, slot)| {
            let attribute = &spec.attributes[(*slot)? as usize];
            let ordinal = ordinal as u32;
            while next < seqs.len() && seqs[next].0 < ordinal {
                next += 1;
            }
            let sequence = match seqs.get(next) {
                Some(&(o, seq)) if o == ordinal => seq,
                _ => 0,
            };
            Some(SlotRef { ordinal, attribute, sequence })
        })
    }

    /// The object name a KDD datastore stores this block under.
    pub fn object_name(&self) -> String {
        cidr_to_name(&self.cidr)
    }
}

pub(crate) fn sequence_for(spec: &IpamBlockSpec, ordinal: u32) -> u64 {
    spec.sequence_number_for_allocation.get(&ordinal.to_string()).copied().unwrap_or(0)
}

/// `sequenceNumberForAllocation` as (ordinal, sequence) pairs sorted by ordinal. Only keys that
/// are an ordinal's canonical decimal form count, as [`sequence_for`]'s exact lookup has it
/// (`"07"` or `"+7"` is not ordinal 7).
pub(crate) fn sequence_table(spec: &IpamBlockSpec) -> Vec<(u32, u64)> {
    let mut table: Vec<(u32, u64)> = spec
        .sequence_number_for_allocation
        .iter()
        .filter(|(k, _)| canonical_ordinal(k))
        .filter_map(|(k, v)| Some((k.parse::<u32>().ok()?, *v)))
        .collect();
    table.sort_unstable_by_key(|e| e.0);
    table
}

fn canonical_ordinal(k: &str) -> bool {
    !k.is_empty() && k.bytes().all(|b| b.is_ascii_digit()) && (k == "0" || !k.starts_with('0'))
}

/// calicoctl's `ipam check` block rules (SPEC §7.1 step 8), plus the structural ones of
/// [`BlockView::from_block`]. Returns every problem found, empty when the block is valid.
pub fn validate_block(block: &IpamBlock, now: Millis) -> Vec<String> {
    let view = match BlockView::from_block(block) {
        Ok(v) => v,
        Err(e) => return vec![e.problem],
    };
    let spec = &block.spec;
    let mut problems = Vec::new();
    let mut referenced = vec![false; spec.attributes.len()];
    let mut allocated = 0usize;
    for slot in spec.allocations.iter().flatten() {
        referenced[*slot as usize] = true;
        allocated += 1;
    }
    for (i, used) in referenced.iter().enumerate() {
        if !used {
            problems.push(format!("attribute {i} is not referenced by any allocation"));
        }
    }
    for (i, attr) in spec.attributes.iter().enumerate() {
        if let Some(at) = &attr.released_at {
            match parse_rfc3339(at) {
                Some(t) if t > now => problems.push(format!("attribute {i} releasedAt {at} is in the future")),
                None => problems.push(format!("attribute {i} releasedAt {at:?} is not a timestamp")),
                _ => {}
            }
        }
    }
    let mut seen = vec![false; view.size as usize];
    for ord in &spec.unallocated {
        match seen.get_mut(*ord as usize) {
            None => problems.push(format!("unallocated ordinal {ord} is outside the block")),
            Some(s) if *s => problems.push(format!("unallocated ordinal {ord} is listed twice")),
            Some(s) => {
                *s = true;
                if spec.allocations[*ord as usize].is_some() {
                    problems.push(format!("ordinal {ord} is both allocated and unallocated"));
                }
            }
        }
    }
    if allocated + spec.unallocated.len() != view.size as usize {
        problems.push(format!(
            "{allocated} allocated + {} unallocated != {} addresses",
            spec.unallocated.len(),
            view.size
        ));
    }
    problems
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use serde_json::json;

    pub fn sample_block() -> Value {
        json!({
            "apiVersion": "crd.projectcalico.org/v1", "kind": "IPAMBlock",
            "metadata": {"name": "10-0-0-0-30", "resourceVersion": "7", "uid": "u-1"},
            "spec": {
                "cidr": "10.0.0.0/30", "affinity": "host:node1", "strictAffinity": false,
                "allocations": [0, null, 1, null], "unallocated": [1, 3],
                "attributes": [
                    {"handle_id": "k8s-pod-network.abc", "secondary": {"namespace": "ns", "pod": "p", "node": "node1"}},
                    {"handle_id": "ipip-tunnel-addr-node1", "secondary": {"node": "node1", "type": "ipipTunnelAddress"}, "futureAttr": 1}
                ],
                "sequenceNumber": 12, "sequenceNumberForAllocation": {"0": 10, "2": 11},
                "someNewField": {"x": 1}
            },
            "status": {"future": true}
        })
    }

    proptest::proptest! {
        /// Decoding keeps each key once with its last value (null read as empty) in first-seen
        /// order, escaped or not, and encoding gives the same pairs back.
        #[test]
        fn attribute_maps_decode_like_an_ordered_map_and_round_trip(
            pairs in proptest::collection::vec(("[a-c]{1,2}|k\\\\\"q|\u{e9}", proptest::option::of("|[a-z \\n\"]{1,6}|\u{1F600}")), 0..10),
        ) {
            let mut body = String::from("{");
            for (i, (k, v)) in pairs.iter().enumerate() {
                if i > 0 {
                    body.push(',');
                }
                body.push_str(&serde_json::to_string(k).unwrap());
                body.push(':');
                body.push_str(&v.as_ref().map_or("null".to_string(), |v| serde_json::to_string(v).unwrap()));
            }
            body.push('}');
            let mut want: Vec<(String, String)> = Vec::new();
            for (k, v) in &pairs {
                let v = v.clone().unwrap_or_default();
                match want.iter_mut().find(|(key, _)| key == k) {
                    Some(slot) => slot.1 = v,
                    None => want.push((k.clone(), v)),
                }
            }
            let map: AttrMap = serde_json::from_str(&body).unwrap();
            let got: Vec<(String, String)> = map.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
            proptest::prop_assert_eq!(&got, &want);
            proptest::prop_assert_eq!(map.len(), want.len());
            for (k, v) in &want {
                proptest::prop_assert_eq!(map.get(k), Some(v.as_str()));
            }
            let again: AttrMap = serde_json::from_str(&serde_json::to_string(&map).unwrap()).unwrap();
            proptest::prop_assert_eq!(again, map);
        }

        /// One pass over the attributes reads what the key-by-key lookups read, repeated and
        /// empty keys included.
        #[test]
        fn owner_attributes_match_the_key_lookups(
            pairs in proptest::collection::vec(("namespace|pod|node|type|vmi-name|other", "|[a-z]{1,3}"), 0..8),
            has_secondary in proptest::bool::ANY,
        ) {
            let attr = AllocationAttribute {
                secondary: has_secondary.then(|| AttrMap::new(pairs.clone())),
                ..AllocationAttribute::default()
            };
            let o = attr.owner();
            let want = |k: &str| attr.attr(k).unwrap_or("");
            proptest::prop_assert_eq!(
                (o.namespace, o.pod, o.node, o.alloc_type, o.vmi, o.vm),
                (want("namespace"), want("pod"), want("node"), want("type"), want("vmi-name"), attr.has_attr("vmi-name"))
            );
        }

        /// The sorted sequence table walked beside the ordinals gives what an exact lookup of each
        /// ordinal's decimal key gives, whatever keys the map holds (non-canonical ones included).
        #[test]
        fn slot_sequences_match_the_exact_key_lookup(
            allocated in proptest::collection::vec(proptest::bool::ANY, 64),
            keys in proptest::collection::vec(("[+0]?[0-9]{1,2}|x|", 0u64..1000), 0..40),
        ) {
            let mut block: IpamBlock = serde_json::from_value(sample_block()).unwrap();
            block.metadata.name = "10-0-0-0-26".into();
            block.spec.cidr = "10.0.0.0/26".into();
            block.spec.allocations = allocated.iter().map(|&a| if a { Some(0) } else { None }).collect();
            block.spec.sequence_number_for_allocation = keys.into_iter().collect();
            let view = BlockView::from_block(&block).unwrap();
            let got: Vec<(u32, u64)> = view.slots().map(|s| (s.ordinal, s.sequence)).collect();
            let want: Vec<(u32, u64)> = (0..64u32)
                .filter(|&o| allocated[o as usize])
                .map(|o| (o, sequence_for(&block.spec, o)))
                .collect();
            proptest::prop_assert_eq!(got, want);
        }
    }

    #[test]
    fn a_valid_block_parses_and_lists_its_allocated_slots() {
        let block: IpamBlock = serde_json::from_value(sample_block()).unwrap();
        let view = BlockView::from_block(&block).unwrap();
        assert_eq!(view.size, 4);
        assert_eq!(view.affinity, Affinity::Host("node1".into()));
        let slots: Vec<_> = view.slots().map(|s| (s.ordinal, s.sequence)).collect();
        assert_eq!(slots, vec![(0, 10), (2, 11)]);
        assert!(validate_block(&block, 0).is_empty());
    }

    #[test]
    fn unknown_fields_survive_a_round_trip() {
        let original = sample_block();
        let block: IpamBlock = serde_json::from_value(original.clone()).unwrap();
        assert_eq!(serde_json::to_value(&block).unwrap(), original);
    }

    #[test]
    fn malformed_blocks_are_rejected_with_the_object_named() {
        let mut v = sample_block();
        v["spec"]["allocations"] = json!([0, null]);
        let block: IpamBlock = serde_json::from_value(v).unwrap();
        let err = BlockView::from_block(&block).unwrap_err();
        assert_eq!(err.name, "10-0-0-0-30");
        assert!(err.problem.contains("allocations has 2 entries"), "{err}");

        let mut v = sample_block();
        v["spec"]["allocations"] = json!([0, null, 5, null]);
        let block: IpamBlock = serde_json::from_value(v).unwrap();
        assert!(BlockView::from_block(&block).unwrap_err().problem.contains("attribute 5"));

        let mut v = sample_block();
        v["spec"]["cidr"] = json!("10.0.0.1/30");
        let block: IpamBlock = serde_json::from_value(v).unwrap();
        assert!(BlockView::from_block(&block).unwrap_err().problem.contains("host bits"));

        let mut v = sample_block();
        v["spec"]["cidr"] = json!("banana");
        let block: IpamBlock = serde_json::from_value(v).unwrap();
        assert!(BlockView::from_block(&block).is_err());
    }

    #[test]
    fn validator_reports_calicoctl_problems() {
        let mut v = sample_block();
        v["spec"]["unallocated"] = json!([1, 1, 2, 9]);
        v["spec"]["attributes"].as_array_mut().unwrap().push(json!({"releasedAt": "2999-01-01T00:00:00Z"}));
        let block: IpamBlock = serde_json::from_value(v).unwrap();
        let problems = validate_block(&block, 0).join("\n");
        for needle in ["listed twice", "both allocated and unallocated", "outside the block", "not referenced", "in the future", "!= 4 addresses"] {
            assert!(problems.contains(needle), "missing {needle}: {problems}");
        }
    }
}
