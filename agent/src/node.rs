//! Node actions in Kubernetes mode: cordon and taint the node for a notice `--cordon-on` names,
//! record an Event, drain with `--drain`, and undo only what the agent itself did once the notice
//! is gone.
//!
//! Every write is a JSON merge patch carrying the resourceVersion the agent read, so a
//! concurrent change makes the API server answer 409 and the agent reads and merges again: other
//! taints and annotations are never lost.

mod drain;

use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Event, Node, Taint};
use kube::api::{Api, Patch, PatchParams, PostParams};
use nerve_notice::Notice;
use serde_json::{Value, json};
use time::OffsetDateTime;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::CordonOn;
use crate::metrics::Metrics;

/// The taint key; its value is the notice kind.
pub const TAINT_KEY: &str = "nerve.io/interruption";
/// Present (value `nerve`) only when the agent itself marked the node unschedulable.
pub const CORDONED_BY_ANNOTATION: &str = "nerve.io/cordoned-by";
/// The notice (JSON) the node was tainted for.
pub const NOTICE_ANNOTATION: &str = "nerve.io/notice";
const FIELD_MANAGER: &str = "nerve-agent";

/// A read-modify-write that keeps conflicting this many times in a row means something else
/// rewrites the node constantly; back off and try again later instead of hammering it.
const MAX_CONFLICT_RETRIES: u32 = 5;

/// First retry of a failed node action; doubles up to [`MAX_BACKOFF`]. 200 ms keeps a short API
/// server blip from costing a whole second of the two-minute warning.
const INITIAL_BACKOFF: Duration = Duration::from_millis(200);
/// Retries of an unreachable API server settle at one every 5 s until the deadline.
const MAX_BACKOFF: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("reading node {node}")]
    Read {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("patching node {node}")]
    Patch {
        node: String,
        #[source]
        source: kube::Error,
    },
    #[error("node {node} changed under every one of {attempts} attempts to patch it")]
    Conflicts { node: String, attempts: u32 },
}

/// What a cordon or uncordon did.
#[derive(Debug, PartialEq, Eq)]
enum Change {
    Written,
    AlreadyDone,
}

/// Acts on one node for the notices the poll loop reports.
pub struct NodeActions {
    client: kube::Client,
    node: String,
    cordon_on: CordonOn,
    drain: bool,
    metrics: Arc<Metrics>,
}

impl NodeActions {
    pub fn new(
        client: kube::Client,
        node: String,
        cordon_on: CordonOn,
        drain: bool,
        metrics: Arc<Metrics>,
    ) -> Self {
        Self {
            client,
            node,
            cordon_on,
            drain,
            metrics,
        }
    }

    /// Brings the node in line with the active notices each time they change. `None` means no
    /// metadata poll has answered yet: nothing is known, so nothing is done (in particular, a
    /// restart never undoes a cordon before the first answer).
    pub async fn act_on_notices(
        self,
        mut notices: watch::Receiver<Option<Vec<Notice>>>,
        shutdown: CancellationToken,
    ) {
        let mut drained: Option<String> = None;
        loop {
            let current = notices.borrow_and_update().clone();
            if let Some(current) = current {
                let target = current
                    .iter()
                    .filter(|n| self.cordon_on.contains(n.kind))
                    .min_by_key(|n| n.deadline)
                    .cloned();
                let done = self
                    .apply_until_done(target.as_ref(), &mut notices, &shutdown)
                    .await;
                if let (true, Some(notice)) = (done && self.drain, &target)
                    && notice.kind.is_emergency()
                    && drained.as_deref() != Some(notice.id.as_str())
                {
                    drained = Some(notice.id.clone());
                    tokio::select! {
                        _ = drain::drain_node(&self.client, &self.node, notice, &self.metrics) => {}
                        _ = notices.changed() => {}
                        _ = shutdown.cancelled() => return,
                    }
                    continue;
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                changed = notices.changed() => if changed.is_err() { return },
            }
        }
    }

    /// Cordons for `target` (or undoes the agent's cordon when `None`), retrying with backoff
    /// until it succeeds, the notice's deadline passes, the notices change or shutdown.
    /// Returns whether the node is now as wanted.
    async fn apply_until_done(
        &self,
        target: Option<&Notice>,
        notices: &mut watch::Receiver<Option<Vec<Notice>>>,
        shutdown: &CancellationToken,
    ) -> bool {
        let mut backoff = INITIAL_BACKOFF;
        let mut failures = 0u32;
        loop {
            let result = match target {
                Some(notice) => self.cordon_node(notice).await,
                None => self.uncordon_node().await,
            };
            let action = if target.is_some() {
                "cordon"
            } else {
                "uncordon"
            };
            match result {
                Ok(_) => {
                    if failures > 0 {
                        tracing::info!(node = %self.node, action, failures, "node action succeeded after retries");
                    }
                    return true;
                }
                Err(err) => {
                    failures += 1;
                    self.metrics.node_action(action, "error");
                    if failures == 1 {
                        tracing::warn!(node = %self.node, action, error = %crate::error_chain(&err), "node action failed; retrying until the notice deadline");
                    } else {
                        tracing::debug!(node = %self.node, action, error = %crate::error_chain(&err), "node action failed again");
                    }
                    if let Some(notice) = target
                        && OffsetDateTime::now_utc() >= notice.deadline
                    {
                        tracing::error!(node = %self.node, notice = %notice.id, failures, "giving up cordoning: the notice deadline passed");
                        return false;
                    }
                }
            }
            let pause = backoff.mul_f64(rand::random_range(0.5..1.0));
            backoff = (backoff * 2).min(MAX_BACKOFF);
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = notices.changed() => {
                    // `changed()` consumed the change; keep it visible so the caller acts on
                    // the new notices instead of waiting for yet another change.
                    notices.mark_changed();
                    return false;
                }
                _ = shutdown.cancelled() => return false,
            }
        }
    }

