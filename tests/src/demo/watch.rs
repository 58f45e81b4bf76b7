//! The notice and what follows it, as seen from outside and printed as it happens: the notice
//! set in the last machine's metadata service, its agent's stream and its Node's cordon (and
//! nothing on the other machines), each trainer's signal, save and done marker, with several
//! ranks how each other pod learnt the notice and each rank's part, and the generation
//! committed before the deadline.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;
use time::OffsetDateTime;
use tokio::sync::mpsc;
use tokio_util::task::AbortOnDropHandle;

use super::observe::{self, CLOSED, NoticeStream, Seen, Source};
use super::pods::Pod;
use super::{Demo, RankTimeline, Timeline, human_bytes};
use crate::apiserver::ApiServer;

/// The watch of one notice: where it stands, from the moment the notice was set.
struct Watch<'d, 'a> {
    demo: &'d Demo<'a>,
    pods: &'d [Pod],
    notice_set: Instant,
    deadline: Instant,
    timeline: Timeline,
}

impl<'a> Demo<'a> {
    /// Sets the notice on the last machine and follows it until the generation is committed
    /// and the Node cordoned (or the deadline passes).
    pub(super) async fn watch_the_notice(
        &self,
        pods: &[Pod],
        sender: &mpsc::Sender<Seen>,
        seen: &mut mpsc::Receiver<Seen>,
    ) -> anyhow::Result<Timeline> {
        let _streams = self.follow_the_agents(sender).await?;
        let mut watch = self.set_the_notice(pods)?;
        loop {
            if watch.done() {
                break;
            }
            if Instant::now() >= watch.deadline {
                self.out
                    .line("deadline reached before the checkpoint was committed".to_owned());
                break;
            }
            tokio::select! {
                line = seen.recv() => watch.see(line.context("every watched output ended")?).await?,
                _ = tokio::time::sleep(observe::POLL) => watch.poll(seen).await?,
            }
        }
        watch.report_quiet_machines();
        Ok(watch.timeline)
    }

    /// Every machine's agent stream, read as a sidecar reads it, passed on to `sender`.
    async fn follow_the_agents(
        &self,
        sender: &mpsc::Sender<Seen>,
    ) -> anyhow::Result<Vec<AbortOnDropHandle<()>>> {
        let mut streams = Vec::with_capacity(self.world.machines.len());
        for (node, machine) in self.world.machines.iter().enumerate() {
            let stream = NoticeStream::connect(&machine.agent_url).await?;
            streams.push(observe::forward_notices(stream, node, sender.clone()));
        }
        Ok(streams)
    }

    /// The cloud's two-minute warning, on the last machine. The notice format carries whole
    /// seconds.
    fn set_the_notice<'d>(&'d self, pods: &'d [Pod]) -> anyhow::Result<Watch<'d, 'a>> {
        let noticed = self.names.noticed();
        let deadline_at = (OffsetDateTime::now_utc() + self.options.deadline)
            .replace_nanosecond(0)
            .context("rounding the deadline")?;
        let notice_set = Instant::now();
        let deadline = notice_set + (deadline_at - OffsetDateTime::now_utc()).unsigned_abs();
        self.world.machines[noticed]
            .imds
            .set_spot_interruption("terminate", deadline_at);
        let of_node = match self.names.multi() {
            true => format!(" of {}", self.names.node(noticed)),
            false => String::new(),
        };
        self.out.line(String::new());
        self.out.event(
            Duration::ZERO,
            format!(
                "Spot interruption notice set in the metadata service{of_node} (deadline in {}s)",
                self.options.deadline.as_secs()
            ),
        );
        let timeline = Timeline {
            noticed_rank: noticed,
            ranks: vec![RankTimeline::default(); self.names.ranks],
            ..Timeline::default()
        };
        Ok(Watch {
            demo: self,
            pods,
            notice_set,
            deadline,
            timeline,
        })
    }
}

impl Watch<'_, '_> {
    /// Committed and cordoned, and with several ranks every rank's part seen committed.
    fn done(&self) -> bool {
        let parts = !self.demo.names.multi()
            || self
                .timeline
                .ranks
                .iter()
                .all(|r| r.part_committed.is_some());
        self.timeline.committed.is_some() && self.timeline.cordoned.is_some() && parts
    }

    fn since(&self, at: Instant) -> Duration {
        at.saturating_duration_since(self.notice_set)
    }

    fn event(&self, at: Duration, text: String) {
        self.demo.out.event(at, text);
    }

    async fn see(&mut self, line: Seen) -> anyhow::Result<()> {
        let at = self.since(line.at);
        match line.source {
            Source::Agent(node) => self.agent_streamed(node, &line.value, at),
            Source::Trainer(rank) => self.trainer_said(rank, &line, at)?,
            Source::Sidecar(rank) => self.sidecar_said(rank, &line, at).await,
        }
        Ok(())
    }

