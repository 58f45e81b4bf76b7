//! A Kubernetes API-server stand-in over real HTTP at 127.0.0.1: one Node (or several, one per
//! simulated machine), pods, events and evictions. It records the method, path, content type and body of every request, enforces
//! resourceVersion preconditions the way the real one does (409 Conflict), and can answer 409,
//! 429 or 500 (or drop connections) on demand.
//!
//! It is stricter than the real one in one way: a node PATCH without
//! `metadata.resourceVersion` is refused (422), where the real API server applies it
//! unconditionally. Every write the agent makes to the node must be conditional, or it can
//! overwrite a change made since it read the node (a lost update); the tests hold it to that.
//!
//! Runs on its own thread like [`crate::imds::MetadataSimulator`]; dropping it stops it. Reach it
//! from a process with the kubeconfig [`ApiServer::write_kubeconfig`] writes.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use serde_json::{Value, json};
use tokio::sync::Notify;

use crate::imds::BackgroundServer;

/// One request as the stand-in received it.
#[derive(Clone, Debug)]
pub struct RecordedRequest {
    pub method: String,
    /// Path and query, e.g. `/api/v1/nodes/n1?fieldManager=nerve-agent`.
    pub path: String,
    pub content_type: Option<String>,
    pub body: String,
    /// When the request (headers and body) had arrived.
    pub at: std::time::Instant,
}

impl RecordedRequest {
    /// The body as JSON (`Value::Null` when it is not JSON).
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body).unwrap_or(Value::Null)
    }

    /// Whether the request changes anything (everything but GET).
    pub fn is_write(&self) -> bool {
        self.method != "GET"
    }
}

/// A canned failure for requests matching a method and a path fragment.
struct Fault {
    method: Option<String>,
    path_contains: String,
    status: u16,
    retry_after: Option<u64>,
    remaining: usize,
}

type NodeChange = Box<dyn FnOnce(&mut Value) + Send>;

struct State {
    /// The Nodes, in the order given; the first is the one the single-node helpers read.
    nodes: Vec<Value>,
    /// The cluster's revision, as etcd keeps it: every write takes the next one, and a Node's
    /// `metadata.resourceVersion` is the revision of its last write.
    resource_version: u64,
    pods: Vec<Value>,
    events: Vec<Value>,
    evicted: Vec<String>,
    requests: Vec<RecordedRequest>,
    faults: Vec<Fault>,
    before_next_write: Option<NodeChange>,
    unavailable: bool,
}

/// The API-server stand-in. See the module docs.
pub struct ApiServer {
    state: Arc<Mutex<State>>,
    changed: Arc<Notify>,
    server: BackgroundServer,
}

impl ApiServer {
    /// Starts the stand-in on 127.0.0.1 at a free port with one schedulable, untainted Node.
    pub fn start(node_name: &str) -> Self {
        Self::start_with_nodes(&[node_name])
    }

