//! Rank and world size: which pod of a multi-pod training job a pod is, and how many pods the job
//! has. The sidecar commits one part per rank and a generation once all parts are in, so every
//! pod of the job must get a distinct, stable rank and the same world size.
//!
//! The injector sets `NERVE_RANK` and `NERVE_WORLD_SIZE` in the sidecar and restore containers,
//! each a literal or a downward-API reference, from what the workload already says (first that
//! applies):
//! - the trainer container's launcher variables, copied ("passed through"): `NERVE_RANK`,
//!   `PET_NODE_RANK`, `GROUP_RANK` or `JOB_COMPLETION_INDEX` for the rank; `NERVE_WORLD_SIZE`,
//!   `PET_NNODES` or `GROUP_WORLD_SIZE` for the world size (the Kubeflow training operator sets
//!   the `PET_*` ones on a PyTorchJob's pods, Kubeflow Trainer on its JobSets' templates);
//! - the workload: an Indexed Job's completion index and `completions`; a PyTorchJob's replica
//!   index and replica counts; a JobSet's Job index and Job count where that gives every pod a
//!   distinct rank;
//! - `nerve.io/world-size`, which overrides the world size.
//!
//! Nothing is set for a single-pod workload (world size 1 is the sidecar's default). When only one
//! of the two can be found, neither is set and a warning says what to add.

use std::fmt;

use serde_json::{Map, Value, json};

/// The Job controller's annotation on each pod of an Indexed Job: its completion index.
pub(crate) const COMPLETION_INDEX_ANNOTATION: &str = "batch.kubernetes.io/job-completion-index";
/// The Kubeflow training operator's labels on a PyTorchJob's pods.
const REPLICA_TYPE_LABEL: &str = "training.kubeflow.org/replica-type";
const REPLICA_INDEX_LABEL: &str = "training.kubeflow.org/replica-index";
/// JobSet's labels on its Jobs and their pods: the Job's index across the whole JobSet, the
/// number of Jobs in the JobSet, and the number of Jobs of this replicated Job.
const JOBSET_GLOBAL_INDEX_LABEL: &str = "jobset.sigs.k8s.io/job-global-index";
const JOBSET_GLOBAL_REPLICAS_LABEL: &str = "jobset.sigs.k8s.io/global-replicas";
const JOBSET_REPLICATED_JOB_REPLICAS_LABEL: &str = "jobset.sigs.k8s.io/replicatedjob-replicas";

/// Launcher variables naming the pod's rank, in the order the sidecar itself reads them.
const RANK_VARIABLES: [&str; 4] = [
    "NERVE_RANK",
    "PET_NODE_RANK",
    "GROUP_RANK",
    "JOB_COMPLETION_INDEX",
];
/// Launcher variables naming the world size, in the order the sidecar itself reads them.
const WORLD_SIZE_VARIABLES: [&str; 3] = ["NERVE_WORLD_SIZE", "PET_NNODES", "GROUP_WORLD_SIZE"];

/// What the injector knows of the workload around a pod template.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Workload {
    /// A Pod as admitted or as written in a manifest; whatever created it is not known.
    #[default]
    Pod,
    /// The pod template of a Job (admitted, or a Job or CronJob manifest).
    Job(JobShape),
    /// The pod template of one replica type of a PyTorchJob manifest.
    PyTorchJob(PyTorchShape),
    /// The pod template of one replicated Job of a JobSet manifest.
    JobSet(JobSetShape),
    /// The pod template of a workload whose replicas have no rank (Deployment, StatefulSet,
    /// ReplicaSet, ...), with its replica count.
    Replicas { kind: String, replicas: u64 },
}

/// What of a Job's spec decides its pods' ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobShape {
    pub indexed: bool,
    /// `spec.completions`; unset means a work queue (or, with parallelism unset too, 1).
    pub completions: Option<u64>,
    /// `spec.parallelism` (1 when unset, as Kubernetes defaults it).
    pub parallelism: u64,
}

