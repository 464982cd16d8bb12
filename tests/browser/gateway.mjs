// Starts the gateway binary with --dev on port 0 for the Node tests here and stops it.
//
//   GATEWAY_BIN=../../target/debug/amqp-gateway node --test

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync } from "node:fs";
import { tmpdir } from "node:os";
import net from "node:net";
import { join, resolve } from "node:path";
import readline from "node:readline";

const BIN = resolve(process.env.GATEWAY_BIN || "../../target/debug/amqp-gateway");
export const WAIT = 10_000;

/**
 * Resolves with { http, mqtt } (bound addresses), the --dev administrator `token`, and `stop()`.
 * `env` adds GATEWAY_… configuration variables.
 */
export function startGateway(env = {}) {
  const dataDir = mkdtempSync(join(tmpdir(), "gw-node-"));
  const child = spawn(
    BIN,
    ["--dev", "--http-listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0", "--mqtt-listen", "127.0.0.1:0", "--amqp-listen", "127.0.0.1:0", "--log-format", "json", "--data-dir", dataDir],
    { stdio: ["ignore", "pipe", "inherit"], env: { ...Object.fromEntries(Object.entries(process.env).filter(([k]) => k !== "RUST_LOG")), ...env } },
  );
  const stop = () => {
    child.kill("SIGTERM");
    rmSync(dataDir, { recursive: true, force: true });
  };
  return new Promise((resolveStart, rejectStart) => {
    const timer = setTimeout(() => rejectStart(new Error("gateway did not start")), WAIT);
    const addrs = {};
    readline.createInterface({ input: child.stdout }).on("line", (line) => {
      if (line.startsWith("{")) {
        const log = JSON.parse(line);
        if (log.fields && log.fields.listener) addrs[log.fields.listener] = log.fields.addr;
      } else if (line.startsWith("eyJ") && addrs.http && addrs.mqtt) {
        clearTimeout(timer);
        resolveStart({ http: addrs.http, mqtt: addrs.mqtt, token: line.trim(), stop });
      }
    });
    child.on("exit", (code) => rejectStart(new Error(`gateway exited with ${code}`)));
  });
}

/** A TCP proxy whose connections the test can cut, and which can refuse new ones. */
export function startProxy(target) {
  const [host, port] = target.split(":");
  const sockets = new Set();
  let refusing = false;
  const server = net.createServer((client) => {
    if (refusing) {
      client.destroy();
      return;
    }
    const upstream = net.connect(Number(port), host);
    sockets.add(client);
    sockets.add(upstream);
    client.pipe(upstream).pipe(client);
    const drop = () => {
      client.destroy();
      upstream.destroy();
      sockets.delete(client);
      sockets.delete(upstream);
    };
    client.on("error", drop).on("close", drop);
    upstream.on("error", drop).on("close", drop);
  });
  return new Promise((ready) =>
    server.listen(0, "127.0.0.1", () =>
      ready({
        url: `http://127.0.0.1:${server.address().port}`,
        cut() {
          for (const s of sockets) s.destroy();
          sockets.clear();
        },
        refuse(on) {
          refusing = on;
        },
        close() {
          server.close();
        },
      }),
    ),
  );
}
