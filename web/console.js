// The live console: a small page on top of the browser client.
import { Gateway } from "/client/amqp-gateway.js";

const $ = (id) => document.getElementById(id);
const MAX_ROWS = 500;
let gateway = null;
let received = 0;
let lagged = 0;

const params = new URLSearchParams(location.search);
if (params.get("token")) $("token").value = params.get("token");

function log(text) {
  $("log").textContent = text;
}

function setConnected(on) {
  $("subscribe").disabled = !on;
  $("publish").disabled = !on;
  $("disconnect").disabled = !gateway;
  $("connect").disabled = !!gateway;
}

function showState(state) {
  const badge = $("state");
  badge.dataset.state = state;
  badge.textContent = state === "open" ? "connected" : state === "connecting" ? "connecting…" : "disconnected";
  setConnected(state === "open");
  if (gateway) $("reconnects").textContent = gateway.reconnects;
}

function addRow(msg) {
  received += 1;
  $("received").textContent = received;
  const tr = document.createElement("tr");
  if (msg.redelivered) tr.className = "redelivered";
  const body = typeof msg.body === "string" ? msg.body : JSON.stringify(msg.body);
  for (const [text, cls] of [
    [new Date().toLocaleTimeString(), ""],
    [msg.sub, ""],
    [msg.exchange, ""],
    [msg.routing_key, "key"],
    [body, "body"],
    [msg.encoding, ""],
    ["", ""],
  ]) {
    const td = document.createElement("td");
    td.textContent = text;
    if (cls) td.className = cls;
    tr.appendChild(td);
  }
  const tbody = $("messages").tBodies[0];
  tbody.prepend(tr);
  while (tbody.rows.length > MAX_ROWS) tbody.deleteRow(-1);
}

$("connect").onclick = () => {
  const token = $("token").value.trim();
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/ws`;
  gateway = new Gateway(url, {
    token: token || null,
    onState: showState,
    onLagged: (_sub, n) => {
      lagged += n;
      $("lagged").textContent = lagged;
    },
  });
  window.gateway = gateway; // for the curious, and for tests
  setConnected(false);
};

$("disconnect").onclick = () => {
  gateway.close();
  gateway = null;
  $("subs").replaceChildren();
  setConnected(false);
};

$("subscribe").onclick = async () => {
  const spec = { exchange: $("exchange").value, binding_key: $("binding-key").value };
  const durable = $("durable").value.trim();
  if (durable) {
    spec.durable = durable;
    spec.ack = "manual";
  }
  try {
    const sub = await gateway.subscribe(spec, (msg, s) => {
      addRow(msg);
      if (s.spec.ack === "manual") s.ack(msg).catch(() => {});
    });
    const li = document.createElement("li");
    li.textContent = `${spec.exchange} ${spec.binding_key}${durable ? ` (durable ${durable})` : ""} → ${sub.queue}`;
    li.dataset.sub = sub.sub;
    const stop = document.createElement("button");
    stop.className = "link";
    stop.textContent = "unsubscribe";
    stop.onclick = async () => {
      await sub.unsubscribe();
      li.remove();
    };
    li.appendChild(stop);
    sub.onCancelled = (reason) => {
      li.textContent += ` — cancelled (${reason})`;
    };
    $("subs").appendChild(li);
    log(`subscribed to ${spec.exchange} / ${spec.binding_key}`);
  } catch (e) {
    log(`subscribe failed: ${e.code || ""} ${e.message}`);
  }
};

$("publish").onclick = async () => {
  const raw = $("pub-body").value;
  let body = raw;
  try {
    body = JSON.parse(raw);
  } catch {
    // not JSON: publish as text
  }
  try {
    const { routed } = await gateway.publish($("pub-exchange").value, $("pub-key").value, body);
    $("pub-result").textContent = routed ? "published ✓" : "published, but no queue was bound";
  } catch (e) {
    $("pub-result").textContent = `failed: ${e.code || ""} ${e.message}`;
  }
};

$("clear").onclick = () => $("messages").tBodies[0].replaceChildren();
showState("closed");
