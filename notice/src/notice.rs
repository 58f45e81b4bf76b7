//! The notice model: what the cloud said, in the one JSON shape used on the stream, in logs and in
//! Kubernetes events.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

/// One thing the cloud told us about this machine.
///
/// Serialises as
/// `{"id","kind","action","deadline","detected_at","source"}` with RFC 3339 UTC times.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Notice {
    /// Stable identity: the same notice seen on every poll has the same id (`<kind>/<deadline>`).
    pub id: String,
    pub kind: NoticeKind,
    /// What the cloud will do to the machine (`terminate`, `stop`, `hibernate`, `rebalance`, or
    /// a maintenance event code such as `system-reboot`).
    pub action: String,
    /// When the machine goes away (or, for "prepare" kinds, the soonest it could).
    #[serde(with = "rfc3339")]
    pub deadline: OffsetDateTime,
    /// When this process first saw the notice.
    #[serde(with = "rfc3339")]
    pub detected_at: OffsetDateTime,
    pub source: Source,
}

impl Notice {
    /// A notice whose id is derived from its kind and deadline, as every source does it.
    pub fn new(
        kind: NoticeKind,
        action: impl Into<String>,
        deadline: OffsetDateTime,
        detected_at: OffsetDateTime,
        source: Source,
    ) -> Self {
        let deadline = rfc3339::normalise(deadline);
        Self {
            id: format!("{kind}/{}", rfc3339::format(deadline)),
            kind,
            action: action.into(),
            deadline,
            detected_at: rfc3339::normalise(detected_at),
            source,
        }
    }

    /// The notice as one line of JSON (no trailing newline).
    pub fn to_json(&self) -> String {
        // A Notice has only strings and times: serialising it cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }
}

/// What kind of notice, in kebab-case on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum NoticeKind {
    SpotInterruption,
    RebalanceRecommendation,
    ScheduledMaintenance,
    AsgTermination,
    Preemption,
}

impl NoticeKind {
    /// Every kind, in a stable order (for help texts and error messages).
    pub const ALL: [NoticeKind; 5] = [
        NoticeKind::SpotInterruption,
        NoticeKind::RebalanceRecommendation,
        NoticeKind::ScheduledMaintenance,
        NoticeKind::AsgTermination,
        NoticeKind::Preemption,
    ];

    /// Emergency kinds mean "checkpoint now": the machine is going away at the deadline.
    /// The others mean "prepare".
    pub fn is_emergency(self) -> bool {
        matches!(
            self,
            NoticeKind::SpotInterruption | NoticeKind::AsgTermination | NoticeKind::Preemption
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            NoticeKind::SpotInterruption => "spot-interruption",
            NoticeKind::RebalanceRecommendation => "rebalance-recommendation",
            NoticeKind::ScheduledMaintenance => "scheduled-maintenance",
            NoticeKind::AsgTermination => "asg-termination",
            NoticeKind::Preemption => "preemption",
        }
    }
}

impl fmt::Display for NoticeKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error(
    "unknown notice kind {0:?}; valid kinds are spot-interruption, rebalance-recommendation, \
     scheduled-maintenance, asg-termination, preemption"
)]
pub struct ParseNoticeKindError(pub String);

impl FromStr for NoticeKind {
    type Err = ParseNoticeKindError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        NoticeKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == s.trim())
            .ok_or_else(|| ParseNoticeKindError(s.to_owned()))
    }
}

/// The cloud whose metadata service is polled.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Cloud {
    Aws,
    Gcp,
    Azure,
}

/// Where a notice came from: the cloud whose metadata service reported it.
pub type Source = Cloud;

impl Cloud {
    pub fn as_str(self) -> &'static str {
        match self {
            Cloud::Aws => "aws",
            Cloud::Gcp => "gcp",
            Cloud::Azure => "azure",
        }
    }
}

impl fmt::Display for Cloud {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown cloud {0:?}; valid clouds are aws, gcp, azure")]
pub struct ParseCloudError(pub String);

impl FromStr for Cloud {
    type Err = ParseCloudError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "aws" => Ok(Cloud::Aws),
            "gcp" => Ok(Cloud::Gcp),
            "azure" => Ok(Cloud::Azure),
            _ => Err(ParseCloudError(s.to_owned())),
        }
    }
}

/// One line of the agent's watch stream (`GET /v1/notices?watch=true`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum StreamEvent {
    /// First line: every notice active when the subscriber connected.
    Snapshot { notices: Vec<Notice> },
    /// A notice that appeared after the snapshot.
    Notice { notice: Notice },
    /// Sent at least every 10 s so a subscriber can tell a quiet agent from a dead one.
    Heartbeat,
}

impl StreamEvent {
    /// The event as one NDJSON line, newline included.
    pub fn to_line(&self) -> String {
        // Only strings and times inside: serialising cannot fail.
        let mut line = serde_json::to_string(self).unwrap_or_default();
        line.push('\n');
        line
    }
}

/// RFC 3339 in UTC with millisecond precision, fraction omitted when zero:
/// `2026-11-22T09:30:36Z`, `2026-11-22T09:28:37.120Z`.
pub(crate) mod rfc3339 {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::format_description::well_known::Rfc3339;
    use time::macros::format_description;
    use time::{OffsetDateTime, UtcOffset};