    fn nodes(&self) -> Api<Node> {
        Api::all(self.client.clone())
    }

    /// Marks the node unschedulable, taints it for the notice and annotates it; writes nothing
    /// when that is already so.
    #[tracing::instrument(skip_all, fields(node = %self.node, notice = %notice.id))]
    async fn cordon_node(&self, notice: &Notice) -> Result<Change, NodeError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let node = self.read_node().await?;
            let plan = CordonPlan::for_node(&node, notice);
            let Some(patch) = plan.patch else {
                self.metrics.node_action("cordon", "skipped");
                return Ok(Change::AlreadyDone);
            };
            match self.patch_node(&patch).await {
                Ok(()) => {
                    self.metrics.node_action("cordon", "ok");
                    let since = (OffsetDateTime::now_utc() - notice.detected_at).as_seconds_f64();
                    self.metrics.cordoned_after(since);
                    tracing::info!(
                        kind = %notice.kind,
                        deadline = %notice.deadline,
                        cordoned = plan.cordons,
                        "node cordoned and tainted for the notice"
                    );
                    let message = format!(
                        "{} notice from {}: the machine goes away at {} (action {}); node tainted {TAINT_KEY}={}:NoSchedule",
                        notice.kind, notice.source, notice.deadline, notice.action, notice.kind
                    );
                    self.record_event(&node, "InterruptionNotice", "Warning", &message)
                        .await;
                    return Ok(Change::Written);
                }
                Err(NodeError::Patch {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 409 => {
                    self.metrics.node_action("cordon", "conflict");
                    tracing::debug!("node changed since it was read; merging again");
                }
                Err(err) => return Err(err),
            }
        }
        Err(NodeError::Conflicts {
            node: self.node.clone(),
            attempts: MAX_CONFLICT_RETRIES,
        })
    }

    /// Removes the agent's taint and annotations, and uncordons only if the agent cordoned.
    #[tracing::instrument(skip_all, fields(node = %self.node))]
    async fn uncordon_node(&self) -> Result<Change, NodeError> {
        for _ in 0..MAX_CONFLICT_RETRIES {
            let node = self.read_node().await?;
            let Some((patch, uncordons)) = uncordon_patch(&node) else {
                return Ok(Change::AlreadyDone);
            };
            match self.patch_node(&patch).await {
                Ok(()) => {
                    self.metrics.node_action("uncordon", "ok");
                    tracing::info!(
                        uncordoned = uncordons,
                        "notice gone: removed the agent's taint{}",
                        if uncordons {
                            " and cordon"
                        } else {
                            " (the node stays cordoned: someone else cordoned it)"
                        }
                    );
                    let message = if uncordons {
                        "the interruption notice is gone: removed the nerve taint and uncordoned the node"
                    } else {
                        "the interruption notice is gone: removed the nerve taint (the node was cordoned by someone else and stays so)"
                    };
                    self.record_event(&node, "InterruptionNoticeWithdrawn", "Normal", message)
                        .await;
                    return Ok(Change::Written);
                }
                Err(NodeError::Patch {
                    source: kube::Error::Api(status),
                    ..
                }) if status.code == 409 => {
                    self.metrics.node_action("uncordon", "conflict");
                }
                Err(err) => return Err(err),
            }
        }
        Err(NodeError::Conflicts {
            node: self.node.clone(),
            attempts: MAX_CONFLICT_RETRIES,
        })
    }

