// The web console and the JS client in real headless Chromium, driven by Playwright.
//
// The gateway binary runs with --dev on port 0; the browser reaches it through a TCP proxy this
// test controls, so the test can break the WebSocket like a network would (both directions cut),
// publish while the browser is away, and let it come back.
//
//   GATEWAY_BIN=../../target/debug/amqp-gateway node --test
// Set SCREENSHOT=path.png to save a picture of the console.

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { chromium } from "playwright-core";
import { WAIT, startGateway, startProxy } from "./gateway.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

let gateway;
let gatewayAddr;
let adminToken;
let proxy;
let browser;

async function publish(routingKey, body) {
  const resp = await fetch(`http://${gatewayAddr}/v1/exchanges/amq.topic/publish`, {
    method: "POST",
    headers: { authorization: `Bearer ${adminToken}`, "content-type": "application/json" },
    body: JSON.stringify({ routing_key: routingKey, body }),
  });
  const text = await resp.text();
  assert.equal(resp.status, 200, text);
  return JSON.parse(text);
}

before(async () => {
  gateway = await startGateway();
  ({ http: gatewayAddr, token: adminToken } = gateway);
  proxy = await startProxy(gatewayAddr);
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: [
      "--no-sandbox",
      "--disable-gpu",
      "--disable-quic",
      "--no-first-run",
      "--disable-background-networking",
      "--disable-component-update",
      "--disable-sync",
    ],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (proxy) proxy.close();
  if (gateway) gateway.stop();
});

test("the console subscribes, shows messages, and resumes a durable subscription after the socket breaks", async () => {
  const page = await browser.newPage({ viewport: { width: 1280, height: 860 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`${proxy.url}/console`);
  await page.fill("#token", adminToken);
  await page.click("#connect");
  await page.waitForSelector('#state[data-state="open"]', { timeout: WAIT });

  await page.fill("#binding-key", "demo.#");
  await page.fill("#durable", "browser-test");
  await page.click("#subscribe");
  await page.waitForSelector("#subs li", { timeout: WAIT });
  assert.match(await page.textContent("#subs li"), /ws-dev-admin\.browser-test/);

  // A REST publish appears in the page.
  assert.deepEqual(await publish("demo.hello", { n: 1 }), { routed: true });
  await page.waitForFunction(() => document.querySelector("#received").textContent === "1", null, { timeout: WAIT });
  const row = await page.textContent("#messages tbody tr");
  assert.match(row, /demo\.hello/);
  assert.match(row, /"n":1/);

  // A publish from the page reaches the same subscription (JS client → gateway → page).
  await page.fill("#pub-key", "demo.from-page");
  await page.fill("#pub-body", '{"from":"page"}');
  await page.click("#publish");
  await page.waitForFunction(() => document.querySelector("#pub-result").textContent.includes("published"), null, { timeout: WAIT });
  await page.waitForFunction(() => document.querySelector("#received").textContent === "2", null, { timeout: WAIT });

  // Break the WebSocket as a network would, keep the browser away, publish meanwhile.
  proxy.refuse(true);
  proxy.cut();
  await page.waitForSelector('#state[data-state="connecting"], #state[data-state="closed"]', { timeout: WAIT });
  // The gateway sees the socket close and lets the durable consumer go; what follows queues up.
  await new Promise((r) => setTimeout(r, 300));
  assert.deepEqual(await publish("demo.while-away", { n: 3 }), { routed: true });
  proxy.refuse(false);

  // The client reconnects with backoff, re-subscribes the durable subscription, and gets what
  // was published while it was away.
  await page.waitForSelector('#state[data-state="open"]', { timeout: WAIT });
  await page.waitForFunction(() => document.querySelector("#received").textContent === "3", null, { timeout: WAIT });
  const newest = await page.textContent("#messages tbody tr");
  assert.match(newest, /demo\.while-away/);
  assert.ok(Number(await page.textContent("#reconnects")) >= 1, "a reconnect was counted");

  if (process.env.SCREENSHOT) await page.screenshot({ path: process.env.SCREENSHOT });
  assert.deepEqual(errors, [], "no errors in the page");
  await page.close();
});

test("the client module is served and usable on its own", async () => {
  const page = await browser.newPage();
  await page.goto(`${proxy.url}/console`);
  const result = await page.evaluate(async (token) => {
    const { Gateway } = await import("/client/amqp-gateway.js");
    const gw = new Gateway(`ws://${location.host}/ws`, { token });
    const got = [];
    const sub = await gw.subscribe({ exchange: "amq.topic", binding_key: "module.#", ack: "manual" }, (m, s) => {
      got.push(m.body);
      s.ack(m);
    });
    const confirm = await gw.publish("amq.topic", "module.x", { ok: true });
    const deadline = Date.now() + 5000;
    while (got.length < 1 && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    let refused = null;
    try {
      await gw.publish("amq.topic", "module.x", "!", { encoding: "base64" });
    } catch (e) {
      refused = e.code;
    }
    await sub.unsubscribe();
    gw.close();
    return { confirm, got, refused };
  }, adminToken);
  assert.deepEqual(result.confirm, { routed: true });
  assert.deepEqual(result.got, [{ ok: true }]);
  assert.equal(result.refused, "bad_request");
  await page.close();
});
