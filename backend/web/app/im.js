// The chat client of one browser tab: a device of its user (docs/PROTOCOL.md sections 1-4, 12, 14, 15), doing
// what the reference client (backend/client.py) does: retained `online` after subscribing, `offline` as its will;
// resend each message with the same msg_id until a receipt; drop repeated seqs and ack every seq (repeats too);
// pull what waits on arrival, after every reconnect and on every announcement; reconnect with backoff for ever.
// Beside that: the read-receipt setting (15.3), the user's devices and their removal (12.6, 12.8) and a
// conversation's history (14.9). It emits "change" (something to redraw), "typing", "state" and "removed"
// (the server said this device had been removed) events; the page (app.js) draws.

import { MqttConnection } from "./mqtt.js";
import { DeviceStore } from "./store.js";

// As backend/client.py: resend 3, 9, 21, 45, 75 s after the first publish; failed at 105 s.
const RESEND_FIRST_MS = 3000, MAX_RESENDS = 5, RESEND_WAIT_MAX_MS = 30000, FAIL_AFTER_MS = 105000;
// A request (count, pull, group ops) is resent after 3 s, 6 s, ... and given up after 10 s.
const REQUEST_RESEND_MS = 3000, REQUEST_TIMEOUT_MS = 10000;
// Reconnect after 1 s, doubling up to 16 s; a refused SUBSCRIBE likewise (client.py's RECONNECT/RESUBSCRIBE).
const BACKOFF_MIN_MS = 1000, BACKOFF_MAX_MS = 16000;
// A sync that got no answer is tried again after 1 s, doubling up to 30 s, while connected (SYNC_RETRY_*).
const SYNC_RETRY_MIN_MS = 1000, SYNC_RETRY_MAX_MS = 30000;
// Keepalive (s): the broker ends a connection silent for 1.5x this; pings go out every half of it (mqtt.js).
export const KEEPALIVE_S = 30;
// Pull pages of this many: a browser on any link (the protocol's default).
const PULL_LIMIT = 100;
// Typing notices are renewed this often while the user types (section 15.1: the server says 6 s).
export const TYPING_RENEW_MS = 3000;
// Never show "typing" longer than this without a renewal, whatever a notice says (the reference client's bound).
const TYPING_MAX_MS = 30000;
// A page of history (section 14.9): the protocol's default; about a screenful and a half of a conversation.
export const HISTORY_LIMIT = 50;
// The conversation list asked for at login (section 14.9, op conversations): one page of the protocol's most
// (500, about 30 KB); older conversations show when a message comes, or by the user opening them.
const CONVERSATIONS_LIMIT = 500;

export class IMClient extends EventTarget {
  /** url: the broker's ws:// or wss:// URL; uid, password: the account; device: this tab's device id. */
  constructor({ url, uid, password, device, keepalive = KEEPALIVE_S, ticker = "worker" }) {
    super();
    // ticker "page": the page's own setInterval instead of the worker (to show what throttling does to it).
    Object.assign(this, { url, uid, password, device, keepalive, ticker });
    this.store = new DeviceStore(uid, device);
    this.state = "connecting";  // connecting | online | offline | refused | closed
    this.reason = "";
    this.connections = 0;  // successful connections so far (a reconnect adds one)
    this.duplicatesDropped = 0;
    this.presence = {};  // uid -> "online" | "offline"
    this.typingFrom = {};  // conversation key -> {uid: until ms}
    this.groups = {};  // group id -> {group, name, role, members}
    this.devices = null;  // the last `devices` answer
    // turned off when the server answers unknown_op (history: history_off, a server keeping none)
    this.features = { read: true, typing: true, settings: true, history: true };
    this.removed = false;  // the server said this device had been removed (section 12.8): set, never cleared
    this.history = {};  // conversation key -> {before, more, loading}: this page's paging back (not saved)
    this.errors = [];
    this._ids = 0;
    this._prefix = Math.random().toString(36).slice(2, 8);
    this._outgoing = new Map();  // msg_id -> {body, attempts, next, deadline}
    this._requests = new Map();  // req_id -> {body, resolve, reject, next, deadline, wait}
    this._acks = [];
    this._timers = [];  // [at, fn]: run by the ticker (1 s resolution, never throttled)
    this._syncing = false;
    this._syncAgain = false;
    this._syncWait = SYNC_RETRY_MIN_MS;
    this.t = (topic) => `im/u/${uid}/d/${device}/${topic}`;
    this.statusTopic = `im/status/${uid}/${device}`;
    // Messages that were not confirmed stored before a reload are resent with their msg_id.
    for (const c of Object.values(this.store.convs)) {
      for (const m of c.messages) if (m.mine && m.state === "sending" && m.body) this._track(m.body, m);
    }
  }

