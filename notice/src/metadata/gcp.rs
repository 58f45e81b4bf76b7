//! GCP: `instance/preempted` turns `TRUE` when the instance is being preempted.

use std::time::Duration;

use http::{Method, StatusCode};

use super::transport::Transport;
use super::{Deadline, EndpointResult, Observation, PollError};
use crate::notice::NoticeKind;

const PREEMPTED_PATH: &str = "/computeMetadata/v1/instance/preempted";

/// GCP stops a preempted instance 30 s after it signals preemption.
const PREEMPTION_NOTICE: Duration = Duration::from_secs(30);

pub(crate) async fn poll(transport: &Transport) -> EndpointResult {
    let result = async {
        let answer = transport
            .send(
                Method::GET,
                PREEMPTED_PATH,
                &[("Metadata-Flavor", "Google")],
            )
            .await?;
        if answer.status != StatusCode::OK {
            return Err(PollError::Status {
                what: format!("GET {PREEMPTED_PATH}"),
                status: answer.status.as_u16(),
            });
        }
        match answer.text().trim() {
            "TRUE" => Ok(vec![Observation {
                kind: NoticeKind::Preemption,
                key: "preempted".to_owned(),
                action: "terminate".to_owned(),
                deadline: Deadline::AfterDetection(PREEMPTION_NOTICE),
            }]),
            "FALSE" => Ok(Vec::new()),
            _ => Err(PollError::Unparseable {
                what: format!("GET {PREEMPTED_PATH}"),
                detail: "expected TRUE or FALSE".to_owned(),
            }),
        }
    }
    .await;
    EndpointResult {
        kinds: &[NoticeKind::Preemption],
        result,
    }
}
