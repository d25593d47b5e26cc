//! Coalesced settling: the acks of one channel's deliveries leave in as few frames as they
//! can.
//!
//! A quorum queue turns every `basic.ack` frame into a Raft command, so acking message by
//! message costs the broker more CPU than the message itself (measured on this machine:
//! 42–59 µs of broker CPU per message with one ack each, 18–21 µs with one `multiple` ack
//! per 16). An [`AckBook`] keeps a channel's unsettled deliveries in tag order; the handler
//! that settles a delivery while no frame is being sent becomes the channel's sender, and
//! sends, in order:
//! - every reject of the *leading run* (the settled deliveries below the first one still
//!   running), one frame each;
//! - one `basic.ack` with `multiple` for the leading run's acks (tags up to its highest ack:
//!   every delivery below it is settled, so nothing else is covered);
//! - each settlement behind a running delivery on its own (never held back: a long task must
//!   not keep the others unacked, which would also eat the prefetch).
//!
//! Frames are queued on the channel without waiting for lapin to write them. Between rounds
//! the sender yields once, so the handlers that are ready settle meanwhile (without
//! waiting: a handler that is not the sender returns at once) and their frames join the
//! next round: the busier the channel, the more a frame carries, and an idle channel sends
//! each ack as soon as its handler settles it. A delivery
//! that is never settled (its channel died, or it was dropped) stays in the book as running:
//! a `multiple` ack never covers it, and the book goes with its channel.

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use futures_util::FutureExt;
use lapin::options::{BasicAckOptions, BasicRejectOptions};
use lapin::Channel;
use tokio::sync::oneshot;

use crate::error::{classify, Result};

/// How a delivery is settled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Settle {
    /// `basic.ack`.
    Ack,
    /// `basic.reject`, back to the queue with `requeue`, else to its dead-letter exchange.
    Reject {
        /// Back to the queue.
        requeue: bool,
    },
}

/// One frame to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Frame {
    /// `basic.ack`; `multiple` settles every unsettled delivery up to `tag`.
    Ack {
        /// The delivery tag.
        tag: u64,
        /// Covers every delivery up to `tag`.
        multiple: bool,
    },
    /// `basic.reject`.
    Reject {
        /// The delivery tag.
        tag: u64,
        /// Back to the queue.
        requeue: bool,
    },
}

enum Entry<W> {
    /// Delivered, not settled by its handler yet.
    Running,
    /// Settled, its frame not sent yet.
    Settled { how: Settle, waiters: Vec<W> },
}

/// The frame plan of one channel: which deliveries are running and which settlements wait
/// for their frame. `W` is whatever each settlement waits on (a reply channel; a number in
/// the unit tests).
pub(crate) struct Book<W> {
    entries: BTreeMap<u64, Entry<W>>,
    /// Settled entries in the book (so [`Book::take_frames`] scans past the leading run
    /// only when some are left behind a running one).
    settled: usize,
    /// A sender is at work: a new settlement is left to it.
    sending: bool,
}

impl<W> Default for Book<W> {
    fn default() -> Self {
        Self {
            entries: BTreeMap::new(),
            settled: 0,
            sending: false,
        }
    }
}

impl<W> Book<W> {
    /// A delivery arrived (tags grow on a channel).
    pub(crate) fn delivered(&mut self, tag: u64) {
        self.entries.insert(tag, Entry::Running);
    }

    /// Its handler settled delivery `tag`. Returns `true` when the caller must now send the
    /// frames (no sender was at work); `false` when the sender at work will. A tag the book
    /// does not know as running is settled on its own (it cannot be covered by a `multiple`
    /// ack safely, and is not expected: every delivery is registered).
    pub(crate) fn settle(&mut self, tag: u64, how: Settle, waiter: Option<W>) -> bool {
        let entry = Entry::Settled {
            how,
            waiters: waiter.into_iter().collect(),
        };
        self.entries.insert(tag, entry);
        self.settled += 1;
        let lead = !self.sending;
        self.sending = true;
        lead
    }

    /// The frames to send now, in order, each with the waiters it settles; empty (and the
    /// book no longer sending) when nothing is left.
    pub(crate) fn take_frames(&mut self) -> Vec<(Frame, Vec<W>)> {
        let mut frames = Vec::new();
        let mut acks: Vec<W> = Vec::new();
        let mut top_ack = None;
        // Acks in the leading run (a waiter list may be empty: not everyone waits).
        let mut covered = 0usize;
        while let Some(first) = self.entries.first_entry() {
            if matches!(first.get(), Entry::Running) {
                break;
            }
            let (tag, entry) = first.remove_entry();
            let Entry::Settled { how, waiters } = entry else {
                continue;
            };
            self.settled = self.settled.saturating_sub(1);
            match how {
                Settle::Ack => {
                    covered += 1;
                    top_ack = Some(tag);
                    acks.extend(waiters);
                }
                Settle::Reject { requeue } => {
                    frames.push((Frame::Reject { tag, requeue }, waiters))
                }
            }
        }
        if let Some(tag) = top_ack {
            let multiple = covered > 1;
            frames.push((Frame::Ack { tag, multiple }, acks));
        }
        if self.settled > 0 {
            let settled: Vec<u64> = self
                .entries
                .iter()
                .filter(|(_, e)| matches!(e, Entry::Settled { .. }))
                .map(|(t, _)| *t)
                .collect();
            for tag in settled {
                if let Some(Entry::Settled { how, waiters }) = self.entries.remove(&tag) {
                    let frame = match how {
                        Settle::Ack => Frame::Ack {
                            tag,
                            multiple: false,
                        },
                        Settle::Reject { requeue } => Frame::Reject { tag, requeue },
                    };
                    frames.push((frame, waiters));
                }
            }
            self.settled = 0;
        }
        if frames.is_empty() {
            self.sending = false;
        }
        frames
    }

