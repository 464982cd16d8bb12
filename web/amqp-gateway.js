// amqp-gateway browser client — an ES module with no dependencies and no build step.
//
//   import { Gateway } from "/client/amqp-gateway.js";
//   const gw = new Gateway("wss://gateway.example/ws", { getToken: () => fetchMyToken() });
//   const sub = await gw.subscribe({ exchange: "amq.topic", binding_key: "sensors.#" }, (msg) => {
//     console.log(msg.routing_key, msg.body);
//   });
//   const { routed } = await gw.publish("amq.topic", "sensors.k1", { t: 21.5 });
//
// Protocol: DESIGN.md §4 (subprotocol "amqp-gateway.v1.json"). The client reconnects with
// exponential backoff and jitter, authenticates again, re-subscribes every subscription (durable
// ones resume where they were) and refreshes the token before it expires.

export const SUBPROTOCOL = "amqp-gateway.v1.json";

/** An error frame from the gateway, as an Error. */
export class GatewayError extends Error {
  constructor(frame) {
    super(frame.message || frame.code);
    this.name = "GatewayError";
    this.code = frame.code;
    this.op = frame.op_of;
    this.retryAfterMs = frame.retry_after_ms;
  }
}

function decodeJwtExp(token) {
  try {
    const payload = token.split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
    const json = JSON.parse(atob(payload + "===".slice((payload.length + 3) % 4)));
    return typeof json.exp === "number" ? json.exp : null;
  } catch {
    return null;
  }
}

/** One subscription; survives reconnects. */
export class Subscription {
  constructor(gateway, spec, onMessage) {
    this.gateway = gateway;
    this.spec = spec;
    this.onMessage = onMessage;
    this.sub = null; // the gateway's id, new after each reconnect
    this.queue = null;
    this.received = 0;
    this.lagged = 0;
    this.closed = false;
    this.onCancelled = null;
  }

  /** Acknowledge a message of a manual-ack subscription. */
  ack(message, { multiple = false } = {}) {
    return this.gateway._settle("ack", this, message, { multiple });
  }

  /** Reject a message; `requeue` (default true) puts it back in the queue. */
  nack(message, { multiple = false, requeue = true } = {}) {
    return this.gateway._settle("nack", this, message, { multiple, requeue });
  }

  /** Stop; `delete: true` also removes a durable subscription. */
  async unsubscribe({ delete: del = false } = {}) {
    this.closed = true;
    this.gateway.subscriptions.delete(this);
    if (this.sub && this.gateway.connected) {
      await this.gateway._request({ op: "unsubscribe", sub: this.sub, delete: del });
    }
  }
}

