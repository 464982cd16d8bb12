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
