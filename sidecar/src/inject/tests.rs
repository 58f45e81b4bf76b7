//! The injected spec, checked field by field for the pod shapes operators actually write.

use serde::Deserialize;
use serde_json::{Value, json};

use super::*;

fn settings() -> InjectSettings {
    InjectSettings {
        image: "registry.example/nerve:test".to_owned(),
        ..InjectSettings::default()
    }
}

fn annotations() -> Value {
    json!({"nerve.io/dest": "s3://ckpt-bucket/runs", "nerve.io/job": "llama",
           "nerve.io/checkpoint-dir": "/ckpt"})
}

fn pod(spec: Value) -> Value {
    json!({"apiVersion": "v1", "kind": "Pod",
           "metadata": {"name": "train-0", "labels": {"nerve.io/checkpoint": "enabled"},
                        "annotations": annotations()},
           "spec": spec})
}

fn init(pod: &Value, name: &str) -> Value {
    pod["spec"]["initContainers"]
        .as_array()
        .expect("initContainers")
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
        .unwrap_or_else(|| panic!("no init container {name}"))
}

fn env_names(container: &Value) -> Vec<String> {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .map(|e| e["name"].as_str().expect("name").to_owned())
        .collect()
}

#[test]
fn injects_restore_then_native_sidecar_with_an_empty_dir_when_the_trainer_has_no_volume() {
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::Injected);
    assert!(injection.warnings.is_empty(), "{:?}", injection.warnings);

    let spec = &p["spec"];
    let names: Vec<&str> = spec["initContainers"]
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["nerve-restore", "nerve-sidecar"]);
    assert_eq!(spec["shareProcessNamespace"], true);
    assert_eq!(spec["terminationGracePeriodSeconds"], 300);
    assert_eq!(
        spec["volumes"],
        json!([{"name": "nerve-checkpoint", "emptyDir": {}}])
    );
    let mount = json!({"name": "nerve-checkpoint", "mountPath": "/ckpt"});
    assert_eq!(spec["containers"][0]["volumeMounts"], json!([mount]));

    let restore = init(&p, "nerve-restore");
    assert_eq!(restore["args"], json!(["restore"]));
    assert!(
        restore.get("restartPolicy").is_none(),
        "restore runs to completion"
    );
    assert_eq!(restore["image"], "registry.example/nerve:test");
    assert_eq!(restore["volumeMounts"], json!([mount]));

    let sidecar = init(&p, "nerve-sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["args"], json!(["run", "--signal", "SIGUSR1"]));
    assert_eq!(sidecar["livenessProbe"]["httpGet"]["path"], "/healthz");
    assert!(
        sidecar.get("startupProbe").is_none() && sidecar.get("readinessProbe").is_none(),
        "nothing may hold the trainer back"
    );
    assert_eq!(sidecar["volumeMounts"], json!([mount]));
    assert_eq!(
        env_names(&sidecar),
        [
            "NODE_NAME",
            "HOST_IP",
            "POD_NAME",
            "POD_NAMESPACE",
            "NERVE_CHECKPOINT_DIR",
            "NERVE_DEST",
            "NERVE_JOB",
            "NERVE_AGENT_URL",
            "NERVE_CLOUD",
            "NERVE_TERMINATION_GRACE",
            "NERVE_CONTAINER"
        ]
    );
    let env = sidecar["env"].as_array().expect("env");
    assert_eq!(
        env[0]["valueFrom"]["fieldRef"]["fieldPath"], "spec.nodeName",
        "NODE_NAME comes from the downward API"
    );
    assert_eq!(
        env[1]["valueFrom"]["fieldRef"]["fieldPath"],
        "status.hostIP"
    );
    assert_eq!(env[4]["value"], "/ckpt");
    assert_eq!(env[5]["value"], "s3://ckpt-bucket/runs");
    assert_eq!(env[6]["value"], "llama", "nerve.io/job is used as given");
    assert_eq!(env[7]["value"], "http://$(HOST_IP):9739");
    assert_eq!(
        env[8]["value"], "aws",
        "the cloud to poll without the agent"
    );
    assert_eq!(
        env[9]["value"], "300s",
        "the sidecar knows the pod's grace period"
    );
    assert_eq!(env[10]["value"], "trainer", "it signals only the trainer");
    assert_eq!(
        spec["containers"][0]["env"],
        json!([{"name": "NERVE_CONTAINER", "value": "trainer"},
               {"name": "NERVE_CHECKPOINT_DIR", "value": "/ckpt"}]),
        "the trainer's processes carry the mark the sidecar looks for"
    );
    assert!(!env_names(&restore).contains(&"NERVE_CONTAINER".to_owned()));
}

