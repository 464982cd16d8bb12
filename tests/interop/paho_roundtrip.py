"""Python paho-mqtt 2.x against the gateway: connect with a JWT as password, subscribe,
publish QoS 1, receive it; and a bad token is refused. Exits non-zero on any failure.

    python3 paho_roundtrip.py HOST PORT TOKEN {3.1.1|5}
"""
import sys
import threading
import uuid

import paho.mqtt.client as mqtt

host, port, token, version = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
WAIT = 10


def client(password):
    c = mqtt.Client(
        callback_api_version=mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"paho-{uuid.uuid4().hex[:8]}",
        protocol=protocol,
    )
    c.username_pw_set("paho", password)
    return c


def expect(event, what):
    if not event.wait(WAIT):
        print(f"FAIL: {what} within {WAIT}s", file=sys.stderr)
        sys.exit(1)


# A bad token is refused at CONNECT.
refused = threading.Event()
outcome = {}
bad = client("not-a-token")
bad.on_connect = lambda c, u, flags, rc, props: (outcome.setdefault("rc", rc), refused.set())
bad.connect(host, port)
bad.loop_start()
expect(refused, "CONNACK for a bad token")
bad.loop_stop()
if not outcome["rc"].is_failure:
    print(f"FAIL: a bad token was accepted: {outcome['rc']}", file=sys.stderr)
    sys.exit(1)

# A good token: subscribe, publish, receive.
connected, subscribed, received = threading.Event(), threading.Event(), threading.Event()
got = {}
c = client(token)
c.on_connect = lambda cl, u, flags, rc, props: connected.set() if not rc.is_failure else None
c.on_subscribe = lambda cl, u, mid, codes, props: (got.setdefault("granted", codes), subscribed.set())


def on_message(cl, u, msg):
    got["message"] = (msg.topic, msg.payload.decode(), msg.qos)
    received.set()


c.on_message = on_message
c.connect(host, port)
c.loop_start()
expect(connected, "CONNACK")
c.subscribe("paho/+/reading", qos=1)
expect(subscribed, "SUBACK")
granted = got["granted"][0]
if granted.is_failure or granted.value != 1:
    print(f"FAIL: subscription not granted QoS 1: {granted}", file=sys.stderr)
    sys.exit(1)
c.publish("paho/dev.1/reading", b"42", qos=1).wait_for_publish(WAIT)
expect(received, "the published message")
if got["message"] != ("paho/dev.1/reading", "42", 1):
    print(f"FAIL: got {got['message']}", file=sys.stderr)
    sys.exit(1)
c.disconnect()
c.loop_stop()
print(f"ok: paho {version}")
