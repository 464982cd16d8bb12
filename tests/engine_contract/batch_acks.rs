//! `Channel::ack_each`: an MQTT client's PUBACKs read together, acked in one call. Each tag is
//! settled on its own (not `multiple`), across the queues the deliveries came from, and an
//! unknown tag among them leaves the known ones settled.

use super::*;

pub async fn ack_each_settles_each_named_tag(engine: Arc<dyn Engine>) {
    let ch = channel(&engine).await;
    let (q1, q2) = (
        declare_queue(&ch, "each-a").await,
        declare_queue(&ch, "each-b").await,
    );
    for i in 0..5 {
        publish(&ch, "", &q1, &format!("a{i}")).await;
    }
    publish(&ch, "", &q2, "b0").await;
    let mut c1 = ch.consume(&q1, ConsumeOptions::manual(3)).await.unwrap();
    let mut c2 = ch.consume(&q2, ConsumeOptions::manual(3)).await.unwrap();
    let a = [
        next(&mut c1).await,
        next(&mut c1).await,
        next(&mut c1).await,
    ];
    let b0 = next(&mut c2).await;
    assert_eq!(a.iter().map(text).collect::<Vec<_>>(), ["a0", "a1", "a2"]);
    nothing_within(&mut c1, QUIET).await;

    // The first and third of one queue and one of the other: a1 stays unacked, and the two
    // freed places of the prefetch bring the next two.
    ch.ack_each(&[a[0].delivery_tag, a[2].delivery_tag, b0.delivery_tag])
        .await
        .unwrap();
    let more = [next(&mut c1).await, next(&mut c1).await];
    assert_eq!([text(&more[0]), text(&more[1])], ["a3", "a4"]);

    // An unknown tag is refused, after the known one beside it was settled.
    let mixed = ch.ack_each(&[a[1].delivery_tag, 1_000_000]).await;
    assert!(
        matches!(mixed, Err(EngineError::PreconditionFailed(_))),
        "{mixed:?}"
    );
    let again = ch.ack(a[1].delivery_tag, false).await;
    assert!(
        matches!(again, Err(EngineError::PreconditionFailed(_))),
        "a1 was settled by the refused call: {again:?}"
    );
    ch.ack_each(&[more[0].delivery_tag, more[1].delivery_tag])
        .await
        .unwrap();

    // Nothing was left unacked: closing the channel puts nothing back.
    drop((c1, c2));
    ch.close().await;
    let observer = channel(&engine).await;
    assert_eq!(observer.queue_info(&q1).await.unwrap().messages, 0);
    assert_eq!(observer.queue_info(&q2).await.unwrap().messages, 0);
}