#[test]
fn passes_the_done_marker_to_trainer_and_sidecar_and_the_exclude_globs_to_sidecar_and_restore() {
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["annotations"]["nerve.io/done-marker"] = json!("checkpoint.done");
    p["metadata"]["annotations"]["nerve.io/exclude"] = json!("runs/**, *.log");
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(
        injection.outcome,
        Outcome::Injected,
        "{:?}",
        injection.warnings
    );
    let value = |container: &Value, name: &str| {
        container["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .map(|e| e["value"].clone())
    };
    let trainer = &p["spec"]["containers"][0];
    let sidecar = init(&p, "nerve-sidecar");
    let restore = init(&p, "nerve-restore");
    assert_eq!(
        value(trainer, "NERVE_DONE_MARKER"),
        Some(json!("checkpoint.done"))
    );
    assert_eq!(
        value(&sidecar, "NERVE_DONE_MARKER"),
        Some(json!("checkpoint.done"))
    );
    assert_eq!(value(&restore, "NERVE_DONE_MARKER"), None);
    assert_eq!(
        value(&sidecar, "NERVE_EXCLUDE"),
        Some(json!("runs/**,*.log"))
    );
    assert_eq!(
        value(&restore, "NERVE_EXCLUDE"),
        Some(json!("runs/**,*.log"))
    );
    assert_eq!(value(trainer, "NERVE_EXCLUDE"), None);

    // Unannotated: both sides keep their shared default, so nothing is set.
    let mut plain = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    inject_pod_template(&mut plain, Owner::None, &Workload::Pod, &settings());
    for name in ["NERVE_DONE_MARKER", "NERVE_EXCLUDE"] {
        assert_eq!(value(&init(&plain, "nerve-sidecar"), name), None, "{name}");
        assert_eq!(value(&plain["spec"]["containers"][0], name), None, "{name}");
    }
}

#[test]
fn marks_the_named_trainer_not_the_first_container_and_keeps_its_own_env() {
    let mut p = pod(json!({"containers": [
        {"name": "istio-proxy", "image": "proxy:1"},
        {"name": "learner", "image": "t:1", "env": [
            {"name": "LR", "value": "0.1"},
            {"name": "NERVE_CHECKPOINT_DIR", "value": "/elsewhere"}]}]}));
    p["metadata"]["annotations"]["nerve.io/container"] = json!("learner");
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::Injected);
    assert!(
        p["spec"]["containers"][0].get("env").is_none(),
        "the proxy is not marked"
    );
    assert_eq!(
        p["spec"]["containers"][1]["env"],
        json!([{"name": "LR", "value": "0.1"},
               {"name": "NERVE_CHECKPOINT_DIR", "value": "/ckpt"},
               {"name": "NERVE_CONTAINER", "value": "learner"}])
    );
    assert!(
        injection.warnings[0].contains("NERVE_CHECKPOINT_DIR"),
        "{:?}",
        injection.warnings
    );
    let sidecar = init(&p, "nerve-sidecar");
    let mark = sidecar["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NERVE_CONTAINER")
        .expect("NERVE_CONTAINER");
    assert_eq!(mark["value"], "learner");
}

/// The env entries of `container` named `name`, with their position.
fn env_entry(container: &Value, name: &str) -> (usize, Value) {
    container["env"]
        .as_array()
        .expect("env")
        .iter()
        .enumerate()
        .find(|(_, e)| e["name"] == name)
        .map(|(i, e)| (i, e.clone()))
        .unwrap_or_else(|| panic!("no {name} in {container}"))
}

