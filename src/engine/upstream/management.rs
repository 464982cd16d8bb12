//! What AMQP 0-9-1 cannot tell, asked of RabbitMQ's management HTTP API: listings of
//! exchanges, queues and bindings, and a queue's or exchange's flags and arguments
//! (DESIGN.md §5). Its figures are the broker's sampled statistics (refreshed every few
//! seconds), so exact counts still come from a passive declare.

use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
use reqwest::Url;
use serde::Deserialize;
use serde_json::Value;

use crate::engine::table::table_from_json;
use crate::engine::{
    BindingInfo, EngineError, ExchangeInfo, ExchangeSpec, FieldTable, QueueInfo, QueueSpec,
};

pub(super) struct Management {
    client: reqwest::Client,
    base: Url,
    vhost: String,
    user: String,
    password: String,
}

#[derive(Deserialize)]
struct QueueJson {
    name: String,
    #[serde(default)]
    durable: bool,
    #[serde(default)]
    exclusive: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    arguments: Value,
    #[serde(default)]
    messages_ready: u64,
    #[serde(default)]
    messages_unacknowledged: u64,
    #[serde(default)]
    consumers: u32,
    /// Absent until the queue has seen traffic (and when statistics are disabled).
    #[serde(default)]
    message_stats: Option<MessageStats>,
}

/// RabbitMQ's counters for a queue since it was declared.
#[derive(Deserialize)]
struct MessageStats {
    #[serde(default)]
    publish: u64,
    #[serde(default)]
    deliver_get: u64,
}

#[derive(Deserialize)]
struct ExchangeJson {
    name: String,
    #[serde(rename = "type")]
    kind: String,
    #[serde(default)]
    durable: bool,
    #[serde(default)]
    auto_delete: bool,
    #[serde(default)]
    internal: bool,
    #[serde(default)]
    arguments: Value,
}

#[derive(Deserialize)]
struct BindingJson {
    source: String,
    destination: String,
    destination_type: String,
    routing_key: String,
    #[serde(default)]
    arguments: Value,
}

fn arguments(v: &Value) -> FieldTable {
    table_from_json(v).unwrap_or_default()
}

fn segment(s: &str) -> String {
    utf8_percent_encode(s, NON_ALPHANUMERIC).to_string()
}

impl Management {
    /// `url` may carry credentials; otherwise the AMQP URL's are used.
    pub(super) fn new(
        url: &str,
        vhost: &str,
        amqp: &lapin::uri::AMQPUri,
    ) -> Result<Self, EngineError> {
        let mut base = Url::parse(url).map_err(|e| {
            EngineError::InvalidArgument(format!("engine.upstream.management_url: {e}"))
        })?;
        let (user, password) = if base.username().is_empty() {
            (
                amqp.authority.userinfo.username.clone(),
                amqp.authority.userinfo.password.clone(),
            )
        } else {
            let decode = |s: &str| {
                percent_encoding::percent_decode_str(s)
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (
                decode(base.username()),
                decode(base.password().unwrap_or_default()),
            )
        };
        let _ = base.set_username("");
        let _ = base.set_password(None);
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .map_err(|e| EngineError::Internal(format!("HTTP client: {e}")))?;
        Ok(Management {
            client,
            base,
            vhost: vhost.to_owned(),
            user,
            password,
        })
    }

    async fn get<T: serde::de::DeserializeOwned>(
        &self,
        path: &str,
    ) -> Result<Option<T>, EngineError> {
        let url = self
            .base
            .join(path)
            .map_err(|e| EngineError::Internal(format!("management URL: {e}")))?;
        let response = self
            .client
            .get(url)
            .basic_auth(&self.user, Some(&self.password))
            .send()
            .await
            .map_err(|e| EngineError::Unavailable(format!("management API: {e}")))?;
        if response.status() == reqwest::StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if !response.status().is_success() {
            return Err(EngineError::Unavailable(format!(
                "management API answered {}",
                response.status()
            )));
        }
        response
            .json()
            .await
            .map(Some)
            .map_err(|e| EngineError::Unavailable(format!("management API: {e}")))
    }

    pub(super) async fn queues(&self) -> Result<Vec<QueueInfo>, EngineError> {
        let path = format!("api/queues/{}", segment(&self.vhost));
        let list: Vec<QueueJson> = self.get(&path).await?.unwrap_or_default();
        let mut out: Vec<QueueInfo> = list.into_iter().map(QueueInfo::from).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub(super) async fn queue(&self, name: &str) -> Result<Option<QueueInfo>, EngineError> {
        let path = format!("api/queues/{}/{}", segment(&self.vhost), segment(name));
        Ok(self.get::<QueueJson>(&path).await?.map(QueueInfo::from))
    }

    pub(super) async fn exchanges(&self) -> Result<Vec<ExchangeInfo>, EngineError> {
        let path = format!("api/exchanges/{}", segment(&self.vhost));
        let list: Vec<ExchangeJson> = self.get(&path).await?.unwrap_or_default();
        let mut out: Vec<ExchangeInfo> = list.into_iter().filter_map(exchange_info).collect();
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    pub(super) async fn exchange(&self, name: &str) -> Result<Option<ExchangeInfo>, EngineError> {
        let shown = if name.is_empty() { "amq.default" } else { name };
        let path = format!("api/exchanges/{}/{}", segment(&self.vhost), segment(shown));
        Ok(self
            .get::<ExchangeJson>(&path)
            .await?
            .and_then(exchange_info))
    }

    pub(super) async fn bindings(
        &self,
        queue: &str,
    ) -> Result<Option<Vec<BindingInfo>>, EngineError> {
        let path = format!(
            "api/queues/{}/{}/bindings",
            segment(&self.vhost),
            segment(queue)
        );
        let list: Option<Vec<BindingJson>> = self.get(&path).await?;
        Ok(list.map(|list| {
            list.into_iter()
                .filter(|b| b.destination_type == "queue")
                .map(|b| BindingInfo {
                    exchange: b.source,
                    queue: b.destination,
                    routing_key: b.routing_key,
                    arguments: arguments(&b.arguments),
                })
                .collect()
        }))
    }
}

impl From<QueueJson> for QueueInfo {
    fn from(q: QueueJson) -> Self {
        QueueInfo {
            spec: Some(QueueSpec {
                durable: q.durable,
                exclusive: q.exclusive,
                auto_delete: q.auto_delete,
                arguments: arguments(&q.arguments),
            }),
            name: q.name,
            messages: q.messages_ready,
            messages_unacknowledged: Some(q.messages_unacknowledged),
            consumers: q.consumers,
            totals: Some(q.message_stats.map_or_else(Default::default, |s| {
                crate::engine::QueueTotals {
                    published: s.publish,
                    delivered: s.deliver_get,
                }
            })),
        }
    }
}

/// Exchanges of a type the gateway does not model (plugins' `x-…` types) are left out.
fn exchange_info(e: ExchangeJson) -> Option<ExchangeInfo> {
    let kind = e.kind.parse().ok()?;
    Some(ExchangeInfo {
        name: e.name,
        spec: ExchangeSpec {
            kind,
            durable: e.durable,
            auto_delete: e.auto_delete,
            internal: e.internal,
            arguments: arguments(&e.arguments),
        },
    })
}
