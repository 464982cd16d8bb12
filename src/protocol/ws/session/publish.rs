//! The `publish` op: the frame checked and turned into an AMQP message, then the publish gate.

use super::*;

impl WsSession {
    pub(super) async fn publish(
        &mut self,
        id: &Value,
        p: frames::Publish,
    ) -> Result<Outcome, RequestError> {
        let exchange = if p.exchange.is_empty() {
            DEFAULT_EXCHANGE_ALIAS.to_owned()
        } else {
            p.exchange.clone()
        };
        crate::engine::names::validate_name("exchange", &exchange)?;
        validate_key(&p.routing_key)?;
        let (body, is_json) = json::body_in(&p.body, p.encoding)?;
        let max = self.ctx.config.limits.max_message_bytes.as_u64() as usize;
        if body.len() > max {
            return Err(RequestError::new(
                Code::TooLarge,
                format!(
                    "the message body is {} bytes, the limit is {max}",
                    body.len()
                ),
            ));
        }
        let properties = json::properties_in(p.properties, is_json)?;
        let cleared = self.ctx.clear_publish(
            PROTOCOL,
            &self.conn,
            &self.principal,
            &exchange,
            &p.routing_key,
            body.len(),
        )?;
        let options = PublishOptions {
            mandatory: p.mandatory,
        };
        let mut publishing =
            cleared.publish(&*self.channel, Message::with(properties, body), options);
        Stall::begin(
            &mut self.stall,
            publishing.take_pace(),
            self.ctx.config.limits.pace_max_wait,
        );
        let outcome = publishing.await.map_err(|e| {
            let mut r = RequestError::from(e);
            if matches!(r.code, Code::Overloaded | Code::Unavailable) {
                r.retry_after_ms = Some(1000);
            }
            r
        })?;
        if p.mandatory && !outcome.routed {
            return Err(RequestError::new(
                Code::Unroutable,
                "no queue is bound to receive this message",
            ));
        }
        if !id.is_null() {
            self.reply(frames::published(id, outcome.routed));
        }
        Ok(Outcome::Continue)
    }
}
