// The page: login, the conversation list, a conversation (with its history), the composer, groups, devices and
// settings. It draws what the
// chat client (im.js) holds and turns clicks and keys into its calls. window.im is the client, for debugging
// (and the browser tests). URL parameters, for trying things: ?ws=ws://host:port/path (another broker),
// ?keepalive=S (the MQTT keepalive, default 30 s), ?ticker=page (keepalive on the page's own, throttled timer).

import { IMClient, TYPING_RENEW_MS } from "./im.js";
import { claimDevice } from "./store.js";

const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const SESSION = "im.v1.session";  // this tab's login (uid and password), so a reload logs in again; gone with the tab
const OPEN = "im.v1.open";  // this tab's open conversation
// One click on "Load earlier messages" fetches up to this many pages while they hold nothing new to the tab: 10
// pages of 50 are 500 messages the tab already shows, as many as it keeps per conversation (MESSAGES_KEPT).
const EARLIER_PAGES_MAX = 10;
let im = null, openKey = null, typingSentAt = 0, typingTo = null, savingSettings = false;

async function wsUrl() {
  if (params.get("ws")) return params.get("ws");
  const config = await (await fetch("config.json")).json();
  const ws = config.ws || {};
  if (ws.url) return ws.url;
  const tls = ws.tls || location.protocol === "https:";
  return `${tls ? "wss" : "ws"}://${location.hostname}:${ws.port || 9001}${ws.path || "/mqtt"}`;
}

function show(el, on) { el.hidden = !on; }

function text(tag, cls, value) {
  const el = document.createElement(tag);
  if (cls) el.className = cls;
  if (value != null) el.textContent = value;
  return el;
}

function time(ms) {
  return ms ? new Date(ms).toLocaleTimeString([], { hour: "2-digit", minute: "2-digit" }) : "";
}

// -- login ------------------------------------------------------------------------------------------------------
async function login(uid, password, resume = false) {
  $("login-error").textContent = "";
  const url = await wsUrl();
  const device = await claimDevice(uid);
  const client = new IMClient({ url, uid, password, device, keepalive: Number(params.get("keepalive")) || undefined,
    ticker: params.get("ticker") || undefined });
  const first = new Promise((resolve) => {
    client.addEventListener("state", function onState(ev) {
      const { state, reason } = ev.detail;
      if (state === "online" || state === "refused") { client.removeEventListener("state", onState); resolve(state); }
      else if (state === "offline") $("login-error").textContent = `Cannot reach the server at ${url} (${reason}); retrying…`;
    });
  });
  client.start();
  $("status").textContent = "Connecting…";
  // A reload of a tab that was logged in shows what it has at once (offline first); a new login waits for the
  // broker to accept the password.
  if (resume) enter(client);
  if (await first === "refused") {
    $("login-error").textContent = "Wrong user id or password.";
    $("status").textContent = "";
    sessionStorage.removeItem(SESSION);
    if (resume) { await client.close(); location.reload(); }
    return;
  }
  sessionStorage.setItem(SESSION, JSON.stringify({ uid, password }));
  localStorage.setItem("im.v1.last-uid", uid);
  if (!resume) enter(client);
}

function enter(client) {
  im = window.im = client;
  im.addEventListener("change", draw);
  im.addEventListener("typing", drawTyping);
  im.addEventListener("state", drawState);
  im.addEventListener("removed", () => notice("This tab was removed from your devices (from another device, or "
    + "after a long silence) and is registered again as a new one: what waited for it is gone; it has fetched your "
    + "conversations again."));
  $("me").textContent = `${im.uid} · device ${im.device}`;
  show($("login-view"), false);
  show($("chat-view"), true);
  drawState();
  draw();
  const last = sessionStorage.getItem(OPEN);  // a reload reopens the conversation that was open
  if (last && /^[ug]:/.test(last)) { im.store.conv(last); openConversation(last); }  // storage cleared: anew
  else $("new-chat-uid").focus();
}

$("login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const uid = $("login-uid").value.trim(), password = $("login-password").value;
  if (!uid || !password) { $("login-error").textContent = "Give your user id and password."; return; }
  login(uid, password);
});

