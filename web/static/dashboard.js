// ShopFlow operators' dashboard: start state from the JSON API, then live over /ws.
// Plain browser JavaScript, no build step. The staff token is entered once and kept
// in localStorage; every request sends it as a bearer token.
"use strict";

const TOKEN_KEY = "shopflow.staffToken";
const API = "/api/v1";
const FEED_MAX = 50;            // newest order events / alerts kept on screen
const RECONNECT_MAX_MS = 10000; // WebSocket reconnect back-off cap
// Next runs move with the clock and no event says so: refetch the schedules this often
// (a page may set window.shopflowScheduleRefreshMs first, as the browser test does).
const SCHEDULE_REFRESH_MS = window.shopflowScheduleRefreshMs ?? 30000;
// Not "jobs": it carries every step of every job (thousands a second when busy); the
// "queues" channel's counts (one entry per changed queue per second) tell when the
// failed and dead lists moved.
const CHANNELS = ["queues", "alerts", "order-status-changed", "stock-updated", "reviews",
                  "supervision"];
// The order feed shows status changes; the channel also carries other order events (the
// extra jobs of a transition, "order.job", with no status in them).
const ORDER_STATUS_EVENT = "order.status_changed";
// Channels whose start state is a list of their own events (GET /events/{channel}).
const FEEDS = new Set(["alerts", "order-status-changed"]);

const $ = (sel) => document.querySelector(sel);
// lastIds: each channel's position (the last event, subscribed or resync id), to resume with
// `since`. feedNewest: the newest event id each feed was loaded with, so a buffered event
// the load already showed is not shown twice. While the start state loads (reloading), live
// events wait in pending and apply on top of it.
const state = { token: localStorage.getItem(TOKEN_KEY), lastIds: {}, feedNewest: {}, ws: null,
                retryMs: 500, orderCount: 0, queues: new Map(), refetchTimer: null,
                flaggedTimer: null, treeTimer: null, scheduleTimer: null, stockTimer: null,
                loaded: false, reloading: null, reloadAgain: false, pending: [],
                awaiting: new Set() };

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
    else node.setAttribute(key, value);
  }
  for (const child of children) {
    node.append(child instanceof Node ? child : document.createTextNode(String(child ?? "")));
  }
  return node;
}

function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  return isNaN(date) ? String(iso) : date.toLocaleString();
}

function status(text) { $("#status").textContent = text; }

async function api(method, path) {
  const resp = await fetch(API + path, {
    method, headers: { Authorization: `Bearer ${state.token}` } });
  if (resp.status === 401) { logout("Token rejected or expired."); throw new Error("401"); }
  const body = resp.headers.get("content-type")?.includes("json") ? await resp.json() : null;
  return { status: resp.status, body };
}

// --- cards ---------------------------------------------------------------------------

function renderQueues() {
  const body = $("#queues tbody");
  body.replaceChildren(...[...state.queues.values()].map((q) => el("tr",
    { "data-queue": q.name },
    el("td", {}, q.name),
    el("td", { class: "num" }, q.pending ?? 0),
    el("td", { class: "num" }, q.delayed ?? 0),
    el("td", { class: "num" + ((q.failed ?? 0) > 0 ? " bad" : "") }, q.failed ?? 0),
    el("td", { class: "num" + ((q.dead ?? 0) > 0 ? " bad" : "") }, q.dead ?? 0),
    el("td", { class: "num" }, Number(q.processed_per_min ?? 0).toFixed(1)))));
}

async function loadQueues() {
  const { status: code, body } = await api("GET", "/queues");
  if (code !== 200) return unavailable("#queues tbody", body, 6);
  state.queues = new Map(body.queues.map((q) => [q.name, q]));
  renderQueues();
}

async function jobAction(method, path, row) {
  const { status: code, body } = await api(method, path);
  if (code === 202 || code === 204 || code === 404) row.remove();
  else status(body?.error?.message ?? `job action failed (${code})`);
  $("#jobs-empty").hidden = $("#jobs tbody").children.length > 0;
}

