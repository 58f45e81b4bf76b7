//! A simulated instance metadata service: AWS IMDS (v2 tokens and v1), GCP's `preempted` flag
//! and Azure scheduled events, on real HTTP at 127.0.0.1, with settable notices and fault modes.
//!
//! The simulator runs on its own thread with its own runtime, so it keeps answering whatever the
//! caller does (blocking waits, a current-thread test runtime, no runtime at all). Dropping it
//! stops it.

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

/// A fault the simulator applies to every request while it is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Answer normally.
    None,
    /// `500 Internal Server Error` with an empty body.
    ServerError,
    /// Read the request and never answer (until the simulator stops).
    Hang,
    /// Read the request and close the connection without answering.
    Reset,
    /// `200 OK` with a body that is no valid answer to anything.
    Garbage,
}

/// How the simulator treats IMDSv2 token PUTs and token-less (IMDSv1) GETs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenPolicy {
    /// Tokens are issued; GETs without a token are served too (IMDSv1 enabled).
    Optional,
    /// IMDSv2 only: GETs without a valid token get 401.
    Required,
    /// Token PUTs are answered with this status (403/404/405 as behind a proxy that refuses
    /// PUT, or 500); GETs without a token are served.
    Refuse(u16),
}

/// An AWS scheduled maintenance event as IMDS lists it.
#[derive(Clone, Debug)]
pub struct MaintenanceEvent {
    pub code: String,
    pub event_id: String,
    pub not_before: OffsetDateTime,
    /// `active`, `completed` or `canceled`.
    pub state: String,
}

/// The answer to every metadata request, as the simulator will give it.
struct State {
    spot: Option<(String, OffsetDateTime)>,
    rebalance: Option<OffsetDateTime>,
    maintenance: Vec<MaintenanceEvent>,
    asg_state: Option<String>,
    gcp_preempted: bool,
    azure_preempt: Option<Option<OffsetDateTime>>,
    azure_resource: String,
    azure_name_fails: bool,
    azure_name_requests: u64,
    fault: Fault,
    token_policy: TokenPolicy,
    tokens: HashMap<String, Instant>,
    token_puts: u64,
    requests: u64,
    tokenless_gets: u64,
    rejected_tokens: u64,
    next_token: u64,
}

/// The Azure VM name the simulator reports (`/metadata/instance/compute/name`).
pub const AZURE_VM_NAME: &str = "nerve-vm-0";

/// The simulated metadata service. See the module docs.
pub struct MetadataSimulator {
    state: Arc<Mutex<State>>,
    server: BackgroundServer,
}

impl MetadataSimulator {
    /// Starts the simulator on 127.0.0.1 at a free port, with nothing to report.
    pub fn start() -> Self {
        Self::start_on(SocketAddr::from(([127, 0, 0, 1], 0))).expect("binding 127.0.0.1:0")
    }

    /// Starts the simulator on `addr`.
    pub fn start_on(addr: SocketAddr) -> std::io::Result<Self> {
        let state = Arc::new(Mutex::new(State {
            spot: None,
            rebalance: None,
            maintenance: Vec::new(),
            asg_state: None,
            gcp_preempted: false,
            azure_preempt: None,
            azure_resource: AZURE_VM_NAME.to_owned(),
            azure_name_fails: false,
            azure_name_requests: 0,
            fault: Fault::None,
            token_policy: TokenPolicy::Optional,
            tokens: HashMap::new(),
            token_puts: 0,
            requests: 0,
            tokenless_gets: 0,
            rejected_tokens: 0,
            next_token: 0,
        }));
        let handler_state = state.clone();
        let server = BackgroundServer::start("imds", addr, move |request, shutdown| {
            let state = handler_state.clone();
            async move { answer(&state, request, shutdown).await }
        })?;
        Ok(Self { state, server })
    }