  // -- lifecycle ------------------------------------------------------------------------------------------------
  start() {
    this._startTicker();
    addEventListener("online", () => this._wake());  // the network is back: try now, not at the backoff's end
    this._loop();
    return this;
  }

  _startTicker() {
    const onTick = () => this._tick(Date.now());
    try {
      if (this.ticker === "page") throw new Error("the page's own timer asked for");
      this._worker = new Worker(new URL("./tick.js", import.meta.url));
      this._worker.onmessage = onTick;
    } catch (e) {
      setInterval(onTick, 1000);  // no workers: the page's own timer (throttled in a background tab)
    }
  }

  _tick(now) {
    if (this.conn) this.conn.tick(now);
    const due = this._timers.filter(([at]) => at <= now);
    this._timers = this._timers.filter(([at]) => at > now);
    for (const [, fn] of due) fn();
    this._resendDue(now);
    this._requestsDue(now);
    this._typingDue(now);
  }

  _after(ms, fn) { this._timers.push([Date.now() + ms, fn]); }

  _sleep(ms) { return new Promise((resolve) => { this._wakeUp = resolve; this._after(ms, resolve); }); }

  _wake() { if (this._wakeUp) this._wakeUp(); }

  _setState(state, reason = "") {
    this.state = state;
    this.reason = reason;
    this.dispatchEvent(new CustomEvent("state", { detail: { state, reason } }));
  }

  async _loop() {
    let backoff = BACKOFF_MIN_MS;
    while (this.state !== "closed" && this.state !== "refused") {
      this._setState("connecting");
      const conn = new MqttConnection(this.url, {
        clientId: `${this.uid}:${this.device}`, username: this.uid, password: this.password,
        keepalive: this.keepalive, will: { topic: this.statusTopic, payload: "offline", qos: 1, retain: true },
      });
      conn.onmessage = (topic, payload, flags) => this._onPublish(topic, payload, flags);
      const closed = new Promise((resolve) => { conn.onclose = resolve; });
      try {
        await conn.connect();
        this.conn = conn;
        await this._subscribe(conn);
        await conn.publish(this.statusTopic, "online", { qos: 1, retain: true });
      } catch (e) {
        if (e.code === 4 || e.code === 5) {
          this._setState("refused", "wrong user name or password");
          return;
        }
        conn.abort(e.message);
        this.conn = null;
        this._setState("offline", e.message);
        await this._sleep(backoff);
        backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
        continue;
      }
      backoff = BACKOFF_MIN_MS;
      this.connections++;
      this._setState("online");
      this._resendAll();
      this.sync();  // whatever waited meanwhile, without waiting for the announcement our `online` brings
      this.refreshGroups().catch(() => {});
      this.loadSettings().catch(() => {});
      this._catchUp().catch(() => {});
      this.loadConversations().catch(() => {});
      const reason = await closed;
      this.conn = null;
      if (this.state === "closed") return;
      this._setState("offline", reason);
      await this._sleep(BACKOFF_MIN_MS);
    }
  }