async function loadJobs() {
  const rows = [];
  for (const jobState of ["failed", "dead"]) {
    const { status: code, body } = await api("GET", `/jobs?state=${jobState}`);
    if (code !== 200) return unavailable("#jobs tbody", body, 6);
    for (const job of body.jobs) {
      const id = encodeURIComponent(job.id);
      const row = el("tr", { "data-job": job.id });
      row.append(el("td", {}, job.id), el("td", {}, job.queue), el("td", {}, job.actor),
        el("td", {}, job.state ?? jobState), el("td", { class: "err" }, job.error ?? ""),
        el("td", {},
          el("button", { type: "button", class: "retry",
                         onclick: () => jobAction("POST", `/jobs/${id}/retry`, row) }, "Retry"),
          " ",
          el("button", { type: "button", class: "remove danger",
                         onclick: () => jobAction("DELETE", `/jobs/${id}`, row) }, "Remove")));
      rows.push(row);
    }
  }
  $("#jobs tbody").replaceChildren(...rows);
  $("#jobs-empty").hidden = rows.length > 0;
}

async function loadSchedules() {
  const { status: code, body } = await api("GET", "/schedules");
  if (code !== 200) return unavailable("#schedules", body);
  $("#schedules").replaceChildren(...body.schedules.map((s) => el("li",
    { "data-schedule": s.name, "data-next": s.next_run_at ?? "" },
    el("strong", {}, s.name), " ", el("code", {}, s.cron ?? ""), el("br"),
    el("span", { class: "muted" }, `next ${when(s.next_run_at)} · last ${when(s.last_run_at)}`))));
}

function treeNode(node) {
  const label = el("li", { class: node.alive === false ? "dead" : "", "data-node": node.name },
    `${node.name} `, el("span", { class: "muted" }, `${node.kind ?? ""}`),
    " ", el("span", { class: "pill" + ((node.restarts ?? 0) > 0 ? " off" : "") },
      `${node.restarts ?? 0} restarts`));
  if (node.children?.length) label.append(el("ul", {}, ...node.children.map(treeNode)));
  return label;
}

async function loadTree() {
  const { status: code, body } = await api("GET", "/supervision");
  if (code !== 200) return unavailable("#tree", body);
  $("#tree").replaceChildren(treeNode(body));
}

async function loadStockSync() {
  const { status: code, body } = await api("GET", "/stock-sync");
  if (code !== 200) return unavailable("#stock-sync", body);
  $("#stock-sync").replaceChildren(
    el("dt", {}, "products"), el("dd", {}, body.products),
    el("dt", {}, "linked to warehouse"), el("dd", {}, body.linked),
    el("dt", {}, "never synced"), el("dd", { class: body.never_synced ? "bad" : "" },
                                     body.never_synced),
    el("dt", {}, "last sync"), el("dd", {}, when(body.last_synced_at)),
    el("dt", {}, "oldest sync"), el("dd", {}, when(body.oldest_synced_at)));
}

async function loadFlagged() {
  const { status: code, body } = await api("GET", `/moderation/flagged?limit=${FEED_MAX}`);
  if (code !== 200) return unavailable("#flagged tbody", body, 10);
  const rows = body.reviews.map((r) => el("tr", { "data-review": r.review_id },
    el("td", {}, `#${r.review_id}`),
    el("td", {}, r.product_id ?? ""),
    el("td", { class: "num" }, r.rating ?? ""),
    el("td", { class: r.status === "rejected" ? "bad" : "" }, r.status),
    el("td", {}, r.current_status ?? ""),
    el("td", {}, r.source ?? ""),
    el("td", { class: "num" }, r.confidence == null ? "—" : Number(r.confidence).toFixed(2)),
    el("td", {}, (r.categories ?? []).join(", ")),
    el("td", { class: "err" }, r.reason ?? ""),
    el("td", { class: "muted" }, r.excerpt ?? "")));
  $("#flagged tbody").replaceChildren(...rows);
  $("#flagged-empty").hidden = rows.length > 0;
}

function scheduleTreeRefetch() {
  // A restart storm (or a whole process starting) refetches the tree at most every 500 ms.
  if (state.treeTimer) return;
  state.treeTimer = setTimeout(() => {
    state.treeTimer = null;
    loadTree().catch(() => {});
  }, 500);
}

function refreshSchedulesPeriodically() {
  if (state.scheduleTimer) return;
  state.scheduleTimer = setInterval(() => {
    if (state.token && !document.hidden) loadSchedules().catch(() => {});
  }, SCHEDULE_REFRESH_MS);
}

function scheduleStockRefetch() {
  // Stock moves in bursts (a sync touches every product): refetch at most every 500 ms.
  if (state.stockTimer) return;
  state.stockTimer = setTimeout(() => {
    state.stockTimer = null;
    loadStockSync().catch(() => {});
  }, 500);
}