#[test]
fn names_the_job_after_its_workload_in_the_pods_namespace_unless_annotated() {
    // A pod of a Job, as the webhook sees it: the Job controller's label names the Job.
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations")
        .remove("nerve.io/job");
    p["metadata"]["labels"]["batch.kubernetes.io/job-name"] = json!("llama");
    inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    for name in ["nerve-restore", "nerve-sidecar"] {
        let container = init(&p, name);
        let (namespace_at, _) = env_entry(&container, "POD_NAMESPACE");
        let (job_at, job) = env_entry(&container, "NERVE_JOB");
        assert_eq!(job["value"], "$(POD_NAMESPACE).llama", "{name}");
        assert!(
            namespace_at < job_at,
            "Kubernetes expands $(POD_NAMESPACE) only from an earlier entry"
        );
    }

    // A Job admitted before the API server named it (generateName): the name comes from the
    // label on its pods.
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["annotations"]
        .as_object_mut()
        .expect("annotations")
        .remove("nerve.io/job");
    inject_pod_template(&mut p, Owner::UnnamedJob, &Workload::Pod, &settings());
    let sidecar = init(&p, "nerve-sidecar");
    let (label_at, label) = env_entry(&sidecar, "JOB_NAME");
    let (job_at, job) = env_entry(&sidecar, "NERVE_JOB");
    assert_eq!(
        label["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.labels['batch.kubernetes.io/job-name']"
    );
    assert_eq!(job["value"], "$(POD_NAMESPACE).$(JOB_NAME)");
    assert!(label_at < job_at);

    // nerve.io/job is used exactly as given, even for a Job's pod.
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["labels"]["batch.kubernetes.io/job-name"] = json!("other");
    inject_pod_template(&mut p, Owner::Named("owner"), &Workload::Pod, &settings());
    assert_eq!(
        env_entry(&init(&p, "nerve-sidecar"), "NERVE_JOB").1["value"],
        "llama"
    );
}

#[test]
fn shares_the_trainers_own_volume_when_it_holds_the_checkpoint_dir() {
    let mut p = pod(json!({
        "containers": [{"name": "trainer", "image": "t:1",
            "volumeMounts": [{"name": "cache", "mountPath": "/cache"},
                             {"name": "data", "mountPath": "/", "readOnly": true},
                             {"name": "scratch", "mountPath": "/ckpt", "subPath": "run-1"}]}],
        "volumes": [{"name": "scratch", "persistentVolumeClaim": {"claimName": "scratch"}},
                    {"name": "cache", "emptyDir": {}}, {"name": "data", "emptyDir": {}}]}));
    let before_volumes = p["spec"]["volumes"].clone();
    let before_mounts = p["spec"]["containers"][0]["volumeMounts"].clone();
    assert_eq!(
        inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings()).outcome,
        Outcome::Injected
    );
    assert_eq!(p["spec"]["volumes"], before_volumes, "no volume added");
    assert_eq!(
        p["spec"]["containers"][0]["volumeMounts"], before_mounts,
        "trainer mounts untouched"
    );
    let shared = json!([{"name": "scratch", "mountPath": "/ckpt", "subPath": "run-1"}]);
    assert_eq!(init(&p, "nerve-sidecar")["volumeMounts"], shared);
    assert_eq!(init(&p, "nerve-restore")["volumeMounts"], shared);
}

#[test]
fn shares_the_volume_mounted_above_the_checkpoint_dir() {
    let mut p = pod(json!({
        "containers": [{"name": "trainer", "image": "t:1",
            "volumeMounts": [{"name": "work", "mountPath": "/"}]}],
        "volumes": [{"name": "work", "emptyDir": {}}]}));
    assert_eq!(
        inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings()).outcome,
        Outcome::Injected
    );
    assert_eq!(
        init(&p, "nerve-sidecar")["volumeMounts"],
        json!([{"name": "work", "mountPath": "/"}])
    );
}

