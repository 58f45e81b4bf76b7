//! Rewriting one pod spec: the containers, volumes and settings the sidecar needs.
//!
//! Works on the JSON the API server sends (not typed structs), so fields this code does not
//! know, including ones newer than its Kubernetes version, pass through untouched and the
//! webhook's patch names only what injection changed.

use serde_json::{Map, Value, json};

use super::InjectSettings;
use super::annotation::{CheckpointRequest, JOB_NAME_LABEL, JobName};
use super::topology::{self, Workload};

/// Name of the injected native sidecar; its presence means "already injected".
pub const SIDECAR_CONTAINER: &str = "nerve-sidecar";
/// Name of the injected init container that restores the latest checkpoint.
pub const RESTORE_CONTAINER: &str = "nerve-restore";
/// Name of the `emptyDir` added when the trainer has no volume at the checkpoint directory.
const CHECKPOINT_VOLUME: &str = "nerve-checkpoint";
/// Where the image (Dockerfile) puts the binary; the injected containers name it explicitly so
/// they do not depend on the image's entrypoint.
const SIDECAR_BINARY: &str = "/usr/local/bin/nerve-sidecar";
/// Set in the trainer container and the sidecar to the trainer container's name; the sidecar
/// signals only processes whose environment carries the same value.
const CONTAINER_ENV: &str = "NERVE_CONTAINER";
/// The done marker, in the trainer (its integration writes it) and the sidecar (which waits for
/// it); set only when annotated, since both sides share the same default.
const DONE_MARKER_ENV: &str = "NERVE_DONE_MARKER";
/// Port of `nerve-sidecar run --listen` (DESIGN.md: 0.0.0.0:9740).
const SIDECAR_PORT: u16 = 9740;

/// Requests of the injected containers. The sidecar idles between notices; an upload streams
/// parts from disk through small read buffers (256 KiB per request in flight), so its bytes in
/// flight do not grow with the checkpoint's size.
const SIDECAR_REQUESTS: (&str, &str) = ("10m", "32Mi");
/// Memory limit of the injected containers unless `nerve.io/sidecar-memory` says otherwise.
/// An upload holds ~40 MiB plus ~0.6-0.75 KiB per file of the checkpoint (measured at 200,000
/// files: 129-190 MiB), so this is enough for checkpoints of up to 150,000 files (the promise
/// in docs/transfer.md); more files need ~1 MiB per 1,000 beyond that, set with the annotation. The OOM killer must
/// never end an upload racing a deadline. No CPU limit: throttling that upload only loses the
/// checkpoint.
pub(super) const SIDECAR_MEMORY_LIMIT: &str = "256Mi";

/// What [`inject_spec`] did.
#[derive(Debug)]
pub(crate) enum SpecChange {
    Injected { notes: Vec<String> },
    AlreadyInjected,
}

/// Why a pod's shape kept it from being injected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ShapeError {
    #[error("the pod has no spec.containers list")]
    NoContainers,
    #[error("unexpected pod shape: {0}")]
    Unexpected(&'static str),
    #[error(
        "container `{name}` (annotation nerve.io/container) is not in the pod; containers: {available}"
    )]
    ContainerNotFound { name: String, available: String },
    #[error(
        "the checkpoint directory {dir} is on read-only mount `{volume}` in container `{container}`; the trainer must be able to write it"
    )]
    ReadOnlyMount {
        dir: String,
        volume: String,
        container: String,
    },
    #[error(
        "container `{container}` must run as non-root but its user is unknown here; set securityContext.runAsUser so the sidecar can run as the same user and signal it"
    )]
    UnknownUser { container: String },
    #[error("the pod already has a volume named {CHECKPOINT_VOLUME}")]
    VolumeNameTaken,
    #[error(
        "the pod already has a container named `{name}` in {list}; the API server would refuse the pod with a second one, so rename that container"
    )]
    ContainerNameTaken { name: &'static str, list: String },
}

