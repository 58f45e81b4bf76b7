//! AWS EC2 instance metadata (IMDSv2, with IMDSv1 fallback only where tokens are refused).

use std::time::{Duration, Instant};

use http::{Method, StatusCode};
use serde::Deserialize;

use super::transport::{Answer, Transport};
use super::{Deadline, EndpointResult, Observation, PollError, parse_time};
use crate::notice::NoticeKind;

const TOKEN_PATH: &str = "/latest/api/token";
const TOKEN_TTL_HEADER: &str = "X-aws-ec2-metadata-token-ttl-seconds";
const TOKEN_HEADER: &str = "X-aws-ec2-metadata-token";

/// Six hours, the longest IMDS allows: one token PUT per six hours of polling.
const TOKEN_TTL: Duration = Duration::from_secs(21_600);

/// Fetch a new token this long before the old one expires, so no request ever carries a token
/// that expires in flight.
const TOKEN_REFRESH_MARGIN: Duration = Duration::from_secs(60);

const SPOT_PATH: &str = "/latest/meta-data/spot/instance-action";
const REBALANCE_PATH: &str = "/latest/meta-data/events/recommendations/rebalance";
const MAINTENANCE_PATH: &str = "/latest/meta-data/events/maintenance/scheduled";
const ASG_PATH: &str = "/latest/meta-data/autoscaling/target-lifecycle-state";

/// A rebalance recommendation names no deadline. The soonest the instance can be reclaimed is
/// two minutes after the recommendation (a spot interruption always gives two minutes).
const REBALANCE_HORIZON: Duration = Duration::from_secs(120);

/// The ASG names no deadline either; without a lifecycle hook termination starts at once, so
/// assume the same two minutes a spot interruption gives (hooks only make it longer).
const ASG_TERMINATION_HORIZON: Duration = Duration::from_secs(120);

struct Token {
    value: String,
    refresh_at: Instant,
}

/// IMDS session state: the cached token, or the IMDSv1 fallback.
#[derive(Default)]
pub(crate) struct Imds {
    token: Option<Token>,
    /// Token PUTs were refused (403/404/405): use IMDSv1 until then, and try a PUT again after.
    v1_until: Option<Instant>,
    v1_logged: bool,
}

impl Imds {
    /// Reads every AWS endpoint (concurrently) once.
    pub async fn poll(&mut self, transport: &Transport) -> Vec<EndpointResult> {
        const ALL: &[NoticeKind] = &[
            NoticeKind::SpotInterruption,
            NoticeKind::RebalanceRecommendation,
            NoticeKind::ScheduledMaintenance,
            NoticeKind::AsgTermination,
        ];
        let token = match self.token(transport).await {
            Ok(token) => token,
            Err(err) => {
                return vec![EndpointResult {
                    kinds: ALL,
                    result: Err(err),
                }];
            }
        };
        let paths = [SPOT_PATH, REBALANCE_PATH, MAINTENANCE_PATH, ASG_PATH];
        let (a, b, c, d) = tokio::join!(
            get(transport, paths[0], token.as_deref()),
            get(transport, paths[1], token.as_deref()),
            get(transport, paths[2], token.as_deref()),
            get(transport, paths[3], token.as_deref()),
        );
        let mut answers = [a, b, c, d];

        // A 401 means the token is no longer valid (IMDS restarted, clock jump): drop it, get a
        // new one, and ask again the endpoints that refused it.
        let refused = |a: &Result<Answer, PollError>| matches!(a, Ok(answer) if answer.status == StatusCode::UNAUTHORIZED);
        if answers.iter().any(refused) {
            self.token = None;
            self.v1_until = None;
            match self.token(transport).await {
                Ok(token) => {
                    for (answer, path) in answers.iter_mut().zip(paths) {
                        if refused(answer) {
                            *answer = get(transport, path, token.as_deref()).await;
                        }
                    }
                }
                Err(err) => {
                    return vec![EndpointResult {
                        kinds: ALL,
                        result: Err(err),
                    }];
                }
            }
        }

        let [spot, rebalance, maintenance, asg] = answers;
        vec![
            EndpointResult {
                kinds: &[NoticeKind::SpotInterruption],
                result: spot.and_then(|a| parse_spot(SPOT_PATH, &a)),
            },
            EndpointResult {
                kinds: &[NoticeKind::RebalanceRecommendation],
                result: rebalance.and_then(|a| parse_rebalance(REBALANCE_PATH, &a)),
            },
            EndpointResult {
                kinds: &[NoticeKind::ScheduledMaintenance],
                result: maintenance.and_then(|a| parse_maintenance(MAINTENANCE_PATH, &a)),
            },
            EndpointResult {
                kinds: &[NoticeKind::AsgTermination],
                result: asg.and_then(|a| parse_asg(ASG_PATH, &a)),
            },
        ]
    }

