// Server-Sent Events in real headless Chromium: the JS client's EventStream (a page's
// EventSource) receives messages; the test breaks the connection through a proxy it owns,
// publishes while the browser is away, and the browser reconnects by itself and resumes the
// durable subscription with Last-Event-ID — every message once, in order.
//
//   GATEWAY_BIN=../../target/debug/amqp-gateway node --test

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { WAIT, startGateway, startProxy } from "./gateway.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

let gateway;
let proxy;
let browser;

async function publish(n) {
  const resp = await fetch(`http://${gateway.http}/v1/exchanges/amq.topic/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${gateway.token}`, "content-type": "application/json" },
    body: JSON.stringify({ routing_key: "sse.demo", body: { n } }),
  });
  assert.equal(resp.status, 200, await resp.text());
}

before(async () => {
  // EventSource cannot send headers: its token rides in the query string.
  gateway = await startGateway({ GATEWAY_WS__ALLOW_QUERY_TOKEN: "true" });
  proxy = await startProxy(gateway.http);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (proxy) proxy.close();
  if (gateway) gateway.stop();
});

test("an EventSource resumes a durable subscription after the connection breaks, nothing lost", async () => {
  const page = await browser.newPage();
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${proxy.url}/console`);
  await page.evaluate(async (token) => {
    const { EventStream } = await import("/client/amqp-gateway.js");
    window.got = [];
    window.states = [];
    window.stream = new EventStream(
      location.origin,
      { exchange: "amq.topic", binding_key: "sse.#", durable: "browser-sse" },
      (m) => window.got.push(m.body.n),
      { token, onState: (s) => window.states.push(s) },
    );
    await window.stream.whenReady();
  }, gateway.token);
  const got = () => page.evaluate(() => window.got.slice());
  const waitFor = (count) =>
    page.waitForFunction((c) => window.got.length >= c, count, { timeout: WAIT });

  for (let n = 1; n <= 5; n++) await publish(n);
  await waitFor(5);
  assert.deepEqual(await got(), [1, 2, 3, 4, 5]);

  // Break the stream as a network would and keep the browser away while messages come.
  proxy.refuse(true);
  proxy.cut();
  await page.waitForFunction(() => window.states.at(-1) === "connecting", null, { timeout: WAIT });
  for (let n = 6; n <= 10; n++) await publish(n);
  proxy.refuse(false);

  // EventSource reconnects on its own with Last-Event-ID: the rest, once each, in order.
  await waitFor(10);
  await new Promise((r) => setTimeout(r, 300)); // anything extra would show up by now
  assert.deepEqual(await got(), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
  const states = await page.evaluate(() => window.states);
  assert.ok(states.filter((s) => s === "open").length >= 2, `reconnected: ${states}`);

  await page.evaluate(() => window.stream.close());
  assert.deepEqual(errors, [], "no errors in the page");
  await page.close();
});