/// Adds the sidecar to `template` (`{"metadata": ..., "spec": ...}`); on error `template` may
/// be half-changed, so callers work on a copy.
pub(crate) fn inject_spec(
    template: &mut Value,
    request: &CheckpointRequest,
    workload: &Workload,
    settings: &InjectSettings,
) -> Result<SpecChange, ShapeError> {
    let metadata = template.get("metadata").and_then(Value::as_object).cloned();
    let spec = template
        .get_mut("spec")
        .ok_or(ShapeError::Unexpected("the pod has no spec"))?
        .as_object_mut()
        .ok_or(ShapeError::Unexpected("spec is not an object"))?;
    let mut notes = Vec::new();

    let init_containers = list(spec, "initContainers")?;
    if init_containers.iter().any(|c| {
        c.get("name").and_then(Value::as_str) == Some(SIDECAR_CONTAINER)
            && c.get("restartPolicy").and_then(Value::as_str) == Some("Always")
    }) {
        return Ok(SpecChange::AlreadyInjected);
    }
    check_names_free(spec)?;

    let trainer_index = find_trainer(spec, request, &mut notes)?;
    let pod_security = spec.get("securityContext").cloned().unwrap_or(Value::Null);
    let trainer = &spec["containers"][trainer_index];
    let trainer_name = trainer["name"].as_str().unwrap_or_default().to_owned();
    let identity = Identity::of(trainer, &pod_security, &trainer_name)?;
    let inherited_env = aws_env(trainer);
    let placement = topology::place(workload, metadata.as_ref(), trainer, request.world_size);
    notes.extend(placement.notes);

    let mount = checkpoint_mount(spec, trainer_index, request, &trainer_name)?;
    // What the trainer needs to know of the sidecar: its container's mark (see the sidecar's
    // NERVE_CONTAINER below) and where the checkpoint goes (trainer integrations write their
    // done marker there).
    let mut trainer_env = vec![
        (CONTAINER_ENV, trainer_name.clone()),
        ("NERVE_CHECKPOINT_DIR", request.dir.clone()),
    ];
    if let Some(marker) = &request.done_marker {
        trainer_env.push((DONE_MARKER_ENV, marker.clone()));
    }
    for (name, value) in trainer_env {
        set_env(spec, trainer_index, name, &value, &trainer_name, &mut notes)?;
    }

    let mut env = vec![
        field_env("NODE_NAME", "spec.nodeName"),
        field_env("HOST_IP", "status.hostIP"),
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        json!({"name": "NERVE_CHECKPOINT_DIR", "value": request.dir}),
        json!({"name": "NERVE_DEST", "value": request.dest}),
    ];
    match &request.job {
        JobName::Given(job) => env.push(json!({"name": "NERVE_JOB", "value": job})),
        // Kubernetes expands $(POD_NAMESPACE) from the downward-API variable defined above; a
        // namespace is a DNS label, so the dot cannot be confused with one inside it.
        JobName::InNamespace(job) => env.push(json!({
            "name": "NERVE_JOB",
            "value": format!("$(POD_NAMESPACE).{job}"),
        })),
        JobName::FromJobLabel => {
            env.push(field_env(
                "JOB_NAME",
                &format!("metadata.labels['{JOB_NAME_LABEL}']"),
            ));
            env.push(json!({"name": "NERVE_JOB", "value": "$(POD_NAMESPACE).$(JOB_NAME)"}));
        }
    }
    // Which part of a multi-pod job's generations this pod commits (restore needs it too).
    env.extend(placement.env);
    if !request.exclude.is_empty() {
        // Not checkpoint content: kept out of completion, upload and restore alike.
        env.push(json!({"name": "NERVE_EXCLUDE", "value": request.exclude.join(",")}));
    }
    env.extend(inherited_env);

    // The restore holds the same manifest of every file as the upload, so it gets the same limit.
    let memory_limit = request
        .sidecar_memory
        .as_deref()
        .unwrap_or(SIDECAR_MEMORY_LIMIT);
    let restore = json!({
        "name": RESTORE_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "command": [SIDECAR_BINARY],
        "args": ["restore"],
        "env": env,
        "volumeMounts": [mount],
        "resources": resources(memory_limit),
        "securityContext": identity.security_context(Role::Restore),
    });

    let mut run_args = vec![
        "run".to_owned(),
        "--signal".to_owned(),
        request.signal.clone(),
    ];
    if let Some(target) = &request.target {
        run_args.extend(["--target".to_owned(), target.clone()]);
    }
    let grace = settings.grace_period.as_secs();
    let grace = spec
        .get("terminationGracePeriodSeconds")
        .and_then(Value::as_u64)
        .map_or(grace, |current| current.max(grace));
    let mut run_env = env.clone();
    run_env.push(json!({
        "name": "NERVE_AGENT_URL",
        // Kubernetes expands $(HOST_IP) from the downward-API variable defined above.
        "value": format!("http://$(HOST_IP):{}", settings.agent_port),
    }));
    run_env.push(json!({"name": "NERVE_CLOUD", "value": settings.cloud}));
    // On SIGTERM the sidecar has until the pod's grace period ends to finish the upload.
    run_env.push(json!({"name": "NERVE_TERMINATION_GRACE", "value": format!("{grace}s")}));
    // The sidecar signals only processes whose environment carries the same NERVE_CONTAINER, so
    // another container's process in the shared namespace (a mesh proxy, a vault agent: Go
    // programs catch every signal) is never signalled.
    run_env.push(json!({"name": CONTAINER_ENV, "value": trainer_name}));
    if let Some(marker) = &request.done_marker {
        run_env.push(json!({"name": DONE_MARKER_ENV, "value": marker}));
    }
    let sidecar = json!({
        "name": SIDECAR_CONTAINER,
        "image": settings.image,
        "imagePullPolicy": settings.image_pull_policy,
        "restartPolicy": "Always",
        "command": [SIDECAR_BINARY],
        "args": run_args,
        "env": run_env,
        "ports": [{"name": "nerve-metrics", "containerPort": SIDECAR_PORT, "protocol": "TCP"}],
        // Liveness only: a startup or readiness probe would hold the trainer or the pod's
        // readiness hostage to the sidecar, and the sidecar must never block training.
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "nerve-metrics"},
            "periodSeconds": 10,
            "timeoutSeconds": 5,
            "failureThreshold": 6,
        },
        "volumeMounts": [mount],
        "resources": resources(memory_limit),
        "securityContext": identity.security_context(Role::Run),
    });

    let init_containers = list_mut(spec, "initContainers")?;
    // After the pod's own init containers: a mesh proxy or credentials helper among them may be
    // what the restore needs to reach S3.
    init_containers.push(restore);
    init_containers.push(sidecar);

    // Seeing the trainer's processes needs a shared PID namespace; with hostPID the sidecar sees
    // them already, and the API server refuses both together.
    if spec.get("hostPID").and_then(Value::as_bool) != Some(true) {
        spec.insert("shareProcessNamespace".to_owned(), Value::Bool(true));
    }

    spec.insert("terminationGracePeriodSeconds".to_owned(), json!(grace));

    Ok(SpecChange::Injected { notes })
}