    /// The token to send, fetching one only when none is cached or it is about to expire;
    /// `None` means IMDSv1.
    async fn token(&mut self, transport: &Transport) -> Result<Option<String>, PollError> {
        let now = Instant::now();
        if let Some(token) = &self.token
            && now < token.refresh_at
        {
            return Ok(Some(token.value.clone()));
        }
        if let Some(until) = self.v1_until
            && now < until
        {
            return Ok(None);
        }
        let ttl = TOKEN_TTL.as_secs().to_string();
        let answer = transport
            .send(Method::PUT, TOKEN_PATH, &[(TOKEN_TTL_HEADER, &ttl)])
            .await?;
        match answer.status {
            StatusCode::OK => {
                let value = answer.text().trim().to_owned();
                if value.is_empty() || http::HeaderValue::from_str(&value).is_err() {
                    return Err(PollError::Unparseable {
                        what: format!("PUT {TOKEN_PATH}"),
                        detail: "the token is empty or not a valid header value".to_owned(),
                    });
                }
                self.token = Some(Token {
                    value: value.clone(),
                    refresh_at: now + TOKEN_TTL - TOKEN_REFRESH_MARGIN,
                });
                self.v1_until = None;
                Ok(Some(value))
            }
            // Only an explicit refusal of tokens allows IMDSv1; anything else (5xx, timeouts) is
            // a failure, never a silent downgrade.
            StatusCode::FORBIDDEN | StatusCode::NOT_FOUND | StatusCode::METHOD_NOT_ALLOWED => {
                if !self.v1_logged {
                    tracing::warn!(
                        status = answer.status.as_u16(),
                        "the metadata service refuses IMDSv2 tokens; falling back to IMDSv1 \
                         (logged once)"
                    );
                    self.v1_logged = true;
                }
                self.token = None;
                self.v1_until = Some(now + TOKEN_TTL);
                Ok(None)
            }
            status => Err(PollError::Status {
                what: format!("PUT {TOKEN_PATH}"),
                status: status.as_u16(),
            }),
        }
    }
}

async fn get(transport: &Transport, path: &str, token: Option<&str>) -> Result<Answer, PollError> {
    match token {
        Some(token) => {
            transport
                .send(Method::GET, path, &[(TOKEN_HEADER, token)])
                .await
        }
        None => transport.send(Method::GET, path, &[]).await,
    }
}

/// 200 → the body; 404 → nothing to report; anything else is a failure.
fn body_if_present<'a>(path: &str, answer: &'a Answer) -> Result<Option<&'a str>, PollError> {
    match answer.status {
        StatusCode::OK => Ok(Some(answer.text())),
        StatusCode::NOT_FOUND => Ok(None),
        status => Err(PollError::Status {
            what: format!("GET {path}"),
            status: status.as_u16(),
        }),
    }
}

fn unparseable(path: &str, detail: impl Into<String>) -> PollError {
    PollError::Unparseable {
        what: format!("GET {path}"),
        detail: detail.into(),
    }
}

fn parse_json<'a, T: Deserialize<'a>>(path: &str, body: &'a str) -> Result<T, PollError> {
    serde_json::from_str(body).map_err(|err| unparseable(path, err.to_string()))
}

fn parse_spot(path: &str, answer: &Answer) -> Result<Vec<Observation>, PollError> {
    #[derive(Deserialize)]
    struct InstanceAction {
        action: String,
        time: String,
    }
    let Some(body) = body_if_present(path, answer)? else {
        return Ok(Vec::new());
    };
    let action: InstanceAction = parse_json(path, body)?;
    let time = parse_time(&action.time)
        .ok_or_else(|| unparseable(path, format!("time {:?} is not RFC 3339", action.time)))?;
    Ok(vec![Observation {
        kind: NoticeKind::SpotInterruption,
        key: action.time,
        action: action.action,
        deadline: Deadline::At(time),
    }])
}

fn parse_rebalance(path: &str, answer: &Answer) -> Result<Vec<Observation>, PollError> {
    #[derive(Deserialize)]
    struct Recommendation {
        #[serde(rename = "noticeTime")]
        notice_time: String,
    }
    let Some(body) = body_if_present(path, answer)? else {
        return Ok(Vec::new());
    };
    let recommendation: Recommendation = parse_json(path, body)?;
    let time = parse_time(&recommendation.notice_time).ok_or_else(|| {
        unparseable(
            path,
            format!(
                "noticeTime {:?} is not RFC 3339",
                recommendation.notice_time
            ),
        )
    })?;
    Ok(vec![Observation {
        kind: NoticeKind::RebalanceRecommendation,
        key: recommendation.notice_time,
        action: "rebalance".to_owned(),
        deadline: Deadline::At(time + REBALANCE_HORIZON),
    }])
}