export class Gateway {
  /**
   * @param {string} url  ws:// or wss:// URL of /ws
   * @param {object} options
   *   token: a JWT; or getToken: async () => JWT (called on connect and before expiry)
   *   onState: (state) => void, state in "connecting" | "open" | "closed"
   *   backoff: { initialMs = 250, maxMs = 15000 }
   *   refreshBeforeSeconds: refresh this long before exp (default 30)
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = options;
    this.subscriptions = new Set();
    this.pending = new Map(); // id -> {resolve, reject}
    this.bySub = new Map(); // gateway sub id -> Subscription
    this.nextId = 1;
    this.ws = null;
    this.connected = false;
    this.stopped = false;
    this.attempt = 0;
    this.refreshTimer = null;
    this.ready = null;
    this.reconnects = 0;
    this._connect();
  }

  _state(state) {
    if (this.options.onState) this.options.onState(state);
  }

  async _token() {
    if (this.options.getToken) return await this.options.getToken();
    return this.options.token || null;
  }

  _connect() {
    if (this.stopped) return;
    this._state("connecting");
    let opened;
    let failed;
    this.ready = new Promise((res, rej) => {
      opened = res;
      failed = rej;
    });
    this.ready.catch(() => {});
    const ws = new WebSocket(this.url, [SUBPROTOCOL]);
    this.ws = ws;
    ws.onopen = async () => {
      try {
        const token = await this._token();
        if (token) {
          await this._request({ op: "auth", token }, ws);
          this._scheduleRefresh(token);
        }
        this.connected = true;
        this.attempt = 0;
        for (const s of this.subscriptions) await this._subscribe(s);
        this._state("open");
        opened();
      } catch (e) {
        failed(e);
        ws.close();
      }
    };
    ws.onmessage = (event) => this._frame(JSON.parse(event.data));
    ws.onclose = () => {
      const wasConnected = this.connected;
      this.connected = false;
      clearTimeout(this.refreshTimer);
      for (const { reject } of this.pending.values()) reject(new Error("connection closed"));
      this.pending.clear();
      this.bySub.clear();
      for (const s of this.subscriptions) s.sub = null;
      failed(new Error("connection closed"));
      this._state("closed");
      if (this.stopped) return;
      if (wasConnected) this.reconnects += 1;
      const { initialMs = 250, maxMs = 15000 } = this.options.backoff || {};
      const ceiling = Math.min(maxMs, initialMs * 2 ** this.attempt);
      this.attempt += 1;
      // Full jitter: many browsers dropped at once do not come back at once.
      setTimeout(() => this._connect(), Math.random() * ceiling);
    };
  }

  _scheduleRefresh(token) {
    clearTimeout(this.refreshTimer);
    const exp = decodeJwtExp(token);
    if (!exp || !this.options.getToken) return;
    const before = this.options.refreshBeforeSeconds ?? 30;
    const inMs = Math.max(1000, (exp - before) * 1000 - Date.now());
    this.refreshTimer = setTimeout(async () => {
      try {
        const fresh = await this.options.getToken();
        await this._request({ op: "auth", token: fresh });
        this._scheduleRefresh(fresh);
      } catch {
        // The gateway closes with 4001 at expiry; reconnecting fetches a token again.
      }
    }, inMs);
  }

  _frame(frame) {
    switch (frame.op) {
      case "message": {
        const s = this.bySub.get(frame.sub);
        if (!s) return;
        s.received += 1;
        s.onMessage(frame, s);
        return;
      }
      case "lagged": {
        const s = this.bySub.get(frame.sub);
        if (s) s.lagged += frame.dropped;
        if (this.options.onLagged) this.options.onLagged(frame.sub, frame.dropped);
        return;
      }
      case "cancelled": {
        const s = this.bySub.get(frame.sub);
        if (!s) return;
        this.bySub.delete(frame.sub);
        s.sub = null;
        if (s.onCancelled) s.onCancelled(frame.reason);
        // A subscription taken over by another tab, or deleted, stays down.
        this.subscriptions.delete(s);
        return;
      }
      default: {
        const waiting = frame.id != null && this.pending.get(frame.id);
        if (!waiting) return;
        this.pending.delete(frame.id);
        if (frame.op === "error") waiting.reject(new GatewayError(frame));
        else waiting.resolve(frame);
      }
    }
  }

  _request(frame, ws = this.ws) {
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.pending.set(id, { resolve, reject });
      ws.send(JSON.stringify({ ...frame, id }));
    });
  }

  async _subscribe(s) {
    const reply = await this._request({ op: "subscribe", ...s.spec });
    s.sub = reply.sub;
    s.queue = reply.queue;
    this.bySub.set(reply.sub, s);
  }

  async _settle(op, s, message, extra) {
    if (!s.sub || message.sub !== s.sub) return; // from before a reconnect: already requeued
    await this._request({ op, sub: s.sub, delivery_tag: message.delivery_tag, ...extra });
  }

  /** Waits until connected (and authenticated). */
  async whenReady() {
    for (;;) {
      try {
        return await this.ready;
      } catch {
        await new Promise((r) => setTimeout(r, 50));
      }
    }
  }

  /**
   * Subscribe. spec: { exchange, binding_key } or { queue }, plus optional durable (a name),
   * ack ("auto" | "manual"), prefetch, overflow ("drop_oldest" | "disconnect"), arguments.
   * onMessage(message, subscription) gets each "message" frame.
   */
  async subscribe(spec, onMessage) {
    const s = new Subscription(this, spec, onMessage);
    this.subscriptions.add(s);
    if (this.connected) {
      try {
        await this._subscribe(s);
      } catch (e) {
        this.subscriptions.delete(s);
        throw e;
      }
    }
    return s;
  }

