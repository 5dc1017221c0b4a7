//! `leak-scan` against a live cluster: one paged, read-only LIST per kind, each object fed
//! through the same reader as a dump file (Pods trimmed to their facts and IPAM objects applied
//! to the index as they arrive), then the same two-observation report. No watch, no write, no
//! datastore lock.
//!
//! Owns: which kinds are listed, paging, and the refusal of clusters this version cannot read.
//! Must not: write anything, or keep a page longer than it takes to absorb it.

use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Client;
use kube::api::{Api, ApiResource, DynamicObject, ListParams, TypeMeta};

use super::dump::DumpContents;
use crate::datastore::Kind;
use crate::datastore::kube::api_resource;

/// Items per LIST page: large enough that 100k pods take 200 round trips, small enough that a
/// page of full Pods (about 10 KB each) stays near 5 MB.
const PAGE_SIZE: u32 = 500;

#[derive(Debug, thiserror::Error)]
pub enum LiveScanError {
    #[error("listing {resource}: {source}")]
    List { resource: String, source: kube::Error },
    #[error(
        "this cluster serves no ipamblocks under crd.projectcalico.org/v1: Calico's CRDs are not installed, \
         or the cluster uses the projectcalico.org/v3 CRDs, which this version does not read yet"
    )]
    NoCalicoCrds,
}

/// What is listed, in this order: blocks first (a cluster without Calico's CRDs stops at once),
/// then the facts. `true`: a missing resource (404) is an error rather than an empty list.
fn listed() -> [(ApiResource, bool); 10] {
    let calico = |kind: Kind, required| (api_resource(kind), required);
    [
        calico(Kind::IpamBlock, true),
        (ApiResource::erase::<Node>(&()), true),
        (ApiResource::erase::<Pod>(&()), true),
        calico(Kind::BlockAffinity, false),
        calico(Kind::IpamHandle, false),
        calico(Kind::IpPool, false),
        calico(Kind::IpReservation, false),
        calico(Kind::IpamConfig, false),
        calico(Kind::ClusterInformation, false),
        calico(Kind::KubeControllersConfiguration, false),
    ]
}

/// Lists every kind the GC reads into an indexed [`DumpContents`], ready for `scan_dump`.
/// `progress(kind, objects_so_far)` is called after each page.
pub async fn read_cluster(client: &Client, progress: &mut dyn FnMut(&str, u64)) -> Result<DumpContents, LiveScanError> {
    let mut contents =
        DumpContents { index: Some(Box::new(crate::ipam::index::IpamIndex::new())), complete_pod_view: true, ..DumpContents::default() };
    for (resource, required) in listed() {
        let api: Api<DynamicObject> = Api::all_with(client.clone(), &resource);
        let types = TypeMeta { api_version: resource.api_version.clone(), kind: resource.kind.clone() };
        let mut params = ListParams::default().limit(PAGE_SIZE);
        let mut seen = 0u64;
        loop {
            let page = match api.list(&params).await {
                Ok(page) => page,
                Err(kube::Error::Api(status)) if status.code == 404 => {
                    if resource.plural == Kind::IpamBlock.plural() {
                        return Err(LiveScanError::NoCalicoCrds);
                    }
                    if required {
                        return Err(LiveScanError::List { resource: resource.plural, source: kube::Error::Api(status) });
                    }
                    break;
                }
                Err(source) => return Err(LiveScanError::List { resource: resource.plural, source }),
            };
            let next = page.metadata.continue_.clone().filter(|c| !c.is_empty());
            for (i, mut item) in page.items.into_iter().enumerate() {
                // List items of built-in kinds come without apiVersion/kind; the reader needs them.
                item.types = Some(types.clone());
                match serde_json::to_vec(&item) {
                    Ok(bytes) => contents.absorb_object_json(&bytes, &format!("{}[{}]", resource.plural, seen + i as u64)),
                    Err(e) => tracing::warn!(resource = %resource.plural, error = %e, "object could not be re-encoded; skipped"),
                }
            }
            seen = *contents.kind_counts.get(&resource.kind).unwrap_or(&0);
            progress(&resource.plural, seen);
            match next {
                Some(token) => params = params.continue_token(&token),
                None => break,
            }
        }
    }
    Ok(contents)
}
