// MQTT 3.1.1 over WebSocket, the project's own and only what the chat needs: CONNECT (with a will), SUBSCRIBE,
// PUBLISH at QoS 0 and 1 both ways, PUBACK, PINGREQ/PINGRESP, DISCONNECT. One MqttConnection is one WebSocket;
// reconnecting (a new connection) is the caller's job (im.js). No timers of its own: the caller calls tick()
// every second or so from a timer that background tabs do not throttle (tick.js, a worker).

// Largest packet accepted from the broker: the server cuts its payloads at 1 MiB; 4 MiB leaves room and still
// bounds what a broken broker can hand a tab (backend/client.py's REPLY_ACCEPT_MAX).
export const MAX_INBOUND = 4 * 1024 * 1024;
// The broker waits 1.5 x keepalive for a packet; a PINGREQ goes out when nothing was sent for half the keepalive,
// so a tick late by up to keepalive seconds (a throttled tab) still keeps the connection.
const PING_FRACTION = 0.5;

const CONNECT = 1, CONNACK = 2, PUBLISH = 3, PUBACK = 4, SUBSCRIBE = 8, SUBACK = 9, PINGREQ = 12, PINGRESP = 13,
  DISCONNECT = 14;
const encoder = new TextEncoder();
const decoder = new TextDecoder("utf-8", { fatal: true });

export const CONNACK_REASONS = {
  1: "unacceptable protocol version", 2: "client id rejected", 3: "server unavailable",
  4: "bad user name or password", 5: "not authorized",
};

export class MqttError extends Error {
  constructor(message, code) { super(message); this.code = code; }
}

function bytes(value) { return typeof value === "string" ? encoder.encode(value) : value; }

function str(value) {  // an MQTT UTF-8 string: 2-byte length, then the bytes
  const b = bytes(value);
  if (b.length > 65535) throw new MqttError("string over 65,535 bytes");
  return [Uint8Array.of(b.length >> 8, b.length & 255), b];
}

function u16(n) { return Uint8Array.of(n >> 8, n & 255); }