#[test]
fn appends_after_existing_init_containers_and_keeps_them() {
    let existing = json!([{"name": "fetch-data", "image": "busybox"},
                          {"name": "istio-proxy", "image": "proxy", "restartPolicy": "Always"}]);
    let mut p = pod(json!({"initContainers": existing,
                           "containers": [{"name": "trainer", "image": "t:1"}]}));
    assert_eq!(
        inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings()).outcome,
        Outcome::Injected
    );
    let init = p["spec"]["initContainers"].as_array().expect("list");
    assert_eq!(init.len(), 4);
    assert_eq!(init[0], existing[0]);
    assert_eq!(init[1], existing[1]);
    assert_eq!(init[2]["name"], "nerve-restore");
    assert_eq!(init[3]["name"], "nerve-sidecar");
}

#[test]
fn injecting_twice_equals_injecting_once() {
    let mut once = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    inject_pod_template(&mut once, Owner::None, &Workload::Pod, &settings());
    let mut twice = once.clone();
    let injection = inject_pod_template(&mut twice, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::AlreadyInjected);
    assert!(injection.warnings.is_empty());
    assert_eq!(twice, once);
}

#[test]
fn leaves_a_pod_unchanged_when_an_injected_name_is_taken_in_any_container_list() {
    for (list, name, extra) in [
        ("containers", "nerve-sidecar", json!({})),
        ("containers", "nerve-restore", json!({})),
        ("ephemeralContainers", "nerve-restore", json!({})),
        ("initContainers", "nerve-restore", json!({})),
        // An ordinary init container of that name is not the injected native sidecar.
        ("initContainers", "nerve-sidecar", json!({})),
        (
            "initContainers",
            "nerve-restore",
            json!({"restartPolicy": "Always"}),
        ),
    ] {
        let mut container = json!({"name": name, "image": "other:1"});
        container
            .as_object_mut()
            .expect("object")
            .extend(extra.as_object().expect("object").clone());
        let mut spec = json!({"containers": [{"name": "trainer", "image": "t:1"}]});
        spec[list] = match spec.get(list) {
            Some(Value::Array(existing)) => {
                let mut all = existing.clone();
                all.push(container);
                Value::Array(all)
            }
            _ => json!([container]),
        };
        let mut p = pod(spec);
        let before = p.clone();
        let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
        assert_eq!(injection.outcome, Outcome::NotInjected, "{list}/{name}");
        assert_eq!(p, before, "{list}/{name}");
        let warning = &injection.warnings[0];
        assert!(
            warning.contains(&format!("`{name}`")) && warning.contains(&format!("spec.{list}")),
            "{warning}"
        );
    }
}

#[test]
fn leaves_a_pod_with_bad_or_missing_annotations_unchanged_and_says_what_is_wrong() {
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["annotations"] = json!({"nerve.io/dest": "bucket/prefix",
                                          "nerve.io/checkpoint-dir": "/ckpt"});
    let before = p.clone();
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::NotInjected);
    assert_eq!(p, before);
    assert_eq!(injection.warnings.len(), 2, "{:?}", injection.warnings);
    assert!(injection.warnings[0].contains("nerve.io/dest"));
    assert!(injection.warnings[0].contains("s3://"));
    assert!(injection.warnings[1].contains("nerve.io/job is missing"));
}