    fn agent_streamed(&mut self, node: usize, notice: &Value, at: Duration) {
        let id = notice["id"].as_str().unwrap_or_default().to_owned();
        let on = self.demo.names.on(node);
        if node != self.timeline.noticed_rank {
            self.event(at, format!("agent{on} streamed a notice {id}: UNEXPECTED"));
            self.disturbed(node);
        } else if self.timeline.agent_saw_notice.is_none() {
            self.timeline.agent_saw_notice = Some(at);
            self.event(at, format!("agent{on} streamed the notice {id}"));
            self.timeline.notice_id = id;
        }
    }

    fn disturbed(&mut self, node: usize) {
        let name = self.demo.names.node(node);
        if !self.timeline.disturbed_nodes.contains(&name) {
            self.timeline.disturbed_nodes.push(name);
        }
    }

    fn trainer_said(&mut self, rank: usize, line: &Seen, at: Duration) -> anyhow::Result<()> {
        let who = self.demo.names.rank(rank);
        let this = &mut self.timeline.ranks[rank];
        if line.event() == CLOSED && this.checkpoint_complete.is_none() {
            bail!("{who}the trainer exited before checkpointing");
        }
        if let Some(text) = record_trainer_event(this, line, at) {
            self.event(at, format!("{who}{text}"));
        }
        Ok(())
    }

    /// A sidecar's JSON log line (with several ranks; one sidecar logs text).
    async fn sidecar_said(&mut self, rank: usize, line: &Seen, at: Duration) {
        let who = self.demo.names.rank(rank);
        match line.message() {
            "published the notice for the job's other pods"
                if self.timeline.published.is_none() =>
            {
                self.timeline.published = Some(at);
                self.event(
                    at,
                    format!(
                        "{who}notice published for the job's other pods (notice.json in the store)"
                    ),
                );
            }
            "notice from another pod of the job"
                if self.timeline.ranks[rank].heard_by.is_none() =>
            {
                let channel = line.value["fields"]["channel"].as_str().unwrap_or("?");
                let how = match channel {
                    "peer" => "the job-wide notice in the store",
                    "marker" => "its trainer's agreed save",
                    _ => "an unknown channel",
                };
                self.event(
                    at,
                    format!(
                        "{who}sidecar heard the notice from another pod: channel {channel} ({how})"
                    ),
                );
                self.timeline.ranks[rank].heard_by = Some(channel.to_owned());
            }
            "checkpoint committed" if self.timeline.ranks[rank].part_committed.is_none() => {
                self.timeline.ranks[rank].part_committed = Some(at);
                let url = &self.pods[rank].sidecar_url;
                record_upload(&mut self.timeline.ranks[rank], url).await;
                let wrote_job = match line.value["fields"]["job"].as_str() {
                    Some("Written") => ", and wrote the job manifest",
                    _ => "",
                };
                let lead = format!("{who}part committed{wrote_job}: ");
                report_upload(self, at, &lead, rank);
            }
            _ => {}
        }
    }

    /// Looks at the Nodes and, once a checkpoint is complete, at the store. Lines that arrived
    /// while the store was looked at come first, so the timeline stays in order.
    async fn poll(&mut self, seen: &mut mpsc::Receiver<Seen>) -> anyhow::Result<()> {
        for node in 0..self.demo.names.ranks {
            self.look_at_node(node);
        }
        let complete = self
            .timeline
            .ranks
            .iter()
            .any(|r| r.checkpoint_complete.is_some());
        if self.timeline.committed.is_some() || !complete {
            return Ok(());
        }
        let demo = self.demo;
        let committed = demo
            .children
            .committed_generations(&demo.world.store_env)
            .await?;
        if let Some(generation) = committed.last() {
            while let Ok(line) = seen.try_recv() {
                self.see(line).await?;
            }
            self.record_commit(generation).await;
        }
        Ok(())
    }

    fn look_at_node(&mut self, node: usize) {
        let name = self.demo.names.node(node);
        let Some(taint) = nerve_taint(&self.demo.world.api, &name) else {
            return;
        };
        let at = self.since(Instant::now());
        if node != self.timeline.noticed_rank {
            if !self.timeline.disturbed_nodes.contains(&name) {
                self.event(
                    at,
                    format!("node {name} cordoned, taint {taint}: UNEXPECTED"),
                );
                self.disturbed(node);
            }
        } else if self.timeline.cordoned.is_none() {
            self.timeline.cordoned = Some(at);
            self.event(
                at,
                format!("node {name} cordoned, taint {taint} (recorded by the API server)"),
            );
            self.timeline.taint = Some(taint);
        }
    }