impl JobShape {
    /// Reads a Job's `spec`.
    pub fn of(spec: Option<&Value>) -> Self {
        let count = |key: &str| spec.and_then(|s| s.get(key)).and_then(Value::as_u64);
        JobShape {
            indexed: spec
                .and_then(|s| s.get("completionMode"))
                .and_then(Value::as_str)
                == Some("Indexed"),
            completions: count("completions"),
            parallelism: count("parallelism").unwrap_or(1),
        }
    }

    /// How many pods of the Job take part: every index of an Indexed Job, else the pods it runs
    /// at once.
    pub fn pods(&self) -> u64 {
        match (self.indexed, self.completions) {
            (true, Some(completions)) => completions,
            (_, Some(completions)) => self.parallelism.min(completions),
            (_, None) => self.parallelism,
        }
    }
}

/// What of a PyTorchJob decides the ranks of one replica type's pods.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PyTorchShape {
    /// `Master`, `Worker`, ...
    pub replica_type: String,
    pub has_master: bool,
    pub worker_replicas: u64,
    /// Replicas of every type together: the operator's `PET_NNODES` without an elastic policy.
    pub total_replicas: u64,
    /// `elasticPolicy` `minReplicas`/`maxReplicas`, when the job is elastic.
    pub elastic: Option<(Option<u64>, Option<u64>)>,
}

/// What of a JobSet decides the ranks of one replicated Job's pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct JobSetShape {
    /// Jobs in the whole JobSet (the sum of every replicated Job's `replicas`).
    pub total_jobs: u64,
    /// The Job template of this replicated Job.
    pub job: JobShape,
    /// Every Job of the JobSet runs one pod.
    pub one_pod_per_job: bool,
}

/// Where one of the two values comes from.
#[derive(Debug, Clone, PartialEq)]
enum Source {
    Literal(u64),
    /// A downward-API field of the pod.
    Field(String),
    /// A launcher variable's own `valueFrom`, copied.
    ValueFrom(Value),
}

impl Source {
    fn env(&self, name: &str) -> Value {
        match self {
            Source::Literal(n) => json!({"name": name, "value": n.to_string()}),
            Source::Field(path) => {
                json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}})
            }
            Source::ValueFrom(from) => json!({"name": name, "valueFrom": from}),
        }
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Literal(n) => write!(f, "{n}"),
            Source::Field(path) => write!(f, "the pod's {path}"),
            Source::ValueFrom(_) => write!(f, "the trainer's launcher variable"),
        }
    }
}

/// The env entries to add to the sidecar and restore containers, and what the operator should
/// know.
#[derive(Debug, Default)]
pub(crate) struct Placement {
    pub env: Vec<Value>,
    pub notes: Vec<String>,
}

