//! The `nerve.io/*` pod annotations that say what to checkpoint and where, checked all at once.

use std::fmt;

use serde_json::{Map, Value};

use nerve_store::Destination;

use super::pod::SIDECAR_MEMORY_LIMIT;

/// `s3://bucket/prefix` the checkpoints go to (required).
pub const ANNOTATION_DEST: &str = "nerve.io/dest";
/// Stable name of the training job across pods (required unless the pod belongs to a Job).
pub const ANNOTATION_JOB: &str = "nerve.io/job";
/// Absolute path of the checkpoint directory in the trainer container (required).
pub const ANNOTATION_DIR: &str = "nerve.io/checkpoint-dir";
/// Signal that asks the trainer to checkpoint (default SIGUSR1).
pub const ANNOTATION_SIGNAL: &str = "nerve.io/signal";
/// Regex on the trainer's command line, to pick the process to signal.
pub const ANNOTATION_TARGET: &str = "nerve.io/target";
/// Name of the trainer container (default: the first container).
pub const ANNOTATION_CONTAINER: &str = "nerve.io/container";
/// File (relative to the checkpoint directory, or absolute inside it) whose appearance means the
/// checkpoint is complete; given to the trainer and the sidecar as `NERVE_DONE_MARKER`. Unset,
/// both sides use their default (`.nerve-done` in the checkpoint directory).
pub const ANNOTATION_DONE_MARKER: &str = "nerve.io/done-marker";
/// Comma-separated globs, relative to the checkpoint directory, of files that are not checkpoint
/// content (logs, TensorBoard events); given to the sidecar and restore as `NERVE_EXCLUDE`.
pub const ANNOTATION_EXCLUDE: &str = "nerve.io/exclude";
/// How many pods the training job has, each committing one part of a generation; overrides what
/// the injector derives from the workload (an Indexed Job's completions, a launcher's variables).
pub const ANNOTATION_WORLD_SIZE: &str = "nerve.io/world-size";
/// Memory limit of the injected containers, a Kubernetes quantity (`512Mi`, `1Gi`); for
/// checkpoints of more files than the default limit holds.
pub const ANNOTATION_SIDECAR_MEMORY: &str = "nerve.io/sidecar-memory";

/// Largest `nerve.io/world-size` accepted: far beyond any training job's pod count (the largest
/// runs use tens of thousands of GPUs, at eight per pod), and small enough to be a typo's bound.
const MAX_WORLD_SIZE: u32 = 65_536;

/// Smallest `nerve.io/sidecar-memory` accepted, in bytes: an upload at the default concurrency
/// needs ~40-60 MiB before any per-file state, so a lower limit risks the OOM killer during the
/// notice upload.
const MIN_SIDECAR_MEMORY: u64 = 128 * 1024 * 1024;

/// Labels whose value names the training job a pod belongs to, most specific first: JobSet puts
/// its name on every pod of every Job it runs (each of which has its own Job name), the Kubeflow
/// training operator its PyTorchJob's name, the Job controller the Job's name.
const JOB_NAME_LABELS: [&str; 4] = [
    "jobset.sigs.k8s.io/jobset-name",
    "training.kubeflow.org/job-name",
    "batch.kubernetes.io/job-name",
    "job-name",
];

/// The Job controller's label on every pod of a Job (Kubernetes 1.27 and later).
pub(crate) const JOB_NAME_LABEL: &str = "batch.kubernetes.io/job-name";

/// What names the workload around a pod template, for the default job name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner<'a> {
    /// A Pod on its own (its name changes with every replacement, so it names nothing).
    None,
    /// A workload with a stable name (a Job, a Deployment, a PyTorchJob...).
    Named(&'a str),
    /// A Job created with `generateName`, not named yet when admitted; its pods carry the name in
    /// [`JOB_NAME_LABEL`].
    UnnamedJob,
}

/// The training job's name as the sidecar gets it in `NERVE_JOB`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobName {
    /// `nerve.io/job`, used as given.
    Given(String),
    /// A workload's name; the pod's namespace is put in front at run time
    /// (`$(POD_NAMESPACE).<name>`), so same-named Jobs in two namespaces never share generations.
    InNamespace(String),
    /// The Job's name from the pod's [`JOB_NAME_LABEL`], in the pod's namespace.
    FromJobLabel,
}

