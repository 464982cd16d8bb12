//! `deploy/`: the compose file runs the gateway, RabbitMQ, Prometheus and Grafana with the
//! dashboard provisioned, and every metric the dashboard's PromQL names is one the gateway
//! exports on `/metrics` (embedded and upstream gateways in this process share one recorder,
//! so one scrape shows both engines' series).

mod common;

use std::collections::BTreeSet;

use common::rabbit::Vhost;
use common::under::on_vhost;
use common::{admin, start_gateway};
use serde_json::{Value, json};

const DEPLOY: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy");

fn yaml(path: &str) -> Value {
    let text = std::fs::read_to_string(format!("{DEPLOY}/{path}")).expect(path);
    serde_yaml_ng::from_str(&text).unwrap_or_else(|e| panic!("{path} is YAML: {e}"))
}

/// The metric names in a PromQL expression (`gateway_…`; a histogram's `_bucket` series is
/// exported under that name).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(i) = rest.find("gateway_") {
        let name: String = rest[i..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[i + name.len()..];
        names.push(name);
    }
    names
}

#[test]
fn the_compose_file_runs_the_four_services_with_the_dashboard_provisioned() {
    let compose = yaml("docker-compose.yml");
    let services = compose["services"].as_object().expect("services");
    for s in ["gateway", "rabbitmq", "prometheus", "grafana"] {
        assert!(services.contains_key(s), "service {s}");
    }
    let gateway = &services["gateway"];
    let env = &gateway["environment"];
    assert_eq!(env["GATEWAY_ENGINE__KIND"], "upstream");
    assert!(
        env["GATEWAY_ENGINE__UPSTREAM__URL"]
            .as_str()
            .unwrap()
            .contains("@rabbitmq:5672")
    );
    assert_eq!(env["GATEWAY_METRICS__LISTEN"], "0.0.0.0:9090");
    assert_eq!(gateway["build"]["context"], "..");
    assert!(std::path::Path::new(&format!("{DEPLOY}/../Dockerfile")).exists());
    // Prometheus scrapes the gateway's metrics listener.
    let prometheus = yaml("prometheus.yml");
    assert_eq!(
        prometheus["scrape_configs"][0]["static_configs"][0]["targets"],
        json!(["gateway:9090"])
    );
    // Grafana: the Prometheus data source and the dashboard, both mounted from deploy/.
    let volumes: Vec<&str> = services["grafana"]["volumes"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        volumes
            .iter()
            .any(|v| v.starts_with("./grafana/provisioning:")),
        "{volumes:?}"
    );
    assert!(
        volumes
            .iter()
            .any(|v| v.starts_with("./grafana/amqp-gateway.json:/var/lib/grafana/dashboards/")),
        "{volumes:?}"
    );
    let datasource = yaml("grafana/provisioning/datasources/prometheus.yml");
    assert_eq!(
        datasource["datasources"][0]["url"],
        "http://prometheus:9090"
    );
    assert_eq!(datasource["datasources"][0]["uid"], "prometheus");
    let provider = yaml("grafana/provisioning/dashboards/amqp-gateway.yml");
    assert_eq!(
        provider["providers"][0]["options"]["path"],
        "/var/lib/grafana/dashboards"
    );
}

#[tokio::test]
async fn every_metric_the_dashboard_plots_is_exported() {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(format!("{DEPLOY}/grafana/amqp-gateway.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    let mut wanted = BTreeSet::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        assert_eq!(
            panel["datasource"]["uid"], "prometheus",
            "{}",
            panel["title"]
        );
        for target in panel["targets"].as_array().expect("targets") {
            let expr = target["expr"].as_str().expect("expr");
            let names = metric_names(expr);
            assert!(!names.is_empty(), "{expr}");
            wanted.extend(names);
        }
    }
    // Both engines, and enough traffic that the per-event series exist: a publish, a
    // delivery, a connection opened and closed, a refused one.
    let embedded = start_gateway(|_| {}).await;
    let vhost = Vhost::create().await;
    let _upstream = start_gateway(|c| on_vhost(c, &vhost)).await;
    let q = embedded.queue("dash").await;
    embedded.publish("amq.default", &q, json!("x")).await;
    assert_eq!(embedded.take(&q, 1).await.len(), 1);
    let _ = common::amqp::connect(&embedded, &admin()).await;
    let refused = lapin::Connection::connect(
        &common::amqp::url(&embedded, "not-a-token"),
        lapin::ConnectionProperties::default(),
    )
    .await;
    assert!(refused.is_err());
    // The upstream engine measures its round trip on start, then every 5 s.
    common::eventually("the upstream round trip measured", || async {
        embedded
            .metrics_text()
            .await
            .contains("gateway_upstream_round_trip_seconds_bucket")
    })
    .await;
    let text = embedded.metrics_text().await;
    let exported: BTreeSet<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .filter_map(|l| l.split(['{', ' ']).next())
        .collect();
    let missing: Vec<&String> = wanted
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "the dashboard plots metrics /metrics lacks: {missing:?}\n{text}"
    );
}