/// Finds the rank and world size of the pods of `template` (its `metadata`, and the trainer
/// container), given the workload around it and `nerve.io/world-size`.
pub(crate) fn place(
    workload: &Workload,
    metadata: Option<&Map<String, Value>>,
    trainer: &Value,
    world_size_annotation: Option<u32>,
) -> Placement {
    let mut notes = Vec::new();
    let labels = metadata
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object);
    let label = |key: &str| labels.and_then(|l| l.get(key)).and_then(Value::as_str);
    // In a JobSet of several Jobs, a completion index counts only within its own Job.
    let index_is_global = label(JOBSET_GLOBAL_REPLICAS_LABEL).is_none_or(|total| total == "1");
    let (mut rank, mut world) = launcher_variables(trainer, index_is_global, &mut notes);

    let (derived_rank, derived_world) = match workload {
        Workload::Pod => from_pod(metadata, trainer, &label),
        Workload::Job(job) if label(JOBSET_GLOBAL_REPLICAS_LABEL).is_some() => {
            from_jobset_job(*job, &label, &mut notes)
        }
        Workload::Job(job) => from_job(*job, &mut notes),
        Workload::PyTorchJob(shape) => from_pytorchjob(shape, &mut notes),
        Workload::JobSet(shape) => from_jobset(*shape, &mut notes),
        Workload::Replicas { kind, replicas } => {
            if *replicas > 1 {
                notes.push(format!(
                    "the {replicas} replicas of this {kind} have no rank, so each commits its own \
                     generations of one job; use an Indexed Job (or one {kind} per nerve.io/job) \
                     for a multi-pod job"
                ));
            }
            (None, None)
        }
    };
    rank = rank.or(derived_rank);
    world = world.or(derived_world);
    if let Some(n) = world_size_annotation {
        world = Some(Source::Literal(u64::from(n)));
    }

    match (rank, world) {
        (Some(rank), Some(world)) => {
            if let (Source::Literal(r), Source::Literal(w)) = (&rank, &world)
                && r >= w
            {
                notes.push(format!(
                    "rank {r} is not below the world size {w}; no rank set (check \
                     nerve.io/world-size)"
                ));
                return Placement {
                    env: Vec::new(),
                    notes,
                };
            }
            Placement {
                env: vec![rank.env("NERVE_RANK"), world.env("NERVE_WORLD_SIZE")],
                notes,
            }
        }
        (None, Some(Source::Literal(1))) | (None, None) => Placement {
            env: Vec::new(),
            notes,
        },
        (None, Some(world)) => {
            notes.push(format!(
                "the job has {world} pods but this pod's rank cannot be found, so no rank is set \
                 and it would commit alone; give the trainer container NERVE_RANK (or a \
                 launcher's PET_NODE_RANK)"
            ));
            Placement {
                env: Vec::new(),
                notes,
            }
        }
        (Some(rank), None) => {
            notes.push(format!(
                "this pod's rank is {rank} but the number of pods is not known, so no rank is \
                 set; set nerve.io/world-size"
            ));
            Placement {
                env: Vec::new(),
                notes,
            }
        }
    }
}

/// The rank and world size the trainer container's own launcher variables give.
fn launcher_variables(
    trainer: &Value,
    index_is_global: bool,
    notes: &mut Vec<String>,
) -> (Option<Source>, Option<Source>) {
    let env = trainer
        .get("env")
        .and_then(Value::as_array)
        .map(Vec::as_slice)
        .unwrap_or_default();
    let find = |name: &str| {
        env.iter()
            .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
    };
    let mut rank = None;
    for name in RANK_VARIABLES {
        if name == "JOB_COMPLETION_INDEX" && !index_is_global {
            continue;
        }
        let Some(entry) = find(name) else { continue };
        match usable(entry, false) {
            Ok(source) => {
                rank = Some(source);
                break;
            }
            Err(value) => notes.push(format!(
                "the trainer's {name} is `{value}`, not a rank; it is not passed to the sidecar"
            )),
        }
    }
    let mut world = None;
    for name in WORLD_SIZE_VARIABLES {
        let Some(entry) = find(name) else { continue };
        match usable(entry, name == "PET_NNODES") {
            Ok(source) => {
                world = Some(source);
                break;
            }
            Err(value) => notes.push(format!(
                "the trainer's {name} is `{value}`: the number of pods can change (elastic), so \
                 a generation cannot name all its parts; set nerve.io/world-size to the number \
                 of pods that checkpoint"
            )),
        }
    }
    (rank, world)
}

/// A launcher variable the sidecar can use: a whole number, a `valueFrom` (copied as is), or for
/// `PET_NNODES` an elastic range whose ends agree (`4:4`). Anything else is returned as the
/// offending value.
fn usable(entry: &Value, range_allowed: bool) -> Result<Source, String> {
    if let Some(from) = entry.get("valueFrom") {
        return Ok(Source::ValueFrom(from.clone()));
    }
    let value = entry
        .get("value")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .trim();
    if let Ok(n) = value.parse::<u64>() {
        return Ok(Source::Literal(n));
    }
    if range_allowed
        && let Some((low, high)) = value.split_once(':')
        && low == high
        && let Ok(n) = low.parse::<u64>()
    {
        return Ok(Source::Literal(n));
    }
    Err(value.to_owned())
}