function scheduleFlaggedRefetch() {
  // A moderation burst refetches the flagged list at most every 500 ms.
  if (state.flaggedTimer) return;
  state.flaggedTimer = setTimeout(() => {
    state.flaggedTimer = null;
    loadFlagged().catch(() => {});
  }, 500);
}

function addFeedItem(list, text, at) {
  list.prepend(el("li", {}, text, " ", el("span", { class: "muted" }, when(at))));
  while (list.children.length > FEED_MAX) list.lastChild.remove();
}

function orderText(p) {
  return `order ${p.order_id} (customer ${p.customer_id}): ${p.from_status ?? "—"} → ` +
         `${p.to_status ?? "?"}${p.reason ? ` (${p.reason})` : ""}`;
}

// The alerts stream carries the Alerter's notifications (payload in Alertmanager's
// webhook shape: status, labels.{alertname, severity, ...}, annotations.summary) and
// plain events of other writers (process.fatal, stock-conflict, fulfillment.failed).
const ALERT_EVENTS = {
  "process.fatal": (p) => ["critical", `program ${p.processname ?? "?"} is FATAL (${p.host ?? ""})`],
  "stock-conflict": (p) => ["warning", `stock conflict on product ${p.product_id}: warehouse ` +
    `${p.warehouse_quantity}, reserved ${p.reserved_quantity}`],
  "stock-conflict-resolved": (p) => ["info", `stock conflict on product ${p.product_id} resolved`],
  "fulfillment.failed": (p) => ["critical", `order ${p.order_id}: ${p.reason ?? p.step ?? ""}`],
};

function alertText(event) {
  const p = event.payload ?? {};
  if (p.labels) {
    const { alertname, severity } = p.labels;
    const resolved = p.status === "resolved" || event.event === "alert.resolved";
    return `${resolved ? "resolved" : (severity ?? "alert")}: ${alertname ?? "alert"} — ` +
           `${p.annotations?.summary ?? ""}`;
  }
  const known = ALERT_EVENTS[event.event];
  const [severity, text] = known ? known(p)
    : [p.severity ?? "alert", p.message ?? p.summary ?? p.reason ?? event.event ?? ""];
  return `${severity}: ${text}`;
}

function isOrderStatus(event) { return event.event === ORDER_STATUS_EVENT; }

// Stream ids ("<ms>-<seq>") in order; ms fits a double exactly.
function idAfter(a, b) {
  const [aMs, aSeq] = a.split("-").map(Number);
  const [bMs, bSeq] = b.split("-").map(Number);
  return aMs > bMs || (aMs === bMs && aSeq > bSeq);
}

async function loadFeed(channel, list, format, keep = () => true) {
  const { status: code, body } = await api("GET", `/events/${channel}?limit=${FEED_MAX}`);
  if (code !== 200) return;
  if (body.events.length) state.feedNewest[channel] = body.events[0].id;
  list.replaceChildren();
  for (const event of body.events.slice().reverse()) {
    if (keep(event)) addFeedItem(list, format(event), event.at);
  }
}

function unavailable(selector, body, colspan) {
  const text = body?.error?.message ?? "not available";
  const node = $(selector);
  node.replaceChildren(colspan ? el("tr", {}, el("td", { colspan }, text))
                               : el("li", { class: "muted" }, text));
}

async function loadAll() {
  await Promise.all([loadQueues(), loadJobs(), loadSchedules(), loadTree(), loadStockSync(),
    loadFlagged(),
    loadFeed("alerts", $("#alerts"), alertText),
    loadFeed("order-status-changed", $("#orders"), (e) => orderText(e.payload), isOrderStatus)
      .then(() => { state.orderCount = $("#orders").children.length;
                    $("#order-count").textContent = state.orderCount; })]);
}

// Load the start state with live events held back meanwhile, then apply them on top. Asked
// again while loading (a resync of another channel), it loads once more after.
function reload() {
  if (state.reloading) { state.reloadAgain = true; return state.reloading; }
  state.reloading = (async () => {
    try {
      do { state.reloadAgain = false; await loadAll(); } while (state.reloadAgain);
    } finally {
      state.loaded = true;
      state.reloading = null;
      const pending = state.pending;
      state.pending = [];
      for (const message of pending) onEvent(message);
    }
  })();
  return state.reloading;
}

// --- live updates ----------------------------------------------------------------------

function scheduleFailedRefetch() {
  // Failed and dead counts move in bursts: refetch those lists at most every 300 ms.
  if (state.refetchTimer) return;
  state.refetchTimer = setTimeout(() => {
    state.refetchTimer = null;
    loadJobs().catch(() => {});
  }, 300);
}