  async _subscribe(conn) {
    let wait = BACKOFF_MIN_MS;
    for (;;) {
      // The device's own status at QoS 0: a stale will there is answered by `online` again (_onPublish).
      const codes = await conn.subscribe([[this.t("inbox"), 1], [this.t("reply"), 1], ["im/status/+", 1],
                                          [this.statusTopic, 0]]);
      if (codes[0] < 128 && codes[1] < 128) return;  // presence may be refused (serve --presence self)
      await this._sleep(wait);  // refused (NATS while JetStream recovers): again, with backoff
      wait = Math.min(wait * 2, BACKOFF_MAX_MS);
      if (!conn.connected) throw new Error("connection lost while subscribing");
    }
  }

  /** Log out: `offline` on the device's status, then DISCONNECT (so the will does not fire). */
  async close() {
    const conn = this.conn;
    this._setState("closed");
    if (conn && conn.connected) {
      await conn.publish(this.statusTopic, "offline", { qos: 1, retain: true }).catch(() => {});
      conn.disconnect();
    }
    if (this._worker) this._worker.terminate();
  }

  // -- inbound --------------------------------------------------------------------------------------------------
  _onPublish(topic, payload, flags = {}) {
    if (topic === this.statusTopic) {
      // A live `offline` on our own status while connected is the will of an earlier connection that a broker
      // cluster delivered after this one's `online` (NATS, when a node dies): the worker now counts this device
      // offline and would only store what comes for it. Say `online` again (docs/PROTOCOL.md, section 3). The
      // retained word a subscription brings (flags.retain) is our own past, not news.
      const word = new TextDecoder().decode(payload).trim();
      if (word === "offline" && !flags.retain && this.state !== "closed" && this.conn?.connected) {
        this.statusRestated = (this.statusRestated || 0) + 1;
        this.conn.publish(this.statusTopic, "online", { qos: 1, retain: true }).catch(() => {});
      }
      return;
    }
    if (topic.startsWith("im/status/")) {
      const who = topic.slice(10);
      if (!who.includes("/")) {
        this.presence[who] = new TextDecoder().decode(payload).trim() === "online" ? "online" : "offline";
        this._changed();
      }
      return;
    }
    let obj;
    try { obj = JSON.parse(new TextDecoder().decode(payload)); } catch (e) { return; }
    if (!obj || typeof obj !== "object") return;
    if (topic === this.t("inbox")) this._onInbox(obj);
    else this._onReply(obj);
  }

  _onInbox(obj) {
    if (obj.kind === "msg" && Number.isInteger(obj.seq)) {
      this._acks.push(obj.seq);  // a repeat is acked again: our ack may have been lost
      this._accept(obj);
      this._flushSoon();
    } else if (obj.kind === "typing") {
      const key = obj.group ? `g:${obj.group}` : `u:${obj.from}`, until = Date.now() + Math.min(obj.expires_in || 6000, TYPING_MAX_MS);
      const now = this.typingFrom[key] || (this.typingFrom[key] = {});
      if (obj.state === "stopped") delete now[obj.from]; else now[obj.from] = until;
      this.dispatchEvent(new CustomEvent("typing", { detail: { key } }));
    } else if (obj.kind === "read") {  // another device of ours moved a marker
      this._marker(obj.group ? `g:${obj.group}` : `u:${obj.with}`, obj.seq);
    } else if (obj.kind === "settings") {  // another device of ours changed the setting
      this._settings(obj);
    }
  }

