// What the tab keeps in the browser's storage: its device id (one per tab, stable across reloads), and per
// (user, device) the conversations, the seqs already shown (so nothing shows twice after a reload) and the
// messages not yet confirmed stored (resent after a reload). localStorage: synchronous, so a message is on disk
// before its ack leaves (store first, ack after).

const PREFIX = "im.v1";
// Kept per conversation (older ones leave the tab's storage; the server keeps history where it is turned on).
export const MESSAGES_KEPT = 500;
// ...and when the browser's storage quota is reached (a few MB per site).
export const MESSAGES_KEPT_WHEN_FULL = 50;
// Seen seqs kept: far more than can be redelivered (a seq is redelivered only until its ack reaches the server).
export const SEEN_KEPT = 20000;

function randomId() {
  const a = new Uint8Array(6);
  crypto.getRandomValues(a);
  return Array.from(a, (b) => (b % 36).toString(36)).join("");
}

function tryLock(name) {
  // Held until the tab closes or reloads: the promise returned to the lock manager never settles.
  return new Promise((resolve) => {
    navigator.locks.request(name, { ifAvailable: true }, (lock) => {
      resolve(!!lock);
      return lock ? new Promise(() => {}) : null;
    }).catch(() => resolve(false));
  });
}

/** This tab's device id for ``uid``: the one it had before a reload, else a known id no other open tab holds
 * (Web Locks), else a new one ("web-xxxxxx"). Two tabs are two devices; a reload keeps its device. */
export async function claimDevice(uid) {
  const sessionKey = `${PREFIX}.device.${uid}`, poolKey = `${PREFIX}.devices.${uid}`;
  const pool = JSON.parse(localStorage.getItem(poolKey) || "[]");
  const preferred = sessionStorage.getItem(sessionKey);
  let device = null;
  if (navigator.locks) {
    for (const id of new Set([preferred, ...pool].filter(Boolean))) {
      if (await tryLock(`${PREFIX}.${uid}.${id}`)) { device = id; break; }
    }
    if (!device) {
      device = `web-${randomId()}`;
      await tryLock(`${PREFIX}.${uid}.${device}`);
    }
  } else {  // no Web Locks (a page not served from localhost or HTTPS): one id per tab, kept across reloads
    device = preferred || `web-${randomId()}`;
  }
  if (!pool.includes(device)) localStorage.setItem(poolKey, JSON.stringify([...pool, device]));
  sessionStorage.setItem(sessionKey, device);
  return device;
}

/** The saved state of one device of one user. */
export class DeviceStore {
  constructor(uid, device) {
    this.key = `${PREFIX}.state.${uid}.${device}`;
    let saved = null;
    try { saved = JSON.parse(localStorage.getItem(this.key) || "null"); } catch (e) { saved = null; }
    this.convs = saved?.convs || {};  // key ("u:bob", "g:team") -> conversation
    this.seen = new Set(saved?.seen || []);
    this.filled = !!saved?.filled;  // it has fetched what its user had before it (section 12.7)
    this.settings = saved?.settings || null;  // the user's settings as the server last said ({read_receipts})
    this.paged = new Set();  // conversations whose earlier pages were loaded on this page: not cut in memory
  }

  conv(key, init = {}) {
    let c = this.convs[key];
    if (!c) {
      const [kind, id] = [key[0] === "g" ? "group" : "user", key.slice(2)];
      c = this.convs[key] = { key, kind, id, name: id, messages: [], read: 0, ...init };
    }
    return c;
  }

  /** Write it all (before any ack leaves). The browser's quota reached: keep fewer old messages and try again;
   * still full: throws, and the caller sends no ack (the server keeps the messages for later). */
  save() {
    let seen = [...this.seen];
    if (seen.length > SEEN_KEPT) { seen = seen.sort((a, b) => a - b).slice(-SEEN_KEPT); this.seen = new Set(seen); }
    for (const kept of [MESSAGES_KEPT, MESSAGES_KEPT_WHEN_FULL]) {
      const convs = {};
      for (const c of Object.values(this.convs)) {
        const old = c.messages.length - kept;
        const cut = old > 0 ? c.messages.findIndex((m, i) => i >= old || m.state === "sending") : 0;
        // A conversation paged back through (history) keeps what was loaded on the page; the storage, the newest.
        if (this.paged.has(c.key)) convs[c.key] = cut > 0 ? { ...c, messages: c.messages.slice(cut) } : c;
        else { if (cut > 0) c.messages.splice(0, cut); convs[c.key] = c; }
      }
      try {
        localStorage.setItem(this.key, JSON.stringify({ convs, seen, filled: this.filled, settings: this.settings }));
        return;
      } catch (e) {
        if (kept === MESSAGES_KEPT_WHEN_FULL) throw e;
      }
    }
  }
}