function onEvent(message) {
  const p = message.payload;
  const shown = state.feedNewest[message.channel];
  if (FEEDS.has(message.channel) && shown && !idAfter(message.id, shown)) return;  // loaded
  switch (message.channel) {
    case "queues": {
      const name = p.queue ?? p.name;
      if (!name) break;
      const before = state.queues.get(name) ?? {};
      state.queues.set(name, { ...before, ...p, name });
      renderQueues();
      if ((p.failed ?? before.failed) !== before.failed ||
          (p.dead ?? before.dead) !== before.dead) scheduleFailedRefetch();
      break;
    }
    case "alerts": addFeedItem($("#alerts"), alertText(message), message.at); break;
    case "order-status-changed":
      if (!isOrderStatus(message)) break;
      state.orderCount += 1;
      $("#order-count").textContent = state.orderCount;
      addFeedItem($("#orders"), orderText(p), message.at);
      break;
    case "stock-updated": scheduleStockRefetch(); break;
    case "reviews": if (message.event === "review-moderated") scheduleFlaggedRefetch(); break;
    case "supervision": scheduleTreeRefetch(); break;
  }
}

function setLive(on) {
  const pill = $("#live");
  pill.textContent = on ? "live" : "offline";
  pill.className = "pill " + (on ? "on" : "off");
}

function connect() {
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const ws = new WebSocket(`${scheme}://${location.host}/ws?token=${encodeURIComponent(state.token)}`);
  state.ws = ws;
  ws.onmessage = (frame) => {
    let message;
    try { message = JSON.parse(frame.data); } catch { return; }
    if (message.type === "welcome") {
      setLive(true);
      state.retryMs = 500;
      state.awaiting = new Set(CHANNELS);
      for (const channel of CHANNELS) {
        const since = state.lastIds[channel];
        ws.send(JSON.stringify(since ? { type: "subscribe", channel, since }
                                     : { type: "subscribe", channel }));
      }
    } else if (message.type === "event") {
      state.lastIds[message.channel] = message.id;
      if (state.reloading || !state.loaded) state.pending.push(message);
      else onEvent(message);
    } else if (message.type === "subscribed" || message.type === "resync") {
      // Both carry the position live events follow from: resume from there next time.
      state.lastIds[message.channel] = message.last_id;
      // Before the first load, that load (once all are subscribed) covers the resync.
      if (message.type === "resync" && (state.loaded || state.reloading)) {
        reload().catch(() => {});
      }
      state.awaiting.delete(message.channel);
      // The first start state loads once every channel is subscribed, so nothing that
      // happens while it loads is lost: those events are held back and applied after.
      if (!state.loaded && !state.reloading && state.awaiting.size === 0) {
        reload().catch(() => {});
      }
    } else if (message.type === "error") status(`server: ${message.message}`);
  };
  ws.onclose = (event) => {
    setLive(false);
    if (state.ws !== ws) return;
    if (event.code === 4401) { logout("Token rejected or expired."); return; }
    setTimeout(() => { if (state.token) connect(); }, state.retryMs);
    state.retryMs = Math.min(state.retryMs * 2, RECONNECT_MAX_MS);
  };
}

// --- login ---------------------------------------------------------------------------------

function logout(reason) {
  localStorage.removeItem(TOKEN_KEY);
  state.token = null;
  const ws = state.ws;
  state.ws = null;
  ws?.close();
  clearInterval(state.scheduleTimer);
  state.scheduleTimer = null;
  // The next token starts afresh: subscribe, then load.
  Object.assign(state, { loaded: false, lastIds: {}, feedNewest: {}, pending: [] });
  $("#board").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-error").textContent = reason ?? "";
}

async function start() {
  const { status: code, body } = await api("GET", "/me");
  if (code !== 200 || body.role !== "staff") {
    logout("That is not a staff token.");
    return;
  }
  $("#login").hidden = true;
  $("#board").hidden = false;
  $("#logout").hidden = false;
  // Subscribe first, then load (see onmessage): a load before subscribing would miss what
  // happened in between.
  connect();
  refreshSchedulesPeriodically();
  status("");
}

$("#login").addEventListener("submit", (event) => {
  event.preventDefault();
  state.token = $("#token").value.trim();
  localStorage.setItem(TOKEN_KEY, state.token);
  start().catch(() => {});
});
$("#logout").addEventListener("click", () => logout());

if (state.token) start().catch(() => {}); else logout();
