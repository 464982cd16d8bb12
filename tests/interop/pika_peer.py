"""A legacy AMQP application on the gateway's RabbitMQ, with pika (RabbitMQ's Python client).

    python3 pika_peer.py URL publish EXCHANGE ROUTING_KEY COUNT
        publishes COUNT persistent messages "m0".."m{COUNT-1}" with properties
        (content type, headers, correlation id, reply-to, message id), each confirmed.
    python3 pika_peer.py URL consume QUEUE COUNT
        prints one JSON line per message (body and properties), acks, exits after COUNT.
Exits non-zero on any failure or after 15 s without the expected messages.
"""
import json
import sys

import pika

url, mode = sys.argv[1], sys.argv[2]
conn = pika.BlockingConnection(pika.URLParameters(url))
ch = conn.channel()

if mode == "publish":
    exchange, key, count = sys.argv[3], sys.argv[4], int(sys.argv[5])
    ch.confirm_delivery()
    for i in range(count):
        props = pika.BasicProperties(
            content_type="text/plain",
            headers={"origin": "pika", "n": i},
            correlation_id=f"corr-{i}",
            reply_to="pika-replies",
            message_id=f"id-{i}",
            delivery_mode=2,
        )
        ch.basic_publish(exchange, key, f"m{i}".encode(), props, mandatory=True)
    print("published", count, flush=True)
elif mode == "consume":
    queue, count = sys.argv[3], int(sys.argv[4])
    got = 0
    for method, props, body in ch.consume(queue, inactivity_timeout=15):
        if method is None:
            print(f"FAIL: only {got} of {count} messages within 15 s", file=sys.stderr)
            sys.exit(1)
        print(json.dumps({
            "body": body.decode(),
            "content_type": props.content_type,
            "headers": props.headers,
            "correlation_id": props.correlation_id,
            "reply_to": props.reply_to,
            "delivery_mode": props.delivery_mode,
            "expiration": props.expiration,
            "message_id": props.message_id,
        }), flush=True)
        ch.basic_ack(method.delivery_tag)
        got += 1
        if got == count:
            break
    ch.cancel()
else:
    sys.exit(f"unknown mode {mode}")
conn.close()