    /// UTC, truncated to milliseconds: what the wire format can carry.
    pub fn normalise(t: OffsetDateTime) -> OffsetDateTime {
        let t = t.to_offset(UtcOffset::UTC);
        let millis = t.millisecond();
        t.replace_nanosecond(u32::from(millis) * 1_000_000)
            .unwrap_or(t)
    }

    pub fn format(t: OffsetDateTime) -> String {
        let t = normalise(t);
        let result = if t.millisecond() == 0 {
            t.format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
            ))
        } else {
            t.format(format_description!(
                "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
            ))
        };
        // Years 0..=9999 always format; anything else is not a real deadline.
        result.unwrap_or_default()
    }

    pub fn parse(s: &str) -> Result<OffsetDateTime, String> {
        let t = OffsetDateTime::parse(s, &Rfc3339).map_err(|e| e.to_string())?;
        // An offset can move a time past what UTC can hold (`to_offset` would panic) or past
        // what RFC 3339 can write back (years 0000-9999): refuse it, never panic on input.
        match t.checked_to_offset(UtcOffset::UTC) {
            Some(utc) if (0..=9999).contains(&utc.year()) => Ok(normalise(utc)),
            _ => Err(format!("`{s}` is outside the years 0000-9999 in UTC")),
        }
    }

    pub fn serialize<S: Serializer>(t: &OffsetDateTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format(*t))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<OffsetDateTime, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        parse(&s).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    #[test]
    fn refuses_times_an_offset_moves_outside_what_rfc3339_can_write() {
        // Found with the fuzz target's seeds: the first panicked, the second re-serialised as "".
        for edge in ["9999-12-31T23:59:59-01:00", "0000-01-01T00:30:00+01:00"] {
            assert!(rfc3339::parse(edge).is_err(), "{edge}");
            let line = format!(
                r#"{{"id":"x","kind":"preemption","action":"terminate","deadline":"{edge}","detected_at":"2026-11-22T09:28:37Z","source":"gcp"}}"#
            );
            assert!(serde_json::from_str::<Notice>(&line).is_err(), "{line}");
        }
        assert!(rfc3339::parse("9999-12-31T22:59:59-01:00").is_ok());
    }

    #[test]
    fn serialises_exactly_as_the_design_shows() {
        let notice = Notice::new(
            NoticeKind::SpotInterruption,
            "terminate",
            datetime!(2026-11-22 09:30:36 UTC),
            datetime!(2026-11-22 09:28:37.120456 UTC),
            Cloud::Aws,
        );
        assert_eq!(
            notice.to_json(),
            r#"{"id":"spot-interruption/2026-11-22T09:30:36Z","kind":"spot-interruption","action":"terminate","deadline":"2026-11-22T09:30:36Z","detected_at":"2026-11-22T09:28:37.120Z","source":"aws"}"#
        );
        let back: Notice = serde_json::from_str(&notice.to_json()).unwrap();
        assert_eq!(back, notice);
    }

    #[test]
    fn stream_events_are_tagged_by_type() {
        assert_eq!(
            StreamEvent::Heartbeat.to_line(),
            "{\"type\":\"heartbeat\"}\n"
        );
        assert_eq!(
            StreamEvent::Snapshot { notices: vec![] }.to_line(),
            "{\"type\":\"snapshot\",\"notices\":[]}\n"
        );
        let notice = Notice::new(
            NoticeKind::Preemption,
            "terminate",
            datetime!(2026-11-22 09:30:36 +02:00),
            datetime!(2026-11-22 09:30:06 UTC),
            Cloud::Gcp,
        );
        let line = StreamEvent::Notice {
            notice: notice.clone(),
        }
        .to_line();
        assert!(line.starts_with(
            "{\"type\":\"notice\",\"notice\":{\"id\":\"preemption/2026-11-22T07:30:36Z\""
        ));
        let parsed: StreamEvent = serde_json::from_str(line.trim_end()).unwrap();
        assert_eq!(parsed, StreamEvent::Notice { notice });
    }

    #[test]
    fn kinds_parse_and_print_in_kebab_case() {
        for kind in NoticeKind::ALL {
            assert_eq!(kind.to_string().parse::<NoticeKind>().unwrap(), kind);
            assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{kind}\""));
        }
        let err = "spot".parse::<NoticeKind>().unwrap_err().to_string();
        assert!(err.contains("valid kinds are spot-interruption"), "{err}");
        assert!(NoticeKind::SpotInterruption.is_emergency());
        assert!(NoticeKind::Preemption.is_emergency());
        assert!(NoticeKind::AsgTermination.is_emergency());
        assert!(!NoticeKind::RebalanceRecommendation.is_emergency());
        assert!(!NoticeKind::ScheduledMaintenance.is_emergency());
    }

    #[test]
    fn clouds_parse_case_insensitively_and_name_the_valid_ones() {
        assert_eq!("AWS".parse::<Cloud>().unwrap(), Cloud::Aws);
        assert_eq!("gcp".parse::<Cloud>().unwrap(), Cloud::Gcp);
        assert_eq!("azure".parse::<Cloud>().unwrap(), Cloud::Azure);
        let err = "ibm".parse::<Cloud>().unwrap_err().to_string();
        assert!(err.contains("aws, gcp, azure"), "{err}");
    }
}
