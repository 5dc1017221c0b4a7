//! IPAMHandle: how many addresses one handle (one pod, one tunnel) holds in each block.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::meta::Object;

pub type IpamHandle = Object<IpamHandleSpec>;
pub const KIND: &str = "IPAMHandle";

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IpamHandleSpec {
    #[serde(rename = "handleID", default)]
    pub handle_id: String,
    /// Block CIDR -> number of this handle's addresses in that block.
    #[serde(default)]
    pub block: BlockCounts,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub deleted: bool,
    #[serde(flatten)]
    pub extra: BTreeMap<String, Value>,
}

/// A handle's per-block address counts: one or two blocks nearly always, so a sorted vector of
/// pairs (a `BTreeMap` node would cost about 300 bytes per handle). Serialized as a map in CIDR
/// order, as the `BTreeMap` it replaces was.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockCounts(Vec<(String, u32)>);

impl BlockCounts {
    fn position(&self, cidr: &str) -> Result<usize, usize> {
        self.0.binary_search_by(|(k, _)| k.as_str().cmp(cidr))
    }
    pub fn get(&self, cidr: &str) -> Option<&u32> {
        self.position(cidr).ok().map(|i| &self.0[i].1)
    }
    pub fn get_mut(&mut self, cidr: &str) -> Option<&mut u32> {
        self.position(cidr).ok().map(|i| &mut self.0[i].1)
    }
    /// Sets the count of `cidr`, returning the previous one.
    pub fn insert(&mut self, cidr: String, count: u32) -> Option<u32> {
        match self.position(&cidr) {
            Ok(i) => Some(std::mem::replace(&mut self.0[i].1, count)),
            Err(i) => {
                self.0.insert(i, (cidr, count));
                None
            }
        }
    }
    /// Adds `n` to the count of `cidr` (from 0 when absent).
    pub fn add(&mut self, cidr: &str, n: u32) {
        match self.get_mut(cidr) {
            Some(c) => *c += n,
            None => {
                self.insert(cidr.to_string(), n);
            }
        }
    }
    pub fn remove(&mut self, cidr: &str) -> Option<u32> {
        self.position(cidr).ok().map(|i| self.0.remove(i).1)
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    /// Gives back the growth slack (a handle built by adding counts one by one).
    pub fn shrink_to_fit(&mut self) {
        self.0.shrink_to_fit();
    }
    pub fn len(&self) -> usize {
        self.0.len()
    }
    /// (CIDR, count) in CIDR order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.0.iter().map(|(k, v)| (k.as_str(), *v))
    }
    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.0.iter().map(|(k, _)| k.as_str())
    }
    pub fn values(&self) -> impl Iterator<Item = &u32> {
        self.0.iter().map(|(_, v)| v)
    }
}

impl FromIterator<(String, u32)> for BlockCounts {
    /// A repeated CIDR keeps its last count, as a map would.
    fn from_iter<I: IntoIterator<Item = (String, u32)>>(iter: I) -> Self {
        let mut counts = BlockCounts::default();
        for (k, v) in iter {
            counts.insert(k, v);
        }
        counts.0.shrink_to_fit();
        counts
    }
}

impl<const N: usize> From<[(String, u32); N]> for BlockCounts {
    fn from(pairs: [(String, u32); N]) -> Self {
        pairs.into_iter().collect()
    }
}

impl From<BTreeMap<String, u32>> for BlockCounts {
    fn from(m: BTreeMap<String, u32>) -> Self {
        BlockCounts(m.into_iter().collect())
    }
}

impl Serialize for BlockCounts {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        super::block::serialize_pairs(&self.0, s)
    }
}

impl<'de> Deserialize<'de> for BlockCounts {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Counts;
        impl<'de> serde::de::Visitor<'de> for Counts {
            type Value = BlockCounts;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map of block CIDRs to address counts")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<BlockCounts, A::Error> {
                let mut counts = BlockCounts(Vec::with_capacity(map.size_hint().unwrap_or(1).min(16)));
                while let Some((k, v)) = map.next_entry::<String, u32>()? {
                    counts.insert(k, v);
                }
                counts.0.shrink_to_fit();
                Ok(counts)
            }
        }
        d.deserialize_map(Counts)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn block_counts_read_and_write_as_the_map_they_replace() {
        let text = r#"{"10.0.0.64/26":2,"10.0.0.0/26":1,"10.0.0.64/26":3}"#;
        let counts: BlockCounts = serde_json::from_str(text).unwrap();
        let map: BTreeMap<String, u32> = serde_json::from_str(text).unwrap();
        assert_eq!(serde_json::to_string(&counts).unwrap(), serde_json::to_string(&map).unwrap());
        assert_eq!(counts, BlockCounts::from(map));
        assert!(serde_json::from_str::<BlockCounts>(r#"{"10.0.0.0/26":-1}"#).is_err());
        assert!(serde_json::from_str::<BlockCounts>("[]").is_err());
    }

    #[test]
    fn block_counts_stay_sorted_and_unique_through_edits() {
        let mut c = BlockCounts::default();
        c.add("b", 1);
        c.add("a", 2);
        c.add("b", 1);
        assert_eq!(c.iter().collect::<Vec<_>>(), vec![("a", 2), ("b", 2)]);
        assert_eq!(c.insert("a".into(), 5), Some(2));
        *c.get_mut("b").unwrap() -= 1;
        assert_eq!((c.get("a"), c.get("b"), c.get("c")), (Some(&5), Some(&1), None));
        assert_eq!(c.remove("a"), Some(5));
        assert_eq!((c.len(), c.remove("a"), c.keys().collect::<Vec<_>>()), (1, None, vec!["b"]));
        c.remove("b");
        assert!(c.is_empty());
    }
}