    async fn record_commit(&mut self, generation: &Value) {
        let at = self.since(Instant::now());
        self.timeline.committed = Some(at);
        self.timeline.margin = self.deadline.checked_duration_since(Instant::now());
        let id = generation["generation"].as_str().map(str::to_owned);
        self.timeline.committed_generation = id;
        let names = self.demo.names;
        let generation_name = self.timeline.committed_generation.as_deref().unwrap_or("?");
        let text = if names.multi() {
            let parts = &generation["parts_committed"];
            format!(
                "job manifest committed: generation {generation_name} ({parts} of {} parts)",
                names.ranks
            )
        } else {
            let url = &self.pods[0].sidecar_url;
            record_upload(&mut self.timeline.ranks[0], url).await;
            report_upload(self, at, "", 0);
            format!("manifest committed: generation {generation_name}")
        };
        self.event(at, text);
        if let Some(margin) = self.timeline.margin {
            self.event(
                at,
                format!(
                    "safe with {:.1}s to spare before the deadline",
                    margin.as_secs_f64()
                ),
            );
        }
    }

    /// With several machines: says that the others saw no notice and were not cordoned.
    fn report_quiet_machines(&self) {
        let names = self.demo.names;
        for node in (0..names.ranks).filter(|n| *n != self.timeline.noticed_rank) {
            let name = names.node(node);
            if !self.timeline.disturbed_nodes.contains(&name) {
                self.demo.out.line(format!(
                    "{name}: no notice on its agent's stream, not cordoned"
                ));
            }
        }
    }
}

/// Records the first signal, notice checkpoint and done marker of a rank's trainer; what to
/// print about it.
fn record_trainer_event(this: &mut RankTimeline, line: &Seen, at: Duration) -> Option<String> {
    let value = &line.value;
    let step = &value["step"];
    match line.event() {
        "signal" if this.signal_delivered.is_none() => {
            this.signal_delivered = Some(at);
            this.already_answered = value["already_answered"] == true;
            let answered = match this.already_answered {
                true => " (already answered: the ranks saved for this notice)",
                false => "",
            };
            let signal = value["signal"].as_str().unwrap_or("the signal");
            Some(format!(
                "trainer received {signal} at step {step}{answered}"
            ))
        }
        "checkpoint" if this.saved_step.is_none() && value["reason"] != "periodic" => {
            this.saved_step = value["step"].as_u64();
            this.saved_digest = value["digest"].as_str().map(str::to_owned);
            let agreed = match value["reason"] == "peer" {
                true => ", the step the ranks agreed on",
                false => "",
            };
            let bytes = human_bytes(value["bytes"].as_u64().unwrap_or(0));
            Some(format!("trainer wrote checkpoint-{step} ({bytes}){agreed}"))
        }
        "done-marker" if this.checkpoint_complete.is_none() => {
            this.checkpoint_complete = Some(at);
            Some("checkpoint complete (done marker written)".to_owned())
        }
        _ => None,
    }
}

/// Bytes and seconds of the rank's upload, from its sidecar's own metrics.
async fn record_upload(rank: &mut RankTimeline, sidecar_url: &str) {
    let metrics = observe::scrape(&format!("{sidecar_url}/metrics"))
        .await
        .unwrap_or_default();
    rank.bytes_uploaded = observe::sum(
        &metrics,
        "nerve_sidecar_transfer_bytes_total",
        Some("upload"),
    ) as u64;
    rank.bytes_reused = observe::sum(&metrics, "nerve_sidecar_reused_bytes_total", None) as u64;
    rank.upload_seconds = observe::sum(&metrics, "nerve_sidecar_upload_duration_seconds_sum", None);
}

/// `<lead>uploaded 256 MiB in 0.77s (334 MiB/s), 0 B reused` for rank `rank`.
fn report_upload(watch: &Watch<'_, '_>, at: Duration, lead: &str, rank: usize) {
    let upload = &watch.timeline.ranks[rank];
    let rate = if upload.upload_seconds > 0.0 {
        upload.bytes_uploaded as f64 / (1024.0 * 1024.0) / upload.upload_seconds
    } else {
        0.0
    };
    watch.event(
        at,
        format!(
            "{lead}uploaded {} in {:.2}s ({rate:.0} MiB/s), {} reused",
            human_bytes(upload.bytes_uploaded),
            upload.upload_seconds,
            human_bytes(upload.bytes_reused)
        ),
    );
}

/// The taint the agent adds to Node `name`, as `key=value:Effect`, once it is unschedulable.
fn nerve_taint(api: &ApiServer, name: &str) -> Option<String> {
    let node = api.node_named(name)?;
    if node["spec"]["unschedulable"] != true {
        return None;
    }
    let taints = node["spec"]["taints"].as_array()?;
    taints.iter().find_map(|taint| {
        (taint["key"] == "nerve.io/interruption").then(|| {
            format!(
                "{}={}:{}",
                taint["key"].as_str().unwrap_or_default(),
                taint["value"].as_str().unwrap_or_default(),
                taint["effect"].as_str().unwrap_or_default()
            )
        })
    })
}