$("logout-button").addEventListener("click", async () => {
  sessionStorage.removeItem(SESSION);
  await im.close();
  location.reload();  // a clean page: the device's lock is released, nothing of this login stays in memory
});

// -- the conversation list --------------------------------------------------------------------------------------
function lastMessage(c) {
  for (let i = c.messages.length - 1; i >= 0; i--) if (c.messages[i].type !== "group_event") return c.messages[i];
  return c.messages[c.messages.length - 1];
}

function draw() {
  if (!im) return;
  const convs = Object.values(im.store.convs).sort((a, b) => recent(b) - recent(a));
  const list = $("conversations");
  const focused = list.contains(document.activeElement) ? document.activeElement.dataset.key : null;
  list.replaceChildren(...convs.map((c) => {
    const li = document.createElement("li");
    const b = document.createElement("button");
    b.type = "button";
    b.dataset.key = c.key;
    b.setAttribute("aria-current", c.key === openKey ? "true" : "false");
    const unread = im.unread(c), last = lastMessage(c), presence = c.kind === "user" ? im.presence[c.id] || "offline" : null;
    const name = text("span", "conv-name");
    if (presence) { const dot = text("span", "dot"); dot.dataset.presence = presence; name.append(dot); }
    name.append(c.kind === "group" ? `# ${c.name}` : c.name);
    const badge = text("span", "badge", unread ? String(unread) : "");
    const preview = text("span", "conv-preview", last ? `${last.mine && last.type !== "group_event" ? "You: " : ""}${summary(last)}` : "");
    b.append(name, badge, preview);
    b.setAttribute("aria-label", [c.kind === "group" ? `group ${c.name}` : c.name, presence, unread ? `${unread} unread` : "",
      last ? `last: ${summary(last)}` : ""].filter(Boolean).join(", "));
    b.addEventListener("click", () => openConversation(c.key));
    li.append(b);
    return li;
  }));
  if (focused) list.querySelector(`button[data-key="${CSS.escape(focused)}"]`)?.focus();  // a redraw keeps focus
  drawConversation();
  if ($("settings-dialog").open && !savingSettings) drawSettings();  // another device changed it meanwhile
}

// (a conversation listed by the server and not opened yet holds no message: the server's time of its newest)
function recent(c) { const m = lastMessage(c); return Math.max(m ? m.sent_at || m.ts || 0 : 0, c.lastSentAt || 0); }

function summary(m) {
  if (m.type === "group_event" && m.event) return eventText(m);
  return m.content;
}

function eventText(m) {
  // This tab's own user is "You" / "you" (a preview read "You: alice added ghost" for alice's own change).
  const me = im && im.uid, name = (u, start) => (u === me ? (start ? "You" : "you") : u);
  const e = m.event, by = name(e.by, true), who = (e.members || []).map((u, i) => name(u, i === 0)).join(", ");
  return { created: `${by} created the group`, added: `${by} added ${who.replace(/^You\b/, "you")}`,
    removed: `${by} removed ${who.replace(/^You\b/, "you")}`, left: `${who} left`,
    renamed: `${by} renamed the group to ${e.name}`,
    role: `${name(e.member, true)} ${e.member === me ? "are" : "is"} now ${e.role}` }[e.event] || e.event;
}

$("new-chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const uid = $("new-chat-uid").value.trim();
  if (!/^[A-Za-z0-9_.-]{1,50}$/.test(uid)) return;
  im.store.conv(`u:${uid}`);
  $("new-chat-uid").value = "";
  openConversation(`u:${uid}`);
});

// -- one conversation -------------------------------------------------------------------------------------------
function openConversation(key) {
  if (typingTo && openKey !== key) stopTyping();
  openKey = key;
  sessionStorage.setItem(OPEN, key);
  $("chat-view").classList.add("in-conversation");
  show($("conversation-pane"), true);
  const c = im.store.convs[key];
  if (c.kind === "group") im.groupMembers(c.id).then(draw).catch(() => {});
  firstHistory();
  draw();
  $("composer").focus();
}