  /** Record a message unless its seq was seen; saved before any ack leaves (_flushSoon). ``past``: a history
   * entry (section 14.9), which says nothing of the group as it is now nor of who types. */
  _accept(m, past = false) {
    if (this.store.seen.has(m.seq)) { this.duplicatesDropped++; return false; }
    this.store.seen.add(m.seq);
    const mine = m.from === this.uid && !(m.to === this.uid && !m.copy);
    const key = m.group ? `g:${m.group}` : `u:${mine ? m.to : m.from}`;
    const c = this.store.conv(key);
    const rec = {
      seq: m.seq, gseq: m.gseq, msg_id: m.msg_id, from: m.from, to: m.to, type: m.type, content: m.content,
      sent_at: m.sent_at, ts: m.ts, mine, event: m.event, state: mine ? "stored" : undefined,
    };
    const same = mine ? c.messages.find((x) => x.mine && x.msg_id === m.msg_id) : null;
    if (same) Object.assign(same, { seq: m.seq, gseq: m.gseq });
    else c.messages.push(rec);
    c.messages.sort(order);
    if (past) return true;
    if (m.group && m.type === "group_event" && m.event) this._groupEvent(m.group, m.event);
    if (!mine && this.typingFrom[key]) delete this.typingFrom[key][m.from];
    this._changedSoon = true;
    return true;
  }

  _flushSoon() {
    // Once per burst of packets (one WebSocket frame), never on a timer a background tab would throttle.
    if (this._flushQueued) return;
    this._flushQueued = true;
    queueMicrotask(() => {
      this._flushQueued = false;
      this.store.save();  // store first...
      const seqs = this._acks.splice(0);
      if (seqs.length && this.conn?.connected) {  // ...ack after (a lost ack: the server pushes again, we ack again)
        this.conn.publish(this.t("ack"), JSON.stringify({ seqs }), { qos: 1 }).catch(() => {});
      }
      if (this._changedSoon) { this._changedSoon = false; this._changed(); }
    });
  }

  _onReply(obj) {
    if (obj.kind === "receipts" && Array.isArray(obj.receipts)) {
      for (const r of obj.receipts) if (r && typeof r === "object") this._onReply(r);
      return;
    }
    if (obj.kind === "receipt") return this._receipt(obj);
    const req = obj.req_id != null && this._requests.get(obj.req_id);
    if (req) {
      this._requests.delete(obj.req_id);
      if (obj.kind === "error") req.reject(Object.assign(new Error(obj.message), { code: obj.code }));
      else req.resolve(obj);
      return;
    }
    if (obj.kind === "error") {
      this.errors.push(obj);
      if (obj.code === "unknown_op" && typeof obj.req_id === "string" && obj.req_id.startsWith("t-")) {
        this.features.typing = false;  // a server without typing notices (section 15)
      }
      if (obj.code === "device_removed") this._removed();
      const out = this._outgoing.get(obj.msg_id);
      if (out && obj.code !== "rate_limited") {  // rate_limited: the resend timer tries again later
        this._outgoing.delete(obj.msg_id);
        out.rec.state = "failed";
        out.rec.error = obj.code;
        delete out.rec.body;
        this._save();
      }
    } else if (obj.kind === "count" && obj.req_id == null) {  // an announcement
      if (obj.total > 0) this.sync();
    }
  }

  _receipt(r) {
    const status = r.status;
    if (status === "read" && r.group != null) {  // k of the group's n other members have read this one
      const rec = this._findMine(r);
      if (!rec) return;
      rec.readBy = [r.read, r.members];
      if (r.read > 0 && r.read >= r.members) rec.state = "read";
      return this._save();
    }
    if (status === "read") {  // r.to read everything of ours up to r.seq (markers never move back)
      const c = this.store.convs[`u:${r.to}`];
      if (!c) return;
      for (const m of c.messages) if (m.mine && m.seq && m.seq <= r.seq) m.state = "read";
      return this._save();
    }
    const out = this._outgoing.get(r.msg_id);
    const rec = out ? out.rec : this._findMine(r);
    if (!rec) return;
    if (status === "stored" || status === "duplicate") {
      this._outgoing.delete(r.msg_id);
      delete rec.body;
      rec.seq = r.seq;
      if (r.gseq != null) rec.gseq = r.gseq;
      if (rec.state === "sending" || rec.state === "failed") rec.state = "stored";
    } else if (status === "delivered") {
      if (r.members != null) rec.progress = [r.delivered, r.members];
      if (rec.state !== "read" && (r.members == null || r.delivered > 0)) rec.state = "delivered";
    }
    const c = this.store.convs[rec.key];
    if (c) c.messages.sort(order);
    this._save();
  }