fn parse_maintenance(path: &str, answer: &Answer) -> Result<Vec<Observation>, PollError> {
    #[derive(Deserialize)]
    #[serde(rename_all = "PascalCase")]
    struct Event {
        code: String,
        not_before: String,
        #[serde(default)]
        state: Option<String>,
        #[serde(default)]
        event_id: Option<String>,
    }
    let Some(body) = body_if_present(path, answer)? else {
        return Ok(Vec::new());
    };
    if body.trim().is_empty() {
        return Ok(Vec::new());
    }
    let events: Vec<Event> = parse_json(path, body)?;
    let mut observations = Vec::new();
    for event in events {
        // Canceled and completed events stay listed for a while; only pending ones matter.
        if matches!(event.state.as_deref(), Some("canceled" | "completed")) {
            continue;
        }
        let not_before = parse_time(&event.not_before).ok_or_else(|| {
            unparseable(
                path,
                format!("NotBefore {:?} is not a time", event.not_before),
            )
        })?;
        observations.push(Observation {
            kind: NoticeKind::ScheduledMaintenance,
            key: event.event_id.unwrap_or_else(|| event.not_before.clone()),
            action: event.code,
            deadline: Deadline::At(not_before),
        });
    }
    Ok(observations)
}

fn parse_asg(path: &str, answer: &Answer) -> Result<Vec<Observation>, PollError> {
    let Some(body) = body_if_present(path, answer)? else {
        return Ok(Vec::new());
    };
    let state = body.trim();
    if state.is_empty()
        || !state
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b':')
    {
        return Err(unparseable(path, "not a lifecycle state"));
    }
    // `Terminated`, or `Warmed:Terminated` for an instance in a warm pool.
    if state == "Terminated" || state.ends_with(":Terminated") {
        return Ok(vec![Observation {
            kind: NoticeKind::AsgTermination,
            key: state.to_owned(),
            action: "terminate".to_owned(),
            deadline: Deadline::AfterDetection(ASG_TERMINATION_HORIZON),
        }]);
    }
    Ok(Vec::new())
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn answer(status: u16, body: &'static str) -> Answer {
        Answer {
            status: StatusCode::from_u16(status).unwrap(),
            body: Bytes::from_static(body.as_bytes()),
        }
    }

    #[test]
    fn reads_the_spot_instance_action() {
        let found = parse_spot(
            SPOT_PATH,
            &answer(200, r#"{"action": "stop", "time": "2017-09-18T08:22:00Z"}"#),
        )
        .unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].action, "stop");
        assert!(
            parse_spot(SPOT_PATH, &answer(404, "Not Found"))
                .unwrap()
                .is_empty()
        );
        let err = parse_spot(SPOT_PATH, &answer(200, "<html>")).unwrap_err();
        assert_eq!(err.outcome(), "unparseable");
        let err = parse_spot(SPOT_PATH, &answer(503, "")).unwrap_err();
        assert_eq!(err.outcome(), "http_5xx");
    }

    #[test]
    fn skips_canceled_and_completed_maintenance() {
        let body = r#"[
          {"Code":"system-reboot","Description":"x","EventId":"instance-event-1","NotBefore":"21 Jan 2019 09:00:43 GMT","NotAfter":"21 Jan 2019 09:17:23 GMT","State":"active"},
          {"Code":"instance-stop","EventId":"instance-event-2","NotBefore":"22 Jan 2019 09:00:43 GMT","State":"canceled"}
        ]"#;
        let found = parse_maintenance(MAINTENANCE_PATH, &answer(200, body)).unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].action, "system-reboot");
        assert_eq!(found[0].key, "instance-event-1");
        assert!(
            parse_maintenance(MAINTENANCE_PATH, &answer(200, "[]"))
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn only_a_terminated_lifecycle_state_is_a_notice() {
        assert!(
            parse_asg(ASG_PATH, &answer(200, "InService"))
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            parse_asg(ASG_PATH, &answer(200, "Terminated"))
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            parse_asg(ASG_PATH, &answer(200, "Warmed:Terminated"))
                .unwrap()
                .len(),
            1
        );
        assert!(parse_asg(ASG_PATH, &answer(200, "\u{0}\u{1}garbage{{")).is_err());
    }
}
