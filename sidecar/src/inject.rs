//! Sidecar injection: one pure function from a pod (or a workload's pod template) and its
//! `nerve.io/*` annotations to the same pod with the checkpoint sidecar added.
//!
//! Two front ends use it: `nerve-sidecar inject -f job.yaml` rewrites manifests offline (for
//! GitOps), and `nerve-sidecar webhook` answers the API server's admission reviews with a JSON
//! Patch. Both follow one rule: injection never blocks a pod. Missing or bad annotations, or a
//! pod shape this code does not understand, leave the pod exactly as it was and produce a
//! warning that says what is wrong and how to fix it.
//!
//! What an injected pod gets (see [`pod`] for the details):
//! - a `nerve-restore` init container (`nerve-sidecar restore`) after any existing init
//!   containers, so the trainer starts from the latest committed checkpoint;
//! - a `nerve-sidecar` native sidecar (init container with `restartPolicy: Always`) running
//!   `nerve-sidecar run`;
//! - `shareProcessNamespace: true`, so the sidecar can see and signal the trainer;
//! - the checkpoint directory shared with the trainer (its own volume, or a new `emptyDir`);
//! - a `terminationGracePeriodSeconds` long enough to upload a checkpoint.
//!
//! It deliberately does not talk to the API server or S3: it only rewrites specs.

mod annotation;
mod manifest;
mod pod;
#[cfg(test)]
mod tests;
mod topology;
pub mod webhook;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use serde_json::Value;

pub use annotation::{
    ANNOTATION_CONTAINER, ANNOTATION_DEST, ANNOTATION_DIR, ANNOTATION_DONE_MARKER,
    ANNOTATION_EXCLUDE, ANNOTATION_JOB, ANNOTATION_SIGNAL, ANNOTATION_TARGET, AnnotationError,
    CheckpointRequest, JobName, Owner, read_annotations,
};
pub use manifest::{ManifestError, ManifestReport, inject_manifest};
pub use pod::{RESTORE_CONTAINER, SIDECAR_CONTAINER, ShapeError};
pub use topology::{JobSetShape, JobShape, PyTorchShape, Workload};
pub use webhook::{WebhookArgs, serve_webhook};

/// The label that opts a pod in; the webhook's objectSelector matches it.
pub const OPT_IN_LABEL: &str = "nerve.io/checkpoint";
/// The value of [`OPT_IN_LABEL`] that opts in.
pub const OPT_IN_VALUE: &str = "enabled";

/// The image injected when none is configured: the one image that holds both binaries, at the
/// version of this binary, so the injector and what it injects always match.
pub const DEFAULT_IMAGE: &str = concat!("ghcr.io/nerve-io/nerve:", env!("CARGO_PKG_VERSION"));

/// Smallest grace period an injected pod gets. Kubernetes' default of 30 s is too short to
/// signal the trainer, wait for its checkpoint and upload a few GiB; five minutes covers a
/// ~30 GiB checkpoint at 1 Gbit/s. A longer grace period on the pod is kept.
pub const DEFAULT_GRACE_PERIOD: &str = "5m";

/// Port of the node agent's notice stream (DESIGN.md: `--listen 0.0.0.0:9739`).
pub const DEFAULT_AGENT_PORT: u16 = 9739;

/// Settings of the injector itself, the same for every pod (flags of `inject` and `webhook`).
#[derive(Debug, Clone, clap::Args)]
pub struct InjectSettings {
    /// Image of the injected `nerve-restore` and `nerve-sidecar` containers.
    #[arg(long, env = "NERVE_SIDECAR_IMAGE", default_value = DEFAULT_IMAGE)]
    pub image: String,

    /// Pull policy of the injected containers.
    #[arg(long, env = "NERVE_SIDECAR_IMAGE_PULL_POLICY", default_value = "IfNotPresent",
          value_parser = ["Always", "IfNotPresent", "Never"])]
    pub image_pull_policy: String,

    /// Smallest terminationGracePeriodSeconds an injected pod gets (time to checkpoint and
    /// upload when the pod is deleted or drained); a longer one on the pod is kept.
    #[arg(long, env = "NERVE_INJECT_GRACE_PERIOD", default_value = DEFAULT_GRACE_PERIOD,
          value_parser = parse_grace_period)]
    pub grace_period: Duration,

    /// Port of the node agent on the node's IP; the sidecar connects to http://$HOST_IP:PORT.
    #[arg(long, env = "NERVE_AGENT_PORT", default_value_t = DEFAULT_AGENT_PORT)]
    pub agent_port: u16,

    /// Cloud whose metadata service the sidecars poll themselves when the agent cannot be
    /// reached (aws, gcp or azure); the same as the agents'.
    #[arg(long, env = "NERVE_CLOUD", default_value = "aws", value_parser = ["aws", "gcp", "azure"])]
    pub cloud: String,
}