  _findMine(r) {
    const c = this.store.convs[r.group ? `g:${r.group}` : `u:${r.to}`];
    return c ? c.messages.find((m) => m.mine && m.msg_id === r.msg_id) : null;
  }

  _save() { this.store.save(); this._changed(); }

  _changed() { this.dispatchEvent(new Event("change")); }

  // -- sending --------------------------------------------------------------------------------------------------
  /** Send text to a user (``group`` false) or a group; shown at once as "sending", then stored, delivered, read. */
  send(to, content, { group = false } = {}) {
    const msg_id = `${this.device}-${Date.now().toString(36)}-${++this._ids}`;
    const body = { msg_id, [group ? "group" : "to"]: to, type: "text", content, ts: Date.now(), receipts: "batch" };
    const key = `${group ? "g" : "u"}:${to}`;
    const c = this.store.conv(key);
    const rec = { msg_id, from: this.uid, to, type: "text", content, ts: body.ts, mine: true, state: "sending", key, body };
    c.messages.push(rec);
    this._track(body, rec);
    this._publishSend(body);
    this._save();
    return rec;
  }

  _track(body, rec) {
    const now = Date.now();
    rec.key = rec.key || `${body.group ? "g" : "u"}:${body.group || body.to}`;
    // deadline: set at the first publish on a connection (time offline does not count: a message typed on a
    // train goes when the network is back, it does not fail meanwhile)
    this._outgoing.set(body.msg_id, { body, rec, attempts: 0, wait: RESEND_FIRST_MS, next: now + RESEND_FIRST_MS,
      deadline: null });
  }

  _publishSend(body) {
    if (!this.conn?.connected) return;
    this.conn.publish(this.t("send"), JSON.stringify(body), { qos: 1 }).catch(() => {});
    const out = this._outgoing.get(body.msg_id);
    if (out && out.deadline == null) out.deadline = Date.now() + FAIL_AFTER_MS;
  }

  _resendAll() {
    for (const out of this._outgoing.values()) this._publishSend(out.body);
  }

  _resendDue(now) {
    if (!this.conn?.connected) return;  // a reconnect resends them all at once (_resendAll)
    for (const [id, out] of this._outgoing) {
      if (out.deadline != null && now >= out.deadline && out.attempts >= MAX_RESENDS) {
        this._outgoing.delete(id);
        out.rec.state = "failed";
        this._save();
      } else if (now >= out.next) {
        out.attempts++;
        out.wait = Math.min(out.wait * 2, RESEND_WAIT_MAX_MS);
        out.next = now + out.wait;
        this._publishSend(out.body);
      }
    }
  }

  /** Send a failed message again (same msg_id: never stored twice). */
  retry(rec) {
    if (!rec.mine || rec.state !== "failed") return;
    const body = rec.body || { msg_id: rec.msg_id, [rec.key[0] === "g" ? "group" : "to"]: rec.to, type: "text",
      content: rec.content, ts: rec.ts, receipts: "batch" };
    rec.body = body;
    rec.state = "sending";
    rec.ts = Date.now();
    this._track(body, rec);
    this._publishSend(body);
    this._save();
  }

  // -- requests -------------------------------------------------------------------------------------------------
  /** A request on the device's req topic; resolves with the answer, rejects with the error (``code``) or on
   * timeout. Resent with the same req_id until answered (requests are idempotent). */
  request(body, timeoutMs = REQUEST_TIMEOUT_MS) {
    if (!this.conn?.connected) return Promise.reject(Object.assign(new Error("not connected"), { code: "offline" }));
    const req_id = `${this._prefix}-${++this._ids}`;
    const full = { ...body, req_id };
    return new Promise((resolve, reject) => {
      const now = Date.now();
      this._requests.set(req_id, { body: full, resolve, reject, wait: REQUEST_RESEND_MS, next: now + REQUEST_RESEND_MS,
        deadline: now + timeoutMs });
      this.conn.publish(this.t("req"), JSON.stringify(full), { qos: 1 }).catch(() => {});
    });
  }