  /**
   * Publish; resolves with { routed } once the gateway's engine took the message.
   * body: a string (utf8) or any JSON value; options: { encoding, properties, mandatory }.
   */
  async publish(exchange, routingKey, body, options = {}) {
    await this.whenReady();
    const frame = { op: "publish", exchange, routing_key: routingKey, body };
    if (options.encoding) frame.encoding = options.encoding;
    if (options.properties) frame.properties = options.properties;
    if (options.mandatory) frame.mandatory = true;
    const reply = await this._request(frame);
    return { routed: reply.routed };
  }

  /** Round trip to the gateway. */
  async ping() {
    await this.whenReady();
    await this._request({ op: "ping" });
  }

  /** Close for good (no reconnect). */
  close() {
    this.stopped = true;
    clearTimeout(this.refreshTimer);
    if (this.ws) this.ws.close(1000);
  }
}

/**
 * Subscribe-only over Server-Sent Events (GET /v1/sse), for pages behind proxies that break
 * WebSockets and for dashboards that only listen:
 *
 *   const stream = new EventStream("https://gateway.example", {
 *     token, exchange: "amq.topic", binding_key: "sensors.#", durable: "dashboard",
 *   }, (msg) => console.log(msg.routing_key, msg.body));
 *   await stream.whenReady();
 *
 * spec: { exchange, binding_key } or { queue }, plus optional durable (a name shared with the
 * WebSocket protocol) and overflow ("drop_oldest" | "disconnect"); token or getToken as for
 * Gateway. EventSource cannot send headers, so the token travels in the query string: the
 * gateway must have ws.allow_query_token = true. EventSource reconnects by itself, and a durable
 * stream resumes with Last-Event-ID: nothing is lost across a reconnect. When the token expires
 * (a "close" event with code 4001) a getToken client opens a new stream with a fresh token,
 * resuming from the last id it received.
 */
export class EventStream {
  constructor(baseUrl, spec, onMessage, options = {}) {
    this.baseUrl = baseUrl.replace(/\/$/, "");
    this.spec = spec;
    this.onMessage = onMessage;
    this.options = options;
    this.queue = null;
    this.received = 0;
    this.lagged = 0;
    this.lastEventId = null;
    this.closed = false;
    this.onCancelled = null;
    this.source = null;
    this.ready = new Promise((resolve) => (this._resolveReady = resolve));
    this._open();
  }

  _state(state) {
    if (this.options.onState) this.options.onState(state);
  }

  async _open() {
    if (this.closed) return;
    const token = this.options.getToken ? await this.options.getToken() : this.options.token;
    const params = new URLSearchParams();
    for (const key of ["exchange", "binding_key", "queue", "durable", "overflow"]) {
      if (this.spec[key] != null) params.set(key, this.spec[key]);
    }
    if (token) params.set("access_token", token);
    // A new EventSource has no Last-Event-ID of its own: the query string carries it.
    if (this.lastEventId) params.set("last_event_id", this.lastEventId);
    const source = new EventSource(`${this.baseUrl}/v1/sse?${params}`);
    this.source = source;
    this._state("connecting");
    source.addEventListener("subscribed", (e) => {
      this.queue = JSON.parse(e.data).queue;
      this._state("open");
      this._resolveReady(this);
    });
    source.addEventListener("message", (e) => {
      if (e.lastEventId) this.lastEventId = e.lastEventId;
      this.received += 1;
      this.onMessage(JSON.parse(e.data), this);
    });
    source.addEventListener("lagged", (e) => {
      this.lagged += JSON.parse(e.data).dropped;
    });
    source.addEventListener("cancelled", (e) => {
      this.close();
      if (this.onCancelled) this.onCancelled(JSON.parse(e.data).reason);
    });
    source.addEventListener("close", (e) => {
      const { code } = JSON.parse(e.data);
      if (code === 4001 && this.options.getToken) {
        source.close();
        this._open();
      }
    });
    // EventSource retries by itself after network errors; it gives up only on an HTTP error.
    source.onerror = () => {
      if (this.source !== source) return;
      this._state(source.readyState === EventSource.CLOSED ? "closed" : "connecting");
    };
  }

  /** Waits until the stream is subscribed. */
  whenReady() {
    return this.ready;
  }

  /** Close for good (no reconnect). */
  close() {
    this.closed = true;
    if (this.source) this.source.close();
    this._state("closed");
  }
}
