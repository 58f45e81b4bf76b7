//! Offline injection into a stream of manifests (`nerve-sidecar inject -f job.yaml`).

use serde::Deserialize;
use serde_json::Value;

use super::{
    InjectSettings, JobSetShape, JobShape, OPT_IN_LABEL, OPT_IN_VALUE, Outcome, Owner,
    PyTorchShape, Workload, inject_pod_template,
};

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
/// ReplicaSets, PyTorchJobs, JobSets and the items of a `List`, are injected when labelled
/// `nerve.io/checkpoint: enabled` (on the template or the workload). Other documents are
/// written back unchanged, with a warning when something in them is labelled.
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
    let Some(templates) = pod_templates(&kind, document) else {
        for path in labelled_objects(document, String::new()) {
            warnings.push(format!(
                "{kind}/{name}: {path} is labelled {OPT_IN_LABEL}: {OPT_IN_VALUE}, but \
                 nerve-sidecar inject does not know where a {kind}'s pod templates are; left \
                 unchanged (let the webhook inject its pods, or inject the Pods or Jobs it \
                 creates)"
            ));
        }
        return 0;
    };
    // Kinds whose templates sit deep inside (and may be several): say which one a warning is about.
    let several = matches!(kind.as_str(), "PyTorchJob" | "JobSet");
    let workload_opted_in = opted_in(document);
    let mut injected = 0;
    for (pointer, workload) in templates {
        let place = if several {
            format!("{kind}/{name} {}", dotted(&pointer))
        } else {
            format!("{kind}/{name}")
        };
        let Some(template) = document.pointer_mut(&pointer) else {
            warnings.push(format!("{place}: has no pod template; left unchanged"));
            continue;
        };
        if !(workload_opted_in || opted_in(template)) {
            let mentions_nerve = template
                .pointer("/metadata/annotations")
                .and_then(Value::as_object)
                .is_some_and(|a| a.keys().any(|k| k.starts_with("nerve.io/")));
            if mentions_nerve {
                warnings.push(format!(
                    "{place}: has nerve.io annotations but not the label \
                     {OPT_IN_LABEL}: {OPT_IN_VALUE}; left unchanged"
                ));
            }
            continue;
        }
        // A Pod's own name changes with every replacement pod; a workload's name is stable.
        let owner = if kind == "Pod" {
            Owner::None
        } else {
            Owner::Named(&name)
        };
        let injection = inject_pod_template(template, owner, &workload, settings);
        warnings.extend(injection.warnings.iter().map(|w| format!("{place}: {w}")));
        injected += usize::from(injection.outcome == Outcome::Injected);
    }
    injected
}

/// The JSON pointers of a kind's pod templates, each with what the injector knows of the
/// workload around it; `None` for a kind this code does not know.
fn pod_templates(kind: &str, document: &Value) -> Option<Vec<(String, Workload)>> {
    let spec = document.get("spec");
    let replicas = || {
        spec.and_then(|s| s.get("replicas"))
            .and_then(Value::as_u64)
            .unwrap_or(1)
    };
    let templates = match kind {
        "Pod" => vec![(String::new(), Workload::Pod)],
        "Job" => vec![(
            "/spec/template".to_owned(),
            Workload::Job(JobShape::of(spec)),
        )],
        "CronJob" => vec![(
            "/spec/jobTemplate/spec/template".to_owned(),
            Workload::Job(JobShape::of(document.pointer("/spec/jobTemplate/spec"))),
        )],
        "Deployment" | "StatefulSet" | "ReplicaSet" | "ReplicationController" => vec![(
            "/spec/template".to_owned(),
            Workload::Replicas {
                kind: kind.to_owned(),
                replicas: replicas(),
            },
        )],
        "DaemonSet" => vec![("/spec/template".to_owned(), Workload::Pod)],
        "PyTorchJob" => pytorchjob_templates(spec),
        "JobSet" => jobset_templates(spec),
        _ => return None,
    };
    Some(templates)
}