/// A Pod as admitted: an Indexed Job's completion index, or a PyTorchJob's replica index when
/// the operator gave the pod no node rank (a job without a Master).
fn from_pod<'a>(
    metadata: Option<&Map<String, Value>>,
    trainer: &Value,
    label: &impl Fn(&str) -> Option<&'a str>,
) -> (Option<Source>, Option<Source>) {
    let annotated = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key(COMPLETION_INDEX_ANNOTATION));
    // A JobSet's pod: its completion index counts only within its own Job.
    if let Some(total_jobs) = label(JOBSET_GLOBAL_REPLICAS_LABEL)
        && total_jobs != "1"
    {
        return (None, None);
    }
    if annotated {
        let path = format!("metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']");
        return (Some(Source::Field(path)), None);
    }
    if label(REPLICA_TYPE_LABEL).is_some() && label(REPLICA_INDEX_LABEL).is_some() {
        // The operator sets PET_NODE_RANK (taken above) whenever the job has a Master; without
        // one, the Workers' replica indexes are the node ranks. Older operators set only RANK,
        // which is the node rank too.
        let rank = trainer
            .get("env")
            .and_then(Value::as_array)
            .and_then(|env| env.iter().find(|e| e["name"] == "RANK"))
            .and_then(|entry| usable(entry, false).ok())
            .unwrap_or_else(|| Source::Field(format!("metadata.labels['{REPLICA_INDEX_LABEL}']")));
        return (Some(rank), None);
    }
    (None, None)
}

/// An Indexed Job: the completion index, out of `completions`.
fn from_job(job: JobShape, notes: &mut Vec<String>) -> (Option<Source>, Option<Source>) {
    if job.indexed {
        let path = format!("metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']");
        return (Some(Source::Field(path)), Some(Source::Literal(job.pods())));
    }
    if job.pods() > 1 {
        notes.push(format!(
            "the {} pods this Job runs at once have no rank, so each commits its own generations \
             of one job; use completionMode: Indexed for a multi-pod job",
            job.pods()
        ));
    }
    (None, None)
}

/// A Job of a JobSet, admitted on its own: JobSet's labels on its template say how many Jobs
/// there are and which one this is, but not how many pods the other Jobs run, so a global rank
/// is found only when every Job is this one's twin (one replicated Job) and either there is one
/// Job or each Job runs one pod.
fn from_jobset_job<'a>(
    job: JobShape,
    label: &impl Fn(&str) -> Option<&'a str>,
    notes: &mut Vec<String>,
) -> (Option<Source>, Option<Source>) {
    let count = |key: &str| label(key).and_then(|v| v.parse::<u64>().ok());
    let (Some(total_jobs), Some(twins)) = (
        count(JOBSET_GLOBAL_REPLICAS_LABEL),
        count(JOBSET_REPLICATED_JOB_REPLICAS_LABEL),
    ) else {
        notes.push(
            "this JobSet Job's labels do not say how many Jobs the JobSet has; set \
             nerve.io/world-size"
                .to_owned(),
        );
        return (None, None);
    };
    if total_jobs == twins {
        from_jobset(
            JobSetShape {
                total_jobs,
                job,
                one_pod_per_job: job.pods() == 1,
            },
            notes,
        )
    } else {
        notes.push(format!(
            "this JobSet has {total_jobs} Jobs over several replicated Jobs, whose pod counts \
             this Job does not show, so its pods' global rank cannot be found here; inject the \
             JobSet itself with `nerve-sidecar inject`, which sees every replicated Job"
        ));
        (None, None)
    }
}

/// A JobSet: one Job of N pods ranks by completion index; N Jobs of one pod each rank by the
/// Job's global index. Anything else needs arithmetic the downward API cannot do.
fn from_jobset(shape: JobSetShape, notes: &mut Vec<String>) -> (Option<Source>, Option<Source>) {
    if shape.total_jobs == 1 {
        return from_job(shape.job, notes);
    }
    if shape.one_pod_per_job {
        let path = format!("metadata.labels['{JOBSET_GLOBAL_INDEX_LABEL}']");
        return (
            Some(Source::Field(path)),
            Some(Source::Literal(shape.total_jobs)),
        );
    }
    notes.push(format!(
        "this JobSet runs {} Jobs of several pods each: a pod's global rank (its Job's index times \
         the pods per Job, plus its completion index) cannot be written with the downward API, \
         so its pods get no rank and each commits alone; use one Job of N pods (replicas: 1, \
         completionMode: Indexed) or N Jobs of one pod each",
        shape.total_jobs
    ));
    (None, None)
}