/// Container names are unique across a pod's containers, init containers and ephemeral
/// containers; injecting a second `nerve-restore` or `nerve-sidecar` would get the pod refused.
fn check_names_free(spec: &Map<String, Value>) -> Result<(), ShapeError> {
    for key in ["initContainers", "containers", "ephemeralContainers"] {
        for container in list(spec, key)? {
            let name = container.get("name").and_then(Value::as_str);
            for injected in [RESTORE_CONTAINER, SIDECAR_CONTAINER] {
                if name == Some(injected) {
                    return Err(ShapeError::ContainerNameTaken {
                        name: injected,
                        list: format!("spec.{key}"),
                    });
                }
            }
        }
    }
    Ok(())
}

fn list<'a>(spec: &'a Map<String, Value>, key: &'static str) -> Result<&'a [Value], ShapeError> {
    match spec.get(key) {
        None | Some(Value::Null) => Ok(&[]),
        Some(Value::Array(items)) if items.iter().all(has_name) => Ok(items),
        Some(_) => Err(ShapeError::Unexpected(match key {
            "containers" => "spec.containers is not a list of named containers",
            "initContainers" => "spec.initContainers is not a list of named containers",
            "ephemeralContainers" => "spec.ephemeralContainers is not a list of named containers",
            _ => "spec.volumes is not a list of named volumes",
        })),
    }
}

fn list_mut<'a>(
    spec: &'a mut Map<String, Value>,
    key: &'static str,
) -> Result<&'a mut Vec<Value>, ShapeError> {
    list(spec, key)?;
    let entry = spec.entry(key).or_insert_with(|| json!([]));
    if entry.is_null() {
        *entry = json!([]);
    }
    entry
        .as_array_mut()
        .ok_or(ShapeError::Unexpected("a pod list is not a list"))
}

