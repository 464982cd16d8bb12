//! Dead-lettering (DESIGN.md §2, as RabbitMQ): `x-death` bookkeeping, the first/last death
//! headers, cycles cut by RabbitMQ's rule, and routing through the dead-letter exchange.

use super::*;

impl Broker {
    pub(super) fn dead_letter(&self, dead: DeadLetter, fx: &mut Effects) {
        let exchange = canonical_exchange(&dead.exchange);
        let routing_key: Arc<str> = match dead.routing_key {
            Some(key) => key.into(),
            None => dead.envelope.routing_key.clone(),
        };
        let mut message = dead.envelope.message.clone();
        // The dead letter's own properties: copied here once if the original shares them.
        let props = message.properties_mut();
        let original_expiration = props.expiration.take();
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs();
        let headers = &mut props.headers;
        let mut deaths = match headers.remove("x-death") {
            Some(FieldValue::Array(items)) => items,
            _ => Vec::new(),
        };
        let reason = FieldValue::Str(dead.reason.as_str().into());
        let queue_name = FieldValue::Str(dead.queue.clone());
        let existing = deaths.iter().position(|d| {
            matches!(d, FieldValue::Table(t) if t.get("queue") == Some(&queue_name) && t.get("reason") == Some(&reason))
        });
        let entry = match existing {
            Some(at) => {
                let mut d = deaths.remove(at);
                if let FieldValue::Table(t) = &mut d {
                    let count = t.get("count").and_then(FieldValue::as_i128).unwrap_or(0);
                    t.insert("count", FieldValue::I64(count as i64 + 1));
                    t.insert("time", FieldValue::Timestamp(now));
                }
                d
            }
            None => {
                let mut t = death_entry(
                    &dead.queue,
                    dead.reason,
                    &dead.envelope.exchange,
                    &dead.envelope.routing_key,
                    now,
                );
                if let Some(exp) = original_expiration {
                    t.insert("original-expiration", FieldValue::Str(exp.into()));
                }
                FieldValue::Table(Box::new(t))
            }
        };
        deaths.insert(0, entry);
        // (queue, reason) of each death, most recent first, for the cycle check below.
        let history: Vec<(String, bool)> = deaths
            .iter()
            .filter_map(|d| match d {
                FieldValue::Table(t) => Some((
                    t.get("queue")?.as_str()?.to_owned(),
                    t.get("reason").and_then(FieldValue::as_str) == Some("rejected"),
                )),
                _ => None,
            })
            .collect();
        headers.insert("x-death", FieldValue::Array(deaths));
        for (key, value) in [
            ("reason", dead.reason.as_str().to_owned()),
            ("queue", dead.queue.to_string()),
            ("exchange", dead.envelope.exchange.to_string()),
        ] {
            let first = format!("x-first-death-{key}");
            if !headers.contains_key(&first) {
                headers.insert(first, FieldValue::Str(value.as_str().into()));
            }
            headers.insert(format!("x-last-death-{key}"), FieldValue::Str(value.into()));
        }

        let mut targets = Targets::new();
        // A missing dead-letter exchange drops the message, as RabbitMQ does; an internal one
        // is a fine dead-letter exchange.
        let Ok((exchange_name, _)) = self.route(
            exchange,
            &routing_key,
            &message.properties.headers,
            true,
            &mut targets,
        ) else {
            return;
        };
        targets.retain(|q| !is_cycle(&history, &q.name));
        if !targets.is_empty() {
            // Its store write (if any) is not awaited: nobody confirms a dead letter.
            let _ = self.enqueue_all(&targets, exchange_name, routing_key, message, fx);
        }
    }
}

/// Whether dead-lettering to `queue` closes a cycle that no client took part in, as RabbitMQ
/// decides it (`rabbit_dead_letter`): look at the deaths since the message last died in
/// `queue` (most recent first, up to and including that one); if there is such a death and
/// none of those was a rejection, the message would loop on expiry or length alone and is
/// dropped. A rejection only counts inside the cycle: one before it does not keep an expiry
/// loop alive.
pub(super) fn is_cycle(history: &[(String, bool)], queue: &str) -> bool {
    match history.iter().position(|(q, _)| q == queue) {
        None => false,
        Some(at) => history[..=at].iter().all(|(_, rejected)| !rejected),
    }
}
