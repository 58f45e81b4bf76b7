//! The notice model and the instance metadata client that `nerve-agent` and `nerve-sidecar`
//! share.
//!
//! A [`Notice`] is what the cloud told us about this machine going away (or possibly going away):
//! one JSON shape used on the agent's stream, in logs and in Kubernetes events. The
//! [`MetadataClient`] polls the metadata service of AWS (IMDSv2 with IMDSv1 fallback), GCP or
//! Azure and reports the notices active right now.
//!
//! This crate deliberately holds nothing else (no metrics registry, no Kubernetes, no server)
//! beyond [`error_chain`], the one-line error format both binaries log.
//! Callers count poll outcomes themselves ([`PollReport::outcome`]).

mod metadata;
mod notice;

pub use metadata::{InvalidMetadataUrl, MetadataClient, PollError, PollReport, error_chain};
pub use notice::{
    Cloud, Notice, NoticeKind, ParseCloudError, ParseNoticeKindError, Source, StreamEvent,
};
