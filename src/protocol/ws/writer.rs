//! A `/ws` connection's write half: what its send queue holds goes out in batches, one flush
//! each, under `limits.write_timeout`; auto-acks on named queues follow their frame's write;
//! the close frame goes last.
//!
//! It runs inside the connection's task, as a future that exists only while a batch is being
//! written: an idle connection holds the socket's sink and nothing else for writing (a writer
//! task of its own cost every idle browser 638 bytes of heap: its cell, its future, its
//! waker and join state; docs/bench.md). The session loop polls the batch beside its reads,
//! so requests, acks and pings are still read while a slow client is being written to.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::SinkExt;
use futures_util::stream::SplitSink;

use super::frames;
use crate::engine::Channel;
use crate::metrics;
use crate::protocol::outbound::{Next, SendQueue};

const PROTOCOL: &str = "ws";
/// Frames written before one flush at most: a burst costs one write, and acks after writes
/// (`ack: "window"` subscriptions) are not held back behind a long one.
pub const WRITE_BATCH: usize = 64;

type Sink = SplitSink<WebSocket, Message>;
type Batch = Pin<Box<dyn Future<Output = Result<Sink, WriterEnd>> + Send>>;

/// Why writing stopped.
pub enum WriterEnd {
    /// The close frame is written (or the client could not be told).
    Done,
    /// A batch took longer than `limits.write_timeout`.
    SlowConsumer,
    /// The socket failed.
    Gone,
}

/// The write half: idle with the socket's sink, writing a batch (which holds the sink), or
/// ended.
pub enum Writer {
    Idle(Sink),
    Writing(Batch),
    Ended,
}

impl Writer {
    pub fn is_idle(&self) -> bool {
        matches!(self, Writer::Idle(_))
    }

    pub fn is_writing(&self) -> bool {
        matches!(self, Writer::Writing(_))
    }

    /// Starts writing `first` and what is queued behind it, when idle.
    pub fn start(
        &mut self,
        first: Next,
        out: &Arc<SendQueue>,
        channel: Option<&Arc<dyn Channel>>,
        write_timeout: Duration,
    ) {
        if let Writer::Idle(sink) = std::mem::replace(self, Writer::Ended) {
            let (out, channel) = (out.clone(), channel.cloned());
            *self = Writer::Writing(Box::pin(batch(sink, first, out, channel, write_timeout)));
        }
    }

    /// The batch under way, to be polled; `None` when there is none.
    pub fn batch(&mut self) -> Option<&mut Batch> {
        match self {
            Writer::Writing(batch) => Some(batch),
            _ => None,
        }
    }

    /// Takes a finished batch's result: idle again with the sink, or how writing ended.
    pub fn wrote(&mut self, result: Result<Sink, WriterEnd>) -> Option<WriterEnd> {
        match result {
            Ok(sink) => {
                *self = Writer::Idle(sink);
                None
            }
            Err(end) => {
                *self = Writer::Ended;
                Some(end)
            }
        }
    }

    /// Writes what is queued until the queue closes ([`SendQueue::close`]), the close frame
    /// last. Unbounded: callers bound it.
    pub async fn finish(
        self,
        out: &Arc<SendQueue>,
        channel: Option<&Arc<dyn Channel>>,
        write_timeout: Duration,
    ) -> WriterEnd {
        let mut sink = match self {
            Writer::Idle(sink) => sink,
            Writer::Writing(batch) => match batch.await {
                Ok(sink) => sink,
                Err(end) => return end,
            },
            Writer::Ended => return WriterEnd::Done,
        };
        loop {
            let first = out.next().await;
            match batch(sink, first, out.clone(), channel.cloned(), write_timeout).await {
                Ok(s) => sink = s,
                Err(end) => return end,
            }
        }
    }
}

/// Writes `first` and what is queued behind it (up to a batch) in one flush; the sink back,
/// or how writing ended (after the close frame, when the queue had closed).
async fn batch(
    mut sink: Sink,
    first: Next,
    out: Arc<SendQueue>,
    channel: Option<Arc<dyn Channel>>,
    write_timeout: Duration,
) -> Result<Sink, WriterEnd> {
    let mut next = Some(first);
    let (mut texts, mut acks) = (Vec::new(), Vec::new());
    let mut messages = 0;
    let mut close = None;
    while let Some(item) = next.take() {
        match item {
            Next::Lagged(lagged) => {
                texts.extend(lagged.iter().map(|(s, n)| frames::lagged(s, *n)));
            }
            Next::Frame(f) => {
                texts.push(f.text);
                messages += u64::from(f.message);
                acks.extend(f.ack_after_write);
            }
            Next::Closed(c) => {
                close = Some(c);
                break;
            }
        }
        if texts.len() < WRITE_BATCH {
            next = out.try_next();
        }
    }
    let write = async {
        for text in texts {
            sink.feed(Message::Text(text.into())).await?;
        }
        sink.flush().await
    };
    match tokio::time::timeout(write_timeout, write).await {
        Ok(Ok(())) => {}
        Ok(Err(_)) => return Err(WriterEnd::Gone),
        Err(_) => return Err(WriterEnd::SlowConsumer),
    }
    if messages > 0 {
        metrics::messages_out(PROTOCOL, messages);
    }
    if let Some(ch) = &channel {
        for tag in acks {
            let _ = ch.ack(tag, false).await;
        }
    }
    let Some(close) = close else {
        return Ok(sink);
    };
    if let Some((code, reason)) = close {
        let frame = Message::Close(Some(CloseFrame {
            code,
            reason: reason.into(),
        }));
        let _ = tokio::time::timeout(write_timeout, sink.send(frame)).await;
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.close()).await;
    Err(WriterEnd::Done)
}
