// The Updraft dashboard: reads the status document from /api/v1/events (server-sent events, one
// per second) and redraws. Every text from the gateway goes in through textContent, never as
// markup, so a device's string value cannot inject anything.
"use strict";

let previous = null;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function ago(ms, now) {
  if (ms === null || ms === undefined) return "never";
  return duration(Math.max(0, now - ms)) + " ago";
}

function duration(ms) {
  if (ms < 1000) return ms + " ms";
  const s = ms / 1000;
  if (s < 60) return s.toFixed(s < 10 ? 1 : 0) + " s";
  if (s < 3600) return Math.floor(s / 60) + " min " + Math.floor(s % 60) + " s";
  if (s < 86400) return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  return Math.floor(s / 86400) + " d " + Math.floor((s % 86400) / 3600) + " h";
}

function fmtValue(p) {
  if (p.value === null || p.value === undefined) return p.quality === "bad" ? "—" : "null";
  if (typeof p.value === "number") {
    return Number.isInteger(p.value) ? String(p.value) : String(Math.round(p.value * 1000) / 1000);
  }
  return String(p.value);
}

function num(n) {
  return (n ?? 0).toLocaleString("en-US");
}

function deviceState(d) {
  if (d.state === "stalled") return "stalled";
  return d.last_good_ms ? "ok" : "waiting";
}

function valuesTable(values, now) {
  const rows = Object.entries(values || {}).map(([tag, p]) =>
    el("tr", { "data-tag": tag, "data-quality": p.quality },
      el("td", {}, tag),
      el("td", { class: "v", title: p.error || "" }, fmtValue(p)),
      el("td", { class: "age" }, ago(p.ts, now)),
      p.error ? el("td", { class: "err" }, p.error) : el("td", {})));
  if (!rows.length) return el("div", { class: "empty" }, "No values yet.");
  return el("table", {}, el("tbody", {}, ...rows));
}

