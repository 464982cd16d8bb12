//! Short-lived AMQP channels for topology, passive declares and no-ack gets (DESIGN.md §1):
//! RabbitMQ closes a channel on every refusal, so such work never runs on a channel that holds
//! consumers or unconfirmed publishes. A channel that survived its operation goes back to the
//! pool; one the broker closed is dropped and replaced on demand.

use std::sync::Arc;

use parking_lot::Mutex;

use super::convert::About;
use crate::engine::EngineError;

/// Idle channels kept open; beyond this a returned channel is closed.
const IDLE: usize = 16;

pub(super) struct Pool {
    link: Arc<super::link::Link>,
    idle: Arc<Mutex<Vec<lapin::Channel>>>,
}

impl Pool {
    pub(super) fn new(link: Arc<super::link::Link>) -> Pool {
        Pool {
            link,
            idle: Arc::default(),
        }
    }

    pub(super) async fn take(&self) -> Result<Pooled, EngineError> {
        let idle = {
            let mut idle = self.idle.lock();
            loop {
                match idle.pop() {
                    Some(ch) if ch.status().connected() => break Some(ch),
                    Some(_) => continue,
                    None => break None,
                }
            }
        };
        let channel = match idle {
            Some(ch) => ch,
            None => self
                .link
                .current()?
                .consuming_channel()
                .await
                .map_err(|e| super::convert::engine_error(&e, About::Other))?,
        };
        Ok(Pooled {
            channel: Some(channel),
            idle: self.idle.clone(),
        })
    }

    pub(super) fn clear(&self) {
        self.idle.lock().clear();
    }
}

/// A channel on loan: back to the pool on drop if the broker left it open.
pub(super) struct Pooled {
    channel: Option<lapin::Channel>,
    idle: Arc<Mutex<Vec<lapin::Channel>>>,
}

impl std::ops::Deref for Pooled {
    type Target = lapin::Channel;
    fn deref(&self) -> &lapin::Channel {
        self.channel.as_ref().expect("present until drop")
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some(channel) = self.channel.take() else {
            return;
        };
        if !channel.status().connected() {
            return;
        }
        let mut idle = self.idle.lock();
        if idle.len() < IDLE {
            idle.push(channel);
        } else if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move { channel.close(200, "OK".into()).await });
        }
    }
}
