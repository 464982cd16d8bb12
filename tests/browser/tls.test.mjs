// HTTPS and WSS in real headless Chromium: the gateway serves a certificate signed by a test CA
// that Chromium trusts through its NSS database (as a company CA installed on a desktop would
// be), not through a flag that ignores certificate errors. The console loads over https:// and
// its WebSocket runs over wss://; a browser without the CA refuses the page.
//
//   GATEWAY_BIN=../../target/debug/amqp-gateway node --test

import { test, before, after } from "node:test";
import assert from "node:assert/strict";
import { execFileSync } from "node:child_process";
import { mkdtempSync, mkdirSync, rmSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { chromium } from "playwright-core";
import { WAIT, startGateway } from "./gateway.mjs";

const CHROMIUM = process.env.CHROMIUM || "/usr/bin/chromium";
const ARGS = ["--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking"];

let dir;
let gateway;

const run = (cmd, args) => execFileSync(cmd, args, { cwd: dir, stdio: ["ignore", "pipe", "pipe"] });

/** A CA and a server certificate for localhost it signed, as PEM files in `dir`. */
function issueCertificates() {
  run("openssl", ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", "ca-key.pem", "-out", "ca.pem", "-days", "2", "-subj", "/CN=amqp-gateway browser test CA",
    "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign"]);
  run("openssl", ["req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
    "-keyout", "key.pem", "-out", "server.csr", "-subj", "/CN=localhost"]);
  writeFileSync(join(dir, "server.ext"),
    "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\nbasicConstraints=CA:FALSE\n");
  run("openssl", ["x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca-key.pem",
    "-CAcreateserial", "-out", "cert.pem", "-days", "2", "-extfile", "server.ext"]);
}

/** A home directory whose NSS database (what Chromium on Linux trusts) holds `ca`, if given. */
function home(name, ca) {
  const h = join(dir, name);
  const db = join(h, ".pki", "nssdb");
  mkdirSync(db, { recursive: true });
  run("certutil", ["-d", `sql:${db}`, "-N", "--empty-password"]);
  if (ca) run("certutil", ["-d", `sql:${db}`, "-A", "-t", "C,,", "-n", "amqp-gateway test CA", "-i", ca]);
  return h;
}

async function launch(homeDir) {
  return chromium.launch({ executablePath: CHROMIUM, args: ARGS, env: { ...process.env, HOME: homeDir } });
}

before(async () => {
  dir = mkdtempSync(join(tmpdir(), "gw-tls-"));
  issueCertificates();
  gateway = await startGateway({
    GATEWAY_TLS__CERT: join(dir, "cert.pem"),
    GATEWAY_TLS__KEY: join(dir, "key.pem"),
    GATEWAY_MQTT__TLS_LISTEN: "127.0.0.1:0",
    GATEWAY_AMQP__TLS_LISTEN: "127.0.0.1:0",
  });
});

after(() => {
  if (gateway) gateway.stop();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

const consoleUrl = () => `https://localhost:${gateway.http.split(":")[1]}/console`;

test("the console over https:// subscribes and publishes over wss:// with the CA trusted", async () => {
  const browser = await launch(home("trusting", join(dir, "ca.pem")));
  try {
    const page = await browser.newPage();
    const errors = [];
    page.on("pageerror", (e) => errors.push(e.message));
    const response = await page.goto(consoleUrl());
    assert.equal(response.status(), 200);
    const security = await response.securityDetails();
    assert.match(security.protocol, /^TLS 1\.[23]$/);
    assert.equal(security.subjectName, "localhost");

    await page.fill("#token", gateway.token);
    await page.click("#connect");
    await page.waitForSelector('#state[data-state="open"]', { timeout: WAIT });
    await page.fill("#binding-key", "secure.#");
    await page.click("#subscribe");
    await page.waitForSelector("#subs li", { timeout: WAIT });
    await page.fill("#pub-key", "secure.from-page");
    await page.fill("#pub-body", '{"over":"wss"}');
    await page.click("#publish");
    await page.waitForFunction(() => document.querySelector("#received").textContent === "1", null, { timeout: WAIT });
    assert.match(await page.textContent("#messages tbody tr"), /"over":"wss"/);
    assert.equal(await page.evaluate(() => location.protocol), "https:");
    assert.deepEqual(errors, []);
  } finally {
    await browser.close();
  }
});

test("a browser without the CA refuses the gateway's certificate", async () => {
  const browser = await launch(home("stranger", null));
  try {
    const page = await browser.newPage();
    await assert.rejects(page.goto(consoleUrl()), /ERR_CERT_AUTHORITY_INVALID/);
  } finally {
    await browser.close();
  }
});
