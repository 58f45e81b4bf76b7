//! One `AdmissionReview` (admission.k8s.io/v1) in, one out: always allowed, with a JSON Patch
//! when the sidecar was injected and warnings when something is off.

use base64::Engine;
use serde_json::{Value, json};

use crate::inject::{
    InjectSettings, Injection, JobShape, OPT_IN_LABEL, OPT_IN_VALUE, Outcome, Owner, Workload,
    inject_pod_template,
};

/// Why a request body could not be answered at all. Without the request's `uid` no valid
/// response exists; the API server then applies `failurePolicy: Ignore` and admits the pod.
#[derive(Debug, thiserror::Error)]
pub enum AdmissionError {
    #[error("the body is not JSON")]
    NotJson(#[source] serde_json::Error),
    #[error("the body is not an AdmissionReview with request.uid")]
    NoRequest,
}

/// Answers one AdmissionReview. Anything unexpected inside a well-formed review admits the
/// object unchanged with a warning; injection never blocks a pod.
pub fn review_admission(body: &[u8], settings: &InjectSettings) -> Result<Value, AdmissionError> {
    let review: Value = serde_json::from_slice(body).map_err(AdmissionError::NotJson)?;
    let request = review.get("request").ok_or(AdmissionError::NoRequest)?;
    let uid = request
        .get("uid")
        .and_then(Value::as_str)
        .ok_or(AdmissionError::NoRequest)?;
    let api_version = review
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or("admission.k8s.io/v1");

    let (patch, warnings) = mutate(request, settings);
    let mut response = json!({"uid": uid, "allowed": true});
    if let Some(patch) = patch {
        response["patchType"] = json!("JSONPatch");
        response["patch"] = json!(base64::engine::general_purpose::STANDARD.encode(patch));
    }
    if !warnings.is_empty() {
        for warning in &warnings {
            tracing::warn!(uid, warning, "admitted with a warning");
        }
        response["warnings"] = json!(warnings);
    }
    Ok(json!({
        "apiVersion": api_version,
        "kind": "AdmissionReview",
        "response": response,
    }))
}

/// The patch (serialized JSON Patch) to apply, if any, and the warnings for the user.
fn mutate(request: &Value, settings: &InjectSettings) -> (Option<Vec<u8>>, Vec<String>) {
    let group = request
        .pointer("/kind/group")
        .and_then(Value::as_str)
        .unwrap_or_default();
    let kind = request
        .pointer("/kind/kind")
        .and_then(Value::as_str)
        .unwrap_or("(none)");
    let sub_resource = request.get("subResource").and_then(Value::as_str);
    let target = match (group, kind) {
        _ if sub_resource.is_some_and(|s| !s.is_empty()) => None,
        ("", "Pod") => Some(Target::Pod),
        ("batch", "Job") => Some(Target::Job),
        _ => None,
    };
    let Some(target) = target else {
        return (
            None,
            vec![format!(
                "nerve: the webhook only injects into Pods and Jobs, got {kind}; admitted unchanged"
            )],
        );
    };
    let Some(original) = request.get("object").filter(|o| o.is_object()) else {
        return (
            None,
            vec![format!(
                "nerve: the review carries no {kind} object; admitted unchanged"
            )],
        );
    };
    let mut object = original.clone();
    let injection = match target {
        Target::Pod => inject_pod_template(&mut object, Owner::None, &Workload::Pod, settings),
        Target::Job => match inject_job(&mut object, settings) {
            Some(injection) => injection,
            // Not opted in: the chart's match conditions normally keep such Jobs away.
            None => return (None, Vec::new()),
        },
    };
    if injection.outcome != Outcome::Injected {
        return (None, injection.warnings);
    }
    let patch = json_patch::diff(original, &object);
    match serde_json::to_vec(&patch) {
        Ok(bytes) => (Some(bytes), injection.warnings),
        Err(e) => (
            None,
            vec![format!(
                "nerve: sidecar not injected: could not encode the patch ({e}); admitted unchanged"
            )],
        ),
    }
}

/// What a review is about.
enum Target {
    Pod,
    /// A Job, injected in its pod template: its pods then arrive already injected, and the
    /// injector sees what a pod cannot show, the Job's completions (an Indexed Job's world size).
    Job,
}

/// Injects into a Job's pod template; `None` when neither the Job nor its template opts in.
fn inject_job(job: &mut Value, settings: &InjectSettings) -> Option<Injection> {
    let opted_in = |object: Option<&Value>| {
        object
            .and_then(|o| o.pointer("/metadata/labels"))
            .and_then(|labels| labels.get(OPT_IN_LABEL))
            .and_then(Value::as_str)
            == Some(OPT_IN_VALUE)
    };
    if !opted_in(Some(job)) && !opted_in(job.pointer("/spec/template")) {
        return None;
    }
    let workload = Workload::Job(JobShape::of(job.get("spec")));
    // A CronJob's Jobs are one training job across runs: name it after the CronJob. A Job named
    // by generateName has no name yet; its pods' job-name label will carry it.
    let cron_job = job
        .pointer("/metadata/ownerReferences")
        .and_then(Value::as_array)
        .and_then(|owners| {
            owners.iter().find(|o| {
                o.get("kind").and_then(Value::as_str) == Some("CronJob")
                    && o.get("controller").and_then(Value::as_bool) == Some(true)
            })
        })
        .and_then(|o| o.get("name"))
        .and_then(Value::as_str)
        .map(str::to_owned);
    let name = job
        .pointer("/metadata/name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .map(str::to_owned);
    let owner = match (&cron_job, &name) {
        (Some(cron_job), _) => Owner::Named(cron_job),
        (None, Some(name)) => Owner::Named(name),
        (None, None) => Owner::UnnamedJob,
    };
    let Some(template) = job.pointer_mut("/spec/template").filter(|t| t.is_object()) else {
        return Some(Injection {
            outcome: Outcome::NotInjected,
            warnings: vec!["nerve: sidecar not injected: the Job has no spec.template".to_owned()],
        });
    };
    Some(inject_pod_template(template, owner, &workload, settings))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn review(object: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
                "kind": {"group": "", "version": "v1", "kind": "Pod"},
                "resource": {"group": "", "version": "v1", "resource": "pods"},
                "namespace": "ml",
                "operation": "CREATE",
                "object": object,
            }
        }))
        .expect("json")
    }

    fn opted_in_pod() -> Value {
        json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"generateName": "train-", "namespace": "ml",
                "labels": {"nerve.io/checkpoint": "enabled"},
                "annotations": {"nerve.io/dest": "s3://ckpt-bucket/runs",
                    "nerve.io/job": "llama", "nerve.io/checkpoint-dir": "/ckpt"}},
            "spec": {"containers": [{"name": "trainer", "image": "trainer:1"}]}
        })
    }

    #[test]
    fn answers_with_a_patch_that_turns_the_pod_into_the_injected_pod() {
        let answer = review_admission(&review(opted_in_pod()), &InjectSettings::default())
            .expect("answered");
        let response = &answer["response"];
        assert_eq!(response["uid"], "705ab4f5-6393-11e8-b7cc-42010a800002");
        assert_eq!(response["allowed"], true);
        assert_eq!(response["patchType"], "JSONPatch");
        let patch = base64::engine::general_purpose::STANDARD
            .decode(response["patch"].as_str().expect("patch"))
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
        let mut patched = opted_in_pod();
        json_patch::patch(&mut patched, &patch).expect("applies");
        let mut expected = opted_in_pod();
        inject_pod_template(
            &mut expected,
            Owner::None,
            &Workload::Pod,
            &InjectSettings::default(),
        );
        assert_eq!(patched, expected);
        assert_eq!(
            patched["spec"]["initContainers"][1]["name"],
            "nerve-sidecar"
        );
    }

    #[test]
    fn admits_an_unexpected_pod_shape_unchanged_with_a_warning() {
        let mut pod = opted_in_pod();
        pod["spec"]["containers"] = json!("trainer");
        let answer = review_admission(&review(pod), &InjectSettings::default()).expect("answered");
        let response = &answer["response"];
        assert_eq!(response["allowed"], true);
        assert!(response.get("patch").is_none());
        let warning = response["warnings"][0].as_str().expect("a warning");
        assert!(warning.contains("spec.containers"), "{warning}");
    }

    fn job_review(job: Value) -> Vec<u8> {
        serde_json::to_vec(&json!({
            "apiVersion": "admission.k8s.io/v1",
            "kind": "AdmissionReview",
            "request": {
                "uid": "job-1",
                "kind": {"group": "batch", "version": "v1", "kind": "Job"},
                "resource": {"group": "batch", "version": "v1", "resource": "jobs"},
                "namespace": "ml",
                "operation": "CREATE",
                "object": job,
            }
        }))
        .expect("json")
    }

    fn patched(answer: &Value, mut object: Value) -> Value {
        let patch = base64::engine::general_purpose::STANDARD
            .decode(answer["response"]["patch"].as_str().expect("patch"))
            .expect("base64");
        let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
        json_patch::patch(&mut object, &patch).expect("applies");
        object
    }

    fn sidecar_env(template: &Value, name: &str) -> Value {
        template["spec"]["initContainers"][1]["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name}"))
    }

    #[test]
    fn injects_a_jobs_pod_template_with_its_completions_and_names_cron_jobs_runs_after_the_cron_job()
     {
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "nightly-29000000", "namespace": "ml",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
                    "name": "nightly", "uid": "u", "controller": true}]},
            "spec": {"completionMode": "Indexed", "completions": 3, "parallelism": 3,
                "template": opted_in_pod()}
        });
        let answer = review_admission(&job_review(job.clone()), &InjectSettings::default())
            .expect("answered");
        assert_eq!(answer["response"]["allowed"], true);
        let job = patched(&answer, job);
        let template = &job["spec"]["template"];
        assert_eq!(
            template["spec"]["initContainers"][1]["name"],
            "nerve-sidecar"
        );
        assert_eq!(sidecar_env(template, "NERVE_WORLD_SIZE")["value"], "3");
        assert_eq!(
            sidecar_env(template, "NERVE_JOB")["value"],
            "llama",
            "nerve.io/job as given"
        );

        let mut unnamed = opted_in_pod();
        unnamed["metadata"]["annotations"]
            .as_object_mut()
            .expect("annotations")
            .remove("nerve.io/job");
        let job = json!({
            "apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "nightly-29000000",
                "ownerReferences": [{"apiVersion": "batch/v1", "kind": "CronJob",
                    "name": "nightly", "uid": "u", "controller": true}]},
            "spec": {"template": unnamed.clone()}
        });
        let answer = review_admission(&job_review(job.clone()), &InjectSettings::default())
            .expect("answered");
        let job = patched(&answer, job);
        assert_eq!(
            sidecar_env(&job["spec"]["template"], "NERVE_JOB")["value"],
            "$(POD_NAMESPACE).nightly",
            "every run of a CronJob resumes the same job"
        );

        let job = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"generateName": "llama-"}, "spec": {"template": unnamed}});
        let answer = review_admission(&job_review(job.clone()), &InjectSettings::default())
            .expect("answered");
        let job = patched(&answer, job);
        assert_eq!(
            sidecar_env(&job["spec"]["template"], "NERVE_JOB")["value"],
            "$(POD_NAMESPACE).$(JOB_NAME)"
        );
    }

    #[test]
    fn admits_a_job_that_does_not_opt_in_unchanged_and_without_a_word() {
        let mut template = opted_in_pod();
        template["metadata"]["labels"] = json!({});
        let job = json!({"apiVersion": "batch/v1", "kind": "Job",
            "metadata": {"name": "etl"}, "spec": {"template": template}});
        let answer =
            review_admission(&job_review(job), &InjectSettings::default()).expect("answered");
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        assert!(answer["response"].get("warnings").is_none());
    }

    #[test]
    fn admits_other_kinds_unchanged_with_a_warning() {
        let mut body: Value = serde_json::from_slice(&review(json!({}))).expect("json");
        body["request"]["kind"]["kind"] = json!("Deployment");
        let body = serde_json::to_vec(&body).expect("json");
        let answer = review_admission(&body, &InjectSettings::default()).expect("answered");
        assert_eq!(answer["response"]["allowed"], true);
        assert!(answer["response"].get("patch").is_none());
        assert!(
            answer["response"]["warnings"][0]
                .as_str()
                .expect("warning")
                .contains("Deployment")
        );
    }

    #[test]
    fn refuses_a_body_without_a_request_uid() {
        let error = review_admission(br#"{"kind":"AdmissionReview"}"#, &InjectSettings::default())
            .expect_err("no uid");
        assert!(matches!(error, AdmissionError::NoRequest));
        assert!(matches!(
            review_admission(b"not json", &InjectSettings::default()),
            Err(AdmissionError::NotJson(_))
        ));
    }
}