  _requestsDue(now) {
    for (const [id, r] of this._requests) {
      if (now >= r.deadline) {
        this._requests.delete(id);
        r.reject(Object.assign(new Error("no answer"), { code: "timeout" }));
      } else if (now >= r.next && this.conn?.connected) {
        r.wait *= 2;
        r.next = now + r.wait;
        this.conn.publish(this.t("req"), JSON.stringify(r.body), { qos: 1 }).catch(() => {});
      }
    }
  }

  /** Pull until the empty page, each pull acking the page before; once more if asked meanwhile (an
   * announcement); a failed sync is tried again with backoff while connected. */
  async sync() {
    if (this._syncing) { this._syncAgain = true; return; }
    this._syncing = true;
    try {
      do {
        this._syncAgain = false;
        let ack = null;
        for (;;) {
          const page = await this.request({ op: "pull", limit: PULL_LIMIT, ...(ack ? { ack } : {}) });
          for (const m of page.messages || []) if (Number.isInteger(m.seq)) this._accept(m);
          this.store.save();  // before the next pull acks this page
          this._changed();
          if (!page.messages || !page.messages.length) break;
          ack = page.cursor;
        }
      } while (this._syncAgain);
      this._syncWait = SYNC_RETRY_MIN_MS;
      this.syncs = (this.syncs || 0) + 1;
    } catch (e) {
      if (this.conn?.connected) {
        const wait = this._syncWait;
        this._syncWait = Math.min(wait * 2, SYNC_RETRY_MAX_MS);
        this._after(wait, () => this.sync());
      }
    } finally {
      this._syncing = false;
    }
  }

  /** After a (re)connect: a new device fetches what its user already has (section 12.7: read-only pages of the
   * user's scope), and conversations with unread messages ask where their markers are (another device may have
   * read them while this one was away: `read` notices reach only online devices). */
  async _catchUp() {
    let after = 0;
    while (!this.store.filled) {
      const page = await this.request({ op: "pull", scope: "user", after, limit: PULL_LIMIT });
      for (const m of page.messages || []) if (Number.isInteger(m.seq)) this._accept(m);
      after = page.after;
      if (!page.more || !Number.isInteger(after)) this.store.filled = true;
      this._save();
    }
    for (const c of Object.values(this.store.convs)) {
      if (!this.features.read || !this.unread(c)) continue;
      this.request({ op: "read", [c.kind === "group" ? "group" : "with"]: c.id, seq: 0 })
        .then((a) => this._marker(c.key, a.seq))
        .catch((e) => { if (e.code === "unknown_op") this.features.read = false; });
    }
  }

  // -- conversations: read markers and typing (section 15) -----------------------------------------------------
  /** The user has seen a conversation up to its newest message from the others: move the read marker (shared
   * by the user's devices; the senders get `read` receipts, aggregate in a group). */
  markRead(key) {
    const c = this.store.convs[key];
    if (!c) return;
    const newest = c.messages.reduce((s, m) => (!m.mine && m.seq > s ? m.seq : s), 0);
    if (newest <= c.read) return;
    c.read = newest;
    this._save();
    if (this.features.read && this.conn?.connected) {
      this.request({ op: "read", [c.kind === "group" ? "group" : "with"]: c.id, seq: newest })
        .then((a) => this._marker(key, a.seq))
        .catch((e) => { if (e.code === "unknown_op") this.features.read = false; });
    }
  }

  _marker(key, seq) {
    const c = this.store.convs[key];
    if (c && Number.isInteger(seq) && seq > c.read) { c.read = seq; this._save(); }
  }

  unread(c) { return c.messages.filter((m) => !m.mine && m.seq > c.read && m.type !== "group_event").length; }