// -- history (servers with --history-days): the recent past when a conversation opens, then page by page -------
function firstHistory() {
  // Once per conversation and page (a new tab, a reload, storage cleared): the newest page, beside what the tab
  // holds. Not connected yet (a reload opens the last conversation at once): when the tab is online (drawState).
  if (!im || !openKey || !im.features.history || im.history[openKey] || im.state !== "online") return;
  im.loadHistory(openKey).catch(() => {});  // history_off: the control hides (drawHistory); nothing else to say
}

function drawHistory(c) {
  const h = im.history[c.key] || {};
  show($("load-earlier"), im.features.history && !!h.more);
  $("load-earlier").disabled = !!h.loading;
  $("load-earlier").textContent = h.loading ? "Loading…" : "Load earlier messages";
  // A server without history: say it once, where the control would be, when there is nothing to show.
  const off = !im.features.history && !c.messages.length;
  show($("history-note"), off);
  $("history-note").textContent = off ? "This server keeps no history: only what arrives from now on shows here." : "";
}

$("load-earlier").addEventListener("click", async () => {
  const key = openKey, box = $("messages"), fromBottom = box.scrollHeight - box.scrollTop;
  // A page the tab holds already (a new device's first sync brought the recent past) adds nothing: go on to the
  // page before it, so that a click shows something or hides the button (a trial saw clicks change nothing).
  try {
    for (let pages = 0; pages < EARLIER_PAGES_MAX; pages++) {
      if (await im.loadHistory(key, true) > 0 || !im.history[key]?.more) break;
    }
  } catch (e) { return; }
  if (key === openKey) box.scrollTop = box.scrollHeight - fromBottom;  // the same message stays in view
  if (!$("load-earlier").hidden) $("load-earlier").focus();
});

$("back-button").addEventListener("click", () => {
  $("chat-view").classList.remove("in-conversation");
  openKey = null;
  sessionStorage.removeItem(OPEN);
  draw();
  const b = document.querySelector("#conversations button");
  if (b) b.focus();
});

function drawConversation() {
  const c = openKey && im.store.convs[openKey];
  if (!c) return;
  $("conversation-title").textContent = c.kind === "group" ? `# ${c.name}` : c.name;
  $("conversation-presence").textContent = c.kind === "user" ? im.presence[c.id] || "offline" : (c.left ? "you left" : "");
  const g = c.kind === "group" ? im.groups[c.id] : null;
  show($("add-members-button"), !!g && !c.left);
  show($("leave-group-button"), !!g && !c.left);
  show($("group-members"), !!g?.members);
  if (g?.members) $("group-members").textContent = `Members: ${g.members.map((m) => m.uid).join(", ")}`;
  drawHistory(c);  // first: the control's height changes the box's
  const box = $("messages");
  const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
  box.replaceChildren(...c.messages.map((m) => drawMessage(c, m)));
  if (atBottom) box.scrollTop = box.scrollHeight;
  $("composer").disabled = !!c.left;
  drawTyping();
  if (document.visibilityState === "visible") im.markRead(openKey);
}

function drawMessage(c, m) {
  const li = document.createElement("li");
  if (m.seq != null) li.dataset.seq = m.seq;
  li.dataset.msgId = m.msg_id;
  if (m.type === "group_event") {
    li.className = "msg event";
    li.textContent = m.event ? eventText(m) : "group changed";
    return li;
  }
  li.className = m.mine ? "msg mine" : "msg";
  if (c.kind === "group" && !m.mine) li.append(text("span", "who", m.from));
  li.append(text("span", "body", m.content));
  const meta = text("span", "meta", time(m.sent_at || m.ts));
  if (m.mine) {
    const state = text("span", "state");
    state.dataset.state = m.state || "stored";
    li.dataset.state = m.state || "stored";
    const label = { sending: "sending…", stored: "sent", delivered: "delivered", read: "read", failed: "not sent" }[m.state || "stored"];
    // In a group: "delivered to k of n", "read by k of n" (all read: "read by n of n").
    const group = m.state === "read" ? (m.readBy ? ` by ${m.readBy[0]} of ${m.readBy[1]}` : "") :
      (m.progress ? ` to ${m.progress[0]} of ${m.progress[1]}` : "") +
      (m.readBy ? `, read by ${m.readBy[0]} of ${m.readBy[1]}` : "");
    state.textContent = ` · ${label}${group}`;
    meta.append(state);
    if (m.state === "failed") {
      const retry = text("button", "retry", "Retry");
      retry.type = "button";
      retry.addEventListener("click", () => im.retry(m));
      meta.append(" ", retry);
    }
  }
  li.append(meta);
  return li;
}

