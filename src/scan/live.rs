//! `leak-scan` against a live cluster: one paged, read-only LIST per kind, each object fed
//! through the same reader as a dump file (Pods trimmed to their facts and IPAM objects applied
//! to the index as they arrive), then the same two-observation report. No watch, no write, no
//! datastore lock.
//!
//! Owns: which kinds are listed, paging, and the refusal of clusters this version cannot read.
//! Must not: write anything, or keep a page longer than it takes to absorb it.

use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, GroupVersionKind, ListParams, TypeMeta};

use super::dump::DumpContents;

/// Items per LIST page: large enough that 100k pods take 200 round trips, small enough that a
/// page of full Pods (about 10 KB each) stays near 5 MB.
const PAGE_SIZE: u32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum LiveScanError {
    #[error("listing {resource}: {source}")]
    List { resource: &'static str, source: kube::Error },
    #[error(
        "this cluster serves no ipamblocks under crd.projectcalico.org/v1: Calico's CRDs are not installed, \
         or the cluster uses the projectcalico.org/v3 CRDs, which this version does not read yet"
    )]
    NoCalicoCrds,
}

struct Listed {
    resource: &'static str,
    api_version: &'static str,
    kind: &'static str,
    /// A missing resource (404) is an error rather than an empty list.
    required: bool,
}

const CALICO: &str = "crd.projectcalico.org/v1";

const KINDS: [Listed; 10] = [
    Listed { resource: "ipamblocks", api_version: CALICO, kind: "IPAMBlock", required: true },
    Listed { resource: "nodes", api_version: "v1", kind: "Node", required: true },
    Listed { resource: "pods", api_version: "v1", kind: "Pod", required: true },
    Listed { resource: "blockaffinities", api_version: CALICO, kind: "BlockAffinity", required: false },
    Listed { resource: "ipamhandles", api_version: CALICO, kind: "IPAMHandle", required: false },
    Listed { resource: "ippools", api_version: CALICO, kind: "IPPool", required: false },
    Listed { resource: "ipreservations", api_version: CALICO, kind: "IPReservation", required: false },
    Listed { resource: "ipamconfigs", api_version: CALICO, kind: "IPAMConfig", required: false },
    Listed { resource: "clusterinformations", api_version: CALICO, kind: "ClusterInformation", required: false },
    Listed { resource: "kubecontrollersconfigurations", api_version: CALICO, kind: "KubeControllersConfiguration", required: false },
];

/// Lists every kind the GC reads into an indexed [`DumpContents`], ready for `scan_dump`.
/// `progress(kind, objects_so_far)` is called after each page.
pub async fn read_cluster(client: &Client, progress: &mut dyn FnMut(&str, u64)) -> Result<DumpContents, LiveScanError> {
    let mut contents =
        DumpContents { index: Some(Box::new(crate::ipam::index::IpamIndex::new())), complete_pod_view: true, ..DumpContents::default() };
    for listed in &KINDS {
        let (group, version) = listed.api_version.split_once('/').unwrap_or(("", listed.api_version));
        let resource = ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(group, version, listed.kind), listed.resource);
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let types = TypeMeta { api_version: listed.api_version.to_string(), kind: listed.kind.to_string() };
        let mut params = ListParams::default().limit(PAGE_SIZE);
        let mut seen = 0u64;
        loop {
            let page = match api.list(&params).await {
                Ok(page) => page,
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    if listed.resource == "ipamblocks" {
                        return Err(LiveScanError::NoCalicoCrds);
                    }
                    if listed.required {
                        return Err(LiveScanError::List { resource: listed.resource, source: kube::Error::Api(status) });
                    }
                    break;
                }
                Err(source) => return Err(LiveScanError::List { resource: listed.resource, source }),
            };
            let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
            for (i, mut item) in page.items.into_iter().enumerate() {
                // List items of built-in kinds come without apiVersion/kind; the reader needs them.
                item.types = Some(types.clone());
                match serde_json::to_vec(&item) {
                    Ok(bytes) => contents.absorb_object_json(&bytes, &format!("{}[{}]", listed.resource, seen + i as u64)),
                    Err(e) => tracing::warn!(resource = listed.resource, error = %e, "object could not be re-encoded; skipped"),
                }
            }
            seen = *contents.kind_counts.get(listed.kind).unwrap_or(&0);
            progress(listed.resource, seen);
            match next {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(contents)
}
