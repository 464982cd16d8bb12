// The operator view: the gateway's live state from the WebSocket feed (`/v1/feed`, a snapshot
// every second), and the operator's actions through REST (purge, delete, close).

const $ = (id) => document.getElementById(id);
const HISTORY = 120;
const history = { published: [], delivered: [], dropped: [], refused: [] };
const COLORS = { published: "#4aa3ff", delivered: "#3fb950", dropped: "#f85149", refused: "#d29922" };
let feed = null;
let retry = null;

const params = new URLSearchParams(location.search);
const saved = params.get("token") || sessionStorage.getItem("amqp-gateway-operator-token") || "";
$("token").value = saved;

function token() {
  return $("token").value.trim();
}

function log(text) {
  $("log").textContent = text;
}

function state(s, text) {
  $("state").dataset.state = s;
  $("state").textContent = text;
}

function bytes(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${n.toFixed(i ? 1 : 0)} ${units[i]}`;
}

function rate(n) {
  return n >= 1000 ? `${(n / 1000).toFixed(1)}k` : n >= 10 ? n.toFixed(0) : n.toFixed(1);
}

function duration(s) {
  const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
  return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : `${m}m ${s % 60}s`;
}

function cell(tr, text, cls) {
  const td = document.createElement("td");
  td.textContent = text;
  if (cls) td.className = cls;
  tr.appendChild(td);
  return td;
}

// A button that acts on its second click within 3 s: no modal dialog, no accident. Tables are
// redrawn every second, so whether a button is armed is kept by what it acts on, not in it.
const armedUntil = new Map();

function armed(label, key, act) {
  const b = document.createElement("button");
  const id = `${label} ${key}`;
  const isArmed = () => (armedUntil.get(id) || 0) > Date.now();
  b.className = isArmed() ? "danger armed" : "danger";
  b.textContent = isArmed() ? `${label}?` : label;
  b.dataset.action = label;
  b.onclick = async () => {
    if (!isArmed()) {
      armedUntil.set(id, Date.now() + 3000);
      b.classList.add("armed");
      b.textContent = `${label}?`;
      return;
    }
    armedUntil.delete(id);
    b.disabled = true;
    try {
      await act();
    } finally {
      b.disabled = false;
    }
  };
  return b;
}

async function rest(method, path) {
  const resp = await fetch(path, { method, headers: { authorization: `Bearer ${token()}` } });
  if (!resp.ok) {
    const problem = await resp.json().catch(() => ({}));
    log(`${method} ${path}: ${resp.status} ${problem.detail || problem.title || ""}`);
    return false;
  }
  log(`${method} ${path}: done`);
  return true;
}

function chart(canvas, series) {
  const ctx = canvas.getContext("2d");
  const w = canvas.width, h = canvas.height, pad = 4;
  ctx.clearRect(0, 0, w, h);
  const max = Math.max(1, ...series.flatMap((name) => history[name]));
  ctx.strokeStyle = "#2a333d";
  ctx.fillStyle = "#8a96a3";
  ctx.font = "11px system-ui";
  for (const f of [0.5, 1]) {
    const y = h - pad - f * (h - 2 * pad);
    ctx.beginPath();
    ctx.moveTo(0, y);
    ctx.lineTo(w, y);
    ctx.stroke();
    ctx.fillText(rate(max * f), 4, y + 12);
  }
  for (const name of series) {
    const points = history[name];
    ctx.strokeStyle = COLORS[name];
    ctx.lineWidth = 2;
    ctx.beginPath();
    points.forEach((v, i) => {
      const x = w - (points.length - 1 - i) * (w / (HISTORY - 1));
      const y = h - pad - (v / max) * (h - 2 * pad);
      if (i === 0) ctx.moveTo(x, y);
      else ctx.lineTo(x, y);
    });
    ctx.stroke();
  }
}

function showOverview(o, queueCount) {
  $("engine").textContent = o.engine;
  $("uptime").textContent = duration(o.uptime_seconds);
  $("version").textContent = o.version;
  for (const k of ["published", "delivered", "dropped", "refused"]) {
    $(`rate-${k}`).textContent = rate(o.rates[k]);
    history[k].push(o.rates[k]);
    if (history[k].length > HISTORY) history[k].shift();
  }
  $("rate-acked").textContent = rate(o.rates.acked);
  $("rate-paced").textContent = o.rates.paced_seconds.toFixed(2);
  $("held").textContent = bytes(o.memory.held_bytes);
  $("watermark").textContent = `watermark ${o.memory.high_watermark}${o.memory.publish_blocked ? " · publishing blocked" : ""}`;
  const total = Object.values(o.connections).reduce((a, b) => a + b, 0);
  $("connection-count").textContent = total;
  $("per-protocol").textContent = Object.entries(o.connections).map(([p, n]) => `${p} ${n}`).join(" · ");
  $("queue-count").textContent = queueCount;
  chart($("chart-messages"), ["published", "delivered"]);
  chart($("chart-problems"), ["dropped", "refused"]);
}

function showQueues(queues) {
  const rows = queues.map((q) => {
    const tr = document.createElement("tr");
    tr.dataset.queue = q.name;
    cell(tr, q.name, "key");
    cell(tr, q.messages, "num depth");
    cell(tr, q.messages_unacknowledged ?? "–", "num");
    cell(tr, q.consumers, "num consumers");
    cell(tr, q.in_rate === undefined ? "–" : rate(q.in_rate), "num");
    cell(tr, q.out_rate === undefined ? "–" : rate(q.out_rate), "num");
    cell(tr, q.growth > 0 ? `+${rate(q.growth)}` : rate(q.growth), `num${q.growth > 0 ? " grow" : ""}`);
    const actions = cell(tr, "");
    actions.className = "actions";
    const name = encodeURIComponent(q.name);
    actions.append(
      armed("purge", q.name, () => rest("DELETE", `/v1/queues/${name}/contents`)),
      armed("delete", q.name, () => rest("DELETE", `/v1/queues/${name}`)),
    );
    return tr;
  });
  $("queues").tBodies[0].replaceChildren(...rows);
}

function showConnections(connections) {
  const rows = connections.map((c) => {
    const tr = document.createElement("tr");
    tr.dataset.connection = c.id;
    tr.dataset.clientId = c.client_id ?? "";
    cell(tr, c.id, "num");
    cell(tr, `${c.protocol}/${c.transport}`);
    cell(tr, c.peer);
    cell(tr, c.subject);
    cell(tr, c.client_id ?? "");
    cell(tr, new Date(c.connected_since * 1000).toLocaleTimeString());
    cell(tr, c.subscriptions.map((s) => s.pattern ? `${s.pattern} → ${s.queue}` : s.queue).join("\n"), "subs");
    cell(tr, c.in_flight, "num");
    cell(tr, rate(c.publish_rate ?? 0), "num");
    const buffer = cell(tr, "");
    if (c.buffer) {
      const fill = document.createElement("span");
      fill.className = `fill${c.buffer.slow ? " slow" : ""}`;
      const bar = document.createElement("span");
      bar.style.width = `${Math.min(100, (100 * c.buffer.messages) / Math.max(1, c.buffer.max_messages))}%`;
      fill.append(bar);
      buffer.append(fill, ` ${c.buffer.messages}${c.buffer.dropped ? ` (${c.buffer.dropped})` : ""}`);
    }
    const actions = cell(tr, "");
    actions.className = "actions";
    actions.append(armed("close", c.id, () => rest("DELETE", `/v1/connections/${c.id}`)));
    return tr;
  });
  $("connections").tBodies[0].replaceChildren(...rows);
}

function watch() {
  clearTimeout(retry);
  if (feed) feed.close();
  sessionStorage.setItem("amqp-gateway-operator-token", token());
  const url = `${location.protocol === "https:" ? "wss" : "ws"}://${location.host}/v1/feed`;
  const ws = new WebSocket(url);
  feed = ws;
  state("connecting", "connecting…");
  ws.onopen = () => ws.send(JSON.stringify({ op: "auth", token: token() }));
  ws.onmessage = (ev) => {
    const s = JSON.parse(ev.data);
    if (s.op !== "snapshot") return;
    state("open", "live");
    $("auth-error").textContent = "";
    showOverview(s.overview, s.queue_count);
    showQueues(s.queues);
    showConnections(s.connections);
  };
  ws.onclose = (ev) => {
    if (feed !== ws) return;
    state("closed", "disconnected");
    if (ev.code === 4001 || ev.code === 1008) {
      $("auth-error").textContent = ev.reason || "refused";
      return;
    }
    retry = setTimeout(watch, 1000);
  };
}

$("watch").onclick = watch;
if (saved) watch();