/// The signal the sidecar sends when the pod does not say (DESIGN.md).
const DEFAULT_SIGNAL: &str = "SIGUSR1";

/// What a pod asked for, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointRequest {
    pub dest: String,
    pub job: JobName,
    pub dir: String,
    /// Canonical name, e.g. `SIGUSR1`.
    pub signal: String,
    pub target: Option<String>,
    pub container: Option<String>,
    pub done_marker: Option<String>,
    /// Validated globs, in the order given.
    pub exclude: Vec<String>,
    /// `nerve.io/world-size`: the number of pods in the job, when the pod says.
    pub world_size: Option<u32>,
    /// `nerve.io/sidecar-memory` as given, a quantity of at least `MIN_SIDECAR_MEMORY`: the
    /// memory limit of the injected containers, when the pod says.
    pub sidecar_memory: Option<String>,
}

/// One annotation that is missing or wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AnnotationError {
    Missing {
        key: &'static str,
        fix: &'static str,
    },
    Invalid {
        key: &'static str,
        problem: String,
    },
}

impl fmt::Display for AnnotationError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AnnotationError::Missing { key, fix } => {
                write!(f, "annotation {key} is missing; {fix}")
            }
            AnnotationError::Invalid { key, problem } => write!(f, "annotation {key}: {problem}"),
        }
    }
}

impl std::error::Error for AnnotationError {}

