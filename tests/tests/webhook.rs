//! The real `nerve-sidecar webhook` binary answers real AdmissionReview v1 requests over HTTPS
//! on 127.0.0.1, the way the API server calls it.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::{Value, json};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, pki_types::ServerName};

/// Generous: the binary starts in milliseconds, but CI machines are loaded.
const STARTUP_TIMEOUT: Duration = Duration::from_secs(60);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The webhook process, killed when the test ends however it ends.
struct Webhook {
    child: Child,
    port: u16,
    ca: rustls::RootCertStore,
    _dir: tempfile::TempDir,
}

impl Drop for Webhook {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_webhook() -> Webhook {
    let dir = tempfile::tempdir().expect("temp dir");
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()])
        .expect("self-signed certificate");
    let cert_path = dir.path().join("tls.crt");
    let key_path = dir.path().join("tls.key");
    std::fs::write(&cert_path, certified.cert.pem()).expect("write cert");
    std::fs::write(&key_path, certified.signing_key.serialize_pem()).expect("write key");
    let mut ca = rustls::RootCertStore::empty();
    ca.add(certified.cert.der().clone())
        .expect("trust the cert");

    let mut child = Command::new(nerve_tests::binary_path("nerve-sidecar"))
        .args(["--log-format", "json", "webhook", "--listen", "127.0.0.1:0"])
        .arg("--tls-cert")
        .arg(&cert_path)
        .arg("--tls-key")
        .arg(&key_path)
        .args(["--image", "registry.example/nerve:test"])
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start nerve-sidecar webhook");

    // The webhook logs its bound address; read stderr on a thread so a silent process cannot
    // hang the test, and keep draining it afterwards so the pipe never fills.
    let stderr = child.stderr.take().expect("stderr");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut tx = Some(tx);
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("webhook: {line}");
            if let Some(sender) = &tx
                && let Some(port) = listening_port(&line)
            {
                let _ = sender.send(port);
                tx = None;
            }
        }
    });
    let port = match rx.recv_timeout(STARTUP_TIMEOUT) {
        Ok(port) => port,
        Err(_) => {
            let _ = child.kill();
            let status = child.wait();
            panic!("the webhook did not report its address (exit: {status:?})");
        }
    };
    Webhook {
        child,
        port,
        ca,
        _dir: dir,
    }
}

fn listening_port(line: &str) -> Option<u16> {
    let log: Value = serde_json::from_str(line).ok()?;
    let address = log.pointer("/fields/address")?.as_str()?;
    address.strip_prefix("127.0.0.1:")?.parse().ok()
}

impl Webhook {
    /// Sends one HTTPS request, verifying the server's certificate like the API server does
    /// with the caBundle.
    async fn request(&self, method: &str, path: &str, body: Vec<u8>) -> (u16, Vec<u8>) {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(self.ca.clone())
        .with_no_client_auth();
        let connector = TlsConnector::from(Arc::new(config));
        let exchange = async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
                .await
                .expect("connect");
            let server_name = ServerName::try_from("localhost").expect("name");
            let tls = connector.connect(server_name, tcp).await.expect("TLS");
            let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
                .await
                .expect("HTTP handshake");
            tokio::spawn(connection);
            let request = http::Request::builder()
                .method(method)
                .uri(path)
                .header("host", "localhost")
                .header("content-type", "application/json")
                .body(Full::new(Bytes::from(body)))
                .expect("request");
            let response = sender.send_request(request).await.expect("response");
            let status = response.status().as_u16();
            let body = response
                .into_body()
                .collect()
                .await
                .expect("body")
                .to_bytes();
            (status, body.to_vec())
        };
        tokio::time::timeout(REQUEST_TIMEOUT, exchange)
            .await
            .expect("the webhook answered in time")
    }

    async fn review(&self, review: &Value) -> Value {
        let (status, body) = self
            .request("POST", "/mutate", serde_json::to_vec(review).expect("json"))
            .await;
        assert_eq!(status, 200, "{}", String::from_utf8_lossy(&body));
        serde_json::from_slice(&body).expect("an AdmissionReview")
    }
}