#[test]
fn a_sidecar_memory_annotation_sets_the_injected_limit() {
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    for name in ["nerve-restore", "nerve-sidecar"] {
        assert_eq!(
            init(&p, name)["resources"],
            json!({"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "256Mi"}}),
            "{name} without the annotation"
        );
    }

    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["annotations"]["nerve.io/sidecar-memory"] = json!("1Gi");
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::Injected);
    for name in ["nerve-restore", "nerve-sidecar"] {
        assert_eq!(
            init(&p, name)["resources"],
            json!({"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "1Gi"}}),
            "{name}: the limit as annotated, the requests unchanged"
        );
    }

    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["annotations"]["nerve.io/sidecar-memory"] = json!("64Mi");
    let before = p.clone();
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::NotInjected);
    assert_eq!(p, before);
    let warning = &injection.warnings[0];
    assert!(
        warning.starts_with("nerve: sidecar not injected: annotation nerve.io/sidecar-memory:")
            && warning.contains("`64Mi`")
            && warning.contains("use at least 128Mi"),
        "{warning}"
    );
    assert!(
        warning.len() <= 256,
        "the API server cuts admission warnings at 256 characters: {warning}"
    );
}

#[test]
fn leaves_the_pod_unchanged_when_the_named_container_does_not_exist() {
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    p["metadata"]["annotations"]["nerve.io/container"] = json!("learner");
    let before = p.clone();
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::NotInjected);
    assert_eq!(p, before);
    assert!(injection.warnings[0].contains("`learner`"));
    assert!(injection.warnings[0].contains("trainer"));
}

#[test]
fn leaves_an_unexpected_pod_shape_unchanged_with_a_warning() {
    for spec in [
        json!({"containers": "trainer"}),
        json!({"containers": []}),
        json!({"containers": [{"image": "no-name"}]}),
        json!({"containers": [{"name": "t", "volumeMounts": {"a": 1}}]}),
    ] {
        let mut p = pod(spec);
        let before = p.clone();
        let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
        assert_eq!(injection.outcome, Outcome::NotInjected, "{before}");
        assert_eq!(p, before);
        assert_eq!(injection.warnings.len(), 1);
    }
}

#[test]
fn runs_as_the_trainers_user_without_added_capabilities_when_the_user_is_known() {
    let mut p = pod(json!({
        "securityContext": {"runAsUser": 1000, "runAsGroup": 3000, "fsGroup": 2000},
        "containers": [{"name": "trainer", "image": "t:1",
                        "securityContext": {"runAsUser": 1001}}]}));
    inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    for name in ["nerve-restore", "nerve-sidecar"] {
        let context = &init(&p, name)["securityContext"];
        assert_eq!(context["runAsUser"], 1001, "the container's own user wins");
        assert_eq!(context["runAsGroup"], 3000);
        assert_eq!(context["runAsNonRoot"], true);
        assert_eq!(context["capabilities"], json!({"drop": ["ALL"]}));
        assert_eq!(context["readOnlyRootFilesystem"], true);
        assert_eq!(context["allowPrivilegeEscalation"], false);
    }
}

#[test]
fn adds_only_cap_kill_to_the_sidecar_when_the_trainers_user_is_unknown() {
    let mut p = pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}));
    inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    let context = &init(&p, "nerve-sidecar")["securityContext"];
    assert_eq!(context["runAsUser"], 0);
    assert_eq!(
        context["capabilities"],
        json!({"drop": ["ALL"], "add": ["KILL"]})
    );
}

#[test]
fn refuses_a_non_root_trainer_whose_user_it_cannot_match() {
    let mut p = pod(json!({"securityContext": {"runAsNonRoot": true},
                           "containers": [{"name": "trainer", "image": "t:1"}]}));
    let before = p.clone();
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::NotInjected);
    assert_eq!(p, before);
    assert!(injection.warnings[0].contains("runAsUser"));
}

#[test]
fn keeps_a_longer_grace_period_and_host_pid() {
    let mut p = pod(
        json!({"terminationGracePeriodSeconds": 900, "hostPID": true,
                           "containers": [{"name": "trainer", "image": "t:1"}]}),
    );
    inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(p["spec"]["terminationGracePeriodSeconds"], 900);
    let sidecar = init(&p, "nerve-sidecar");
    let grace = sidecar["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NERVE_TERMINATION_GRACE")
        .expect("grace env");
    assert_eq!(grace["value"], "900s");
    assert!(
        p["spec"].get("shareProcessNamespace").is_none(),
        "the API server refuses hostPID together with shareProcessNamespace"
    );
}