/// Reads and checks the annotations in a pod's (or pod template's) `metadata`, reporting every
/// problem at once. Without `nerve.io/job`, the job is named after the workload: a label naming
/// it on the pod, else `owner`.
pub fn read_annotations(
    metadata: Option<&Map<String, Value>>,
    owner: Owner<'_>,
) -> Result<CheckpointRequest, Vec<AnnotationError>> {
    let annotations = metadata
        .and_then(|m| m.get("annotations"))
        .and_then(Value::as_object);
    let labels = metadata
        .and_then(|m| m.get("labels"))
        .and_then(Value::as_object);
    let mut errors = Vec::new();
    let get = |key: &'static str, errors: &mut Vec<AnnotationError>| -> Option<String> {
        match annotations.and_then(|a| a.get(key)) {
            None => None,
            Some(Value::String(s)) if s.trim().is_empty() => {
                errors.push(AnnotationError::Invalid {
                    key,
                    problem: "is empty".to_owned(),
                });
                None
            }
            Some(Value::String(s)) => Some(s.trim().to_owned()),
            Some(other) => {
                errors.push(AnnotationError::Invalid {
                    key,
                    problem: format!("must be a string, got {other}"),
                });
                None
            }
        }
    };

    let dest = get(ANNOTATION_DEST, &mut errors);
    let job = get(ANNOTATION_JOB, &mut errors);
    let dir = get(ANNOTATION_DIR, &mut errors);
    let signal = get(ANNOTATION_SIGNAL, &mut errors);
    let target = get(ANNOTATION_TARGET, &mut errors);
    let container = get(ANNOTATION_CONTAINER, &mut errors);
    let done_marker = get(ANNOTATION_DONE_MARKER, &mut errors);
    let exclude = get(ANNOTATION_EXCLUDE, &mut errors);
    let world_size = get(ANNOTATION_WORLD_SIZE, &mut errors).and_then(|value| {
        match value.parse::<u32>() {
            Ok(n) if (1..=MAX_WORLD_SIZE).contains(&n) => Some(n),
            _ => {
                errors.push(AnnotationError::Invalid {
                    key: ANNOTATION_WORLD_SIZE,
                    problem: format!(
                        "`{value}` is not a number of pods; use a whole number from 1 to {MAX_WORLD_SIZE}"
                    ),
                });
                None
            }
        }
    });

    let sidecar_memory = get(ANNOTATION_SIDECAR_MEMORY, &mut errors).and_then(|value| {
        match check_sidecar_memory(&value) {
            Ok(()) => Some(value),
            Err(problem) => {
                errors.push(AnnotationError::Invalid {
                    key: ANNOTATION_SIDECAR_MEMORY,
                    problem,
                });
                None
            }
        }
    });

    let dest = match dest {
        None if !has_error(&errors, ANNOTATION_DEST) => {
            errors.push(AnnotationError::Missing {
                key: ANNOTATION_DEST,
                fix: "set it to s3://bucket/prefix",
            });
            None
        }
        None => None,
        Some(dest) => match Destination::parse(&dest) {
            Ok(_) => Some(dest),
            Err(problem) => {
                errors.push(AnnotationError::Invalid {
                    key: ANNOTATION_DEST,
                    problem,
                });
                None
            }
        },
    };

    let job = match job {
        Some(given) => match nerve_store::s3::check_job_name(&given) {
            Ok(given) => Some(JobName::Given(given)),
            Err(problem) => {
                errors.push(AnnotationError::Invalid {
                    key: ANNOTATION_JOB,
                    problem,
                });
                None
            }
        },
        None if has_error(&errors, ANNOTATION_JOB) => None,
        None => {
            let labelled = JOB_NAME_LABELS
                .iter()
                .find_map(|l| labels.and_then(|m| m.get(*l)).and_then(Value::as_str));
            match (labelled, owner) {
                (Some(name), _) | (None, Owner::Named(name)) => {
                    match nerve_store::s3::check_job_name(name) {
                        Ok(name) => Some(JobName::InNamespace(name)),
                        Err(problem) => {
                            errors.push(AnnotationError::Invalid {
                                key: ANNOTATION_JOB,
                                problem: format!(
                                    "is not set, and the workload's name cannot be the job name: {problem}"
                                ),
                            });
                            None
                        }
                    }
                }
                (None, Owner::UnnamedJob) => Some(JobName::FromJobLabel),
                (None, Owner::None) => {
                    errors.push(AnnotationError::Missing {
                        key: ANNOTATION_JOB,
                        fix: "set it to the training job's stable name (the same in every pod \
                              that resumes it)",
                    });
                    None
                }
            }
        }
    };

    let dir = match dir {
        None if !has_error(&errors, ANNOTATION_DIR) => {
            errors.push(AnnotationError::Missing {
                key: ANNOTATION_DIR,
                fix: "set it to the absolute path the trainer writes checkpoints to",
            });
            None
        }
        None => None,
        Some(dir) => match check_dir(&dir) {
            Ok(dir) => Some(dir),
            Err(problem) => {
                errors.push(AnnotationError::Invalid {
                    key: ANNOTATION_DIR,
                    problem,
                });
                None
            }
        },
    };

    let signal = match signal {
        None => Some(DEFAULT_SIGNAL.to_owned()),
        Some(signal) => match parse_signal(&signal) {
            Ok(signal) => Some(signal),
            Err(problem) => {
                errors.push(AnnotationError::Invalid {
                    key: ANNOTATION_SIGNAL,
                    problem,
                });
                None
            }
        },
    };

    if let Some(target) = &target
        && let Err(e) = regex::Regex::new(target)
    {
        errors.push(AnnotationError::Invalid {
            key: ANNOTATION_TARGET,
            problem: format!("`{target}` is not a regular expression ({e})"),
        });
    }

    if let Some(container) = &container
        && !is_dns_label(container)
    {
        errors.push(AnnotationError::Invalid {
            key: ANNOTATION_CONTAINER,
            problem: format!("`{container}` is not a container name"),
        });
    }

    if let Some(marker) = &done_marker
        && let Err(problem) = check_done_marker(marker, dir.as_deref())
    {
        errors.push(AnnotationError::Invalid {
            key: ANNOTATION_DONE_MARKER,
            problem,
        });
    }

    let exclude = match exclude.as_deref().map(parse_exclude) {
        None => Vec::new(),
        Some(Ok(patterns)) => patterns,
        Some(Err(problem)) => {
            errors.push(AnnotationError::Invalid {
                key: ANNOTATION_EXCLUDE,
                problem,
            });
            Vec::new()
        }
    };

    match (dest, job, dir, signal) {
        (Some(dest), Some(job), Some(dir), Some(signal)) if errors.is_empty() => {
            Ok(CheckpointRequest {
                dest,
                job,
                dir,
                signal,
                target,
                container,
                done_marker,
                exclude,
                world_size,
                sidecar_memory,
            })
        }
        _ => Err(errors),
    }
}