function drawTyping() {
  if (!im || !openKey) return;
  const who = im.typers(openKey);
  $("typing").textContent = who.length ? `${who.join(", ")} ${who.length > 1 ? "are" : "is"} typing…` : "";
}

function drawState() {
  const s = im ? im.state : "";
  $("status").dataset.state = s;
  $("status").textContent = { online: "", connecting: "Connecting…", offline: "Offline, reconnecting…",
    refused: "Login refused", closed: "" }[s] ?? s;
  if (s === "online") firstHistory();
}

function notice(message) {
  $("notice-text").textContent = message;
  show($("notice"), true);
  $("notice-close").focus();
}
$("notice-close").addEventListener("click", () => show($("notice"), false));

document.addEventListener("visibilitychange", () => {
  if (!im || document.visibilityState !== "visible") return;
  im.touch();  // back in front: a contact, so a tab removed meanwhile is told now (section 12.8)
  if (openKey) im.markRead(openKey);
});

// -- the composer -----------------------------------------------------------------------------------------------
function sendComposer() {
  const body = $("composer").value;
  const c = im.store.convs[openKey];
  if (!body.trim() || !c || c.left) return;
  im.send(c.id, body, { group: c.kind === "group" });
  $("composer").value = "";
  stopTyping();
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function stopTyping() {
  if (typingTo) im.typing(typingTo, "stopped");
  typingTo = null;
  typingSentAt = 0;
}

$("composer-form").addEventListener("submit", (ev) => { ev.preventDefault(); sendComposer(); });
$("composer").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) { ev.preventDefault(); sendComposer(); }
});
$("composer").addEventListener("input", () => {
  const c = im.store.convs[openKey];
  if (!c || c.left) return;
  if (!$("composer").value) { stopTyping(); return; }
  const now = Date.now();
  if (typingTo !== c.key || now - typingSentAt >= TYPING_RENEW_MS) {
    im.typing(c.key);
    typingTo = c.key;
    typingSentAt = now;
  }
});
$("composer").addEventListener("blur", () => { if (!$("composer").value) stopTyping(); });

// -- groups -----------------------------------------------------------------------------------------------------
const uids = (s) => s.split(/[\s,]+/).map((x) => x.trim()).filter(Boolean);

$("new-group-button").addEventListener("click", () => {
  $("group-error").textContent = "";
  $("group-dialog").showModal();
  $("group-id").focus();
});
$("group-cancel").addEventListener("click", () => $("group-dialog").close());
$("group-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const id = $("group-id").value.trim();
  if (!/^[A-Za-z0-9_-]{1,32}$/.test(id)) { $("group-error").textContent = "A group id is 1-32 letters, digits, _ or -."; return; }
  try {
    await im.createGroup(id, $("group-name").value.trim(), uids($("group-members-input").value));
  } catch (e) {
    $("group-error").textContent = `Not created: ${e.code || ""} ${e.message}`;
    return;
  }
  $("group-dialog").close();
  $("group-form").reset();
  openConversation(`g:${id}`);
});

$("add-members-button").addEventListener("click", () => {
  $("add-error").textContent = "";
  $("add-dialog").showModal();
  $("add-members-input").focus();
});
$("add-cancel").addEventListener("click", () => $("add-dialog").close());
$("add-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const c = im.store.convs[openKey];
  try {
    await im.addMembers(c.id, uids($("add-members-input").value));
  } catch (e) {
    $("add-error").textContent = `Not added: ${e.code || ""} ${e.message}`;
    return;
  }
  $("add-dialog").close();
  $("add-form").reset();
  $("composer").focus();
});

