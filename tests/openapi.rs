//! The committed OpenAPI document must be what the code generates.

#[test]
fn committed_openapi_matches_the_code() {
    let generated =
        serde_json::to_string_pretty(&amqp_gateway::protocol::rest::openapi()).unwrap() + "\n";
    let committed = std::fs::read_to_string("openapi/openapi.json").unwrap_or_default();
    assert!(
        generated == committed,
        "openapi/openapi.json is stale; regenerate it with:\n  cargo run -q -- openapi > openapi/openapi.json"
    );
}

#[test]
fn every_route_is_documented_with_problem_responses() {
    let doc = serde_json::to_value(amqp_gateway::protocol::rest::openapi()).unwrap();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for expected in [
        "/v1/exchanges/{exchange}/publish",
        "/v1/exchanges/{exchange}/publish-batch",
        "/v1/exchanges/{exchange}/messages",
        "/v1/exchanges",
        "/v1/exchanges/{name}",
        "/v1/queues",
        "/v1/queues/{name}",
        "/v1/queues/{name}/contents",
        "/v1/queues/{queue}/bindings",
        "/v1/queues/{queue}/get",
        "/v1/sse",
    ] {
        assert!(paths.contains_key(expected), "{expected} missing");
    }
    for (path, ops) in paths {
        for (method, op) in ops.as_object().unwrap() {
            let responses = op["responses"].as_object().unwrap();
            let errors: Vec<_> = responses
                .keys()
                .filter(|c| c.starts_with('4') || c.starts_with('5'))
                .collect();
            assert!(!errors.is_empty(), "{method} {path} documents no error");
            for code in errors {
                assert!(
                    responses[code]["content"]["application/problem+json"].is_object(),
                    "{method} {path} {code} is not problem+json"
                );
            }
            assert!(
                op["security"].is_array(),
                "{method} {path} names no security"
            );
        }
    }
}