    /// Deliveries in the book (running or waiting for their frame).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }
}

/// What a settlement's waiter learns: `Ok(true)` sent, `Ok(false)` not sent because the
/// channel closed (the broker redelivers), `Err` any other failure (what was being done, and
/// lapin's error, which is `Clone` where warren's is not).
type Outcome = std::result::Result<bool, (&'static str, lapin::Error)>;
type Waiter = oneshot::Sender<Outcome>;

/// Rounds of frames a handler sends for its channel before a task of its own takes over.
const HANDLER_ROUNDS: usize = 4;

/// The [`Book`] of one channel and the channel its frames go on.
pub(crate) struct AckBook {
    book: Mutex<Book<Waiter>>,
    channel: Arc<Channel>,
}

impl AckBook {
    pub(crate) fn new(channel: Arc<Channel>) -> Arc<Self> {
        Arc::new(Self {
            book: Mutex::new(Book::default()),
            channel,
        })
    }

    /// The channel the book's deliveries came on.
    pub(crate) fn channel(&self) -> &Channel {
        &self.channel
    }

    fn lock(&self) -> MutexGuard<'_, Book<Waiter>> {
        // The book holds no invariant a panic elsewhere could break half-way.
        self.book.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a delivery.
    pub(crate) fn delivered(&self, tag: u64) {
        self.lock().delivered(tag);
    }

    /// Settles delivery `tag`. When no sender is at work, this call becomes the channel's
    /// sender and returns once the frame carrying it was sent. Otherwise the sender at work
    /// sends it: with `wait` this call returns once it did; without, at once with `Ok(true)`
    /// (the settlement is queued on a live channel: waiting would cost a task wake-up per
    /// delivery, and if the channel dies first the broker redelivers the message, as it
    /// does for a frame lost in the socket).
    pub(crate) async fn settle(
        self: &Arc<Self>,
        tag: u64,
        how: Settle,
        wait: bool,
    ) -> Result<bool> {
        let (tx, rx) = oneshot::channel();
        let lead = {
            let mut book = self.lock();
            let leads = !book.sending;
            book.settle(tag, how, (leads || wait).then_some(tx))
        };
        if lead {
            self.send_all(true).await;
        } else if !wait {
            return Ok(true);
        }
        // A dropped waiter means its frame was never sent and its channel is gone.
        rx.await
            .unwrap_or(Ok(false))
            .map_err(|(doing, e)| classify(doing, e))
    }

    /// Sends frames until the book has none left. A handler that became the sender hands
    /// the rest to a task of its own after [`HANDLER_ROUNDS`] rounds, so that a busy channel
    /// does not keep one handler (and its concurrency permit) sending for the others.
    async fn send_all(self: &Arc<Self>, handler: bool) {
        let mut guard = Sending {
            book: self,
            done: false,
        };
        let mut rounds = 0;
        loop {
            if handler && rounds == HANDLER_ROUNDS && self.spawn_sender() {
                guard.done = true;
                return;
            }
            rounds += 1;
            let frames = self.lock().take_frames();
            if frames.is_empty() {
                guard.done = true;
                return;
            }
            for (frame, waiters) in frames {
                let outcome = self.send_now(frame);
                for w in waiters {
                    let _ = w.send(outcome.clone());
                }
            }
            // Lets the handlers that are ready settle: their frames join the next round.
            tokio::task::yield_now().await;
        }
    }

    /// Starts a task that sends the book's frames (the book stays `sending`); `false` outside
    /// a tokio runtime.
    fn spawn_sender(self: &Arc<Self>) -> bool {
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return false;
        };
        let again = self.clone();
        let task: Pin<Box<dyn Future<Output = ()> + Send>> =
            Box::pin(async move { again.send_all(false).await });
        rt.spawn(task);
        true
    }

    /// Queues `frame` on the channel without waiting for lapin to write it: lapin's
    /// `basic_ack`/`basic_reject` queue their frame on their first poll (frames leave in
    /// queue order) and then only wait for the write. Waiting for each write in turn would
    /// cost a round trip to lapin's I/O thread per frame and leave the frames of a round
    /// one by one; a frame that is not written because the connection dies is as if the
    /// channel had closed (the broker redelivers).
    fn send_now(&self, frame: Frame) -> Outcome {
        let (sent, doing) = match frame {
            Frame::Ack { tag, multiple } => (
                self.channel
                    .basic_ack(tag, BasicAckOptions { multiple })
                    .now_or_never(),
                "acking a delivery",
            ),
            Frame::Reject { tag, requeue } => (
                self.channel
                    .basic_reject(tag, BasicRejectOptions { requeue })
                    .now_or_never(),
                "rejecting a delivery",
            ),
        };
        match sent {
            None | Some(Ok(())) => Ok(true),
            // The channel closed meanwhile: the broker puts the messages back.
            Some(Err(_)) if !self.channel.status().connected() => Ok(false),
            Some(Err(e)) => Err((doing, e)),
        }
    }
}