  /** Tell a conversation (key "u:bob" or "g:team") the user types (state "typing", renewed by the caller every
   * TYPING_RENEW_MS) or "stopped". QoS 0: worth nothing late. */
  typing(key, state = "typing") {
    if (!this.features.typing || !this.conn?.connected) return;
    const target = key[0] === "g" ? { group: key.slice(2) } : { to: key.slice(2) };
    const body = { op: "typing", ...target, state, req_id: `t-${++this._ids}` };  // req_id: a server without it says so
    this.conn.publish(this.t("req"), JSON.stringify(body), { qos: 0 }).catch(() => {});
  }

  typers(key, now = Date.now()) {
    return Object.entries(this.typingFrom[key] || {}).filter(([, until]) => until > now).map(([uid]) => uid);
  }

  _typingDue(now) {
    for (const [key, who] of Object.entries(this.typingFrom)) {
      for (const [uid, until] of Object.entries(who)) {
        if (until <= now) { delete who[uid]; this.dispatchEvent(new CustomEvent("typing", { detail: { key } })); }
      }
    }
  }

  // -- groups and devices (sections 14 and 12) ------------------------------------------------------------------
  async refreshGroups() {
    const answer = await this.request({ op: "groups" });
    for (const g of answer.groups || []) {
      this.groups[g.group] = { ...this.groups[g.group], ...g };
      const c = this.store.conv(`g:${g.group}`);
      c.name = g.name || g.group;
      c.left = false;
    }
    this._save();
  }

  async createGroup(group, name, members) {
    const g = await this.request({ op: "group_create", group, ...(name ? { name } : {}), members });
    this._group(g);
    return g;
  }

  async addMembers(group, members) { const g = await this.request({ op: "group_add", group, members }); this._group(g); return g; }

  async leaveGroup(group) {
    const a = await this.request({ op: "group_leave", group });
    const c = this.store.conv(`g:${group}`);
    c.left = true;
    delete this.groups[group];
    this._save();
    return a;
  }

  async groupMembers(group) { const g = await this.request({ op: "group_members", group }); this._group(g); return g; }

  _group(g) {
    this.groups[g.group] = { ...this.groups[g.group], group: g.group, name: g.name, members: g.members };
    const c = this.store.conv(`g:${g.group}`);
    c.name = g.name || g.group;
    c.left = false;
    this._save();
  }

  _groupEvent(group, ev) {
    const c = this.store.conv(`g:${group}`);
    if (ev.event === "created" && ev.name) c.name = ev.name;
    if (ev.event === "renamed" && ev.name) c.name = ev.name;
    const gone = (ev.event === "removed" || ev.event === "left") && (ev.members || []).includes(this.uid);
    if (gone) { c.left = true; delete this.groups[group]; }
    if (ev.event === "added" && (ev.members || []).includes(this.uid)) c.left = false;
    if (this.groups[group]?.members) this.groupMembers(group).catch(() => {});
  }

  async listDevices() {
    this.devices = await this.request({ op: "devices" });
    this._changed();
    return this.devices;
  }

  /** Remove another device of the user (its waiting messages are released; it is told when it comes back). */
  async removeDevice(device) {
    if (device === this.device) throw Object.assign(new Error("this tab cannot remove itself"), { code: "bad_field" });
    return this.request({ op: "remove_device", device });
  }

  /** The server registered this device afresh after its removal (section 12.8): what waited for it is gone. It
   * must not believe it is complete: fetch the user's conversations again (12.7) and sync; the page says so. */
  _removed() {
    this.removed = true;
    this.store.filled = false;
    this.history = {};
    this._save();
    this.dispatchEvent(new Event("removed"));
    this.sync();
    if (this.conn?.connected) this._catchUp().catch(() => {});
  }

  /** Contact the server now (a pull): the page calls it when the tab comes to the front, so a tab removed
   * meanwhile from another device hears it at once rather than at its next message. */
  touch() { if (this.conn?.connected) this.sync(); }

  // -- the read-receipt setting (section 15.3) ------------------------------------------------------------------
  /** Ask the server for the user's settings (the stored value; a reload shows the saved one meanwhile). */
  async loadSettings() { return this._settingsRequest({ op: "settings" }); }