    async fn read_node(&self) -> Result<Node, NodeError> {
        self.nodes()
            .get(&self.node)
            .await
            .map_err(|source| NodeError::Read {
                node: self.node.clone(),
                source,
            })
    }

    async fn patch_node(&self, patch: &Value) -> Result<(), NodeError> {
        let params = PatchParams {
            field_manager: Some(FIELD_MANAGER.to_owned()),
            ..PatchParams::default()
        };
        self.nodes()
            .patch(&self.node, &params, &Patch::Merge(patch))
            .await
            .map(drop)
            .map_err(|source| NodeError::Patch {
                node: self.node.clone(),
                source,
            })
    }

    /// Records a Kubernetes Event on the node; a failure is logged and counted, never fatal.
    async fn record_event(&self, node: &Node, reason: &str, type_: &str, message: &str) {
        let now = crate::rfc3339_now();
        let event = json!({
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": format!("{}.nerve-", self.node), "namespace": "default"},
            "involvedObject": {
                "apiVersion": "v1",
                "kind": "Node",
                "name": self.node,
                "uid": node.metadata.uid.clone().unwrap_or_default(),
            },
            "reason": reason,
            "message": message,
            "type": type_,
            "source": {"component": "nerve-agent", "host": self.node},
            "reportingComponent": "nerve.io/agent",
            "reportingInstance": self.node,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        });
        let event: Event = match serde_json::from_value(event) {
            Ok(event) => event,
            Err(err) => {
                tracing::warn!(error = %err, "building the node event");
                return;
            }
        };
        let events: Api<Event> = Api::namespaced(self.client.clone(), "default");
        match events.create(&PostParams::default(), &event).await {
            Ok(_) => self.metrics.node_action("event", "ok"),
            Err(err) => {
                self.metrics.node_action("event", "error");
                tracing::warn!(node = %self.node, error = %crate::error_chain(&err), "recording the node event");
            }
        }
    }
}

/// The patch that cordons, taints and annotates `node` for `notice`, or none when it already is.
struct CordonPlan {
    patch: Option<Value>,
    /// The agent flips `unschedulable` itself (the node was schedulable, or the agent cordoned it).
    cordons: bool,
}

impl CordonPlan {
    fn for_node(node: &Node, notice: &Notice) -> Self {
        let spec = node.spec.clone().unwrap_or_default();
        let unschedulable = spec.unschedulable.unwrap_or(false);
        let taints = spec.taints.unwrap_or_default();
        let annotations = node.metadata.annotations.clone().unwrap_or_default();
        let ours = annotations.get(CORDONED_BY_ANNOTATION).map(String::as_str) == Some("nerve");
        let tainted = taints.iter().any(|t| {
            t.key == TAINT_KEY
                && t.effect == "NoSchedule"
                && t.value.as_deref() == Some(notice.kind.as_str())
        });
        let annotated_for = annotations
            .get(NOTICE_ANNOTATION)
            .and_then(|json| serde_json::from_str::<Notice>(json).ok())
            .map(|n| n.id);
        let cordons = !unschedulable || ours;
        if unschedulable && tainted && annotated_for.as_deref() == Some(notice.id.as_str()) {
            return Self {
                patch: None,
                cordons,
            };
        }
        let mut new_taints: Vec<Taint> =
            taints.into_iter().filter(|t| t.key != TAINT_KEY).collect();
        new_taints.push(Taint {
            key: TAINT_KEY.to_owned(),
            value: Some(notice.kind.as_str().to_owned()),
            effect: "NoSchedule".to_owned(),
            time_added: None,
        });
        let mut annotation_patch = serde_json::Map::new();
        annotation_patch.insert(
            NOTICE_ANNOTATION.to_owned(),
            Value::String(notice.to_json()),
        );
        if cordons {
            annotation_patch.insert(
                CORDONED_BY_ANNOTATION.to_owned(),
                Value::String("nerve".to_owned()),
            );
        }
        let patch = json!({
            "metadata": {
                "resourceVersion": node.metadata.resource_version,
                "annotations": annotation_patch,
            },
            "spec": {
                "unschedulable": true,
                "taints": new_taints,
            },
        });
        Self {
            patch: Some(patch),
            cordons,
        }
    }
}