/// A PyTorchJob: the world size is the operator's `PET_NNODES`; Workers rank by replica index.
/// With a Master, the operator's node rank of a Worker is its index plus one, which the downward
/// API cannot compute, so offline the Master takes the last rank instead: ranks stay distinct
/// and stable per pod, which is all a part's rank is for.
fn from_pytorchjob(
    shape: &PyTorchShape,
    notes: &mut Vec<String>,
) -> (Option<Source>, Option<Source>) {
    let world = match shape.elastic {
        None => Some(shape.total_replicas),
        Some((None, None)) => Some(shape.worker_replicas),
        Some((Some(low), Some(high))) if low == high => Some(low),
        Some((low, high)) => {
            let bound = |b: Option<u64>| b.map_or_else(|| "unset".to_owned(), |b| b.to_string());
            notes.push(format!(
                "this PyTorchJob is elastic ({} to {} pods): the number of pods can change, so a \
                 generation cannot name all its parts; set nerve.io/world-size to the number of \
                 pods that checkpoint",
                bound(low),
                bound(high)
            ));
            None
        }
    };
    let rank = match shape.replica_type.as_str() {
        "Master" => Some(Source::Literal(if shape.has_master {
            shape.worker_replicas
        } else {
            0
        })),
        "Worker" => Some(Source::Field(format!(
            "metadata.labels['{REPLICA_INDEX_LABEL}']"
        ))),
        other => {
            notes.push(format!(
                "PyTorchJob replica type {other} is neither Master nor Worker; its pods get no rank"
            ));
            None
        }
    };
    (rank, world.map(Source::Literal))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env_of(placement: &Placement) -> Value {
        Value::Array(placement.env.clone())
    }

    fn trainer(env: Value) -> Value {
        json!({"name": "trainer", "image": "t:1", "env": env})
    }

    fn metadata(value: Value) -> Map<String, Value> {
        value.as_object().cloned().expect("object")
    }

    #[test]
    fn an_indexed_job_ranks_by_completion_index_out_of_its_completions() {
        let job = Workload::Job(JobShape::of(Some(
            &json!({"completionMode": "Indexed", "completions": 4, "parallelism": 4}),
        )));
        let placement = place(&job, None, &trainer(json!([])), None);
        assert_eq!(
            env_of(&placement),
            json!([
                {"name": "NERVE_RANK", "valueFrom": {"fieldRef": {"fieldPath":
                    "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}},
                {"name": "NERVE_WORLD_SIZE", "value": "4"}
            ])
        );
        assert!(placement.notes.is_empty(), "{:?}", placement.notes);

        let overridden = place(&job, None, &trainer(json!([])), Some(2));
        assert_eq!(
            overridden.env[1],
            json!({"name": "NERVE_WORLD_SIZE", "value": "2"})
        );
    }

    #[test]
    fn a_single_pod_job_gets_nothing_and_a_parallel_unindexed_one_a_warning() {
        let single = place(
            &Workload::Job(JobShape::of(Some(&json!({})))),
            None,
            &trainer(json!([])),
            None,
        );
        assert!(single.env.is_empty() && single.notes.is_empty());
        let parallel = place(
            &Workload::Job(JobShape::of(Some(&json!({"parallelism": 3})))),
            None,
            &trainer(json!([])),
            None,
        );
        assert!(parallel.env.is_empty());
        assert!(parallel.notes[0].contains("completionMode: Indexed"));
    }

    #[test]
    fn passes_the_launchers_variables_through_in_the_sidecars_order() {
        // As the Kubeflow training operator sets them on a PyTorchJob pod with a Master.
        let env = json!([
            {"name": "MASTER_ADDR", "value": "llama-master-0"},
            {"name": "WORLD_SIZE", "value": "24"},
            {"name": "RANK", "value": "2"},
            {"name": "PET_NODE_RANK", "value": "2"},
            {"name": "PET_NNODES", "value": "3"}
        ]);
        let pod = metadata(json!({"labels": {
            "training.kubeflow.org/replica-type": "worker",
            "training.kubeflow.org/replica-index": "1"}}));
        let placement = place(&Workload::Pod, Some(&pod), &trainer(env), None);
        assert_eq!(
            env_of(&placement),
            json!([{"name": "NERVE_RANK", "value": "2"}, {"name": "NERVE_WORLD_SIZE", "value": "3"}])
        );

        // As Kubeflow Trainer sets them on a JobSet's template: the rank by reference.
        let env = json!([
            {"name": "PET_NNODES", "value": "4"},
            {"name": "PET_NODE_RANK", "valueFrom": {"fieldRef": {"fieldPath":
                "metadata.annotations['batch.kubernetes.io/job-completion-index']"}}}
        ]);
        let placement = place(&Workload::Pod, None, &trainer(env), None);
        assert_eq!(
            placement.env[0]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        );
        assert_eq!(placement.env[1]["value"], "4");
    }

    #[test]
    fn an_elastic_range_is_not_a_world_size_unless_its_ends_agree() {
        let elastic = |nnodes: &str| json!([{"name": "PET_NODE_RANK", "value": "0"}, {"name": "PET_NNODES", "value": nnodes}]);
        let fixed = place(&Workload::Pod, None, &trainer(elastic("2:2")), None);
        assert_eq!(fixed.env[1]["value"], "2");
        let ranged = place(&Workload::Pod, None, &trainer(elastic("1:4")), None);
        assert!(ranged.env.is_empty());
        assert!(
            ranged.notes.iter().any(|n| n.contains("`1:4`")),
            "{:?}",
            ranged.notes
        );
        assert!(
            ranged
                .notes
                .iter()
                .any(|n| n.contains("nerve.io/world-size"))
        );
        let annotated = place(&Workload::Pod, None, &trainer(elastic("1:4")), Some(4));
        assert_eq!(annotated.env[1]["value"], "4", "the annotation settles it");
    }

    #[test]
    fn a_pytorchjob_worker_pod_without_a_master_ranks_by_replica_index() {
        let pod = metadata(json!({"labels": {
            "training.kubeflow.org/replica-type": "worker",
            "training.kubeflow.org/replica-index": "3"}}));
        let placement = place(
            &Workload::Pod,
            Some(&pod),
            &trainer(json!([{"name": "PET_NNODES", "value": "4"}])),
            None,
        );
        assert_eq!(
            placement.env[0]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.labels['training.kubeflow.org/replica-index']"
        );
        assert_eq!(placement.env[1]["value"], "4");
    }

    #[test]
    fn a_pod_with_a_rank_but_no_world_size_gets_neither_and_a_warning() {
        let pod =
            metadata(json!({"annotations": {"batch.kubernetes.io/job-completion-index": "2"}}));
        let placement = place(&Workload::Pod, Some(&pod), &trainer(json!([])), None);
        assert!(placement.env.is_empty());
        assert!(placement.notes[0].contains("nerve.io/world-size"));
        let placement = place(&Workload::Pod, Some(&pod), &trainer(json!([])), Some(3));
        assert_eq!(placement.env.len(), 2);
    }

    #[test]
    fn a_jobset_pod_is_not_ranked_by_its_index_within_one_of_several_jobs() {
        let pod = metadata(json!({
            "labels": {"jobset.sigs.k8s.io/global-replicas": "2"},
            "annotations": {"batch.kubernetes.io/job-completion-index": "0"}}));
        let env = json!([{"name": "JOB_COMPLETION_INDEX", "value": "0"}]);
        let placement = place(&Workload::Pod, Some(&pod), &trainer(env), Some(8));
        assert!(placement.env.is_empty(), "{:?}", placement.env);
        assert!(
            placement.notes[0].contains("rank cannot be found"),
            "{:?}",
            placement.notes
        );
    }

    #[test]
    fn a_rank_outside_the_world_size_is_refused() {
        let placement = place(
            &Workload::Pod,
            None,
            &trainer(json!([{"name": "NERVE_RANK", "value": "5"}])),
            Some(4),
        );
        assert!(placement.env.is_empty());
        assert!(placement.notes[0].contains("not below"));
    }

    #[test]
    fn pytorchjob_templates_rank_workers_by_index_and_the_master_last() {
        let shape = |replica_type: &str, has_master: bool, elastic| PyTorchShape {
            replica_type: replica_type.to_owned(),
            has_master,
            worker_replicas: 3,
            total_replicas: if has_master { 4 } else { 3 },
            elastic,
        };
        let master = place(
            &Workload::PyTorchJob(shape("Master", true, None)),
            None,
            &trainer(json!([])),
            None,
        );
        assert_eq!(
            env_of(&master),
            json!([{"name": "NERVE_RANK", "value": "3"}, {"name": "NERVE_WORLD_SIZE", "value": "4"}])
        );
        let worker = place(
            &Workload::PyTorchJob(shape("Worker", true, None)),
            None,
            &trainer(json!([])),
            None,
        );
        assert_eq!(
            worker.env[0]["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.labels['training.kubeflow.org/replica-index']"
        );
        assert_eq!(worker.env[1]["value"], "4");
        let elastic = place(
            &Workload::PyTorchJob(shape("Worker", false, Some((Some(2), Some(3))))),
            None,
            &trainer(json!([])),
            None,
        );
        assert!(elastic.env.is_empty());
        assert!(
            elastic
                .notes
                .iter()
                .any(|n| n.contains("elastic (2 to 3 pods)"))
        );
    }

    #[test]
    fn jobsets_rank_where_the_downward_api_can_and_say_so_where_it_cannot() {
        let indexed = JobShape {
            indexed: true,
            completions: Some(4),
            parallelism: 4,
        };
        let one_job = place(
            &Workload::JobSet(JobSetShape {
                total_jobs: 1,
                job: indexed,
                one_pod_per_job: false,
            }),
            None,
            &trainer(json!([])),
            None,
        );
        assert_eq!(one_job.env[1]["value"], "4");
        let single_pods = place(
            &Workload::JobSet(JobSetShape {
                total_jobs: 6,
                job: JobShape::of(None),
                one_pod_per_job: true,
            }),
            None,
            &trainer(json!([])),
            None,
        );
        assert_eq!(
            env_of(&single_pods),
            json!([
                {"name": "NERVE_RANK", "valueFrom": {"fieldRef": {"fieldPath":
                    "metadata.labels['jobset.sigs.k8s.io/job-global-index']"}}},
                {"name": "NERVE_WORLD_SIZE", "value": "6"}
            ])
        );
        let many = place(
            &Workload::JobSet(JobSetShape {
                total_jobs: 2,
                job: indexed,
                one_pod_per_job: false,
            }),
            None,
            &trainer(json!([])),
            None,
        );
        assert!(many.env.is_empty());
        assert!(many.notes[0].contains("cannot be written with the downward API"));

        // A JobSet's Job as the Job webhook admits it, labelled by the JobSet controller.
        let labels = |total: &str, twins: &str| {
            metadata(json!({"labels": {
                "jobset.sigs.k8s.io/jobset-name": "llama",
                "jobset.sigs.k8s.io/global-replicas": total,
                "jobset.sigs.k8s.io/replicatedjob-replicas": twins,
                "jobset.sigs.k8s.io/job-global-index": "1"}}))
        };
        let single_pod_job = Workload::Job(JobShape::of(None));
        let twins = place(
            &single_pod_job,
            Some(&labels("3", "3")),
            &trainer(json!([])),
            None,
        );
        assert_eq!(twins.env[1]["value"], "3");
        let mixed = place(
            &single_pod_job,
            Some(&labels("3", "2")),
            &trainer(json!([])),
            None,
        );
        assert!(mixed.env.is_empty());
        assert!(mixed.notes[0].contains("several replicated Jobs"));
    }
}
