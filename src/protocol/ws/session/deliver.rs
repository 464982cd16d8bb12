//! Deliveries as `message` frames, by subscription mode, and the client's `ack`/`nack`.

use super::*;

impl WsSession {
    pub(super) async fn settle(
        &mut self,
        id: &Value,
        sub: &str,
        tag: u64,
        multiple: bool,
        nack: Option<bool>,
    ) -> Result<Outcome, RequestError> {
        let Some(s) = self.subs.get_mut(sub) else {
            return Err(RequestError::new(
                Code::PreconditionFailed,
                format!("no subscription '{sub}'"),
            ));
        };
        if s.mode != Mode::Manual {
            return Err(RequestError::new(
                Code::PreconditionFailed,
                format!("subscription '{sub}' acknowledges automatically"),
            ));
        }
        let tags: Vec<u64> = if multiple {
            s.unacked.range(..=tag).map(|(t, _)| *t).collect()
        } else if s.unacked.contains_key(&tag) {
            vec![tag]
        } else {
            Vec::new()
        };
        if tags.is_empty() {
            return Err(RequestError::new(
                Code::PreconditionFailed,
                format!("unknown delivery tag {tag} on '{sub}'"),
            ));
        }
        let engine_tags: Vec<u64> = tags
            .iter()
            .filter_map(|t| s.unacked.remove(t))
            .map(|(e, _)| e)
            .collect();
        for engine_tag in engine_tags {
            match nack {
                None => self.channel.ack(engine_tag, false).await?,
                Some(requeue) => self.channel.nack(engine_tag, false, requeue).await?,
            }
        }
        if !id.is_null() {
            self.reply(frames::ok(id));
        }
        Ok(Outcome::Continue)
    }

    /// A consumer produced something for `sub`.
    pub async fn event(&mut self, sub: Arc<str>, event: ConsumerEvent) -> Outcome {
        let d = match event {
            ConsumerEvent::Delivery(d) => d,
            ConsumerEvent::Ended(reason) => {
                if self.subs.contains_key(&sub) {
                    let why = match reason {
                        Some(CancelReason::QueueDeleted) => "deleted",
                        _ => "deleted",
                    };
                    self.cancel(&sub, why).await;
                }
                return Outcome::Continue;
            }
        };
        let Some(s) = self.subs.get_mut(&sub) else {
            return Outcome::Continue;
        };
        let tag = s.next_tag;
        s.next_tag += 1;
        let text = match message_json(&sub, tag, &d) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode a delivery");
                return Outcome::Continue;
            }
        };
        match s.mode {
            Mode::Manual => {
                s.unacked.insert(tag, (d.delivery_tag, Instant::now()));
                self.out.push(Frame {
                    text,
                    droppable: None,
                    ack_after_write: None,
                    message: true,
                });
            }
            Mode::Window => {
                self.out.push(Frame {
                    text,
                    droppable: None,
                    ack_after_write: Some(d.delivery_tag),
                    message: true,
                });
            }
            Mode::NoAck(overflow) => {
                if let Err(SlowConsumer) = self.out.push_droppable(sub, text, overflow) {
                    metrics::refusal(PROTOCOL, "slow_consumer");
                    return Outcome::Close(CloseReason::SlowConsumer);
                }
            }
        }
        Outcome::Continue
    }
}
