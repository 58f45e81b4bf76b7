//! Azure: scheduled events with `EventType: Preempt` for this VM.

use std::time::Duration;

use http::{Method, StatusCode};
use serde::Deserialize;

use super::transport::Transport;
use super::{Deadline, EndpointResult, Observation, PollError, parse_time};
use crate::notice::NoticeKind;

const EVENTS_PATH: &str = "/metadata/scheduledevents?api-version=2020-07-01";
const NAME_PATH: &str = "/metadata/instance/compute/name?api-version=2021-02-01&format=text";

/// Azure gives a Spot VM at least 30 s between the Preempt event and eviction; used when the
/// event carries no NotBefore (it is blank once the event has started).
const PREEMPTION_NOTICE: Duration = Duration::from_secs(30);

/// Scheduled events are shared by every VM of an availability set or scale set: an event that
/// names VMs counts only when it names this one. The name is read when an event first needs it
/// and kept; while it cannot be read, every Preempt event counts as this VM's (an early
/// checkpoint and a cordon undone when the event goes beat a missed eviction).
#[derive(Default)]
pub(crate) struct ScheduledEvents {
    vm_name: Option<String>,
    /// The name lookup failed and that was logged; logged again only once it answers.
    name_failure_logged: bool,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Document {
    #[serde(default)]
    events: Vec<Event>,
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct Event {
    event_id: String,
    event_type: String,
    #[serde(default)]
    resources: Vec<String>,
    #[serde(default)]
    not_before: String,
}

const HEADERS: [(&str, &str); 1] = [("Metadata", "true")];

impl ScheduledEvents {
    pub async fn poll(&mut self, transport: &Transport) -> EndpointResult {
        EndpointResult {
            kinds: &[NoticeKind::Preemption],
            result: self.read(transport).await,
        }
    }

    async fn read(&mut self, transport: &Transport) -> Result<Vec<Observation>, PollError> {
        let answer = transport.send(Method::GET, EVENTS_PATH, &HEADERS).await?;
        if answer.status != StatusCode::OK {
            return Err(PollError::Status {
                what: format!("GET {EVENTS_PATH}"),
                status: answer.status.as_u16(),
            });
        }
        let unparseable = |detail: String| PollError::Unparseable {
            what: format!("GET {EVENTS_PATH}"),
            detail,
        };
        let document: Document =
            serde_json::from_str(answer.text()).map_err(|err| unparseable(err.to_string()))?;
        let preemptions: Vec<Event> = document
            .events
            .into_iter()
            .filter(|event| event.event_type == "Preempt")
            .collect();
        if self.vm_name.is_none() && preemptions.iter().any(|e| !e.resources.is_empty()) {
            self.learn_vm_name(transport).await;
        }
        let mut observations = Vec::new();
        for event in preemptions {
            let ours = match &self.vm_name {
                _ if event.resources.is_empty() => true,
                Some(name) => event.resources.iter().any(|r| r == name),
                None => true,
            };
            if !ours {
                continue;
            }
            let deadline = if event.not_before.trim().is_empty() {
                Deadline::AfterDetection(PREEMPTION_NOTICE)
            } else {
                Deadline::At(parse_time(&event.not_before).ok_or_else(|| {
                    unparseable(format!("NotBefore {:?} is not a time", event.not_before))
                })?)
            };
            observations.push(Observation {
                kind: NoticeKind::Preemption,
                key: event.event_id,
                action: "terminate".to_owned(),
                deadline,
            });
        }
        Ok(observations)
    }

    /// Reads this VM's name; a failure is logged (once per streak) and never fails the poll.
    async fn learn_vm_name(&mut self, transport: &Transport) {
        let failure = match transport.send(Method::GET, NAME_PATH, &HEADERS).await {
            Ok(answer) if answer.status != StatusCode::OK => PollError::Status {
                what: format!("GET {NAME_PATH}"),
                status: answer.status.as_u16(),
            },
            Ok(answer) if answer.text().trim().is_empty() => PollError::Unparseable {
                what: format!("GET {NAME_PATH}"),
                detail: "the name is empty".to_owned(),
            },
            Ok(answer) => {
                let name = answer.text().trim().to_owned();
                if self.name_failure_logged {
                    tracing::info!(
                        vm = %name,
                        "read this VM's name; Preempt events for other VMs are ignored again"
                    );
                }
                self.vm_name = Some(name);
                self.name_failure_logged = false;
                return;
            }
            Err(err) => err,
        };
        if !self.name_failure_logged {
            self.name_failure_logged = true;
            tracing::warn!(
                error = %crate::error_chain(&failure),
                "cannot read this VM's name; every Preempt event counts as this VM's until it answers"
            );
        }
    }
}