function render(s) {
  const now = s.now_ms;
  document.getElementById("gateway").textContent = s.gateway;
  document.getElementById("version").textContent = "v" + s.version;
  document.getElementById("uptime").textContent = "up " + duration(now - s.started_ms);
  const ready = document.getElementById("ready");
  ready.dataset.ready = String(s.ready);
  ready.textContent = s.ready ? "Ready" : "Not ready";

  const devices = Object.entries(s.devices);
  const stalled = devices.filter(([, d]) => d.state === "stalled").length;
  const sinks = Object.entries(s.sinks);
  const pending = sinks.reduce((a, [, k]) => a + k.pending_points, 0);
  const plugins = Object.entries(s.plugins);
  const traps = plugins.reduce((a, [, p]) => a + p.traps, 0);
  const dt = previous ? (now - previous.now_ms) / 1000 : 0;
  const card = (n, label, bad) => el("div", { class: bad ? "card bad" : "card" }, el("div", { class: "n" }, n), el("div", { class: "l" }, label));
  document.getElementById("summary").replaceChildren(
    card(devices.length - stalled + " / " + devices.length, "devices delivering", stalled > 0),
    card(num(devices.reduce((a, [, d]) => a + d.points_good, 0)), "good points read"),
    card(plugins.length, "plugins" + (traps ? ", " + traps + " traps" : ""), traps > 0),
    card(num(pending), "points waiting for the cloud", sinks.some(([, k]) => k.state === "stalled")),
    card(s.errors.length, "recent warnings", s.errors.some((e) => e.level === "error")));

  const banner = document.getElementById("reload-error");
  if (s.reload && s.reload.last_error) {
    banner.hidden = false;
    banner.textContent = "Reload refused " + ago(s.reload.last_error_ms, now) + "; the running config stays.\n" + s.reload.last_error;
  } else {
    banner.hidden = true;
  }

  document.getElementById("devices").replaceChildren(...devices.map(([name, d]) => {
    const state = deviceState(d);
    return el("article", { class: "device", "data-device": name, "data-state": state },
      el("h3", {}, name, el("span", { class: "state " + state }, state)),
      el("div", { class: "meta" },
        d.driver + " · last good read " + ago(d.last_good_ms, now) +
        " · " + num(d.points_good) + " good, " + num(d.points_bad) + " bad" +
        (d.request_errors ? " · " + num(d.request_errors) + " failed requests" : "") +
        (state === "stalled" ? " · silent for " + duration(d.silent_ms) + " (allowed " + duration(d.stall_after_ms) + ")" : "")),
      valuesTable(d.values, now));
  }));
  if (!devices.length) document.getElementById("devices").replaceChildren(el("div", { class: "empty" }, "No devices configured."));

  const derived = Object.entries(s.derived || {});
  document.getElementById("derived-section").hidden = derived.length === 0;
  document.getElementById("derived").replaceChildren(...derived.map(([name, values]) =>
    el("article", { class: "device", "data-derived": name, "data-state": "ok" }, el("h3", {}, name), valuesTable(values, now))));

  document.querySelector("#plugins tbody").replaceChildren(...(plugins.length ? plugins.map(([name, p]) => {
    const before = previous && previous.plugins[name];
    const calls = before && dt >= 0.5 ? (p.calls - before.calls) / dt : null;
    const dCalls = before ? p.calls - before.calls : 0;
    const mean = dCalls > 0 ? (p.call_us_total - before.call_us_total) / dCalls : (p.calls ? p.call_us_total / p.calls : null);
    return el("tr", { "data-plugin": name },
      el("td", {}, name),
      el("td", { class: "num" }, num(p.calls)),
      el("td", { class: "num" }, calls === null ? "…" : calls.toFixed(1)),
      el("td", { class: "num" }, mean === null ? "—" : (mean < 1000 ? Math.round(mean) + " µs" : (mean / 1000).toFixed(1) + " ms")),
      el("td", { class: "num" }, num(p.points_in) + " → " + num(p.points_out)),
      el("td", { class: "num" }, num(p.traps)),
      el("td", { class: "num" }, num(p.errors) + (p.init_failures ? " (" + num(p.init_failures) + " refused config)" : "") +
        (p.state_errors ? " (" + num(p.state_errors) + " state not saved)" : "")),
      el("td", { class: "num" }, num(p.points_dropped)),
      el("td", { class: "err" }, p.last_trap || ""));
  }) : [el("tr", {}, el("td", { colSpan: 9, class: "empty" }, "No plugins configured."))]));

  document.querySelector("#sinks tbody").replaceChildren(...(sinks.length ? sinks.map(([name, k]) =>
    el("tr", { "data-sink": name, "data-state": k.state },
      el("td", {}, name),
      el("td", {}, k.kind),
      el("td", {}, el("span", { class: "state " + k.state }, k.state)),
      el("td", {}, k.connected ? "connected" : "down"),
      el("td", { class: "num" }, num(k.pending_points)),
      el("td", { class: "num" }, k.pending_points ? duration(k.backlog_age_ms) : "—"),
      el("td", { class: "num" }, ago(k.last_ack_ms, now)),
      el("td", { class: "num" }, num(k.delivered)),
      el("td", { class: "num" }, num(k.dropped)),
      el("td", {}, k.disk_ok ? "ok" : "refusing writes"))) :
    [el("tr", {}, el("td", { colSpan: 10, class: "empty" }, "No cloud sinks configured."))]));

  document.getElementById("errors").replaceChildren(...(s.errors.length ? s.errors.map((e) =>
    el("li", {},
      el("span", { class: "muted" }, new Date(e.ts_ms).toLocaleTimeString() + " "),
      el("span", { class: "lvl " + e.level }, e.level),
      e.scope ? el("span", { class: "scope" }, e.scope) : null,
      e.message)) : [el("li", { class: "empty" }, "Nothing since start.")]));
  previous = s;
}

function connect() {
  const live = document.getElementById("live");
  const source = new EventSource("/api/v1/events");
  source.addEventListener("status", (ev) => {
    live.dataset.live = "true";
    live.textContent = "live";
    render(JSON.parse(ev.data));
  });
  // EventSource reconnects by itself; say so while it does.
  source.onerror = () => {
    live.dataset.live = "false";
    live.textContent = "reconnecting";
  };
}

// A first picture at once, then live updates.
fetch("/api/v1/status").then((r) => r.json()).then(render).catch(() => {});
connect();
