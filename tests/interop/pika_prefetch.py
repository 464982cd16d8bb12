"""A pika consumer with prefetch 10 and manual acks under load, on the gateway.

    AMQP_PORT=… AMQP_TOKEN=… python3 pika_prefetch.py QUEUE COUNT

Declares QUEUE with the arguments REST gave it ({"x-max-length": 100000}, to check the
redeclare is equivalent), publishes COUNT numbered persistent messages with confirms on one
connection — the first half before the consumer starts, so a full queue faces it, the rest
while it runs — and consumes them on another with basic_qos(prefetch_count=10), acking in
bursts. Prints one JSON line: received, the most unacked deliveries ever held, whether they
came in order.
Exits non-zero after 30 s without all of them.
"""
import json
import os
import sys
import threading
import time

import pika

queue, count = sys.argv[1], int(sys.argv[2])
params = pika.ConnectionParameters(host='127.0.0.1', port=int(os.environ['AMQP_PORT']),
                                   credentials=pika.PlainCredentials('any', os.environ['AMQP_TOKEN']))


def publish(numbers):
    conn = pika.BlockingConnection(params)
    ch = conn.channel()
    ch.confirm_delivery()
    for i in numbers:
        ch.basic_publish('', queue, str(i).encode(), pika.BasicProperties(delivery_mode=2))
    conn.close()


conn = pika.BlockingConnection(params)
ch = conn.channel()
ch.queue_declare(queue=queue, durable=True, arguments={'x-max-length': 100000})
ch.basic_qos(prefetch_count=10)
publish(range(count // 2))
pending, received, most = [], [], 0


def on_message(channel, method, properties, body):
    pending.append(method.delivery_tag)
    received.append(int(body))


ch.basic_consume(queue=queue, on_message_callback=on_message)
publisher = threading.Thread(target=publish, args=(range(count // 2, count),))
publisher.start()
deadline = time.time() + 30
while len(received) < count and time.time() < deadline:
    # Let deliveries pile up unacked for a while: the gateway must stop at 10.
    conn.process_data_events(time_limit=0.02)
    most = max(most, len(pending))
    if pending:
        ch.basic_ack(pending[-1], multiple=True)
        pending.clear()
publisher.join()
print(json.dumps({"received": len(received), "max_unacked": most,
                  "in_order": received == list(range(len(received)))}))
conn.close()
sys.exit(0 if len(received) == count else 1)