  /** Send `read` receipts (the default) or not; resolves with the setting as stored. */
  async setReadReceipts(on) { return this._settingsRequest({ op: "settings", read_receipts: !!on }); }

  async _settingsRequest(body) {
    if (!this.features.settings) throw Object.assign(new Error("this server has no settings"), { code: "unknown_op" });
    try {
      return this._settings(await this.request(body));
    } catch (e) {
      if (e.code === "unknown_op") { this.features.settings = false; this._changed(); }
      throw e;
    }
  }

  _settings(obj) {
    if (typeof obj.read_receipts !== "boolean") return this.store.settings;
    this.store.settings = { read_receipts: obj.read_receipts };
    this._save();
    return this.store.settings;
  }

  // -- history (section 14.9) -----------------------------------------------------------------------------------
  /** The user's recent conversations as the server keeps them (servers with --history-days), merged with those
   * the tab holds: a new tab lists its 1:1 conversations too, not only its groups; opening one loads its
   * history. Each gets ``lastSentAt`` (the server's time of its newest message) for the list's order. A server
   * without history answers history_off once, and is not asked again. Resolves with the number listed. */
  async loadConversations() {
    if (!this.features.history) return 0;
    let a;
    try {
      a = await this.request({ op: "conversations", limit: CONVERSATIONS_LIMIT });
    } catch (e) {
      if (e.code === "history_off" || e.code === "unknown_op") { this.features.history = false; this._changed(); }
      throw e;
    }
    let n = 0;
    for (const e of a.conversations || []) {
      const group = typeof e.group === "string", id = group ? e.group : e.with;
      if (typeof id !== "string" || !id) continue;
      const c = this.store.conv(`${group ? "g" : "u"}:${id}`, group && e.name ? { name: e.name } : {});
      if (Number.isInteger(e.last_sent_at)) c.lastSentAt = Math.max(c.lastSentAt || 0, e.last_sent_at);
      n++;
    }
    this._save();
    return n;
  }

  /** Fetch a page of a conversation's past (servers with --history-days): the newest page (``earlier`` false),
   * or the page before the last one fetched. Shown beside what the tab holds, each seq once. Resolves with the
   * number of messages new to the tab; a server without history answers history_off once, and is not asked
   * again. */
  async loadHistory(key, earlier = false) {
    const c = this.store.convs[key];
    const h = this.history[key] || (this.history[key] = { before: 0, more: null, loading: false });
    if (!c || !this.features.history || h.loading || (earlier && !h.more)) return 0;
    if (earlier) this.store.paged.add(key);  // what the user pages back to stays shown (not cut to MESSAGES_KEPT)
    h.loading = true;
    this._changed();
    try {
      const a = await this.request({ op: "history", [c.kind === "group" ? "group" : "with"]: c.id, limit: HISTORY_LIMIT,
        ...(earlier ? { before: h.before } : {}) });
      let added = 0;
      for (const m of a.messages || []) if (Number.isInteger(m.seq) && this._accept(m, true)) added++;
      // The first page fetched sets where "earlier" starts; a later newest page (a reload) does not move it back.
      if (earlier || h.more == null) Object.assign(h, { before: a.before, more: !!a.more && a.before != null });
      this._changedSoon = false;
      this._save();
      return added;
    } catch (e) {
      if (e.code === "history_off" || e.code === "unknown_op") this.features.history = false;
      throw e;
    } finally {
      h.loading = false;
      this._changed();
    }
  }
}

/** A conversation's order: by gseq in a group, by seq otherwise; not yet stored (no seq) last, by time. */
function order(a, b) {
  const ka = a.gseq ?? a.seq, kb = b.gseq ?? b.seq;
  if (ka != null && kb != null) return ka - kb;
  if (ka != null) return -1;
  if (kb != null) return 1;
  return (a.ts || 0) - (b.ts || 0);
}