fn has_name(item: &Value) -> bool {
    item.get("name").and_then(Value::as_str).is_some()
}

/// Index of the trainer container: the one `nerve.io/container` names, else the first.
fn find_trainer(
    spec: &Map<String, Value>,
    request: &CheckpointRequest,
    notes: &mut Vec<String>,
) -> Result<usize, ShapeError> {
    let containers = list(spec, "containers")?;
    if containers.is_empty() {
        return Err(ShapeError::NoContainers);
    }
    let names: Vec<&str> = containers
        .iter()
        .filter_map(|c| c.get("name").and_then(Value::as_str))
        .collect();
    match &request.container {
        Some(wanted) => {
            names
                .iter()
                .position(|n| n == wanted)
                .ok_or_else(|| ShapeError::ContainerNotFound {
                    name: wanted.clone(),
                    available: names.join(", "),
                })
        }
        None => {
            if names.len() > 1 {
                notes.push(format!(
                    "nerve.io/container is not set; treating the first container `{}` as the trainer",
                    names[0]
                ));
            }
            Ok(0)
        }
    }
}

/// The volume mount that holds the checkpoint directory in the trainer, adding an `emptyDir`
/// when the trainer has none. The sidecar gets the same mount at the same path.
fn checkpoint_mount(
    spec: &mut Map<String, Value>,
    trainer_index: usize,
    request: &CheckpointRequest,
    trainer_name: &str,
) -> Result<Value, ShapeError> {
    let trainer = &spec["containers"][trainer_index];
    let mounts = match trainer.get("volumeMounts") {
        None | Some(Value::Null) => &[][..],
        Some(Value::Array(mounts)) => mounts.as_slice(),
        Some(_) => return Err(ShapeError::Unexpected("volumeMounts is not a list")),
    };
    // The deepest mount at or above the directory is the filesystem the trainer writes to.
    let holding = mounts
        .iter()
        .filter_map(|m| Some((m, m.get("mountPath")?.as_str()?.trim_end_matches('/'))))
        .filter(|(_, path)| {
            request.dir == *path
                || request
                    .dir
                    .strip_prefix(path)
                    .is_some_and(|rest| rest.starts_with('/'))
        })
        .max_by_key(|(_, path)| path.len())
        .map(|(m, _)| m.clone());
    if let Some(mount) = holding {
        let volume = mount
            .get("name")
            .and_then(Value::as_str)
            .ok_or(ShapeError::Unexpected("a volume mount has no name"))?
            .to_owned();
        if mount.get("readOnly").and_then(Value::as_bool) == Some(true) {
            return Err(ShapeError::ReadOnlyMount {
                dir: request.dir.clone(),
                volume,
                container: trainer_name.to_owned(),
            });
        }
        let mut shared = Map::new();
        for key in ["name", "mountPath", "subPath", "subPathExpr"] {
            if let Some(value) = mount.get(key) {
                shared.insert(key.to_owned(), value.clone());
            }
        }
        return Ok(Value::Object(shared));
    }

    let volumes = list(spec, "volumes")?;
    if volumes
        .iter()
        .any(|v| v.get("name").and_then(Value::as_str) == Some(CHECKPOINT_VOLUME))
    {
        return Err(ShapeError::VolumeNameTaken);
    }
    list_mut(spec, "volumes")?.push(json!({"name": CHECKPOINT_VOLUME, "emptyDir": {}}));
    let mount = json!({"name": CHECKPOINT_VOLUME, "mountPath": request.dir});
    let trainer = spec["containers"][trainer_index]
        .as_object_mut()
        .ok_or(ShapeError::Unexpected("a container is not an object"))?;
    let mounts = trainer.entry("volumeMounts").or_insert_with(|| json!([]));
    if mounts.is_null() {
        *mounts = json!([]);
    }
    mounts
        .as_array_mut()
        .ok_or(ShapeError::Unexpected("volumeMounts is not a list"))?
        .push(mount.clone());
    Ok(mount)
}