$("leave-group-button").addEventListener("click", async () => {
  const c = im.store.convs[openKey];
  if (!confirm(`Leave ${c.name}?`)) return;
  await im.leaveGroup(c.id).catch((e) => alert(`Could not leave: ${e.message}`));
  draw();
});

// -- devices ----------------------------------------------------------------------------------------------------
async function drawDevices() {
  const list = $("devices-list");
  try {
    const answer = await im.listDevices();
    list.replaceChildren(...answer.devices.map((d) => {
      const li = document.createElement("li");
      li.dataset.device = d.device;
      const name = d.device || "default device";
      // The default device ("": v1 clients) has no status of its own: the server shows it online whenever any
      // device of the user is (docs/PROTOCOL.md 12.4, the mixed case); say so rather than a plain "online".
      const label = d.device ? name : "default device (v1 clients; follows the user's status)";
      li.append(text("span", "", `${label}${d.device === im.device ? " (this tab)" : ""}: ${d.online ? "online" : "offline"}` +
        (!d.online && d.last_seen ? `, last seen ${new Date(d.last_seen).toLocaleString()}` : "")));
      if (d.device !== im.device) {  // this tab does not remove itself (Log out ends it; another device removes it)
        const b = text("button", "remove-device", "Remove");
        b.type = "button";
        b.setAttribute("aria-label", `Remove device ${name}`);
        b.addEventListener("click", () => removeDevice(d.device, name));
        li.append(b);
      }
      return li;
    }));
  } catch (e) {
    list.replaceChildren(text("li", "error", `Could not list devices: ${e.message}`));
  }
}

async function removeDevice(device, name) {
  if (!confirm(`Remove device ${name}? What waits for it is dropped; if it connects again it starts as a new device.`)) return;
  $("devices-error").textContent = "";
  try {
    await im.removeDevice(device);
  } catch (e) {
    $("devices-error").textContent = `Not removed: ${e.code || ""} ${e.message}`;
  }
  await drawDevices();
  $("devices-close").focus();
}

$("devices-button").addEventListener("click", async () => {
  $("devices-list").replaceChildren(text("li", "", "Loading…"));
  $("devices-error").textContent = "";
  $("devices-dialog").showModal();
  await drawDevices();
  $("devices-close").focus();
});
$("devices-close").addEventListener("click", () => $("devices-dialog").close());

// -- settings: read receipts (section 15.3) ---------------------------------------------------------------------
function drawSettings() {
  const s = im.store.settings, box = $("read-receipts");
  box.checked = s ? s.read_receipts : true;  // the default for every user until the server says
  box.disabled = !im.features.settings;
  if (!im.features.settings) $("settings-state").textContent = "This server has no settings.";
}

$("settings-button").addEventListener("click", () => {
  $("settings-state").textContent = "";
  drawSettings();
  $("settings-dialog").showModal();
  $("read-receipts").focus();
  im.loadSettings().then(drawSettings).catch(() => {});  // the stored value (another device may have changed it)
});
$("read-receipts").addEventListener("change", async () => {
  const on = $("read-receipts").checked;
  $("settings-state").textContent = "Saving…";
  savingSettings = true;
  try {
    await im.setReadReceipts(on);
    $("settings-state").textContent = on ? "Read receipts on." : "Read receipts off.";
  } catch (e) {
    $("settings-state").textContent = `Not saved: ${e.code === "offline" ? "offline" : e.message}`;
  }
  savingSettings = false;
  drawSettings();
});
$("settings-close").addEventListener("click", () => $("settings-dialog").close());

// -- start: log in again after a reload ---------------------------------------------------------------------------
const saved = JSON.parse(sessionStorage.getItem(SESSION) || "null");
$("login-uid").value = localStorage.getItem("im.v1.last-uid") || "";
if (saved) login(saved.uid, saved.password, true);
else ($("login-uid").value ? $("login-password") : $("login-uid")).focus();
