//! One `AdmissionReview` (admission.k8s.io/v1) in, one out: always allowed, with a JSON Patch
//! when the sidecar was injected and warnings when something is off.

use base64::Engine;
use serde_json::{Value, json};

use crate::inject::{InjectSettings, Outcome, Owner, Workload, inject_pod_template};

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
    let kind = request
        .pointer("/kind/kind")
        .and_then(Value::as_str)
        .unwrap_or("(none)");
    let sub_resource = request.get("subResource").and_then(Value::as_str);
    if kind != "Pod" || sub_resource.is_some_and(|s| !s.is_empty()) {
        return (
            None,
            vec![format!(
                "nerve: the webhook only injects into Pods, got {kind}; admitted unchanged"
            )],
        );
    }
    let Some(original) = request.get("object").filter(|o| o.is_object()) else {
        return (
            None,
            vec!["nerve: the review carries no pod object; admitted unchanged".to_owned()],
        );
    };
    let mut pod = original.clone();
    let injection = inject_pod_template(&mut pod, Owner::None, &Workload::Pod, settings);
    if injection.outcome != Outcome::Injected {
        return (None, injection.warnings);
    }
    let patch = json_patch::diff(original, &pod);
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
