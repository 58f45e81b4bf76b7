//! `--drain`: evict the node's pods through the eviction API, bounded by the notice deadline.

use std::time::Duration;

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use nerve_notice::Notice;
use time::OffsetDateTime;

use crate::metrics::Metrics;

/// Evictions in flight at once: enough to drain a GPU node (a handful of pods) in one round
/// trip, few enough not to burst the API server when many nodes are reclaimed together.
const EVICTION_CONCURRENCY: usize = 5;

/// Pause before retrying an eviction a PodDisruptionBudget refused without a Retry-After, or
/// after a server error.
const EVICTION_RETRY: Duration = Duration::from_secs(1);

/// Never wait longer than this on one Retry-After, whatever the server says: the deadline is
/// at most minutes away.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(10);

/// A pod label or container name marking a pod whose checkpoint sidecar handles the notice
/// itself: it is left to finish its checkpoint, not evicted.
const CHECKPOINT_LABEL: (&str, &str) = ("nerve.io/checkpoint", "enabled");
const SIDECAR_CONTAINER: &str = "nerve-sidecar";

/// Evicts every pod of the node that should go, until all are evicted or the deadline passes.
#[tracing::instrument(skip_all, fields(node = %node, notice = %notice.id))]
pub async fn drain_node(client: &kube::Client, node: &str, notice: &Notice, metrics: &Metrics) {
    let remaining = notice.deadline - OffsetDateTime::now_utc();
    let Ok(remaining) = Duration::try_from(remaining) else {
        tracing::warn!("not draining: the notice deadline has passed");
        return;
    };
    let drain = async {
        let pods: Api<Pod> = Api::all(client.clone());
        let list = ListParams::default().fields(&format!("spec.nodeName={node}"));
        let pods = loop {
            match pods.list(&list).await {
                Ok(pods) => break pods.items,
                Err(err) => {
                    tracing::warn!(error = %crate::error_chain(&err), "listing the node's pods; retrying");
                    tokio::time::sleep(EVICTION_RETRY).await;
                }
            }
        };
        let targets: Vec<Pod> = pods.into_iter().filter(should_evict).collect();
        tracing::info!(pods = targets.len(), "draining the node");
        futures::stream::iter(targets)
            .map(|pod| evict_pod(client, pod, metrics))
            .buffer_unordered(EVICTION_CONCURRENCY)
            .collect::<Vec<()>>()
            .await;
    };
    if tokio::time::timeout(remaining, drain).await.is_err() {
        tracing::warn!("drain stopped at the notice deadline");
    } else {
        tracing::info!("drain finished");
    }
}

/// Whether a pod is for the drain to evict: not a DaemonSet or mirror pod (the node runs those
/// itself), not finished or already going, not a checkpointing pod (its sidecar handles it).
fn should_evict(pod: &Pod) -> bool {
    let meta = &pod.metadata;
    if meta.deletion_timestamp.is_some() {
        return false;
    }
    if matches!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    ) {
        return false;
    }
    if meta
        .annotations
        .as_ref()
        .is_some_and(|a| a.contains_key("kubernetes.io/config.mirror"))
    {
        return false;
    }
    if meta
        .owner_references
        .as_ref()
        .is_some_and(|owners| owners.iter().any(|o| o.kind == "DaemonSet"))
    {
        return false;
    }
    let labelled = meta
        .labels
        .as_ref()
        .and_then(|l| l.get(CHECKPOINT_LABEL.0))
        .is_some_and(|v| v == CHECKPOINT_LABEL.1);
    let has_sidecar = pod.spec.as_ref().is_some_and(|spec| {
        spec.containers.iter().any(|c| c.name == SIDECAR_CONTAINER)
            || spec
                .init_containers
                .as_ref()
                .is_some_and(|c| c.iter().any(|c| c.name == SIDECAR_CONTAINER))
    });
    !(labelled || has_sidecar)
}

/// Evicts one pod, honouring Retry-After on 429 (a PodDisruptionBudget says not yet).
#[tracing::instrument(skip_all, fields(pod = %pod.metadata.name.as_deref().unwrap_or_default()))]
async fn evict_pod(client: &kube::Client, pod: Pod, metrics: &Metrics) {
    let name = pod.metadata.name.unwrap_or_default();
    let namespace = pod
        .metadata
        .namespace
        .unwrap_or_else(|| "default".to_owned());
    let url = format!("/api/v1/namespaces/{namespace}/pods/{name}/eviction");
    let body = serde_json::json!({
        "apiVersion": "policy/v1",
        "kind": "Eviction",
        "metadata": {"name": name, "namespace": namespace},
    })
    .to_string();
    loop {
        let request = match http::Request::post(&url)
            .header(http::header::CONTENT_TYPE, "application/json")
            .body(kube::client::Body::from(body.clone().into_bytes()))
        {
            Ok(request) => request,
            Err(err) => {
                tracing::warn!(error = %err, "building the eviction");
                return;
            }
        };
        let response = client.send(request.map(kube::client::Body::from)).await;
        let pause = match response {
            Ok(response) => {
                let status = response.status().as_u16();
                match status {
                    200 | 201 => {
                        metrics.node_action("evict", "ok");
                        tracing::info!(namespace, "pod evicted");
                        return;
                    }
                    404 => return,
                    429 => {
                        metrics.node_action("evict", "conflict");
                        let retry_after = response
                            .headers()
                            .get(http::header::RETRY_AFTER)
                            .and_then(|v| v.to_str().ok())
                            .and_then(|v| v.trim().parse::<u64>().ok())
                            .map_or(EVICTION_RETRY, Duration::from_secs);
                        tracing::info!(retry_after = ?retry_after, "a disruption budget defers the eviction");
                        retry_after.min(MAX_RETRY_AFTER)
                    }
                    _ => {
                        metrics.node_action("evict", "error");
                        tracing::warn!(status, "eviction refused; retrying");
                        EVICTION_RETRY
                    }
                }
            }
            Err(err) => {
                metrics.node_action("evict", "error");
                tracing::warn!(error = %crate::error_chain(&err), "eviction failed; retrying");
                EVICTION_RETRY
            }
        };
        tokio::time::sleep(pause).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn pod(value: serde_json::Value) -> Pod {
        serde_json::from_value(value).unwrap()
    }

    #[test]
    fn skips_daemonset_mirror_and_checkpointing_pods() {
        assert!(should_evict(&pod(
            json!({"metadata": {"name": "web"}, "spec": {"containers": [{"name": "web"}]}})
        )));
        assert!(!should_evict(&pod(
            json!({"metadata": {"name": "ds", "ownerReferences": [
            {"apiVersion": "apps/v1", "kind": "DaemonSet", "name": "x", "uid": "u"}]}})
        )));
        assert!(!should_evict(&pod(
            json!({"metadata": {"name": "m", "annotations": {"kubernetes.io/config.mirror": "x"}}})
        )));
        assert!(!should_evict(&pod(
            json!({"metadata": {"name": "t", "labels": {"nerve.io/checkpoint": "enabled"}}})
        )));
        assert!(!should_evict(&pod(
            json!({"metadata": {"name": "t"}, "spec": {
            "containers": [{"name": "trainer"}],
            "initContainers": [{"name": "nerve-sidecar", "restartPolicy": "Always"}]}})
        )));
        assert!(!should_evict(&pod(
            json!({"metadata": {"name": "done"}, "status": {"phase": "Succeeded"}})
        )));
    }
}
