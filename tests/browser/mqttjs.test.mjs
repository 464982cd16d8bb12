// MQTT.js — the MQTT client browsers use — against the gateway, over WebSocket (`/mqtt`, as a
// browser connects) and over TCP, with MQTT 3.1.1 and 5: a JWT as password, subscribe,
// publish QoS 1, receive it (with MQTT 5 user properties), and a bad token refused.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import mqtt from "mqtt";
import { WAIT, startGateway } from "./gateway.mjs";

let gateway;

before(async () => {
  gateway = await startGateway();
});

after(() => {
  if (gateway) gateway.stop();
});

function url(transport) {
  return transport === "ws" ? `ws://${gateway.http}/mqtt` : `mqtt://${gateway.mqtt}`;
}

function connect(transport, protocolVersion, password) {
  return mqtt.connectAsync(url(transport), {
    protocolVersion,
    username: "mqttjs",
    password,
    clientId: `mqttjs-${Math.random().toString(16).slice(2, 10)}`,
    reconnectPeriod: 0,
    connectTimeout: WAIT,
  });
}

function nextMessage(client) {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error("no message")), WAIT);
    client.once("message", (topic, payload, packet) => {
      clearTimeout(timer);
      resolve({ topic, payload: payload.toString(), packet });
    });
  });
}

for (const transport of ["ws", "tcp"]) {
  for (const protocolVersion of [4, 5]) {
    test(`MQTT.js over ${transport}, protocol level ${protocolVersion}`, async () => {
      const client = await connect(transport, protocolVersion, gateway.token);
      try {
        const granted = await client.subscribeAsync("mqttjs/+/t", { qos: 1 });
        assert.equal(granted[0].qos, 1);
        const received = nextMessage(client);
        const properties = protocolVersion === 5 ? { userProperties: { origin: "mqttjs" }, contentType: "text/plain" } : undefined;
        await client.publishAsync("mqttjs/dev.1/t", "21.5", { qos: 1, properties });
        const { topic, payload, packet } = await received;
        assert.equal(topic, "mqttjs/dev.1/t");
        assert.equal(payload, "21.5");
        assert.equal(packet.qos, 1);
        if (protocolVersion === 5) {
          assert.equal(packet.properties.userProperties.origin, "mqttjs");
          assert.equal(packet.properties.contentType, "text/plain");
        }
      } finally {
        await client.endAsync();
      }
      await assert.rejects(connect(transport, protocolVersion, "not-a-token"), /Bad User Name or Password|Not authorized|Bad username or password|Connection refused/i);
    });
  }
}

// MQTT 5 fidelity: what one MQTT.js client sent reaches another exactly — user properties
// (a repeated name included), content type, payload format indicator, response topic,
// correlation data — live, retained, and as a will sent by DISCONNECT with reason 0x04.
const sent = {
  userProperties: { zeta: ["1", "3"], alpha: "2" },
  contentType: "text/plain",
  payloadFormatIndicator: true,
  responseTopic: "mqttjs/reply",
  correlationData: Buffer.from([0, 255, 99]),
  messageExpiryInterval: 60,
};

function assertSameProperties(properties, what) {
  // Entries, so the order counts too (MQTT.js groups a repeated name into an array).
  assert.deepEqual(Object.entries(properties.userProperties), Object.entries(sent.userProperties), `${what}: user properties`);
  assert.equal(properties.contentType, sent.contentType, what);
  assert.equal(properties.payloadFormatIndicator, true, what);
  assert.equal(properties.responseTopic, sent.responseTopic, what);
  assert.deepEqual(properties.correlationData, sent.correlationData, what);
  assert.ok(properties.messageExpiryInterval >= 1 && properties.messageExpiryInterval <= 60, `${what}: expiry counted down`);
}

for (const transport of ["ws", "tcp"]) {
  test(`MQTT.js 5 over ${transport}: properties arrive exactly — live, retained, will`, async () => {
    const base = `fidelity/${transport}${Math.random().toString(16).slice(2, 8)}`;
    const publisher = await connect(transport, 5, gateway.token);
    const subscriber = await connect(transport, 5, gateway.token);
    try {
      await publisher.publishAsync(`${base}/kept`, "kept", { qos: 1, retain: true, properties: sent });
      // Listening before SUBACK: the retained message follows it at once.
      const first = nextMessage(subscriber);
      await subscriber.subscribeAsync(`${base}/#`, { qos: 1 });
      const retained = await first;
      assert.equal(retained.topic, `${base}/kept`);
      assert.equal(retained.packet.retain, true);
      assertSameProperties(retained.packet.properties, "retained");

      const live = nextMessage(subscriber);
      await publisher.publishAsync(`${base}/live`, "live", { qos: 1, properties: sent });
      const got = await live;
      assert.equal(got.payload, "live");
      assertSameProperties(got.packet.properties, "live");
      assert.ok(!("x-gateway-sub" in got.packet.properties.userProperties), "nothing added");

      const device = await mqtt.connectAsync(url(transport), {
        protocolVersion: 5,
        username: "mqttjs",
        password: gateway.token,
        clientId: `mqttjs-will-${Math.random().toString(16).slice(2, 10)}`,
        reconnectPeriod: 0,
        connectTimeout: WAIT,
        will: { topic: `${base}/will`, payload: Buffer.from("bye"), qos: 1, retain: false, properties: sent },
      });
      const will = nextMessage(subscriber);
      await new Promise((resolve) => device.end(false, { reasonCode: 0x04 }, resolve));
      const gotWill = await will;
      assert.equal(gotWill.topic, `${base}/will`);
      assert.equal(gotWill.payload, "bye");
      assertSameProperties(gotWill.packet.properties, "will");
    } finally {
      await publisher.endAsync();
      await subscriber.endAsync();
    }
  });
}