    /// Starts the stand-in with one schedulable, untainted Node per name (one per simulated
    /// machine, each cordoned by its own agent).
    pub fn start_with_nodes(node_names: &[&str]) -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), node_names)
            .expect("binding 127.0.0.1:0")
    }

    pub fn start_on(addr: SocketAddr, node_names: &[&str]) -> std::io::Result<Self> {
        let nodes = node_names
            .iter()
            .enumerate()
            .map(|(index, name)| {
                json!({
                    "apiVersion": "v1",
                    "kind": "Node",
                    "metadata": {
                        "name": name,
                        "uid": format!("6a1f3c2e-0000-4000-8000-{:012}", index + 1),
                        "resourceVersion": "1",
                        "labels": {"kubernetes.io/hostname": name},
                    },
                    "spec": {},
                    "status": {},
                })
            })
            .collect();
        let state = Arc::new(Mutex::new(State {
            nodes,
            resource_version: 1,
            pods: Vec::new(),
            events: Vec::new(),
            evicted: Vec::new(),
            requests: Vec::new(),
            faults: Vec::new(),
            before_next_write: None,
            unavailable: false,
        }));
        let changed = Arc::new(Notify::new());
        let (handler_state, handler_changed) = (state.clone(), changed.clone());
        let server = BackgroundServer::start("apiserver", addr, move |request, _| {
            let state = handler_state.clone();
            let changed = handler_changed.clone();
            async move {
                let answer = handle(&state, request).await;
                changed.notify_waiters();
                answer
            }
        })?;
        Ok(Self {
            state,
            changed,
            server,
        })
    }

    /// `http://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    /// Writes a kubeconfig pointing at the stand-in into `dir` and returns its path (for
    /// `KUBECONFIG` on a child process).
    pub fn write_kubeconfig(&self, dir: &Path) -> PathBuf {
        let path = dir.join("kubeconfig");
        let text = format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: stand-in\n  cluster:\n    server: {}\n\
             contexts:\n- name: stand-in\n  context:\n    cluster: stand-in\n    user: stand-in\n\
             current-context: stand-in\nusers:\n- name: stand-in\n  user:\n    token: stand-in-token\n",
            self.url()
        );
        std::fs::write(&path, text).expect("writing the kubeconfig");
        path
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The (first) Node object as it is now.
    pub fn node(&self) -> Value {
        self.state().nodes.first().cloned().unwrap_or(Value::Null)
    }

    /// The Node called `name` as it is now, when the stand-in serves one.
    pub fn node_named(&self, name: &str) -> Option<Value> {
        let state = self.state();
        state.nodes.iter().find(|n| node_name(n) == name).cloned()
    }

    pub fn unschedulable(&self) -> bool {
        self.node()["spec"]["unschedulable"]
            .as_bool()
            .unwrap_or(false)
    }

    pub fn taints(&self) -> Vec<Value> {
        self.node()["spec"]["taints"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    pub fn annotations(&self) -> serde_json::Map<String, Value> {
        self.node()["metadata"]["annotations"]
            .as_object()
            .cloned()
            .unwrap_or_default()
    }

    /// The cluster's latest resourceVersion (with one Node, that Node's).
    pub fn resource_version(&self) -> u64 {
        self.state().resource_version
    }

    /// Someone else changes the (first) node now (the resourceVersion moves on).
    pub fn update_node(&self, change: impl FnOnce(&mut Value)) {
        let mut state = self.state();
        if let Some(node) = state.nodes.first_mut() {
            change(node);
        }
        bump(&mut state, 0);
        drop(state);
        self.changed.notify_waiters();
    }

    /// Someone else changes the node right before the next write to it arrives, so that write
    /// carries a stale resourceVersion and gets 409.
    pub fn change_node_before_next_write(&self, change: impl FnOnce(&mut Value) + Send + 'static) {
        self.state().before_next_write = Some(Box::new(change));
    }

    /// Answers the next `times` requests whose method is `method` (any when `None`) and whose
    /// path contains `path_contains` with `status`.
    pub fn fail_next(&self, method: Option<&str>, path_contains: &str, status: u16, times: usize) {
        self.state().faults.push(Fault {
            method: method.map(str::to_owned),
            path_contains: path_contains.to_owned(),
            status,
            retry_after: None,
            remaining: times,
        });
    }

    /// A PodDisruptionBudget refuses the eviction of `pod` `times` times with 429 and
    /// `Retry-After: retry_after_secs`.
    pub fn refuse_eviction(&self, pod: &str, times: usize, retry_after_secs: u64) {
        self.state().faults.push(Fault {
            method: Some("POST".to_owned()),
            path_contains: format!("/pods/{pod}/eviction"),
            status: 429,
            retry_after: Some(retry_after_secs),
            remaining: times,
        });
    }

    /// Failures set by [`Self::fail_next`] and [`Self::refuse_eviction`] still to be answered.
    pub fn pending_failures(&self) -> usize {
        self.state()
            .faults
            .iter()
            .fold(0, |sum, f| sum.saturating_add(f.remaining))
    }

    /// Forgets every failure still pending: the API server recovers.
    pub fn clear_failures(&self) {
        self.state().faults.clear();
    }

    /// While set, every connection is closed without an answer (an API server that is down).
    pub fn set_unavailable(&self, unavailable: bool) {
        self.state().unavailable = unavailable;
    }

    /// Adds a pod (a full Pod object; `spec.nodeName` decides which node it is on).
    pub fn add_pod(&self, pod: Value) {
        self.state().pods.push(pod);
    }

    /// A plain pod on the (first) node, in `namespace`, with one container named `container`.
    pub fn pod_on_node(&self, namespace: &str, name: &str, container: &str) -> Value {
        let node = node_name(&self.node()).to_owned();
        json!({
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace, "uid": format!("uid-{name}")},
            "spec": {"nodeName": node, "containers": [{"name": container, "image": "busybox"}]},
            "status": {"phase": "Running"},
        })
    }

    /// `namespace/name` of every pod evicted so far, in order.
    pub fn evicted(&self) -> Vec<String> {
        self.state().evicted.clone()
    }

    /// Events created so far.
    pub fn events(&self) -> Vec<Value> {
        self.state().events.clone()
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<RecordedRequest> {
        self.state().requests.clone()
    }

    /// Every request that was not a GET.
    pub fn writes(&self) -> Vec<RecordedRequest> {
        self.requests()
            .into_iter()
            .filter(|r| r.is_write())
            .collect()
    }

    /// Waits until `condition` holds (checked after every request and change), at most
    /// `timeout`. Returns whether it held.
    pub async fn wait_until(
        &self,
        timeout: Duration,
        condition: impl Fn(&ApiServer) -> bool,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let notified = self.changed.notified();
            if condition(self) {
                return true;
            }
            // Re-check at least every 50 ms even without a notification.
            let wake = (tokio::time::Instant::now() + Duration::from_millis(50)).min(deadline);
            tokio::select! {
                _ = notified => {}
                _ = tokio::time::sleep_until(wake) => {}
            }
            if tokio::time::Instant::now() >= deadline {
                return condition(self);
            }
        }
    }
}