fn admission_review(uid: &str, pod: Value) -> Value {
    json!({
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": uid,
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "requestKind": {"group": "", "version": "v1", "kind": "Pod"},
            "requestResource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "ml",
            "operation": "CREATE",
            "userInfo": {"username": "system:serviceaccount:kube-system:job-controller"},
            "object": pod,
            "oldObject": null,
            "dryRun": false,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"}
        }
    })
}

fn training_pod() -> Value {
    json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "generateName": "llama-finetune-",
            "namespace": "ml",
            "labels": {"nerve.io/checkpoint": "enabled",
                       "batch.kubernetes.io/job-name": "llama-finetune"},
            "annotations": {"nerve.io/dest": "s3://ckpt-bucket/runs",
                            "nerve.io/checkpoint-dir": "/ckpt/llama"}
        },
        "spec": {
            "restartPolicy": "Never",
            "securityContext": {"runAsUser": 1000, "fsGroup": 1000},
            "containers": [{
                "name": "trainer",
                "image": "trainer:1",
                "volumeMounts": [{"name": "scratch", "mountPath": "/ckpt"}]
            }],
            "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}}]
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_answers_a_real_admission_review_with_a_patch_that_injects_the_sidecar() {
    let webhook = start_webhook();

    let (status, body) = webhook.request("GET", "/healthz", Vec::new()).await;
    assert_eq!((status, body.as_slice()), (200, &b"ok\n"[..]));

    let answer = webhook
        .review(&admission_review("a1b2c3", training_pod()))
        .await;
    assert_eq!(answer["apiVersion"], "admission.k8s.io/v1");
    assert_eq!(answer["kind"], "AdmissionReview");
    let response = &answer["response"];
    assert_eq!(response["uid"], "a1b2c3");
    assert_eq!(response["allowed"], true);
    assert_eq!(response["patchType"], "JSONPatch");
    assert!(response.get("warnings").is_none(), "{response}");

    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
    let mut pod = training_pod();
    json_patch::patch(&mut pod, &patch).expect("the patch applies to the pod it was made for");

    let spec = &pod["spec"];
    assert_eq!(spec["shareProcessNamespace"], true);
    assert_eq!(spec["terminationGracePeriodSeconds"], 300);
    assert_eq!(
        spec["volumes"],
        training_pod()["spec"]["volumes"],
        "the trainer's volume is shared, none added"
    );
    let init = spec["initContainers"].as_array().expect("initContainers");
    assert_eq!(init.len(), 2);
    let (restore, sidecar) = (&init[0], &init[1]);
    assert_eq!(restore["name"], "nerve-restore");
    assert_eq!(restore["args"], json!(["restore"]));
    assert_eq!(sidecar["name"], "nerve-sidecar");
    assert_eq!(sidecar["restartPolicy"], "Always");
    assert_eq!(sidecar["image"], "registry.example/nerve:test");
    assert_eq!(sidecar["args"], json!(["run", "--signal", "SIGUSR1"]));
    assert_eq!(
        sidecar["volumeMounts"],
        json!([{"name": "scratch", "mountPath": "/ckpt"}])
    );
    assert_eq!(sidecar["securityContext"]["runAsUser"], 1000);
    let env = |name: &str| {
        sidecar["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name}"))
    };
    assert_eq!(
        env("NERVE_JOB")["value"],
        "$(POD_NAMESPACE).llama-finetune",
        "the Job's name in the pod's namespace"
    );
    assert_eq!(env("NERVE_CHECKPOINT_DIR")["value"], "/ckpt/llama");
    assert_eq!(env("NERVE_DEST")["value"], "s3://ckpt-bucket/runs");
    assert_eq!(
        env("POD_NAMESPACE")["valueFrom"]["fieldRef"]["fieldPath"],
        "metadata.namespace"
    );

    // The API server re-invokes webhooks when another one changed the pod: the injected pod
    // must come back unchanged.
    let again = webhook.review(&admission_review("d4e5f6", pod)).await;
    assert_eq!(again["response"]["allowed"], true);
    assert!(again["response"].get("patch").is_none(), "{again}");

    // A checkpoint of more files than the default limit holds: the pod raises it.
    let mut many_files = training_pod();
    many_files["metadata"]["annotations"]["nerve.io/sidecar-memory"] = json!("1Gi");
    let answer = webhook
        .review(&admission_review("g7h8i9", many_files.clone()))
        .await;
    let patch = base64::engine::general_purpose::STANDARD
        .decode(answer["response"]["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
    json_patch::patch(&mut many_files, &patch).expect("the patch applies");
    assert_eq!(
        many_files["spec"]["initContainers"][1]["resources"]["limits"]["memory"], "1Gi",
        "the sidecar's memory limit as annotated"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_admits_an_unexpected_pod_shape_unchanged_with_a_warning() {
    let webhook = start_webhook();

    let mut odd = training_pod();
    odd["spec"]["containers"] = json!({"trainer": {"image": "trainer:1"}});
    let answer = webhook.review(&admission_review("odd-1", odd)).await;
    let response = &answer["response"];
    assert_eq!(response["uid"], "odd-1");
    assert_eq!(response["allowed"], true);
    assert!(response.get("patch").is_none(), "{response}");
    let warning = response["warnings"][0].as_str().expect("a warning");
    assert!(warning.contains("not injected"), "{warning}");
    assert!(warning.contains("spec.containers"), "{warning}");

    let mut unannotated = training_pod();
    unannotated["metadata"]["annotations"] = json!({});
    let answer = webhook
        .review(&admission_review("bare-1", unannotated))
        .await;
    assert_eq!(answer["response"]["allowed"], true);
    assert!(answer["response"].get("patch").is_none());
    let warnings = answer["response"]["warnings"].as_array().expect("warnings");
    assert!(
        warnings.iter().any(|w| w
            .as_str()
            .is_some_and(|w| w.contains("nerve.io/dest is missing"))),
        "{warnings:?}"
    );

    // Not even a review: no uid to answer, so a client error (the API server then applies
    // failurePolicy: Ignore).
    let (status, _) = webhook
        .request("POST", "/mutate", b"{\"kind\":\"Nonsense\"}".to_vec())
        .await;
    assert_eq!(status, 400);
}

impl Webhook {
    /// An HTTPS connection to the webhook for writing a request by hand.
    async fn connect(&self) -> tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
        let config = rustls::ClientConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_root_certificates(self.ca.clone())
        .with_no_client_auth();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", self.port))
            .await
            .expect("connect");
        TlsConnector::from(Arc::new(config))
            .connect(ServerName::try_from("localhost").expect("name"), tcp)
            .await
            .expect("TLS")
    }
}

/// Reads a whole HTTP/1.1 response the server closes after; returns its status and text.
async fn read_response(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
) -> (u16, String) {
    use tokio::io::AsyncReadExt;
    let mut raw = Vec::new();
    // The server closes after answering a request whose body it did not read; a TLS close
    // without close_notify still leaves the answer in `raw`.
    let _ = tls.read_to_end(&mut raw).await;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP status in {text:?}"));
    (status, text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_refuses_an_oversized_review_and_one_whose_body_never_arrives() {
    use tokio::io::AsyncWriteExt;
    let webhook = start_webhook();

    // 9 MiB announced: refused before a byte of it is read.
    let mut tls = webhook.connect().await;
    tls.write_all(
        b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
          content-length: 9437184\r\n\r\n",
    )
    .await
    .expect("send headers");
    let (status, text) = tokio::time::timeout(REQUEST_TIMEOUT, read_response(tls))
        .await
        .expect("answered at once");
    assert_eq!(status, 413, "{text}");

    // 1000 bytes announced, 10 sent, then nothing: the webhook gives up after its body
    // timeout (10 s) instead of holding the connection for as long as the client likes.
    let mut tls = webhook.connect().await;
    tls.write_all(
        b"POST /mutate HTTP/1.1\r\nhost: localhost\r\ncontent-type: application/json\r\n\
          content-length: 1000\r\n\r\n{\"kind\":\"",
    )
    .await
    .expect("send the start of a review");
    tls.flush().await.expect("flush");
    let started = std::time::Instant::now();
    let slow = tokio::spawn(read_response(tls));

    // Meanwhile the API server's own reviews are answered.
    let answer = webhook
        .review(&admission_review("while-slow", training_pod()))
        .await;
    assert_eq!(answer["response"]["allowed"], true);

    let (status, text) = tokio::time::timeout(REQUEST_TIMEOUT, slow)
        .await
        .expect("the stalled request was answered")
        .expect("reader task");
    assert_eq!(status, 408, "{text}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(20),
        "answered after {waited:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_injects_an_indexed_jobs_template_so_its_pods_arrive_ranked_and_injected() {
    let webhook = start_webhook();
    let mut template = training_pod();
    let metadata = template["metadata"].as_object_mut().expect("metadata");
    metadata.remove("generateName");
    metadata.remove("namespace");
    metadata["labels"] = json!({"nerve.io/checkpoint": "enabled"});
    let job = json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "llama-finetune", "namespace": "ml"},
        "spec": {"completionMode": "Indexed", "completions": 4, "parallelism": 4,
                 "template": template}
    });
    let mut review = admission_review("job-1", job.clone());
    review["request"]["kind"] = json!({"group": "batch", "version": "v1", "kind": "Job"});
    review["request"]["resource"] = json!({"group": "batch", "version": "v1", "resource": "jobs"});
    let answer = webhook.review(&review).await;
    let response = &answer["response"];
    assert_eq!(response["allowed"], true);
    assert!(response.get("warnings").is_none(), "{response}");
    let patch = base64::engine::general_purpose::STANDARD
        .decode(response["patch"].as_str().expect("patch"))
        .expect("base64");
    let patch: json_patch::Patch = serde_json::from_slice(&patch).expect("a JSON Patch");
    let mut job = job;
    json_patch::patch(&mut job, &patch).expect("the patch applies to the Job");
    let template = &job["spec"]["template"];
    let env = |container: usize, name: &str| {
        template["spec"]["initContainers"][container]["env"]
            .as_array()
            .expect("env")
            .iter()
            .find(|e| e["name"] == name)
            .cloned()
            .unwrap_or_else(|| panic!("no {name}"))
    };
    for container in [0, 1] {
        assert_eq!(
            env(container, "NERVE_RANK")["valueFrom"]["fieldRef"]["fieldPath"],
            "metadata.annotations['batch.kubernetes.io/job-completion-index']"
        );
        assert_eq!(env(container, "NERVE_WORLD_SIZE")["value"], "4");
        assert_eq!(
            env(container, "NERVE_JOB")["value"],
            "$(POD_NAMESPACE).llama-finetune"
        );
    }

    // A pod of that Job, as the Job controller creates it: already injected, left alone.
    let mut pod = template.clone();
    pod["apiVersion"] = json!("v1");
    pod["kind"] = json!("Pod");
    pod["metadata"]["generateName"] = json!("llama-finetune-0-");
    pod["metadata"]["labels"]["batch.kubernetes.io/job-name"] = json!("llama-finetune");
    pod["metadata"]["annotations"]["batch.kubernetes.io/job-completion-index"] = json!("0");
    let again = webhook.review(&admission_review("pod-of-job", pod)).await;
    assert_eq!(again["response"]["allowed"], true);
    assert!(again["response"].get("patch").is_none(), "{again}");
}