/// Frees the book if its sender is cancelled (dropped at its only await, between rounds,
/// where every frame it took is queued already) and, if settlements are left, starts a task
/// that sends them, so that no reject is ever left to be covered by a later `multiple` ack.
struct Sending<'a> {
    book: &'a Arc<AckBook>,
    done: bool,
}

impl Drop for Sending<'_> {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        let mut book = self.book.lock();
        if book.settled == 0 {
            book.sending = false;
            return;
        }
        drop(book);
        if !self.book.spawn_sender() {
            self.book.lock().sending = false;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tags(frames: &[(Frame, Vec<u32>)]) -> Vec<Frame> {
        frames.iter().map(|(f, _)| *f).collect()
    }

    fn single(tag: u64) -> Frame {
        Frame::Ack {
            tag,
            multiple: false,
        }
    }

    fn up_to(tag: u64) -> Frame {
        Frame::Ack {
            tag,
            multiple: true,
        }
    }

    fn reject(tag: u64, requeue: bool) -> Frame {
        Frame::Reject { tag, requeue }
    }

    const ACK: Settle = Settle::Ack;
    const REQUEUE: Settle = Settle::Reject { requeue: true };
    const DEAD: Settle = Settle::Reject { requeue: false };

    #[test]
    fn an_idle_channel_acks_each_delivery_alone() {
        let mut b = Book::default();
        b.delivered(1);
        assert!(b.settle(1, ACK, Some(1)));
        let f = b.take_frames();
        assert_eq!(tags(&f), [single(1)]);
        assert_eq!(f[0].1, [1]);
        assert!(b.take_frames().is_empty());
        assert_eq!(b.len(), 0);
        // The next settlement leads again.
        b.delivered(2);
        assert!(b.settle(2, ACK, Some(2)));
    }

    #[test]
    fn settlements_during_a_send_leave_as_one_multiple_ack() {
        let mut b = Book::default();
        for t in 1..=5 {
            b.delivered(t);
        }
        assert!(b.settle(1, ACK, Some(1)));
        let first = b.take_frames();
        assert_eq!(first.len(), 1);
        // While frame 1 is being sent, 2, 3 and 4 settle; 5 still runs.
        assert!(!b.settle(3, ACK, Some(3)));
        assert!(!b.settle(2, ACK, Some(2)));
        assert!(!b.settle(4, ACK, Some(4)));
        let f = b.take_frames();
        assert_eq!(tags(&f), [up_to(4)]);
        assert_eq!(f[0].1, [2, 3, 4]);
        assert!(b.take_frames().is_empty());
        assert_eq!(b.len(), 1, "5 still runs");
    }

    #[test]
    fn a_multiple_ack_never_covers_a_running_delivery() {
        let mut b = Book::default();
        for t in 1..=6 {
            b.delivered(t);
        }
        assert!(b.settle(1, ACK, Some(1)));
        let _ = b.take_frames();
        // 2 runs on; 3, 4 and 6 settle behind it: each alone, at once.
        b.settle(3, ACK, Some(3));
        b.settle(4, DEAD, Some(4));
        b.settle(6, ACK, Some(6));
        let f = b.take_frames();
        assert_eq!(tags(&f), [single(3), reject(4, false), single(6),]);
        assert!(b.take_frames().is_empty());
        // 2 ends: alone again (3, 4 and 6 were sent).
        assert!(b.settle(2, ACK, Some(2)));
        assert_eq!(tags(&b.take_frames()), [single(2)]);
        assert_eq!(b.len(), 1, "5 still runs");
    }

    #[test]
    fn rejects_in_the_leading_run_go_before_its_multiple_ack() {
        let mut b = Book::default();
        for t in 1..=5 {
            b.delivered(t);
        }
        b.settle(1, ACK, Some(1));
        let _ = b.take_frames();
        b.settle(2, REQUEUE, Some(2));
        b.settle(3, ACK, Some(3));
        b.settle(5, DEAD, Some(5));
        b.settle(4, ACK, Some(4));
        let f = b.take_frames();
        assert_eq!(tags(&f), [reject(2, true), reject(5, false), up_to(4),]);
        assert_eq!(f[2].1, [3, 4]);
    }
}