/// The patch that removes the agent's taint and annotations (and its cordon, only if it was the
/// agent's), or none when nothing of the agent's is on the node. The bool: it uncordons.
fn uncordon_patch(node: &Node) -> Option<(Value, bool)> {
    let spec = node.spec.clone().unwrap_or_default();
    let taints = spec.taints.unwrap_or_default();
    let annotations = node.metadata.annotations.clone().unwrap_or_default();
    let ours = annotations.get(CORDONED_BY_ANNOTATION).map(String::as_str) == Some("nerve");
    let tainted = taints.iter().any(|t| t.key == TAINT_KEY);
    if !ours && !tainted && !annotations.contains_key(NOTICE_ANNOTATION) {
        return None;
    }
    let others: Vec<Taint> = taints.into_iter().filter(|t| t.key != TAINT_KEY).collect();
    let mut spec_patch = serde_json::Map::new();
    spec_patch.insert(
        "taints".to_owned(),
        if others.is_empty() {
            Value::Null
        } else {
            json!(others)
        },
    );
    if ours {
        spec_patch.insert("unschedulable".to_owned(), Value::Null);
    }
    let patch = json!({
        "metadata": {
            "resourceVersion": node.metadata.resource_version,
            "annotations": {CORDONED_BY_ANNOTATION: null, NOTICE_ANNOTATION: null},
        },
        "spec": spec_patch,
    });
    Some((patch, ours))
}

#[cfg(test)]
mod tests {
    use super::*;
    use nerve_notice::{Cloud, NoticeKind};
    use time::macros::datetime;

    fn node(value: Value) -> Node {
        serde_json::from_value(value).unwrap()
    }

    fn spot() -> Notice {
        Notice::new(
            NoticeKind::SpotInterruption,
            "terminate",
            datetime!(2026-11-22 09:30:36 UTC),
            datetime!(2026-11-22 09:28:36 UTC),
            Cloud::Aws,
        )
    }

    #[test]
    fn cordon_keeps_other_taints_and_claims_the_cordon() {
        let n = node(json!({
            "metadata": {"name": "n1", "resourceVersion": "7"},
            "spec": {"taints": [{"key": "gpu", "value": "true", "effect": "NoSchedule"}]},
        }));
        let plan = CordonPlan::for_node(&n, &spot());
        assert!(plan.cordons);
        let patch = plan.patch.unwrap();
        assert_eq!(patch["metadata"]["resourceVersion"], "7");
        assert_eq!(
            patch["metadata"]["annotations"][CORDONED_BY_ANNOTATION],
            "nerve"
        );
        assert_eq!(patch["spec"]["unschedulable"], true);
        assert_eq!(
            patch["spec"]["taints"],
            json!([
                {"key": "gpu", "value": "true", "effect": "NoSchedule"},
                {"key": TAINT_KEY, "value": "spot-interruption", "effect": "NoSchedule"},
            ])
        );
    }

    #[test]
    fn cordon_of_a_node_someone_else_cordoned_does_not_claim_it() {
        let n = node(json!({
            "metadata": {"name": "n1", "resourceVersion": "7"},
            "spec": {"unschedulable": true},
        }));
        let plan = CordonPlan::for_node(&n, &spot());
        assert!(!plan.cordons);
        let patch = plan.patch.unwrap();
        assert!(
            patch["metadata"]["annotations"]
                .get(CORDONED_BY_ANNOTATION)
                .is_none()
        );
    }

    #[test]
    fn cordon_writes_nothing_when_already_done() {
        let n = node(json!({
            "metadata": {"name": "n1", "resourceVersion": "8", "annotations": {
                CORDONED_BY_ANNOTATION: "nerve", NOTICE_ANNOTATION: spot().to_json()}},
            "spec": {"unschedulable": true, "taints": [{"key": TAINT_KEY, "value": "spot-interruption", "effect": "NoSchedule"}]},
        }));
        assert!(CordonPlan::for_node(&n, &spot()).patch.is_none());
    }

    #[test]
    fn uncordon_leaves_a_foreign_cordon_in_place() {
        let n = node(json!({
            "metadata": {"name": "n1", "resourceVersion": "9", "annotations": {NOTICE_ANNOTATION: spot().to_json()}},
            "spec": {"unschedulable": true, "taints": [
                {"key": "gpu", "value": "true", "effect": "NoSchedule"},
                {"key": TAINT_KEY, "value": "spot-interruption", "effect": "NoSchedule"}]},
        }));
        let (patch, uncordons) = uncordon_patch(&n).unwrap();
        assert!(!uncordons);
        assert!(patch["spec"].get("unschedulable").is_none());
        assert_eq!(
            patch["spec"]["taints"],
            json!([{"key": "gpu", "value": "true", "effect": "NoSchedule"}])
        );
        let clean = node(json!({"metadata": {"name": "n1"}, "spec": {"unschedulable": true}}));
        assert!(uncordon_patch(&clean).is_none());
    }
}
