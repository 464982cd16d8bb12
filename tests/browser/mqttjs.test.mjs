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
