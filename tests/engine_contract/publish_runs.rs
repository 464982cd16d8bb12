//! `Channel::publish_run`: an MQTT connection's publishes of one socket read, handed over
//! together. Each is routed and answered as if published alone, in order: runs of one route,
//! a change of route part-way, a queue that refuses some, a key nothing is bound to, the
//! default exchange, and a binding removed between two runs.

use super::*;

/// One run's confirms, awaited in order: `Ok(routed)` or the refusal.
async fn run(
    ch: &Arc<dyn Channel>,
    exchange: &str,
    publishes: &[(&str, &str)],
) -> Vec<Result<bool, EngineError>> {
    let mut run: Vec<(Arc<str>, Message)> = publishes
        .iter()
        .map(|(key, body)| (Arc::from(*key), Message::new((*body).to_owned())))
        .collect();
    let mut confirms = Vec::new();
    ch.publish_run(exchange, &mut run, PublishOptions::default(), &mut confirms);
    assert!(run.is_empty(), "the run is taken whole");
    assert_eq!(confirms.len(), publishes.len(), "a confirm per publish");
    let mut answers = Vec::new();
    for confirm in confirms {
        answers.push(confirm.await.map(|outcome| outcome.routed));
    }
    answers
}

pub async fn publish_runs_answer_each_in_order(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "runs", ExchangeKind::Topic).await;
    let qa = declare_queue(&ch, "runs-a").await;
    bind(&ch, &qa, &ex, "a.#").await;
    let qr = declare_queue_with(
        &ch,
        "runs-r",
        args(&[
            ("x-max-length", FieldValue::I64(2)),
            ("x-overflow", FieldValue::Str("reject-publish".into())),
        ]),
    )
    .await;
    bind(&ch, &qr, &ex, "r").await;

    let answers = run(
        &ch,
        &ex,
        &[
            ("a.x", "m0"),
            ("a.x", "m1"),
            ("r", "r0"),
            ("r", "r1"),
            ("r", "r2"),
            ("none", "u0"),
            ("a.x", "m2"),
            ("a.y", "m3"),
        ],
    )
    .await;
    let routed = |r: &Result<bool, EngineError>| matches!(r, Ok(true));
    assert!(answers[..4].iter().all(routed), "{answers:?}");
    assert!(
        matches!(&answers[4], Err(EngineError::Rejected(_))),
        "the third to a queue of two is refused: {answers:?}"
    );
    assert!(matches!(answers[5], Ok(false)), "unrouted: {answers:?}");
    assert!(answers[6..].iter().all(routed), "{answers:?}");
    assert_eq!(drain(&ch, &qa).await, ["m0", "m1", "m2", "m3"]);
    assert_eq!(drain(&ch, &qr).await, ["r0", "r1"]);

    // The default exchange routes each by queue name.
    let answers = run(&ch, "", &[(&qa, "d0"), (&qa, "d1"), (&qr, "d2")]).await;
    assert!(answers.iter().all(routed), "{answers:?}");
    assert_eq!(drain(&ch, &qa).await, ["d0", "d1"]);
    assert_eq!(drain(&ch, &qr).await, ["d2"]);

    // A route the last run took is not kept past a binding's removal.
    ch.unbind_queue(&qa, &ex, "a.#", &FieldTable::new())
        .await
        .expect("unbind");
    let answers = run(&ch, &ex, &[("a.x", "gone0"), ("a.x", "gone1")]).await;
    assert!(
        answers.iter().all(|r| matches!(r, Ok(false))),
        "{answers:?}"
    );
    assert!(drain(&ch, &qa).await.is_empty());
}

/// Routed and unroutable publishes in turn, all outstanding at once: each is told apart.
/// (Upstream, RabbitMQ acks many at once and sends the returns ahead of them.)
pub async fn unroutable_publishes_among_routed_ones_are_told_apart(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let ex = declare_exchange(&ch, "mixed", ExchangeKind::Direct).await;
    let q = declare_queue(&ch, "mixed").await;
    bind(&ch, &q, &ex, "to-q").await;
    let keys: Vec<&str> = (0..200)
        .map(|i| if i % 3 == 1 { "nowhere" } else { "to-q" })
        .collect();
    let publishes: Vec<(&str, &str)> = keys.iter().map(|k| (*k, "same body")).collect();
    let answers = run(&ch, &ex, &publishes).await;
    for (i, (answer, key)) in answers.iter().zip(&keys).enumerate() {
        assert_eq!(answer, &Ok(*key == "to-q"), "publish {i} to '{key}'");
    }
}
