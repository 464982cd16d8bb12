// The console's operator view in real headless Chromium, driven by Playwright: live from the
// /v1/feed WebSocket, a queue filled over REST shows its depth and is purged and deleted from
// the page, an MQTT device appears with its subscription and disappears when closed from the
// page (MQTT 5 DISCONNECT 0x98 on the device's side).
//
//   GATEWAY_BIN=../../target/debug/amqp-gateway node --test operator.test.mjs
// Set SCREENSHOTS=dir to save a picture of each view (docs/operator-*.png are made this way).

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { join } from "node:path";
import { chromium } from "playwright-core";
import mqtt from "mqtt";
import { WAIT, startGateway } from "./gateway.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";

let gateway;
let browser;

async function rest(method, path, body) {
  const resp = await fetch(`http://${gateway.http}${path}`, {
    method,
    headers: { authorization: `Bearer ${gateway.token}`, "content-type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  assert.ok(resp.ok, `${method} ${path}: ${resp.status} ${await resp.text()}`);
}

async function shot(page, selector, name) {
  if (!process.env.SCREENSHOTS) return;
  await page.locator(selector).screenshot({ path: join(process.env.SCREENSHOTS, name) });
}

before(async () => {
  gateway = await startGateway();
  browser = await chromium.launch({
    executablePath: CHROMIUM,
    args: ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking", "--disable-sync"],
  });
});

after(async () => {
  if (browser) await browser.close();
  if (gateway) gateway.stop();
});

test("the operator view shows queues and connections live, and purges, deletes and closes", async () => {
  const page = await browser.newPage({ viewport: { width: 1360, height: 1000 } });
  const errors = [];
  page.on("pageerror", (e) => errors.push(e.message));
  await page.goto(`http://${gateway.http}/console/operator?token=${gateway.token}`);
  await page.waitForSelector('#state[data-state="open"]', { timeout: WAIT });

  // A queue filled by REST shows its depth.
  await rest("PUT", "/v1/queues/orders", { durable: true });
  for (let i = 0; i < 7; i += 1) {
    await rest("POST", "/v1/exchanges/amq.default/publish", { routing_key: "orders", body: { n: i } });
  }
  const depth = page.locator('tr[data-queue="orders"] td.depth');
  await depth.filter({ hasText: /^7$/ }).waitFor({ timeout: WAIT });

  // A connected MQTT device appears with its subscription.
  const device = await mqtt.connectAsync(`mqtt://${gateway.mqtt}`, {
    protocolVersion: 5,
    clientId: "op-device-1",
    username: "device",
    password: gateway.token,
    reconnectPeriod: 0,
  });
  await device.subscribeAsync("sensors/+/temp", { qos: 1 });
  const row = page.locator('tr[data-client-id="op-device-1"]');
  await row.locator("td.subs", { hasText: "sensors/+/temp" }).waitFor({ timeout: WAIT });
  assert.match(await row.textContent(), /mqtt\/tcp/);

  // Something to draw: a few seconds of traffic.
  for (let i = 0; i < 30; i += 1) {
    await device.publishAsync("sensors/k1/temp", String(20 + i), { qos: 1 });
  }
  await page.waitForFunction(() => Number(document.querySelector("#rate-published").textContent) > 0, null, { timeout: WAIT });
  await shot(page, "main > section:nth-of-type(2)", "operator-overview.png");
  await shot(page, "main > section:nth-of-type(3)", "operator-queues.png");
  await shot(page, "main > section:nth-of-type(4)", "operator-connections.png");

  // Closed from the page: the device hears 0x98 (administrative action) and its row goes.
  const disconnected = new Promise((resolve) => device.on("disconnect", (packet) => resolve(packet.reasonCode)));
  const close = row.locator('button[data-action="close"]');
  await close.click();
  await close.click();
  assert.equal(await Promise.race([disconnected, new Promise((r) => setTimeout(() => r("timeout"), WAIT))]), 0x98);
  await row.waitFor({ state: "detached", timeout: WAIT });
  device.end(true);

  // Purge, then delete, from the page.
  const orders = page.locator('tr[data-queue="orders"]');
  await orders.locator('button[data-action="purge"]').click();
  await orders.locator('button[data-action="purge"]').click();
  await depth.filter({ hasText: /^0$/ }).waitFor({ timeout: WAIT });
  await orders.locator('button[data-action="delete"]').click();
  await orders.locator('button[data-action="delete"]').click();
  await orders.waitFor({ state: "detached", timeout: WAIT });
  const gone = await fetch(`http://${gateway.http}/v1/queues/orders`, { headers: { authorization: `Bearer ${gateway.token}` } });
  assert.equal(gone.status, 404);
  assert.deepEqual(errors, []);
});

test("a token without monitoring is refused by the feed and the page says so", async () => {
  const page = await browser.newPage();
  await page.goto(`http://${gateway.http}/console/operator?token=not-a-token`);
  await page.waitForFunction(() => document.querySelector("#auth-error").textContent.length > 0, null, { timeout: WAIT });
  assert.equal(await page.getAttribute("#state", "data-state"), "closed");
});
