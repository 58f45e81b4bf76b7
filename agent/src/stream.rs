//! The notice stream: the notices active now, and fan-out of new ones to every subscriber.
//!
//! Each subscriber has its own small bounded queue. Publishing never waits: a subscriber whose
//! queue is full is dropped (its stream ends and it reconnects to a fresh snapshot), so one stuck
//! reader never delays the others.

use std::net::IpAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use nerve_notice::{Notice, StreamEvent};
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Lines queued per subscriber. Notices are rare (a handful per machine lifetime) and heartbeats
/// come every few seconds: 32 lines is minutes of slack for a slow reader, and a few KiB of
/// memory at most per subscriber.
const SUBSCRIBER_BUFFER: usize = 32;

/// Most concurrent subscribers: one sidecar per training pod, a few pods per GPU node. 1024 is
/// far beyond any node and bounds queued lines at 1024 x 32 x ~250 B = 8 MiB in the worst case.
pub const MAX_SUBSCRIBERS: usize = 1024;

/// Most concurrent subscribers from one address, so a client that opens streams and never reads
/// them cannot take every slot. Sidecars on the host network and `nerve-sidecar@` units on a
/// bare host all connect from the node's own address, and a node runs at most 250 pods (EKS's
/// ceiling with prefix delegation; Kubernetes' default is 110): half the slots, 512, never
/// refuses a real sidecar even while it reconnects, and one address holding all of its slots
/// leaves the other 512, twice the pods a node can run.
pub const MAX_SUBSCRIBERS_PER_PEER: usize = MAX_SUBSCRIBERS / 2;

pub struct NoticeStream {
    inner: Mutex<Inner>,
    metrics: Arc<Metrics>,
}

struct Inner {
    active: Vec<Notice>,
    subscribers: Vec<Subscriber>,
    ready: bool,
    closed: bool,
}

struct Subscriber {
    peer: IpAddr,
    queue: mpsc::Sender<Bytes>,
}

/// Why a watch request gets no stream (the server answers 503: retry later).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SubscribeError {
    #[error("{MAX_SUBSCRIBERS_PER_PEER} watch streams are already open from this address")]
    PeerLimit,
    #[error("{MAX_SUBSCRIBERS} watch streams are already open")]
    Full,
    #[error("the agent is shutting down")]
    Closed,
}

/// What changed with an update of the active notices.
#[derive(Debug, Default)]
pub struct Changes {
    pub appeared: Vec<Notice>,
    pub withdrawn: Vec<Notice>,
}

impl NoticeStream {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            inner: Mutex::new(Inner {
                active: Vec::new(),
                subscribers: Vec::new(),
                ready: false,
                closed: false,
            }),
            metrics,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The notices active now.
    pub fn active(&self) -> Vec<Notice> {
        self.lock().active.clone()
    }

    /// Whether a metadata poll has been answered yet.
    pub fn is_ready(&self) -> bool {
        self.lock().ready
    }

    pub fn mark_ready(&self) {
        self.lock().ready = true;
    }

    /// A new subscriber connected from `peer`: its queue starts with the snapshot. Refused when
    /// `peer` or everyone together hold the most streams allowed, or the stream is shutting down.
    pub fn subscribe(&self, peer: IpAddr) -> Result<mpsc::Receiver<Bytes>, SubscribeError> {
        let mut inner = self.lock();
        inner.subscribers.retain(|s| !s.queue.is_closed());
        if inner.closed {
            return Err(SubscribeError::Closed);
        }
        let from_peer = inner.subscribers.iter().filter(|s| s.peer == peer).count();
        if from_peer >= MAX_SUBSCRIBERS_PER_PEER {
            return Err(SubscribeError::PeerLimit);
        }
        if inner.subscribers.len() >= MAX_SUBSCRIBERS {
            return Err(SubscribeError::Full);
        }
        let (tx, rx) = mpsc::channel(SUBSCRIBER_BUFFER);
        let snapshot = StreamEvent::Snapshot {
            notices: inner.active.clone(),
        };
        // The queue is new and empty: the snapshot always fits.
        let _ = tx.try_send(Bytes::from(snapshot.to_line()));
        inner.subscribers.push(Subscriber { peer, queue: tx });
        self.metrics.subscribers(inner.subscribers.len());
        Ok(rx)
    }

    /// Replaces the active notices; every notice not active before goes to every subscriber.
    pub fn update(&self, notices: &[Notice]) -> Changes {
        let mut inner = self.lock();
        let appeared: Vec<Notice> = notices
            .iter()
            .filter(|n| !inner.active.iter().any(|a| a.id == n.id))
            .cloned()
            .collect();
        let withdrawn: Vec<Notice> = inner
            .active
            .iter()
            .filter(|a| !notices.iter().any(|n| n.id == a.id))
            .cloned()
            .collect();
        inner.active = notices.to_vec();
        for notice in &appeared {
            let line = Bytes::from(
                StreamEvent::Notice {
                    notice: notice.clone(),
                }
                .to_line(),
            );
            self.broadcast(&mut inner, &line);
        }
        Changes {
            appeared,
            withdrawn,
        }
    }