/// Sets `name` to `value` in the env of container `index`, replacing (with a note) an entry of
/// that name with another value.
fn set_env(
    spec: &mut Map<String, Value>,
    index: usize,
    name: &str,
    value: &str,
    container_name: &str,
    notes: &mut Vec<String>,
) -> Result<(), ShapeError> {
    let container = spec["containers"][index]
        .as_object_mut()
        .ok_or(ShapeError::Unexpected("a container is not an object"))?;
    let env = container.entry("env").or_insert_with(|| json!([]));
    if env.is_null() {
        *env = json!([]);
    }
    let env = env
        .as_array_mut()
        .ok_or(ShapeError::Unexpected("a container's env is not a list"))?;
    let wanted = json!({"name": name, "value": value});
    match env
        .iter_mut()
        .find(|e| e.get("name").and_then(Value::as_str) == Some(name))
    {
        Some(existing) if *existing == wanted => {}
        Some(existing) => {
            notes.push(format!(
                "container `{container_name}` set {name} itself; replaced with `{value}`"
            ));
            *existing = wanted;
        }
        None => env.push(wanted),
    }
    Ok(())
}

fn field_env(name: &str, field: &str) -> Value {
    json!({"name": name, "valueFrom": {"fieldRef": {"fieldPath": field}}})
}

/// The trainer's `AWS_*` variables (region, endpoint, role, ...): the sidecar reaches the same
/// bucket with the same settings as the trainer.
fn aws_env(trainer: &Value) -> Vec<Value> {
    trainer
        .get("env")
        .and_then(Value::as_array)
        .map(|env| {
            env.iter()
                .filter(|e| {
                    e.get("name")
                        .and_then(Value::as_str)
                        .is_some_and(|n| n.starts_with("AWS_"))
                })
                .cloned()
                .collect()
        })
        .unwrap_or_default()
}

fn resources(memory_limit: &str) -> Value {
    json!({
        "requests": {"cpu": SIDECAR_REQUESTS.0, "memory": SIDECAR_REQUESTS.1},
        "limits": {"memory": memory_limit},
    })
}

#[derive(Debug, Clone, Copy)]
enum Role {
    Restore,
    Run,
}

/// Who the injected containers run as, so they may signal the trainer and share its files.
#[derive(Debug)]
enum Identity {
    /// The trainer's user is known: run as the same UID (and GID); the kernel lets a process
    /// signal its own user's processes, so no capability is needed.
    SameUser { uid: i64, gid: Option<i64> },
    /// The trainer's user comes from its image and is unknown here: run as root with every
    /// capability dropped except the one each container needs (CAP_KILL to signal; the file
    /// capabilities to write a restored checkpoint the trainer may own).
    Root,
}

impl Identity {
    fn of(trainer: &Value, pod_security: &Value, trainer_name: &str) -> Result<Self, ShapeError> {
        let own = trainer.get("securityContext").unwrap_or(&Value::Null);
        let field = |key: &str| own.get(key).or_else(|| pod_security.get(key)).cloned();
        let uid = field("runAsUser").and_then(|v| v.as_i64());
        let gid = field("runAsGroup").and_then(|v| v.as_i64());
        let non_root = field("runAsNonRoot").and_then(|v| v.as_bool()) == Some(true);
        match uid {
            Some(uid) => Ok(Identity::SameUser { uid, gid }),
            None if non_root => Err(ShapeError::UnknownUser {
                container: trainer_name.to_owned(),
            }),
            None => Ok(Identity::Root),
        }
    }

    fn security_context(&self, role: Role) -> Value {
        let mut context = json!({
            "allowPrivilegeEscalation": false,
            "readOnlyRootFilesystem": true,
            "seccompProfile": {"type": "RuntimeDefault"},
            "capabilities": {"drop": ["ALL"]},
        });
        match self {
            Identity::SameUser { uid, gid } => {
                context["runAsUser"] = json!(uid);
                context["runAsNonRoot"] = json!(*uid != 0);
                if let Some(gid) = gid {
                    context["runAsGroup"] = json!(gid);
                }
            }
            Identity::Root => {
                context["runAsUser"] = json!(0);
                context["runAsNonRoot"] = json!(false);
                context["capabilities"]["add"] = match role {
                    Role::Run => json!(["KILL"]),
                    Role::Restore => json!(["CHOWN", "DAC_OVERRIDE", "FOWNER"]),
                };
            }
        }
        context
    }
}
