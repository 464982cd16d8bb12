//! A Server-Sent Events reader over reqwest: events parsed as the EventSource spec says
//! (fields `id`, `event`, `data`, comments skipped), every wait bounded.

use std::time::Duration;

use serde_json::Value;

use super::{TestGateway, WAIT};

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Event {
    pub id: Option<String>,
    pub event: String,
    pub data: String,
}

impl Event {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data is not JSON ({e}): {}", self.data))
    }
}

pub struct Sse {
    resp: reqwest::Response,
    buf: String,
    /// The `id` of the last event that had one, as an EventSource keeps it.
    pub last_id: Option<String>,
}

/// A request for `/v1/sse?{query}` with `bearer` (when given) and `Last-Event-ID` (when given),
/// on a client without a total timeout (the stream outlives any).
pub fn request(
    gw: &TestGateway,
    query: &str,
    bearer: Option<&str>,
    last_id: Option<&str>,
) -> reqwest::RequestBuilder {
    let client = reqwest::Client::builder()
        .connect_timeout(WAIT)
        .build()
        .unwrap();
    let mut req = client
        .get(gw.url(&format!("/v1/sse?{query}")))
        .header("accept", "text/event-stream");
    if let Some(t) = bearer {
        req = req.bearer_auth(t);
    }
    if let Some(id) = last_id {
        req = req.header("last-event-id", id);
    }
    req
}

impl Sse {
    /// Opens a stream and waits for its `subscribed` event; returns it with that event's data.
    pub async fn open(
        gw: &TestGateway,
        query: &str,
        bearer: Option<&str>,
        last_id: Option<&str>,
    ) -> (Sse, Value) {
        let resp = tokio::time::timeout(WAIT, request(gw, query, bearer, last_id).send())
            .await
            .expect("answered in time")
            .expect("stream request sent");
        assert_eq!(
            resp.status(),
            200,
            "stream refused: {:?}",
            resp.text().await
        );
        assert_eq!(
            resp.headers()["content-type"],
            "text/event-stream",
            "an event stream"
        );
        let mut sse = Sse {
            resp,
            buf: String::new(),
            last_id: last_id.map(str::to_owned),
        };
        let first = sse.next().await.expect("a subscribed event");
        assert_eq!(first.event, "subscribed", "{first:?}");
        (sse, first.json())
    }

    /// The next event, or `None` when the stream ended.
    pub async fn next(&mut self) -> Option<Event> {
        self.next_within(WAIT).await
    }

    pub async fn next_within(&mut self, wait: Duration) -> Option<Event> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(event) = self.parse() {
                return Some(event);
            }
            let chunk = tokio::time::timeout_at(deadline, self.resp.chunk())
                .await
                .unwrap_or_else(|_| panic!("no event within {wait:?} (buffered: {:?})", self.buf))
                .expect("stream readable");
            match chunk {
                Some(bytes) => self.buf.push_str(std::str::from_utf8(&bytes).unwrap()),
                None => return None,
            }
        }
    }

    /// The next `message` event (others but `lagged` are refused).
    pub async fn message(&mut self) -> (String, Value) {
        let e = self.next().await.expect("a message, not the end");
        assert_eq!(e.event, "message", "{e:?}");
        (e.id.clone().expect("messages have ids"), e.json())
    }

    /// Takes one complete event off the buffer (skipping comment-only blocks).
    fn parse(&mut self) -> Option<Event> {
        loop {
            let end = self.buf.find("\n\n")?;
            let block: String = self.buf.drain(..end + 2).collect();
            let mut event = Event {
                event: "message".into(),
                ..Event::default()
            };
            let mut data = Vec::new();
            for line in block.lines() {
                if line.starts_with(':') || line.is_empty() {
                    continue;
                }
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "id" => event.id = Some(value.to_owned()),
                    "event" => event.event = value.to_owned(),
                    "data" => data.push(value.to_owned()),
                    _ => {}
                }
            }
            if let Some(id) = &event.id {
                self.last_id = Some(id.clone());
            }
            if data.is_empty() {
                continue;
            }
            event.data = data.join("\n");
            return Some(event);
        }
    }
}