/// A PyTorchJob's templates: `spec.pytorchReplicaSpecs.<Master|Worker>.template`.
fn pytorchjob_templates(spec: Option<&Value>) -> Vec<(String, Workload)> {
    let Some(specs) = spec
        .and_then(|s| s.get("pytorchReplicaSpecs"))
        .and_then(Value::as_object)
    else {
        return vec![("/spec/pytorchReplicaSpecs".to_owned(), Workload::Pod)];
    };
    // The operator defaults an unset replica count to 1.
    let replicas = |replica_type: &str| {
        specs
            .get(replica_type)
            .map(|s| s.get("replicas").and_then(Value::as_u64).unwrap_or(1))
    };
    let elastic = spec.and_then(|s| s.get("elasticPolicy")).map(|policy| {
        let bound = |key: &str| policy.get(key).and_then(Value::as_u64);
        (bound("minReplicas"), bound("maxReplicas"))
    });
    let total_replicas = specs.keys().filter_map(|t| replicas(t)).sum();
    specs
        .keys()
        .map(|replica_type| {
            (
                format!(
                    "/spec/pytorchReplicaSpecs/{}/template",
                    escape(replica_type)
                ),
                Workload::PyTorchJob(PyTorchShape {
                    replica_type: replica_type.clone(),
                    has_master: specs.contains_key("Master"),
                    worker_replicas: replicas("Worker").unwrap_or(0),
                    total_replicas,
                    elastic,
                }),
            )
        })
        .collect()
}

/// A JobSet's templates: `spec.replicatedJobs[].template.spec.template`.
fn jobset_templates(spec: Option<&Value>) -> Vec<(String, Workload)> {
    let Some(jobs) = spec
        .and_then(|s| s.get("replicatedJobs"))
        .and_then(Value::as_array)
    else {
        return vec![("/spec/replicatedJobs".to_owned(), Workload::Pod)];
    };
    // JobSet defaults an unset replica count to 1.
    let replicas = |job: &Value| job.get("replicas").and_then(Value::as_u64).unwrap_or(1);
    let shape = |job: &Value| JobShape::of(job.pointer("/template/spec"));
    let total_jobs = jobs.iter().map(replicas).sum();
    let one_pod_per_job = jobs
        .iter()
        .all(|job| replicas(job) == 0 || shape(job).pods() == 1);
    (0..jobs.len())
        .map(|index| {
            (
                format!("/spec/replicatedJobs/{index}/template/spec/template"),
                Workload::JobSet(JobSetShape {
                    total_jobs,
                    job: shape(&jobs[index]),
                    one_pod_per_job,
                }),
            )
        })
        .collect()
}

/// Where, inside `value`, objects are labelled to opt in: dotted paths like
/// `spec.workerGroupSpecs[0].template`.
fn labelled_objects(value: &Value, path: String) -> Vec<String> {
    let mut found = Vec::new();
    match value {
        Value::Object(map) => {
            if opted_in(value) {
                found.push(if path.is_empty() {
                    "the object itself".to_owned()
                } else {
                    path.clone()
                });
            }
            for (key, child) in map {
                if key == "metadata" {
                    continue;
                }
                let child_path = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                found.extend(labelled_objects(child, child_path));
            }
        }
        Value::Array(items) => {
            for (index, item) in items.iter().enumerate() {
                found.extend(labelled_objects(item, format!("{path}[{index}]")));
            }
        }
        _ => {}
    }
    found
}

/// A JSON pointer as a dotted path for messages: `/spec/replicatedJobs/0/template` becomes
/// `spec.replicatedJobs[0].template`.
fn dotted(pointer: &str) -> String {
    let mut out = String::new();
    for part in pointer.split('/').skip(1) {
        let part = part.replace("~1", "/").replace("~0", "~");
        if part.bytes().all(|b| b.is_ascii_digit()) && !part.is_empty() {
            out.push_str(&format!("[{part}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(&part);
        }
    }
    out
}

/// Escapes a key for a JSON pointer (RFC 6901).
fn escape(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn opted_in(object: &Value) -> bool {
    object
        .pointer("/metadata/labels")
        .and_then(|labels| labels.get(OPT_IN_LABEL))
        .and_then(Value::as_str)
        == Some(OPT_IN_VALUE)
}