impl Default for InjectSettings {
    fn default() -> Self {
        InjectSettings {
            image: DEFAULT_IMAGE.to_owned(),
            image_pull_policy: "IfNotPresent".to_owned(),
            grace_period: Duration::from_secs(300),
            agent_port: DEFAULT_AGENT_PORT,
            cloud: "aws".to_owned(),
        }
    }
}

/// Longest grace period accepted: a day. Anything longer is a typo, and the kubelet would keep a
/// deleted pod around for that long.
const MAX_GRACE_PERIOD: Duration = Duration::from_secs(24 * 3600);

fn parse_grace_period(value: &str) -> Result<Duration, String> {
    let grace = humantime::parse_duration(value)
        .map_err(|e| format!("`{value}` is not a duration like 5m or 300s: {e}"))?;
    if grace.as_secs() == 0 || grace > MAX_GRACE_PERIOD {
        return Err(format!("must be between 1s and 24h, got {value}"));
    }
    Ok(grace)
}

/// `nerve-sidecar inject`: add the checkpoint sidecar to the manifests in a file.
#[derive(Debug, Clone, clap::Args)]
pub struct InjectArgs {
    /// YAML or JSON file of manifests (Pod, Job, CronJob, Deployment, StatefulSet, DaemonSet,
    /// ReplicaSet, PyTorchJob, JobSet, List; several documents separated by `---`), or `-` for
    /// standard input. Pod templates labelled nerve.io/checkpoint=enabled get the sidecar;
    /// everything else is written back unchanged (with a warning for a labelled object inside a
    /// kind it does not know). Comments are not kept.
    #[arg(short = 'f', long = "filename", value_name = "FILE")]
    pub file: PathBuf,

    #[command(flatten)]
    pub settings: InjectSettings,
}

/// What injecting into one pod did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The sidecar was added.
    Injected,
    /// The pod already had it; nothing changed.
    AlreadyInjected,
    /// The pod was left unchanged; the warnings say why.
    NotInjected,
}

/// The result of [`inject_pod_template`]: what happened, and what the operator should know.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Injection {
    pub outcome: Outcome,
    /// Short, human messages (admission warnings are cut at 256 characters).
    pub warnings: Vec<String>,
}

/// Injects the sidecar into `template`, a Pod or a pod template (an object with `metadata` and
/// `spec`), in place. On [`Outcome::NotInjected`] the template is exactly as it was.
///
/// The job name comes from `nerve.io/job` as given; else it is the workload's name (a label
/// naming it on the pod, else `owner`) in the pod's namespace.
///
/// `workload` says what the template belongs to, for the pods' rank and world size.
pub fn inject_pod_template(
    template: &mut Value,
    owner: Owner<'_>,
    workload: &Workload,
    settings: &InjectSettings,
) -> Injection {
    let metadata = template.get("metadata").and_then(Value::as_object);
    let request = match read_annotations(metadata, owner) {
        Ok(request) => request,
        Err(errors) => {
            return Injection {
                outcome: Outcome::NotInjected,
                warnings: errors
                    .iter()
                    .map(|e| format!("nerve: sidecar not injected: {e}"))
                    .collect(),
            };
        }
    };
    let mut injected = template.clone();
    match pod::inject_spec(&mut injected, &request, workload, settings) {
        Ok(pod::SpecChange::Injected { notes }) => {
            *template = injected;
            Injection {
                outcome: Outcome::Injected,
                warnings: notes.into_iter().map(|n| format!("nerve: {n}")).collect(),
            }
        }
        Ok(pod::SpecChange::AlreadyInjected) => Injection {
            outcome: Outcome::AlreadyInjected,
            warnings: Vec::new(),
        },
        Err(e) => Injection {
            outcome: Outcome::NotInjected,
            warnings: vec![format!("nerve: sidecar not injected: {e}")],
        },
    }
}

/// `nerve-sidecar inject -f FILE`: prints the manifests with the sidecar injected on standard
/// output and the warnings on standard error.
pub fn inject_command(args: &InjectArgs) -> anyhow::Result<()> {
    use std::io::{Read, Write};

    let input = if args.file.as_os_str() == "-" {
        let mut input = String::new();
        std::io::stdin()
            .read_to_string(&mut input)
            .context("reading manifests from standard input")?;
        input
    } else {
        std::fs::read_to_string(&args.file)
            .with_context(|| format!("reading manifests from {}", args.file.display()))?
    };
    let report = inject_manifest(&input, &args.settings)
        .with_context(|| format!("injecting into {}", args.file.display()))?;
    for warning in &report.warnings {
        eprintln!("warning: {warning}");
    }
    std::io::stdout()
        .lock()
        .write_all(report.output.as_bytes())
        .context("writing the manifests to standard output")?;
    Ok(())
}