    /// Sends a heartbeat line to every subscriber (and forgets the ones that left).
    pub fn heartbeat(&self) {
        let line = Bytes::from(StreamEvent::Heartbeat.to_line());
        let mut inner = self.lock();
        self.broadcast(&mut inner, &line);
    }

    /// Ends every subscriber's stream and refuses new ones (shutdown).
    pub fn close(&self) {
        let mut inner = self.lock();
        inner.closed = true;
        inner.subscribers.clear();
        self.metrics.subscribers(0);
    }

    pub fn subscriber_count(&self) -> usize {
        let mut inner = self.lock();
        inner.subscribers.retain(|s| !s.queue.is_closed());
        inner.subscribers.len()
    }

    fn broadcast(&self, inner: &mut Inner, line: &Bytes) {
        let before = inner.subscribers.len();
        inner.subscribers.retain(|subscriber| match subscriber.queue.try_send(line.clone()) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(
                    buffered = SUBSCRIBER_BUFFER,
                    "dropping a watch subscriber that stopped reading; it reconnects to a fresh \
                     snapshot"
                );
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        });
        if inner.subscribers.len() != before {
            self.metrics.subscribers(inner.subscribers.len());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use nerve_notice::{Cloud, NoticeKind};
    use time::macros::datetime;

    fn notice(kind: NoticeKind) -> Notice {
        Notice::new(
            kind,
            "terminate",
            datetime!(2026-11-22 09:30:36 UTC),
            datetime!(2026-11-22 09:28:36 UTC),
            Cloud::Aws,
        )
    }

    const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

    fn line(rx: &mut mpsc::Receiver<Bytes>) -> StreamEvent {
        let bytes = rx.try_recv().expect("a queued line");
        serde_json::from_slice(&bytes).unwrap()
    }

    #[test]
    fn late_subscribers_get_active_notices_in_the_snapshot() {
        let stream = NoticeStream::new(Arc::new(Metrics::new()));
        let spot = notice(NoticeKind::SpotInterruption);
        stream.update(std::slice::from_ref(&spot));
        let mut rx = stream.subscribe(LOCAL).unwrap();
        assert_eq!(
            line(&mut rx),
            StreamEvent::Snapshot {
                notices: vec![spot]
            }
        );
    }

    #[test]
    fn the_same_notice_on_every_poll_is_sent_once() {
        let stream = NoticeStream::new(Arc::new(Metrics::new()));
        let mut rx = stream.subscribe(LOCAL).unwrap();
        line(&mut rx);
        let spot = notice(NoticeKind::SpotInterruption);
        for _ in 0..5 {
            stream.update(std::slice::from_ref(&spot));
        }
        assert_eq!(
            line(&mut rx),
            StreamEvent::Notice {
                notice: spot.clone()
            }
        );
        assert!(rx.try_recv().is_err());
        let changes = stream.update(&[]);
        assert_eq!(changes.withdrawn, vec![spot]);
    }

    #[test]
    fn a_stuck_subscriber_is_dropped_and_the_others_keep_receiving() {
        let stream = NoticeStream::new(Arc::new(Metrics::new()));
        let _stuck = stream.subscribe(LOCAL).unwrap();
        let mut healthy = stream.subscribe(LOCAL).unwrap();
        for _ in 0..SUBSCRIBER_BUFFER * 2 {
            stream.heartbeat();
            while healthy.try_recv().is_ok() {}
        }
        assert_eq!(stream.subscriber_count(), 1);
        let spot = notice(NoticeKind::SpotInterruption);
        stream.update(std::slice::from_ref(&spot));
        assert_eq!(line(&mut healthy), StreamEvent::Notice { notice: spot });
    }

    #[test]
    fn one_address_gets_its_share_of_slots_and_other_addresses_still_get_theirs() {
        let stream = NoticeStream::new(Arc::new(Metrics::new()));
        let hog = IpAddr::V4(std::net::Ipv4Addr::new(10, 0, 0, 9));
        let held: Vec<_> = (0..MAX_SUBSCRIBERS_PER_PEER)
            .map(|_| stream.subscribe(hog).unwrap())
            .collect();
        assert_eq!(stream.subscribe(hog).err(), Some(SubscribeError::PeerLimit));
        let others: Vec<_> = (0..MAX_SUBSCRIBERS - MAX_SUBSCRIBERS_PER_PEER)
            .map(|i| {
                let peer = IpAddr::V4(std::net::Ipv4Addr::new(
                    10,
                    1,
                    (i / 250) as u8,
                    (i % 250) as u8,
                ));
                stream.subscribe(peer).unwrap()
            })
            .collect();
        assert_eq!(stream.subscribe(LOCAL).err(), Some(SubscribeError::Full));
        drop(held);
        assert!(
            stream.subscribe(hog).is_ok(),
            "slots come back when streams end"
        );
        drop(others);
        stream.close();
        assert_eq!(stream.subscribe(LOCAL).err(), Some(SubscribeError::Closed));
    }
}