/// A write to the node at `index`: it takes the cluster's next revision.
fn bump(state: &mut State, index: usize) {
    state.resource_version += 1;
    let version = Value::String(state.resource_version.to_string());
    if let Some(node) = state.nodes.get_mut(index) {
        node["metadata"]["resourceVersion"] = version;
    }
}

fn node_name(node: &Value) -> &str {
    node["metadata"]["name"].as_str().unwrap_or_default()
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

fn reply(status: StatusCode, body: Value) -> Answer {
    let mut response = Response::new(Full::new(Bytes::from(body.to_string())));
    *response.status_mut() = status;
    response.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

fn status(code: u16, reason: &str, message: &str) -> Answer {
    reply(
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        json!({
            "kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": if code < 400 { "Success" } else { "Failure" },
            "message": message, "reason": reason, "code": code,
        }),
    )
}

/// RFC 7386 JSON merge patch.
fn merge_patch(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = json!({});
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge_patch(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

fn node_index(state: &State, name: &str) -> Option<usize> {
    state.nodes.iter().position(|n| node_name(n) == name)
}

/// A PATCH or PUT of the node at `index`, conditional on its resourceVersion.
fn write_node(
    state: &mut State,
    index: usize,
    method: &Method,
    content_type: Option<&str>,
    body: &str,
) -> Answer {
    if let Some(change) = state.before_next_write.take() {
        change(&mut state.nodes[index]);
        bump(state, index);
    }
    let Ok(body) = serde_json::from_str::<Value>(body) else {
        return status(400, "BadRequest", "the body is not JSON");
    };
    let Some(sent_version) = body["metadata"]["resourceVersion"].as_str() else {
        return status(
            422,
            "Invalid",
            "metadata.resourceVersion must be specified for an update (the stand-in \
             requires it on PATCH too: node writes must be conditional)",
        );
    };
    if state.nodes[index]["metadata"]["resourceVersion"].as_str() != Some(sent_version) {
        return status(
            409,
            "Conflict",
            "Operation cannot be fulfilled on nodes: the object has been modified; please apply your changes to the latest version and try again",
        );
    }
    if *method == Method::PATCH {
        match content_type {
            Some("application/merge-patch+json" | "application/strategic-merge-patch+json") => {
                merge_patch(&mut state.nodes[index], &body);
            }
            _ => {
                return status(
                    415,
                    "UnsupportedMediaType",
                    "the stand-in supports merge patches only",
                );
            }
        }
    } else {
        state.nodes[index] = body;
    }
    bump(state, index);
    reply(StatusCode::OK, state.nodes[index].clone())
}

async fn handle(state: &Mutex<State>, request: Request<Incoming>) -> Answer {
    let method = request.method().clone();
    let path = request
        .uri()
        .path_and_query()
        .map(|p| p.to_string())
        .unwrap_or_default();
    let content_type = request
        .headers()
        .get(http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    let body = request
        .into_body()
        .collect()
        .await
        .map_err(std::io::Error::other)?
        .to_bytes();
    let body = String::from_utf8_lossy(&body).into_owned();
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let mut state = lock();
    state.requests.push(RecordedRequest {
        method: method.to_string(),
        path: path.clone(),
        content_type: content_type.clone(),
        body: body.clone(),
        at: std::time::Instant::now(),
    });
    if state.unavailable {
        return Err(std::io::Error::other("API server stand-in is unavailable"));
    }
    if let Some(fault) = state.faults.iter_mut().find(|f| {
        f.remaining > 0
            && f.method.as_deref().is_none_or(|m| m == method.as_str())
            && path.contains(&f.path_contains)
    }) {
        fault.remaining -= 1;
        let (code, retry_after) = (fault.status, fault.retry_after);
        state.faults.retain(|f| f.remaining > 0);
        let reason = match code {
            409 => "Conflict",
            429 => "TooManyRequests",
            _ => "InternalError",
        };
        let mut answer = status(code, reason, "injected by the stand-in")?;
        if let Some(secs) = retry_after {
            answer
                .headers_mut()
                .insert(http::header::RETRY_AFTER, http::HeaderValue::from(secs));
        }
        return Ok(answer);
    }

    let (path_only, query) = path.split_once('?').unwrap_or((&path, ""));
    let segments: Vec<&str> = path_only.trim_matches('/').split('/').collect();
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "nodes", name]) => match node_index(&state, name) {
            Some(index) => reply(StatusCode::OK, state.nodes[index].clone()),
            None => status(404, "NotFound", "the stand-in serves no such node"),
        },
        ("PATCH" | "PUT", ["api", "v1", "nodes", name]) => match node_index(&state, name) {
            Some(index) => write_node(&mut state, index, &method, content_type.as_deref(), &body),
            None => status(404, "NotFound", "the stand-in serves no such node"),
        },
        ("POST", ["api", "v1", "namespaces", namespace, "events"]) => {
            let Ok(mut event) = serde_json::from_str::<Value>(&body) else {
                return status(400, "BadRequest", "the body is not JSON");
            };
            let name = format!(
                "{}{}",
                event["metadata"]["generateName"]
                    .as_str()
                    .unwrap_or("event-"),
                state.events.len() + 1
            );
            event["metadata"]["name"] = Value::String(name);
            event["metadata"]["namespace"] = Value::String((*namespace).to_owned());
            state.events.push(event.clone());
            reply(StatusCode::CREATED, event)
        }
        ("GET", ["api", "v1", "pods"]) | ("GET", ["api", "v1", "namespaces", _, "pods"]) => {
            let selector = query
                .split('&')
                .find_map(|pair| pair.strip_prefix("fieldSelector="))
                .map(|v| v.replace("%3D", "=").replace("%3d", "="));
            let wanted_node = selector
                .as_deref()
                .and_then(|s| s.strip_prefix("spec.nodeName="))
                .map(str::to_owned);
            let namespace = match segments.as_slice() {
                ["api", "v1", "namespaces", ns, "pods"] => Some((*ns).to_owned()),
                _ => None,
            };
            let items: Vec<Value> = state
                .pods
                .iter()
                .filter(|p| {
                    wanted_node
                        .as_deref()
                        .is_none_or(|n| p["spec"]["nodeName"].as_str() == Some(n))
                        && namespace
                            .as_deref()
                            .is_none_or(|ns| p["metadata"]["namespace"].as_str() == Some(ns))
                })
                .cloned()
                .collect();
            reply(
                StatusCode::OK,
                json!({"apiVersion": "v1", "kind": "PodList", "metadata": {"resourceVersion": "1"}, "items": items}),
            )
        }
        (
            "POST",
            [
                "api",
                "v1",
                "namespaces",
                namespace,
                "pods",
                name,
                "eviction",
            ],
        ) => {
            let found = state.pods.iter().position(|p| {
                p["metadata"]["name"].as_str() == Some(name)
                    && p["metadata"]["namespace"].as_str() == Some(namespace)
            });
            match found {
                Some(index) => {
                    state.pods.remove(index);
                    state.evicted.push(format!("{namespace}/{name}"));
                    status(201, "", "evicted")
                }
                None => status(404, "NotFound", "pod not found"),
            }
        }
        _ => status(404, "NotFound", "the stand-in does not serve this path"),
    }
}
