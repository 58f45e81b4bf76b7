//! Offline injection into a stream of manifests (`nerve-sidecar inject -f job.yaml`).

use serde::Deserialize;
use serde_json::Value;

use super::{InjectSettings, OPT_IN_LABEL, OPT_IN_VALUE, Outcome, Owner, inject_pod_template};

/// Why a manifest stream could not be read or written (the pods in it never cause this).
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("document {index} is not valid YAML or JSON")]
    Parse {
        index: usize,
        #[source]
        source: serde_norway::Error,
    },
    #[error("writing document {index} as YAML")]
    Write {
        index: usize,
        #[source]
        source: serde_norway::Error,
    },
}

/// The rewritten stream and what the operator should know about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ManifestReport {
    /// The documents as YAML, separated by `---`.
    pub output: String,
    /// Each prefixed with the document's `Kind/name`.
    pub warnings: Vec<String>,
    /// Pod templates that got the sidecar.
    pub injected: usize,
}

/// Injects the sidecar into every opted-in pod template of a YAML (or JSON) stream.
///
/// Pods, and the pod templates of Jobs, CronJobs, Deployments, StatefulSets, DaemonSets,
/// ReplicaSets and the items of a `List`, are injected when labelled
/// `nerve.io/checkpoint: enabled` (on the template or the workload). Other documents are
/// written back unchanged.
pub fn inject_manifest(
    input: &str,
    settings: &InjectSettings,
) -> Result<ManifestReport, ManifestError> {
    let mut output = String::new();
    let mut warnings = Vec::new();
    let mut injected = 0;
    for (index, document) in serde_norway::Deserializer::from_str(input).enumerate() {
        let index = index + 1;
        let mut value = Value::deserialize(document)
            .map_err(|source| ManifestError::Parse { index, source })?;
        if value.is_null() {
            continue; // an empty document, e.g. after a trailing `---`
        }
        injected += inject_document(&mut value, settings, &mut warnings);
        let yaml = serde_norway::to_string(&value)
            .map_err(|source| ManifestError::Write { index, source })?;
        if !output.is_empty() {
            output.push_str("---\n");
        }
        output.push_str(&yaml);
    }
    Ok(ManifestReport {
        output,
        warnings,
        injected,
    })
}

/// Injects into one document (recursing into `List` items); returns how many pod templates got
/// the sidecar.
fn inject_document(
    document: &mut Value,
    settings: &InjectSettings,
    warnings: &mut Vec<String>,
) -> usize {
    let kind = document
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let name = document
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .unwrap_or("(unnamed)")
        .to_owned();
    if kind == "List" {
        let Some(items) = document.get_mut("items").and_then(Value::as_array_mut) else {
            return 0;
        };
        return items
            .iter_mut()
            .map(|item| inject_document(item, settings, warnings))
            .sum();
    }
    let template_path = match kind.as_str() {
        "Pod" => "",
        "Job"
        | "Deployment"
        | "StatefulSet"
        | "DaemonSet"
        | "ReplicaSet"
        | "ReplicationController" => "/spec/template",
        "CronJob" => "/spec/jobTemplate/spec/template",
        _ => return 0,
    };
    let workload_opted_in = opted_in(document);
    let Some(template) = document.pointer_mut(template_path) else {
        warnings.push(format!(
            "{kind}/{name}: has no pod template; left unchanged"
        ));
        return 0;
    };
    if !(workload_opted_in || opted_in(template)) {
        let mentions_nerve = template
            .pointer("/metadata/annotations")
            .and_then(Value::as_object)
            .is_some_and(|a| a.keys().any(|k| k.starts_with("nerve.io/")));
        if mentions_nerve {
            warnings.push(format!(
                "{kind}/{name}: has nerve.io annotations but not the label \
                 {OPT_IN_LABEL}: {OPT_IN_VALUE}; left unchanged"
            ));
        }
        return 0;
    }
    // A Pod's own name changes with every replacement pod; a workload's name is stable.
    let owner = if kind == "Pod" {
        Owner::None
    } else {
        Owner::Named(&name)
    };
    let injection = inject_pod_template(template, owner, settings);
    warnings.extend(
        injection
            .warnings
            .iter()
            .map(|w| format!("{kind}/{name}: {w}")),
    );
    usize::from(injection.outcome == Outcome::Injected)
}

fn opted_in(object: &Value) -> bool {
    object
        .pointer("/metadata/labels")
        .and_then(|labels| labels.get(OPT_IN_LABEL))
        .and_then(Value::as_str)
        == Some(OPT_IN_VALUE)
}