#[test]
fn picks_the_named_trainer_and_passes_signal_target_and_aws_settings() {
    let mut p = pod(json!({"containers": [
        {"name": "logger", "image": "l:1"},
        {"name": "trainer", "image": "t:1", "env": [
            {"name": "AWS_REGION", "value": "eu-west-1"},
            {"name": "AWS_ENDPOINT_URL", "value": "http://minio:9000"},
            {"name": "HF_TOKEN", "value": "secret"}]}]}));
    p["metadata"]["annotations"]["nerve.io/container"] = json!("trainer");
    p["metadata"]["annotations"]["nerve.io/signal"] = json!("SIGUSR2");
    p["metadata"]["annotations"]["nerve.io/target"] = json!("python .*train\\.py");
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::Injected);
    assert!(injection.warnings.is_empty());
    assert!(p["spec"]["containers"][0].get("volumeMounts").is_none());
    assert_eq!(
        p["spec"]["containers"][1]["volumeMounts"][0]["mountPath"],
        "/ckpt"
    );
    let sidecar = init(&p, "nerve-sidecar");
    assert_eq!(
        sidecar["args"],
        json!([
            "run",
            "--signal",
            "SIGUSR2",
            "--target",
            "python .*train\\.py"
        ])
    );
    let names = env_names(&sidecar);
    assert!(names.contains(&"AWS_REGION".to_owned()));
    assert!(names.contains(&"AWS_ENDPOINT_URL".to_owned()));
    assert!(!names.contains(&"HF_TOKEN".to_owned()));
}

#[test]
fn warns_when_it_guesses_the_trainer_among_several_containers() {
    let mut p =
        pod(json!({"containers": [{"name": "a", "image": "a"}, {"name": "b", "image": "b"}]}));
    let injection = inject_pod_template(&mut p, Owner::None, &Workload::Pod, &settings());
    assert_eq!(injection.outcome, Outcome::Injected);
    assert!(injection.warnings[0].contains("`a`"));
}

const MANIFESTS: &str = r#"
apiVersion: batch/v1
kind: Job
metadata:
  name: llama-finetune
spec:
  template:
    metadata:
      labels:
        nerve.io/checkpoint: enabled
      annotations:
        nerve.io/dest: s3://ckpt-bucket/runs
        nerve.io/checkpoint-dir: /ckpt
    spec:
      restartPolicy: Never
      containers:
        - name: trainer
          image: trainer:1
---
apiVersion: v1
kind: ConfigMap
metadata:
  name: settings
data:
  lr: "0.001"
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: tensorboard
spec:
  template:
    spec:
      containers:
        - name: tb
          image: tb:1
---
apiVersion: apps/v1
kind: StatefulSet
metadata:
  name: forgot-label
spec:
  template:
    metadata:
      annotations:
        nerve.io/dest: s3://ckpt-bucket/runs
    spec:
      containers:
        - name: trainer
          image: trainer:1
---
"#;

#[test]
fn injects_opted_in_templates_of_a_multi_document_stream_and_keeps_the_rest() {
    let report = inject_manifest(MANIFESTS, &settings()).expect("valid YAML");
    assert_eq!(report.injected, 1);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].starts_with("StatefulSet/forgot-label:"));
    assert!(report.warnings[0].contains("nerve.io/checkpoint: enabled"));

    let documents: Vec<Value> = serde_norway::Deserializer::from_str(&report.output)
        .map(|d| Value::deserialize(d).expect("document"))
        .collect();
    assert_eq!(documents.len(), 4);
    let job = &documents[0];
    let sidecar = &job["spec"]["template"]["spec"]["initContainers"][1];
    assert_eq!(sidecar["name"], "nerve-sidecar");
    let job_env = sidecar["env"]
        .as_array()
        .expect("env")
        .iter()
        .find(|e| e["name"] == "NERVE_JOB")
        .expect("NERVE_JOB")
        .clone();
    assert_eq!(
        job_env["value"], "$(POD_NAMESPACE).llama-finetune",
        "job name from the Job, in the pod's namespace"
    );
    assert_eq!(documents[1]["data"]["lr"], "0.001");
    assert!(
        documents[2]["spec"]["template"]["spec"]
            .get("initContainers")
            .is_none()
    );

    let again = inject_manifest(&report.output, &settings()).expect("valid YAML");
    assert_eq!(again.output, report.output, "idempotent");
    assert_eq!(again.injected, 0);
}

