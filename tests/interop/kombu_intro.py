"""kombu's introduction on the gateway (kombu 5, py-amqp transport), one scenario per run:

    python3 kombu_intro.py URL direct|fanout|topic
    python3 kombu_intro.py URL persist-publish QUEUE
    python3 kombu_intro.py URL persist-consume QUEUE

direct: request/reply over a direct exchange (reply_to an exclusive server-named queue,
correlation id); fanout: one message broadcast to two queues; topic: publish/subscribe with a
"usa.#" binding; persist-*: a persistent and a transient message to a durable queue, then what
is left of them (across a gateway restart only the persistent one). Prints a JSON line per
scenario; exits non-zero on any failure or after 10 s without the expected messages.
"""
import json
import socket
import sys

from kombu import Connection, Consumer, Exchange, Producer, Queue

url, scenario = sys.argv[1], sys.argv[2]


def drain(conn, got, want):
    while len(got) < want:
        try:
            conn.drain_events(timeout=10)
        except socket.timeout:
            break


with Connection(url) as conn:
    if scenario == "direct":
        exchange = Exchange("rpc", "direct", durable=True)
        requests = Queue("rpc-requests", exchange=exchange, routing_key="rpc")
        replies = Queue("", exclusive=True, auto_delete=True)
        answers = []

        def serve(body, message):
            Producer(conn).publish({"result": body["n"] * 2}, exchange="", routing_key=message.properties["reply_to"],
                                   correlation_id=message.properties["correlation_id"], serializer="json")
            message.ack()

        def answered(body, message):
            answers.append((body, message.properties["correlation_id"]))
            message.ack()

        with Consumer(conn, [requests], callbacks=[serve]), Consumer(conn, [replies], callbacks=[answered]) as c:
            reply_queue = c.queues[0].name
            Producer(conn).publish({"n": 21}, exchange=exchange, routing_key="rpc", declare=[requests],
                                   reply_to=reply_queue, correlation_id="req-1", serializer="json")
            drain(conn, answers, 1)
        print(json.dumps({"answers": answers}))
        sys.exit(0 if answers == [({"result": 42}, "req-1")] else 1)
    elif scenario == "fanout":
        exchange = Exchange("broadcast", "fanout", durable=False)
        queues = [Queue(f"broadcast-{i}", exchange=exchange, exclusive=True) for i in range(2)]
        got = []
        with Consumer(conn, queues, callbacks=[lambda body, m: (got.append(body), m.ack())]):
            Producer(conn).publish("to all", exchange=exchange, serializer="json")
            drain(conn, got, 2)
        print(json.dumps({"got": got}))
        sys.exit(0 if got == ["to all", "to all"] else 1)
    elif scenario == "topic":
        exchange = Exchange("news", "topic", durable=False)
        usa = Queue("news-usa", exchange=exchange, routing_key="usa.#", exclusive=True)
        got = []
        with Consumer(conn, [usa], callbacks=[lambda body, m: (got.append(body), m.ack())]):
            producer = Producer(conn, exchange=exchange, serializer="json")
            producer.publish("europe", routing_key="europe.news")
            producer.publish("usa", routing_key="usa.news")
            producer.publish("usa weather", routing_key="usa.weather.today")
            drain(conn, got, 2)
        print(json.dumps({"got": got}))
        sys.exit(0 if got == ["usa", "usa weather"] else 1)
    elif scenario == "persist-publish":
        queue = Queue(sys.argv[3], exchange=Exchange("", "direct"), routing_key=sys.argv[3], durable=True)
        producer = Producer(conn, serializer="json")
        producer.publish("persistent", routing_key=sys.argv[3], declare=[queue], delivery_mode=2)
        producer.publish("transient", routing_key=sys.argv[3], declare=[queue], delivery_mode=1)
        print(json.dumps({"published": 2}))
    elif scenario == "persist-consume":
        queue = Queue(sys.argv[3], exchange=Exchange("", "direct"), routing_key=sys.argv[3], durable=True)
        got = []
        with conn.SimpleQueue(queue) as q:
            while True:
                try:
                    message = q.get(block=True, timeout=1)
                except q.Empty:
                    break
                got.append(message.payload)
                message.ack()
        print(json.dumps({"got": got}))
    else:
        sys.exit(f"unknown scenario {scenario}")