/** One packet: fixed header (type, flags, remaining length as a variable byte integer), then the parts. */
export function packet(type, flags, parts) {
  const length = parts.reduce((n, p) => n + p.length, 0);
  if (length > 268435455) throw new MqttError("packet over MQTT's 256 MB limit");
  const head = [(type << 4) | flags];
  let n = length;
  do {
    let digit = n % 128;
    n = Math.floor(n / 128);
    if (n > 0) digit |= 128;
    head.push(digit);
  } while (n > 0);
  const out = new Uint8Array(head.length + length);
  out.set(head, 0);
  let at = head.length;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

/** Split a byte stream into packets: returns [packets, rest]; each packet is {type, flags, body}. Throws on a
 * malformed length or a packet over ``max`` bytes. */
export function parsePackets(buf, max = MAX_INBOUND) {
  const out = [];
  let at = 0;
  for (;;) {
    if (buf.length - at < 2) break;
    let length = 0, mult = 1, i = at + 1, done = false;
    for (let k = 0; k < 4 && i < buf.length; k++, i++) {
      length += (buf[i] & 127) * mult;
      mult *= 128;
      if ((buf[i] & 128) === 0) { done = true; i++; break; }
      if (k === 3) throw new MqttError("malformed remaining length");
    }
    if (!done) break;  // the length itself is not complete yet
    if (length > max) throw new MqttError(`packet of ${length} bytes, over the ${max}-byte limit`);
    if (buf.length - i < length) break;
    out.push({ type: buf[at] >> 4, flags: buf[at] & 15, body: buf.subarray(i, i + length) });
    at = i + length;
  }
  return [out, buf.subarray(at)];
}

export class MqttConnection {
  /**
   * url: ws:// or wss://; options: clientId, username, password, keepalive (s; 0 = none), clean (default true),
   * will: {topic, payload, qos, retain}. Callbacks: onmessage(topic, payloadBytes, {qos, retain, dup}) (its
   * return value, when a promise, is awaited before a QoS 1 PUBACK), onclose(reason).
   */
  constructor(url, options = {}) {
    this.url = url;
    this.options = { keepalive: 30, clean: true, ...options };
    this.onmessage = null;
    this.onclose = null;
    this.connected = false;
    this.closed = false;
    this._ids = 0;
    this._waiting = new Map();  // packet id -> {resolve, reject} of a PUBACK or SUBACK
    this._buf = new Uint8Array(0);
    this._lastSent = 0;
    this._pingSent = 0;  // when the unanswered PINGREQ went out, 0 if none
    this.pings = 0;
  }

  /** Open the socket and log in; resolves with this on CONNACK 0, rejects with an MqttError (code = the
   * CONNACK return code, or undefined when the socket closed or failed first). */
  connect(timeoutMs = 10000) {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url, ["mqtt"]);
      ws.binaryType = "arraybuffer";
      this.ws = ws;
      this._connack = { resolve, reject };
      const timer = setTimeout(() => this._fail(new MqttError("no CONNACK in time")), timeoutMs);
      this._connack.clear = () => clearTimeout(timer);
      ws.onopen = () => this._send(this._connectPacket());
      ws.onmessage = (ev) => this._receive(new Uint8Array(ev.data));
      ws.onerror = () => {};  // always followed by onclose, which says it
      ws.onclose = (ev) => this._closed(`socket closed (${ev.code}${ev.reason ? " " + ev.reason : ""})`);
    });
  }

  _connectPacket() {
    const o = this.options;
    let flags = o.clean ? 2 : 0;
    const payload = [...str(o.clientId || "")];
    if (o.will) {
      flags |= 4 | ((o.will.qos || 0) << 3) | (o.will.retain ? 32 : 0);
      payload.push(...str(o.will.topic), ...str(o.will.payload));
    }
    if (o.username != null) { flags |= 128; payload.push(...str(o.username)); }
    if (o.password != null) { flags |= 64; payload.push(...str(o.password)); }
    const header = [...str("MQTT"), Uint8Array.of(4, flags), u16(o.keepalive)];
    return packet(CONNECT, 0, [...header, ...payload]);
  }

  _nextId() {
    do { this._ids = (this._ids % 65535) + 1; } while (this._waiting.has(this._ids));
    return this._ids;
  }

  /** Subscribe to [[filter, qos], ...]; resolves with the granted codes (0x80 = refused). */
  subscribe(filters) {
    const id = this._nextId();
    const parts = [u16(id)];
    for (const [filter, qos] of filters) parts.push(...str(filter), Uint8Array.of(qos));
    return this._expect(id, () => this._send(packet(SUBSCRIBE, 2, parts)));
  }

  /** Publish; resolves when written (QoS 0) or on the broker's PUBACK (QoS 1); rejects if the connection ends
   * first (the caller resends on its next connection, as an app resends by msg_id). */
  publish(topic, payload, { qos = 0, retain = false } = {}) {
    const flags = (qos << 1) | (retain ? 1 : 0);
    if (qos === 0) {
      this._send(packet(PUBLISH, flags, [...str(topic), bytes(payload)]));
      return Promise.resolve();
    }
    const id = this._nextId();
    return this._expect(id, () => this._send(packet(PUBLISH, flags, [...str(topic), u16(id), bytes(payload)])));
  }

  _expect(id, send) {
    if (!this.connected) return Promise.reject(new MqttError("not connected"));
    const p = new Promise((resolve, reject) => this._waiting.set(id, { resolve, reject }));
    send();
    return p;
  }

  /** Keepalive: call about once a second. Sends PINGREQ when nothing went out for half the keepalive, and ends
   * a connection whose PINGREQ got no answer within the keepalive (a dead link: no FIN ever comes). */
  tick(now = Date.now()) {
    const k = this.options.keepalive * 1000;
    if (!this.connected || !k) return;
    if (this._pingSent && now - this._pingSent > k) {
      this.abort("no answer to PINGREQ within the keepalive");
      return;
    }
    if (!this._pingSent && now - this._lastSent >= k * PING_FRACTION) {
      this._pingSent = now;
      this.pings++;
      this._send(packet(PINGREQ, 0, []));
    }
  }

  /** A clean end: DISCONNECT (the broker drops the will), then close. */
  disconnect() {
    if (this.connected) this._send(packet(DISCONNECT, 0, []));
    this._closed("disconnected", true);
  }

  /** End the connection without DISCONNECT (the broker publishes the will), as a dropped network would. */
  abort(reason = "aborted") { this._closed(reason, true); }

  _send(data) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) return;
    this.ws.send(data);
    this._lastSent = Date.now();
  }

  _receive(chunk) {
    let buf = chunk;
    if (this._buf.length) { buf = new Uint8Array(this._buf.length + chunk.length); buf.set(this._buf); buf.set(chunk, this._buf.length); }
    let packets;
    try {
      [packets, this._buf] = parsePackets(buf);
      this._buf = this._buf.slice();  // keep the rest only, not the whole buffer behind it
      for (const p of packets) this._handle(p);
    } catch (e) {
      this._fail(e instanceof MqttError ? e : new MqttError(String(e)));
    }
  }

  _handle({ type, flags, body }) {
    this._pingSent = 0;  // any packet shows the link is alive
    const view = new DataView(body.buffer, body.byteOffset, body.byteLength);
    if (type === CONNACK) {
      const code = body[1];
      const waiter = this._connack;
      this._connack = null;
      if (!waiter) return;
      waiter.clear();
      if (code === 0) { this.connected = true; this._lastSent = Date.now(); waiter.resolve(this); }
      else this._fail(new MqttError(`connection refused: ${CONNACK_REASONS[code] || "code " + code}`, code), waiter);
    } else if (type === PUBLISH) {
      const qos = (flags >> 1) & 3;
      const n = view.getUint16(0);
      const topic = decoder.decode(body.subarray(2, 2 + n));
      let at = 2 + n, id = 0;
      if (qos > 0) { id = view.getUint16(at); at += 2; }
      const payload = body.slice(at);
      let done;
      try { done = this.onmessage ? this.onmessage(topic, payload, { qos, retain: !!(flags & 1), dup: !!(flags & 8) }) : null; }
      catch (e) { console.error("onmessage failed", e); }
      if (qos === 1) Promise.resolve(done).finally(() => this._send(packet(PUBACK, 0, [u16(id)])));
    } else if (type === PUBACK || type === SUBACK) {
      const id = view.getUint16(0);
      const waiter = this._waiting.get(id);
      this._waiting.delete(id);
      if (waiter) waiter.resolve(type === SUBACK ? Array.from(body.subarray(2)) : undefined);
    } else if (type === PINGRESP) {
      // nothing more: _pingSent was cleared above
    }
  }

  _fail(error, waiter = this._connack) {
    if (waiter) { waiter.clear(); waiter.reject(error); this._connack = null; }
    this._closed(error.message, true);
  }

  _closed(reason, closeSocket = false) {
    if (this.closed) return;
    this.closed = true;
    this.connected = false;
    if (this._connack) { this._connack.clear(); this._connack.reject(new MqttError(reason)); this._connack = null; }
    for (const w of this._waiting.values()) w.reject(new MqttError(reason));
    this._waiting.clear();
    if (closeSocket && this.ws) {
      this.ws.onclose = null;
      try { this.ws.close(); } catch (e) { /* already closing */ }
    }
    if (this.onclose) this.onclose(reason);
  }
}