fn has_error(errors: &[AnnotationError], key: &str) -> bool {
    errors.iter().any(|e| match e {
        AnnotationError::Missing { key: k, .. } | AnnotationError::Invalid { key: k, .. } => {
            *k == key
        }
    })
}

/// An absolute, normalised directory other than `/`, with a trailing slash removed.
fn check_dir(dir: &str) -> Result<String, String> {
    let trimmed = dir.trim_end_matches('/');
    if !dir.starts_with('/') {
        return Err(format!("`{dir}` is not an absolute path"));
    }
    if trimmed.is_empty() {
        return Err("`/` cannot be the checkpoint directory; use a directory below it".to_owned());
    }
    if trimmed
        .split('/')
        .skip(1)
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "`{dir}` must be a plain path without `.`, `..` or `//`"
        ));
    }
    Ok(trimmed.to_owned())
}

/// A done marker the trainer and the sidecar both see: a plain relative path (resolved against
/// the checkpoint directory), or an absolute one inside it (the only filesystem they share).
fn check_done_marker(marker: &str, dir: Option<&str>) -> Result<(), String> {
    if marker.ends_with('/') {
        return Err(format!("`{marker}` names a directory; name a file"));
    }
    let relative = match marker.strip_prefix('/') {
        None => marker,
        Some(_) => match dir {
            // The directory is invalid or missing; that error is reported on its own.
            None => return Ok(()),
            Some(dir) => marker
                .strip_prefix(dir)
                .and_then(|rest| rest.strip_prefix('/'))
                .ok_or_else(|| {
                    format!(
                        "`{marker}` is outside the checkpoint directory {dir}, which is all the \
                         sidecar shares with the trainer; use a path inside it, e.g. .nerve-done"
                    )
                })?,
        },
    };
    if relative
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        return Err(format!(
            "`{marker}` must be a plain path without `.`, `..` or `//`"
        ));
    }
    Ok(())
}

/// Comma-separated globs relative to the checkpoint directory: none empty, none absolute, none
/// climbing out with `..`. Every problem is named at once.
fn parse_exclude(value: &str) -> Result<Vec<String>, String> {
    let mut patterns = Vec::new();
    let mut problems = Vec::new();
    for (index, pattern) in value.split(',').map(str::trim).enumerate() {
        let position = index + 1;
        if pattern.is_empty() {
            problems.push(format!(
                "pattern {position} is empty (a doubled or trailing comma?)"
            ));
        } else if pattern.starts_with('/') {
            problems.push(format!(
                "`{pattern}` is absolute; patterns are relative to the checkpoint directory"
            ));
        } else if pattern.split('/').any(|c| c == "..") {
            problems.push(format!(
                "`{pattern}` contains `..`; patterns cannot reach outside the checkpoint directory"
            ));
        } else {
            patterns.push(pattern.to_owned());
        }
    }
    if problems.is_empty() {
        Ok(patterns)
    } else {
        Err(problems.join("; "))
    }
}

/// A memory limit the sidecar can upload within: a quantity of at least [`MIN_SIDECAR_MEMORY`].
fn check_sidecar_memory(value: &str) -> Result<(), String> {
    let floor_mib = MIN_SIDECAR_MEMORY >> 20;
    match parse_memory_quantity(value) {
        None => Err(format!(
            "`{value}` is not a memory quantity; use a number of bytes with an optional suffix \
             Ki, Mi, Gi, Ti, k, M, G or T, e.g. 512Mi or 1Gi"
        )),
        Some(bytes) if bytes < MIN_SIDECAR_MEMORY => Err(format!(
            "`{value}` is below the minimum of {floor_mib}Mi (an upload needs 40-60 MiB before \
             any per-file state); use at least {floor_mib}Mi, or remove it for the default \
             {SIDECAR_MEMORY_LIMIT}"
        )),
        Some(_) => Ok(()),
    }
}