#[test]
fn injects_the_pod_template_of_a_cron_job_and_a_list() {
    let input = json!({"apiVersion": "v1", "kind": "List", "items": [
        {"apiVersion": "batch/v1", "kind": "CronJob", "metadata": {"name": "nightly"},
         "spec": {"jobTemplate": {"spec": {"template": {
            "metadata": {"labels": {"nerve.io/checkpoint": "enabled"},
                         "annotations": annotations()},
            "spec": {"containers": [{"name": "trainer", "image": "t:1"}]}}}}}},
        pod(json!({"containers": [{"name": "trainer", "image": "t:1"}]}))]});
    let report = inject_manifest(&input.to_string(), &settings()).expect("JSON is YAML");
    assert_eq!(report.injected, 2, "{:?}", report.warnings);
}

#[test]
fn reports_the_document_that_is_not_yaml() {
    let error =
        inject_manifest("kind: Pod\n---\nkind: [unclosed\n", &settings()).expect_err("bad YAML");
    assert!(error.to_string().contains("document 2"), "{error}");
}

/// The env entry `name` of the container `container` in `template`'s init containers.
fn template_env(template: &Value, container: &str, name: &str) -> Option<Value> {
    template["spec"]["initContainers"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == container)?["env"]
        .as_array()?
        .iter()
        .find(|e| e["name"] == name)
        .cloned()
}

fn documents(output: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(output)
        .map(|d| Value::deserialize(d).expect("document"))
        .collect()
}

const INDEXED_JOB: &str = r#"
apiVersion: batch/v1
kind: Job
metadata: {name: llama, namespace: ml}
spec:
  completionMode: Indexed
  completions: 4
  parallelism: 4
  template:
    metadata:
      labels: {nerve.io/checkpoint: enabled}
      annotations: {nerve.io/dest: "s3://ckpt-bucket/runs", nerve.io/checkpoint-dir: /ckpt}
    spec:
      restartPolicy: Never
      containers: [{name: trainer, image: "t:1"}]
"#;

