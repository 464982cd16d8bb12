"""A kombu (Celery's messaging library) consumer reading a queue someone else declared.

    python3 kombu_consumer.py URL QUEUE COUNT
prints each message body on its own line, acks it, and exits after COUNT (non-zero after 15 s
without them). The queue is passive: kombu must not redeclare it with other flags.
"""
import sys

from kombu import Connection, Consumer, Queue

url, queue, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
got = []


def on_message(body, message):
    got.append(message.body.decode() if isinstance(message.body, bytes) else message.body)
    message.ack()


with Connection(url) as conn:
    q = Queue(queue, no_declare=True)
    with Consumer(conn, queues=[q], callbacks=[on_message], accept=None):
        while len(got) < count:
            try:
                conn.drain_events(timeout=15)
            except TimeoutError:
                print(f"FAIL: {len(got)} of {count} within 15 s", file=sys.stderr)
                sys.exit(1)
for body in got:
    print(body)