/// Bytes in a Kubernetes memory quantity, rounded up: a whole or decimal number with an optional
/// binary (`Ki`, `Mi`, `Gi`, `Ti`) or decimal (`k`, `M`, `G`, `T`) suffix. `None` for anything
/// else, including the quantity forms no memory limit needs (exponents, `m`, `P`, `E`, `-`).
fn parse_memory_quantity(value: &str) -> Option<u64> {
    let value = value.strip_prefix('+').unwrap_or(value);
    let (number, suffix) = value.split_at(
        value
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(value.len()),
    );
    let multiplier: u128 = match suffix {
        "" => 1,
        "k" => 1_000,
        "M" => 1_000_000,
        "G" => 1_000_000_000,
        "T" => 1_000_000_000_000,
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        "Ti" => 1 << 40,
        _ => return None,
    };
    let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
    let digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    // `1.` and `.5` are quantities too; `.` alone is not.
    if !digits(whole) || !digits(fraction) || whole.len() + fraction.len() == 0 {
        return None;
    }
    // The number as an integer of units of 10^-(fraction digits).
    let scaled: u128 = format!("{whole}{fraction}").parse().ok()?;
    let scale = 10u128.checked_pow(u32::try_from(fraction.len()).ok()?)?;
    let bytes = scaled.checked_mul(multiplier)?.div_ceil(scale);
    u64::try_from(bytes).ok()
}

/// The signal as `nerve-sidecar run --signal` reads it, in canonical form (`usr1` → `SIGUSR1`).
fn parse_signal(value: &str) -> Result<String, String> {
    crate::run::signal::parse_signal(value).map(|signal| signal.as_str().to_owned())
}