#[test]
fn an_indexed_job_manifest_gives_restore_and_sidecar_its_rank_and_completions() {
    let report = inject_manifest(INDEXED_JOB, &settings()).expect("valid");
    assert_eq!(report.injected, 1);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let template = &documents(&report.output)[0]["spec"]["template"];
    for container in ["nerve-restore", "nerve-sidecar"] {
        let rank = template_env(template, container, "NERVE_RANK").expect("rank");
        assert_eq!(
            rank["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        );
        let world = template_env(template, container, "NERVE_WORLD_SIZE").expect("world");
        assert_eq!(world["value"], "4");
    }

    let overridden = INDEXED_JOB.replace(
        "nerve.io/checkpoint-dir: /ckpt}",
        "nerve.io/checkpoint-dir: /ckpt, nerve.io/world-size: \"2\"}",
    );
    let report = inject_manifest(&overridden, &settings()).expect("valid");
    let template = &documents(&report.output)[0]["spec"]["template"];
    assert_eq!(
        template_env(template, "nerve-sidecar", "NERVE_WORLD_SIZE").expect("world")["value"],
        "2",
        "nerve.io/world-size overrides completions"
    );
}

const PYTORCHJOB: &str = r#"
apiVersion: kubeflow.org/v1
kind: PyTorchJob
metadata: {name: llama}
spec:
  pytorchReplicaSpecs:
    Master:
      replicas: 1
      template:
        metadata:
          labels: {nerve.io/checkpoint: enabled}
          annotations: {nerve.io/dest: "s3://ckpt-bucket/runs", nerve.io/checkpoint-dir: /ckpt}
        spec:
          containers: [{name: pytorch, image: "t:1"}]
    Worker:
      replicas: 3
      template:
        metadata:
          labels: {nerve.io/checkpoint: enabled}
          annotations: {nerve.io/dest: "s3://ckpt-bucket/runs", nerve.io/checkpoint-dir: /ckpt}
        spec:
          containers: [{name: pytorch, image: "t:1"}]
"#;

#[test]
fn injects_every_replica_template_of_a_pytorchjob_with_distinct_ranks() {
    let report = inject_manifest(PYTORCHJOB, &settings()).expect("valid");
    assert_eq!(report.injected, 2, "{:?}", report.warnings);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let job = &documents(&report.output)[0];
    let master = &job["spec"]["pytorchReplicaSpecs"]["Master"]["template"];
    let worker = &job["spec"]["pytorchReplicaSpecs"]["Worker"]["template"];
    assert_eq!(
        template_env(master, "nerve-sidecar", "NERVE_JOB").expect("job")["value"],
        "$(POD_NAMESPACE).llama"
    );
    assert_eq!(
        template_env(master, "nerve-sidecar", "NERVE_RANK").expect("rank")["value"],
        "3",
        "the Master takes the rank after the three Workers"
    );
    assert_eq!(
        template_env(worker, "nerve-restore", "NERVE_RANK").expect("rank")["valueFrom"]["fieldRef"]
            ["fieldPath"],
        "metadata.labels['training.kubeflow.org/replica-index']"
    );
    for template in [master, worker] {
        assert_eq!(
            template_env(template, "nerve-sidecar", "NERVE_WORLD_SIZE").expect("world")["value"],
            "4"
        );
    }
}

const JOBSET: &str = r#"
apiVersion: jobset.x-k8s.io/v1alpha2
kind: JobSet
metadata: {name: llama}
spec:
  replicatedJobs:
    - name: workers
      replicas: 1
      template:
        spec:
          completionMode: Indexed
          completions: 8
          parallelism: 8
          template:
            metadata:
              labels: {nerve.io/checkpoint: enabled}
              annotations: {nerve.io/dest: "s3://ckpt-bucket/runs", nerve.io/checkpoint-dir: /ckpt}
            spec:
              restartPolicy: Never
              containers: [{name: trainer, image: "t:1"}]
"#;

#[test]
fn injects_a_jobsets_templates_and_ranks_pods_where_the_downward_api_can() {
    let report = inject_manifest(JOBSET, &settings()).expect("valid");
    assert_eq!(report.injected, 1, "{:?}", report.warnings);
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    let template =
        &documents(&report.output)[0]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"];
    assert_eq!(
        template_env(template, "nerve-sidecar", "NERVE_WORLD_SIZE").expect("world")["value"],
        "8"
    );
    assert_eq!(
        template_env(template, "nerve-sidecar", "NERVE_JOB").expect("job")["value"],
        "$(POD_NAMESPACE).llama"
    );

    // Two Jobs of eight pods: a global rank would need arithmetic. Injected, unranked, and said.
    let two = JOBSET.replace("replicas: 1", "replicas: 2");
    let report = inject_manifest(&two, &settings()).expect("valid");
    assert_eq!(report.injected, 1);
    let warning = &report.warnings[0];
    assert!(
        warning.starts_with("JobSet/llama spec.replicatedJobs[0].template.spec.template:"),
        "{warning}"
    );
    assert!(
        warning.contains("cannot be written with the downward API"),
        "{warning}"
    );
    let template =
        &documents(&report.output)[0]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"];
    assert!(template_env(template, "nerve-sidecar", "NERVE_RANK").is_none());
}

#[test]
fn warns_about_a_labelled_template_inside_a_kind_it_does_not_know() {
    let input = r#"
apiVersion: ray.io/v1
kind: RayJob
metadata: {name: tune}
spec:
  rayClusterSpec:
    workerGroupSpecs:
      - groupName: gpu
        template:
          metadata:
            labels: {nerve.io/checkpoint: enabled}
          spec:
            containers: [{name: ray-worker, image: "ray:2"}]
---
apiVersion: kubeflow.org/v1
kind: TFJob
metadata: {name: plain}
spec: {}
"#;
    let report = inject_manifest(input, &settings()).expect("valid");
    assert_eq!(report.injected, 0);
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    let warning = &report.warnings[0];
    assert!(
        warning.starts_with(
            "RayJob/tune: spec.rayClusterSpec.workerGroupSpecs[0].template is labelled"
        ),
        "{warning}"
    );
    assert!(warning.contains("does not know"), "{warning}");
}
