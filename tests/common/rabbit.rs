//! The machine's RabbitMQ as the upstream broker of tests: a vhost of its own per test
//! (created and deleted through the management API), so tests running in parallel never share
//! a name. When RabbitMQ or its management plugin is not reachable the test fails saying so;
//! it never skips.

use std::time::Duration;

/// AMQP endpoint (without vhost) and management API of the broker under test.
pub fn amqp_base() -> String {
    std::env::var("GATEWAY_TEST_RABBITMQ_AMQP")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672".into())
}

pub fn management_base() -> String {
    std::env::var("GATEWAY_TEST_RABBITMQ_HTTP").unwrap_or_else(|_| "http://127.0.0.1:15672".into())
}

const USER: &str = "guest";
const PASSWORD: &str = "guest";

/// A vhost deleted (with everything in it) when dropped, also when the test panics.
pub struct Vhost {
    pub name: String,
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("HTTP client")
}

impl Vhost {
    pub async fn create() -> Vhost {
        let name = super::unique("vhost");
        let http = client();
        let base = management_base();
        let put = |url: String, body: serde_json::Value| {
            http.put(url)
                .basic_auth(USER, Some(PASSWORD))
                .json(&body)
                .send()
        };
        let created = put(format!("{base}/api/vhosts/{name}"), serde_json::json!({}))
            .await
            .unwrap_or_else(|e| {
                panic!(
                    "RabbitMQ's management API at {base} is not reachable ({e}): upstream tests \
                     need RabbitMQ on 127.0.0.1:5672 with rabbitmq_management enabled \
                     (`rabbitmq-server -detached`, `rabbitmq-plugins enable rabbitmq_management`; \
                     .ci/run does both)"
                )
            });
        assert!(
            created.status().is_success(),
            "creating vhost {name}: {}",
            created.status()
        );
        let permissions = serde_json::json!({"configure": ".*", "write": ".*", "read": ".*"});
        let granted = put(format!("{base}/api/permissions/{name}/{USER}"), permissions)
            .await
            .expect("set permissions");
        assert!(granted.status().is_success(), "permissions on {name}");
        Vhost { name }
    }

    pub fn amqp_url(&self) -> String {
        format!("{}/{}", amqp_base(), self.name)
    }

    pub fn management_url(&self) -> String {
        management_base()
    }

    /// Names of the vhost's queues, as the management API lists them.
    pub async fn queue_names(&self) -> Vec<String> {
        let url = format!("{}/api/queues/{}", management_base(), self.name);
        let listed: serde_json::Value = client()
            .get(url)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("the management API answers")
            .json()
            .await
            .expect("a JSON list of queues");
        listed
            .as_array()
            .map(|qs| {
                qs.iter()
                    .filter_map(|q| q["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Deletes a queue behind the gateway's back, as a broker restart loses a transient one.
    pub async fn delete_queue(&self, queue: &str) {
        let url = format!("{}/api/queues/{}/{queue}", management_base(), self.name);
        let deleted = client()
            .delete(url)
            .basic_auth(USER, Some(PASSWORD))
            .send()
            .await
            .expect("the management API answers");
        assert!(
            deleted.status().is_success(),
            "delete {queue}: {}",
            deleted.status()
        );
    }
}

impl Drop for Vhost {
    fn drop(&mut self) {
        let url = format!("{}/api/vhosts/{}", management_base(), self.name);
        // Drop may run inside a runtime: delete from a thread with a runtime of its own.
        let deleted = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                client()
                    .delete(url)
                    .basic_auth(USER, Some(PASSWORD))
                    .send()
                    .await
                    .ok()
            })
        })
        .join();
        if !matches!(deleted, Ok(Some(ref r)) if r.status().is_success()) {
            eprintln!("vhost {} not deleted", self.name);
        }
    }
}