/// RFC 1123 label, the rule for container names.
fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn metadata(value: Value) -> Map<String, Value> {
        value.as_object().cloned().expect("object")
    }

    #[test]
    fn reads_every_annotation_and_normalises_the_signal() {
        let m = metadata(json!({"annotations": {
            "nerve.io/dest": "s3://bucket/ckpt", "nerve.io/job": "llama-7b",
            "nerve.io/checkpoint-dir": "/ckpt/", "nerve.io/signal": "usr2",
            "nerve.io/target": "python.*train", "nerve.io/container": "trainer"}}));
        let request = read_annotations(Some(&m), Owner::None).expect("valid");
        assert_eq!(
            request,
            CheckpointRequest {
                dest: "s3://bucket/ckpt".into(),
                job: JobName::Given("llama-7b".into()),
                dir: "/ckpt".into(),
                signal: "SIGUSR2".into(),
                target: Some("python.*train".into()),
                container: Some("trainer".into()),
                done_marker: None,
                exclude: Vec::new(),
                world_size: None,
                sidecar_memory: None,
            }
        );
    }

    #[test]
    fn reads_the_world_size_and_refuses_anything_but_a_count_of_pods() {
        let with = |value: &str| {
            metadata(json!({"annotations": {
                "nerve.io/dest": "s3://bucket", "nerve.io/job": "j",
                "nerve.io/checkpoint-dir": "/c", "nerve.io/world-size": value}}))
        };
        let request = read_annotations(Some(&with(" 4 ")), Owner::None).expect("valid");
        assert_eq!(request.world_size, Some(4));
        for bad in ["0", "-2", "two", "1.5", "65537"] {
            let errors = read_annotations(Some(&with(bad)), Owner::None).expect_err(bad);
            assert!(
                errors[0].to_string().contains("nerve.io/world-size")
                    && errors[0].to_string().contains("whole number"),
                "{bad}: {errors:?}"
            );
        }
    }

    fn with_sidecar_memory(value: &str) -> Map<String, Value> {
        metadata(json!({"annotations": {
            "nerve.io/dest": "s3://bucket", "nerve.io/job": "j",
            "nerve.io/checkpoint-dir": "/c", "nerve.io/sidecar-memory": value}}))
    }

    #[test]
    fn a_sidecar_memory_annotation_is_read_as_given() {
        for good in [
            "1Gi",
            "512Mi",
            "1G",
            "300M",
            "134217728",
            "1.5Gi",
            "0.5Ti",
            "128Mi",
            "1.Gi",
            ".5Gi",
            "+1Gi",
        ] {
            let request = read_annotations(Some(&with_sidecar_memory(good)), Owner::None)
                .unwrap_or_else(|e| panic!("{good}: {e:?}"));
            assert_eq!(request.sidecar_memory.as_deref(), Some(good));
        }
        let request =
            read_annotations(Some(&with_sidecar_memory(" 1Gi ")), Owner::None).expect("valid");
        assert_eq!(request.sidecar_memory.as_deref(), Some("1Gi"), "trimmed");
    }

    #[test]
    fn a_sidecar_memory_below_the_floor_is_refused_with_the_fix() {
        for low in ["64Mi", "100M", "134217727", "0.1Gi", "0"] {
            let errors =
                read_annotations(Some(&with_sidecar_memory(low)), Owner::None).expect_err(low);
            assert_eq!(errors.len(), 1, "{low}: {errors:?}");
            let text = errors[0].to_string();
            assert!(
                text.starts_with("annotation nerve.io/sidecar-memory: ")
                    && text.contains(&format!("`{low}`"))
                    && text.contains("use at least 128Mi")
                    && text.contains("default 256Mi"),
                "{text}"
            );
        }
    }

    #[test]
    fn a_sidecar_memory_that_is_not_a_quantity_is_refused() {
        for bad in [
            "lots",
            "1GB",
            "1gi",
            "1K",
            "-1Gi",
            "1e9",
            "1Pi",
            "128974848000m",
            "1..5Gi",
            ".Gi",
            "Gi",
            "++1Gi",
            "99999999999999999999999999999999999999999Ti",
        ] {
            let errors =
                read_annotations(Some(&with_sidecar_memory(bad)), Owner::None).expect_err(bad);
            assert_eq!(errors.len(), 1, "{bad}: {errors:?}");
            let text = errors[0].to_string();
            assert!(
                text.starts_with("annotation nerve.io/sidecar-memory: ")
                    && text.contains(&format!("`{bad}` is not a memory quantity"))
                    && text.contains("e.g. 512Mi or 1Gi"),
                "{text}"
            );
        }
    }

    #[test]
    fn memory_quantities_are_counted_in_bytes_rounded_up() {
        assert_eq!(parse_memory_quantity("1Gi"), Some(1 << 30));
        assert_eq!(parse_memory_quantity("1G"), Some(1_000_000_000));
        assert_eq!(parse_memory_quantity("1k"), Some(1_000));
        assert_eq!(parse_memory_quantity("2Ti"), Some(2 << 40));
        assert_eq!(parse_memory_quantity("1.5Mi"), Some(3 << 19));
        assert_eq!(parse_memory_quantity("0.001k"), Some(1));
        assert_eq!(
            parse_memory_quantity("0.0001k"),
            Some(1),
            "a fraction of a byte"
        );
        assert_eq!(parse_memory_quantity("42"), Some(42));
        assert_eq!(parse_memory_quantity(""), None);
    }

    #[test]
    fn reads_the_done_marker_and_the_exclude_globs() {
        let m = metadata(json!({"annotations": {
            "nerve.io/dest": "s3://bucket/ckpt", "nerve.io/job": "llama",
            "nerve.io/checkpoint-dir": "/ckpt", "nerve.io/done-marker": "/ckpt/done/marker",
            "nerve.io/exclude": "runs/**, *.log ,wandb/"}}));
        let request = read_annotations(Some(&m), Owner::None).expect("valid");
        assert_eq!(request.done_marker.as_deref(), Some("/ckpt/done/marker"));
        assert_eq!(request.exclude, ["runs/**", "*.log", "wandb/"]);
    }

    #[test]
    fn refuses_a_done_marker_outside_the_directory_and_bad_exclude_globs() {
        for (marker, fragment) in [
            ("/tmp/done", "outside the checkpoint directory"),
            ("/ckptx/done", "outside the checkpoint directory"),
            ("../done", "without `.`, `..`"),
            ("done/", "names a directory"),
        ] {
            assert!(
                check_done_marker(marker, Some("/ckpt"))
                    .expect_err(marker)
                    .contains(fragment),
                "{marker}"
            );
        }
        assert!(check_done_marker(".nerve-done", Some("/ckpt")).is_ok());

        let problem = parse_exclude("runs/**,,/etc/*,a/../../b,").expect_err("bad globs");
        assert!(problem.contains("pattern 2 is empty"), "{problem}");
        assert!(problem.contains("`/etc/*` is absolute"), "{problem}");
        assert!(problem.contains("`a/../../b` contains `..`"), "{problem}");
        assert!(problem.contains("pattern 5 is empty"), "{problem}");

        let m = metadata(json!({"annotations": {
            "nerve.io/dest": "s3://bucket", "nerve.io/job": "j", "nerve.io/checkpoint-dir": "/c",
            "nerve.io/done-marker": "/elsewhere", "nerve.io/exclude": "/abs"}}));
        let errors = read_annotations(Some(&m), Owner::None).expect_err("both bad");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 2, "{text:?}");
        assert!(text[0].starts_with("annotation nerve.io/done-marker"));
        assert!(text[1].starts_with("annotation nerve.io/exclude"));
    }

    #[test]
    fn reports_every_missing_annotation_at_once() {
        let errors = read_annotations(None, Owner::None).expect_err("nothing set");
        let keys: Vec<_> = errors
            .iter()
            .map(|e| match e {
                AnnotationError::Missing { key, .. } => *key,
                AnnotationError::Invalid { key, .. } => *key,
            })
            .collect();
        assert_eq!(keys, [ANNOTATION_DEST, ANNOTATION_JOB, ANNOTATION_DIR]);
    }

    #[test]
    fn takes_the_job_name_from_the_job_controllers_label() {
        let m = metadata(json!({
            "labels": {"batch.kubernetes.io/job-name": "train-1"},
            "annotations": {"nerve.io/dest": "s3://bucket", "nerve.io/checkpoint-dir": "/c"}}));
        let request = read_annotations(Some(&m), Owner::Named("owner")).expect("valid");
        assert_eq!(request.job, JobName::InNamespace("train-1".into()));
        let m = metadata(json!({
            "annotations": {"nerve.io/dest": "s3://bucket", "nerve.io/checkpoint-dir": "/c"}}));
        let request = read_annotations(Some(&m), Owner::Named("owner")).expect("valid");
        assert_eq!(request.job, JobName::InNamespace("owner".into()));
        let request = read_annotations(Some(&m), Owner::UnnamedJob).expect("valid");
        assert_eq!(request.job, JobName::FromJobLabel);
        let m = metadata(json!({
            "labels": {"batch.kubernetes.io/job-name": "train-1-worker-0",
                       "jobset.sigs.k8s.io/jobset-name": "train-1"},
            "annotations": {"nerve.io/dest": "s3://bucket", "nerve.io/checkpoint-dir": "/c"}}));
        let request = read_annotations(Some(&m), Owner::None).expect("valid");
        assert_eq!(
            request.job,
            JobName::InNamespace("train-1".into()),
            "every Job of a JobSet is one training job"
        );
    }

    #[test]
    fn refuses_bad_values_with_the_reason() {
        let m = metadata(json!({"annotations": {
            "nerve.io/dest": "gs://bucket", "nerve.io/job": "a/b",
            "nerve.io/checkpoint-dir": "ckpt/../x", "nerve.io/signal": "SIGKILL",
            "nerve.io/target": "(", "nerve.io/container": "Trainer_1"}}));
        let errors = read_annotations(Some(&m), Owner::None).expect_err("all bad");
        let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
        assert_eq!(text.len(), 6, "{text:?}");
        assert!(text[0].contains("nerve.io/dest") && text[0].contains("s3://"));
        assert!(text[1].contains("nerve.io/job"));
        assert!(text[2].contains("not an absolute path"));
        assert!(text[3].contains("nerve.io/signal") && text[3].contains("SIGKILL"));
        assert!(text[4].contains("regular expression"));
        assert!(text[5].contains("not a container name"));
    }

    #[test]
    fn refuses_dot_segments_and_the_root_as_checkpoint_dir() {
        assert!(check_dir("/ckpt/../etc").is_err());
        assert!(check_dir("/").is_err());
        assert!(check_dir("/a//b").is_err());
        assert_eq!(check_dir("/a/b/").as_deref(), Ok("/a/b"));
    }
}