    /// `http://127.0.0.1:PORT`, the value for `--metadata-url`.
    pub fn url(&self) -> String {
        format!("http://{}", self.server.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.addr
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// AWS spot interruption: `instance-action` answers `{"action", "time": deadline}`.
    pub fn set_spot_interruption(&self, action: &str, deadline: OffsetDateTime) {
        self.state().spot = Some((action.to_owned(), deadline));
    }

    pub fn clear_spot_interruption(&self) {
        self.state().spot = None;
    }

    /// AWS rebalance recommendation with its `noticeTime`.
    pub fn set_rebalance_recommendation(&self, notice_time: OffsetDateTime) {
        self.state().rebalance = Some(notice_time);
    }

    pub fn clear_rebalance_recommendation(&self) {
        self.state().rebalance = None;
    }

    /// AWS scheduled maintenance events (replaces the list; empty clears it).
    pub fn set_scheduled_maintenance(&self, events: Vec<MaintenanceEvent>) {
        self.state().maintenance = events;
    }

    /// AWS Auto Scaling target lifecycle state (`InService`, `Terminated`, ...); `None` answers
    /// 404 as outside an Auto Scaling group.
    pub fn set_asg_lifecycle_state(&self, state: Option<&str>) {
        self.state().asg_state = state.map(str::to_owned);
    }

    /// GCP `instance/preempted`.
    pub fn set_gcp_preempted(&self, preempted: bool) {
        self.state().gcp_preempted = preempted;
    }

    /// Azure: a `Preempt` scheduled event for this VM with `NotBefore` (blank when `None`).
    pub fn set_azure_preempt(&self, not_before: Option<OffsetDateTime>) {
        self.state().azure_preempt = Some(not_before);
    }

    /// Azure: the Preempt event names another VM of the scale set instead of this one.
    pub fn set_azure_preempt_for_other_vm(&self, other: bool) {
        self.state().azure_resource = if other {
            "some-other-vm".to_owned()
        } else {
            AZURE_VM_NAME.to_owned()
        };
    }

    /// Azure: `/metadata/instance/compute/name` answers 500 (true) or the name (false); the
    /// scheduled events keep answering either way.
    pub fn set_azure_name_fails(&self, fails: bool) {
        self.state().azure_name_fails = fails;
    }

    /// Azure: requests for this VM's name so far.
    pub fn azure_name_requests(&self) -> u64 {
        self.state().azure_name_requests
    }

    pub fn clear_azure_preempt(&self) {
        self.state().azure_preempt = None;
    }

    /// Clears every notice of every cloud.
    pub fn clear_all(&self) {
        let mut state = self.state();
        state.spot = None;
        state.rebalance = None;
        state.maintenance.clear();
        state.asg_state = None;
        state.gcp_preempted = false;
        state.azure_preempt = None;
    }

    pub fn set_fault(&self, fault: Fault) {
        self.state().fault = fault;
    }

    pub fn set_token_policy(&self, policy: TokenPolicy) {
        self.state().token_policy = policy;
    }

    /// Forgets every issued token, as an IMDS restart does: the next request carrying one gets
    /// 401.
    pub fn expire_tokens(&self) {
        self.state().tokens.clear();
    }

    /// Token PUTs answered with a token.
    pub fn token_puts(&self) -> u64 {
        self.state().token_puts
    }

    /// Every request received, token PUTs included.
    pub fn requests(&self) -> u64 {
        self.state().requests
    }

    /// AWS GETs that carried no token (IMDSv1).
    pub fn tokenless_gets(&self) -> u64 {
        self.state().tokenless_gets
    }

    /// GETs answered 401 because their token was unknown or expired.
    pub fn rejected_tokens(&self) -> u64 {
        self.state().rejected_tokens
    }
}

type Answer = Result<Response<Full<Bytes>>, std::io::Error>;

fn respond(status: StatusCode, body: impl Into<Bytes>) -> Answer {
    Ok(Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(body.into()))
        .unwrap_or_default())
}

fn rfc3339(t: OffsetDateTime) -> String {
    t.to_offset(time::UtcOffset::UTC)
        .replace_nanosecond(0)
        .unwrap_or(t)
        .format(&Rfc3339)
        .unwrap_or_default()
}

/// `21 Jan 2019 09:00:43 GMT`, as IMDS writes maintenance times.
fn aws_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{} {} {} {:02}:{:02}:{:02} GMT",
        t.day(),
        &t.month().to_string()[..3],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

/// `Mon, 19 Sep 2016 18:29:47 GMT`, as Azure writes NotBefore.
fn azure_time(t: OffsetDateTime) -> String {
    let t = t.to_offset(time::UtcOffset::UTC);
    format!(
        "{}, {:02} {} {} {:02}:{:02}:{:02} GMT",
        &t.weekday().to_string()[..3],
        t.day(),
        &t.month().to_string()[..3],
        t.year(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

async fn answer(
    state: &Mutex<State>,
    request: Request<Incoming>,
    shutdown: CancellationToken,
) -> Answer {
    let fault = {
        let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
        state.requests += 1;
        state.fault
    };
    match fault {
        Fault::None => {}
        Fault::ServerError => return respond(StatusCode::INTERNAL_SERVER_ERROR, ""),
        Fault::Hang => {
            shutdown.cancelled().await;
            return Err(std::io::Error::other("simulator stopped"));
        }
        Fault::Reset => return Err(std::io::Error::other("simulated connection reset")),
        Fault::Garbage => return respond(StatusCode::OK, &b"\x00\xff<html>garbage{{"[..]),
    }
    let mut state = state.lock().unwrap_or_else(|p| p.into_inner());
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or("").to_owned();
    let header = |name: &str| {
        request
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };

    if path.starts_with("/latest/") {
        if path == "/latest/api/token" {
            if request.method() != Method::PUT {
                return respond(StatusCode::METHOD_NOT_ALLOWED, "");
            }
            if let TokenPolicy::Refuse(status) = state.token_policy {
                let status =
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                return respond(status, "");
            }
            let ttl = header("x-aws-ec2-metadata-token-ttl-seconds")
                .and_then(|v| v.parse::<u64>().ok())
                .filter(|ttl| (1..=21_600).contains(ttl));
            let Some(ttl) = ttl else {
                return respond(StatusCode::BAD_REQUEST, "");
            };
            state.next_token += 1;
            state.token_puts += 1;
            let token = format!("AQAEA-simulated-token-{}==", state.next_token);
            state
                .tokens
                .insert(token.clone(), Instant::now() + Duration::from_secs(ttl));
            return respond(StatusCode::OK, token);
        }
        if request.method() != Method::GET {
            return respond(StatusCode::METHOD_NOT_ALLOWED, "");
        }
        match header("x-aws-ec2-metadata-token") {
            Some(token) => {
                let valid = state
                    .tokens
                    .get(&token)
                    .is_some_and(|expiry| Instant::now() < *expiry);
                if !valid {
                    state.rejected_tokens += 1;
                    return respond(StatusCode::UNAUTHORIZED, "");
                }
            }
            None => {
                state.tokenless_gets += 1;
                if state.token_policy == TokenPolicy::Required {
                    return respond(StatusCode::UNAUTHORIZED, "");
                }
            }
        }
        return match path.as_str() {
            "/latest/meta-data/spot/instance-action" => match &state.spot {
                Some((action, time)) => respond(
                    StatusCode::OK,
                    format!(r#"{{"action":"{action}","time":"{}"}}"#, rfc3339(*time)),
                ),
                None => respond(StatusCode::NOT_FOUND, "Not Found"),
            },
            "/latest/meta-data/events/recommendations/rebalance" => match state.rebalance {
                Some(time) => respond(
                    StatusCode::OK,
                    format!(r#"{{"noticeTime":"{}"}}"#, rfc3339(time)),
                ),
                None => respond(StatusCode::NOT_FOUND, "Not Found"),
            },
            "/latest/meta-data/events/maintenance/scheduled" => {
                let events: Vec<serde_json::Value> = state
                    .maintenance
                    .iter()
                    .map(|e| {
                        serde_json::json!({
                            "Code": e.code,
                            "Description": "simulated maintenance",
                            "EventId": e.event_id,
                            "NotBefore": aws_time(e.not_before),
                            "NotAfter": aws_time(e.not_before + Duration::from_secs(3600)),
                            "State": e.state,
                        })
                    })
                    .collect();
                respond(StatusCode::OK, serde_json::Value::from(events).to_string())
            }
            "/latest/meta-data/autoscaling/target-lifecycle-state" => match &state.asg_state {
                Some(lifecycle) => respond(StatusCode::OK, lifecycle.clone()),
                None => respond(StatusCode::NOT_FOUND, "Not Found"),
            },
            _ => respond(StatusCode::NOT_FOUND, "Not Found"),
        };
    }

    if path.starts_with("/computeMetadata/") {
        if header("metadata-flavor").as_deref() != Some("Google") {
            return respond(StatusCode::FORBIDDEN, "Missing Metadata-Flavor: Google");
        }
        return match path.as_str() {
            "/computeMetadata/v1/instance/preempted" => respond(
                StatusCode::OK,
                if state.gcp_preempted { "TRUE" } else { "FALSE" },
            ),
            _ => respond(StatusCode::NOT_FOUND, ""),
        };
    }

    if path.starts_with("/metadata/") {
        if header("metadata").as_deref() != Some("true") {
            return respond(StatusCode::BAD_REQUEST, r#"{"error":"Bad request"}"#);
        }
        if !query.contains("api-version=") {
            return respond(StatusCode::BAD_REQUEST, r#"{"error":"Bad request"}"#);
        }
        return match path.as_str() {
            "/metadata/instance/compute/name" => {
                state.azure_name_requests += 1;
                if state.azure_name_fails {
                    respond(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        r#"{"error":"Internal error"}"#,
                    )
                } else {
                    respond(StatusCode::OK, AZURE_VM_NAME)
                }
            }
            "/metadata/scheduledevents" => {
                let events: Vec<serde_json::Value> = state
                    .azure_preempt
                    .iter()
                    .map(|not_before| {
                        serde_json::json!({
                            "EventId": "A123BC45-1234-5678-AB90-ABCDEF123456",
                            "EventStatus": "Scheduled",
                            "EventType": "Preempt",
                            "ResourceType": "VirtualMachine",
                            "Resources": [state.azure_resource],
                            "NotBefore": not_before.map(azure_time).unwrap_or_default(),
                            "Description": "simulated eviction",
                            "EventSource": "Platform",
                            "DurationInSeconds": -1,
                        })
                    })
                    .collect();
                respond(
                    StatusCode::OK,
                    serde_json::json!({"DocumentIncarnation": 1, "Events": events}).to_string(),
                )
            }
            _ => respond(StatusCode::NOT_FOUND, ""),
        };
    }

    respond(StatusCode::NOT_FOUND, "")
}

/// An HTTP/1 server on its own thread and runtime; stops when dropped. Shared by the stand-ins
/// of this crate.
pub(crate) struct BackgroundServer {
    pub addr: SocketAddr,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl BackgroundServer {
    pub fn start<H, F>(name: &str, addr: SocketAddr, handler: H) -> std::io::Result<Self>
    where
        H: Fn(Request<Incoming>, CancellationToken) -> F + Send + Sync + 'static,
        F: Future<Output = Answer> + Send + 'static,
    {
        let listener = std::net::TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shutdown = CancellationToken::new();
        let stop = shutdown.clone();
        let handler = Arc::new(handler);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let thread = std::thread::Builder::new()
            .name(format!("{name}-{}", addr.port()))
            .spawn(move || {
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    loop {
                        let stream = tokio::select! {
                            _ = stop.cancelled() => break,
                            accepted = listener.accept() => match accepted {
                                Ok((stream, _)) => stream,
                                Err(_) => continue,
                            },
                        };
                        let handler = handler.clone();
                        let stop = stop.clone();
                        tokio::spawn(async move {
                            let service = service_fn(move |request| {
                                let stop = stop.clone();
                                handler(request, stop)
                            });
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                });
                // Dropping the runtime here ends every connection task.
            })?;
        Ok(Self {
            addr,
            shutdown,
            thread: Some(thread),
        })
    }
}

impl Drop for BackgroundServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
