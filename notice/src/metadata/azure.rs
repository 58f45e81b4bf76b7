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

/// Scheduled events are shared by every VM of an availability set or scale set: keep only the
/// ones naming this VM, whose name is read once.
#[derive(Default)]
pub(crate) struct ScheduledEvents {
    vm_name: Option<String>,
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

impl ScheduledEvents {
    pub async fn poll(&mut self, transport: &Transport) -> EndpointResult {
        EndpointResult {
            kinds: &[NoticeKind::Preemption],
            result: self.read(transport).await,
        }
    }

    async fn read(&mut self, transport: &Transport) -> Result<Vec<Observation>, PollError> {
        let headers = [("Metadata", "true")];
        if self.vm_name.is_none() {
            let answer = transport.send(Method::GET, NAME_PATH, &headers).await?;
            if answer.status != StatusCode::OK {
                return Err(PollError::Status {
                    what: format!("GET {NAME_PATH}"),
                    status: answer.status.as_u16(),
                });
            }
            self.vm_name = Some(answer.text().trim().to_owned());
        }
        let answer = transport.send(Method::GET, EVENTS_PATH, &headers).await?;
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
        let vm_name = self.vm_name.as_deref().unwrap_or_default();
        let mut observations = Vec::new();
        for event in document.events {
            if event.event_type != "Preempt" {
                continue;
            }
            if !event.resources.is_empty() && !event.resources.iter().any(|r| r == vm_name) {
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
}
