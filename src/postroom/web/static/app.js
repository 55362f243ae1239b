// Postroom dashboard: live updates (Server-Sent Events), local times, the throughput chart, tabs.
// Plain JavaScript, no build step, no dependencies.
"use strict";

(function () {
  const $ = (sel, root = document) => root.querySelector(sel);
  const $$ = (sel, root = document) => Array.from(root.querySelectorAll(sel));
  const pad = (n) => String(n).padStart(2, "0");

  // -- times ----------------------------------------------------------------------------------
  function localStamp(d) {
    return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())} ${pad(d.getHours())}:${pad(d.getMinutes())}:${pad(d.getSeconds())}`;
  }
  function ago(d) {
    const s = Math.round((Date.now() - d.getTime()) / 1000);
    const future = s < 0;
    const a = Math.abs(s);
    let t;
    if (a < 5) return future ? "in a moment" : "just now";
    if (a < 60) t = `${a} s`;
    else if (a < 3600) t = `${Math.floor(a / 60)} min`;
    else if (a < 86400) t = `${Math.floor(a / 3600)} h`;
    else if (a < 86400 * 30) t = `${Math.floor(a / 86400)} d`;
    else return localStamp(d).slice(0, 10);
    return future ? `in ${t}` : `${t} ago`;
  }
  function localizeTimes(root = document) {
    for (const el of $$("time[datetime]", root)) {
      const d = new Date(el.getAttribute("datetime"));
      if (isNaN(d)) continue;
      el.textContent = el.dataset.style === "ago" ? ago(d) : localStamp(d);
      el.title = localStamp(d) + " (" + Intl.DateTimeFormat().resolvedOptions().timeZone + ")";
    }
  }

  // -- forms: the browser's time zone for datetime-local fields ------------------------------
  function fillTimeZones() {
    for (const el of $$("[data-tz-offset]")) el.value = String(new Date().getTimezoneOffset());
    // keep the filter URL clean when no time filter is set
    const filters = $("#filters");
    if (filters) {
      filters.addEventListener("submit", () => {
        for (const el of $$("input, select", filters)) if (!el.value) el.disabled = true;
        const tz = $("[data-tz-offset]", filters);
        if (tz && !$$("input[type=datetime-local]", filters).some((i) => i.value)) tz.disabled = true;
      });
    }
  }

  // -- tabs ----------------------------------------------------------------------------------
  function initTabs() {
    for (const box of $$("[data-tabs]")) {
      box.addEventListener("click", (ev) => {
        const tab = ev.target.closest("[data-tab]");
        if (!tab) return;
        for (const t of $$("[data-tab]", box)) t.classList.toggle("on", t === tab);
        for (const p of $$("[data-pane]", box)) p.hidden = p.dataset.pane !== tab.dataset.tab;
      });
    }
  }

  // -- clickable rows ------------------------------------------------------------------------
  function initRows() {
    document.addEventListener("click", (ev) => {
      const row = ev.target.closest("tr.row-link");
      if (!row || ev.target.closest("a, button, input")) return;
      const link = row.dataset.href || (row.querySelector("a") || {}).href;
      if (link) window.location.href = link;
    });
  }

  // -- the throughput chart (inline SVG) -------------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  const SERIES = [
    ["sent", "var(--sent)"],
    ["retried", "var(--retrying)"],
    ["failed", "var(--failed)"],
  ];
  function svg(tag, attrs, parent) {
    const el = document.createElementNS(SVG, tag);
    for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, v);
    if (parent) parent.appendChild(el);
    return el;
  }
  function niceMax(v) {
    if (v <= 4) return 4;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }
  function fmtNum(n) {
    return n >= 10000 ? (n / 1000).toFixed(n >= 100000 ? 0 : 1) + "k" : String(n);
  }
  function drawChart(box, data) {
    if (!box || !data) return;
    box._data = data;
    const W = Math.max(box.clientWidth - 20, 200);
    const H = Math.max(box.clientHeight - 16, 120);
    const L = 40, R = 8, T = 8, B = 22;
    const n = data.series.sent.length;
    const totals = data.series.sent.map((_, i) => SERIES.reduce((a, [k]) => a + data.series[k][i], 0));
    const max = niceMax(Math.max(0, ...totals));
    const bw = (W - L - R) / n;
    const y = (v) => T + (H - T - B) * (1 - v / max);
    box.textContent = "";
    const root = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img", "aria-label": "messages per interval" }, box);
    const defs = svg("defs", {}, root);
    const pat = svg("pattern", { id: "hatch", width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)" }, defs);
    svg("rect", { width: 6, height: 6, fill: "#fafbfc" }, pat);
    svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#eceef2", "stroke-width": 3 }, pat);

    const grid = svg("g", { class: "grid" }, root);
    const axis = svg("g", { class: "axis" }, root);
    for (let i = 0; i <= 4; i++) {
      const v = (max * i) / 4;
      svg("line", { x1: L, x2: W - R, y1: y(v), y2: y(v) }, grid);
      const t = svg("text", { x: L - 8, y: y(v) + 4, "text-anchor": "end" }, axis);
      t.textContent = fmtNum(Math.round(v));
    }
    // before the first sample there is no data: say so instead of drawing zeros
    if (!data.exact && data.since > data.start) {
      const x0 = L + ((data.since - data.start) / data.bucket_s) * bw;
      const w = Math.min(x0, W - R) - L;
      if (w > 2) {
        svg("rect", { class: "nodata", x: L, y: T, width: w, height: H - T - B }, root);
        if (w > 120) {
          const t = svg("text", { class: "nodata-label", x: L + w / 2, y: T + (H - T - B) / 2, "text-anchor": "middle" }, root);
          t.textContent = "before this server started";
        }
      }
    }
    const hover = svg("rect", { class: "hover-col", x: 0, y: T, width: bw, height: H - T - B, visibility: "hidden" }, root);
    const bars = svg("g", {}, root);
    const gap = bw > 6 ? Math.min(2, bw * 0.2) : 0;
    for (let i = 0; i < n; i++) {
      let acc = 0;
      for (const [k, colour] of SERIES) {
        const v = data.series[k][i];
        if (!v) continue;
        const y1 = y(acc + v), y0 = y(acc);
        svg("rect", { x: L + i * bw + gap / 2, y: y1, width: Math.max(bw - gap, 1), height: Math.max(y0 - y1, 1), fill: colour, rx: bw > 8 ? 2 : 0 }, bars);
        acc += v;
      }
    }
    // time labels
    const ticks = Math.max(2, Math.min(6, n, Math.floor((W - L) / 70)));
    for (let j = 0; j <= ticks; j++) {
      const i = Math.round((j * n) / ticks);
      const t = new Date((data.start + i * data.bucket_s) * 1000);
      const el = svg("text", { x: L + i * bw, y: H - 5, "text-anchor": j === 0 ? "start" : j === ticks ? "end" : "middle" }, axis);
      el.textContent = `${pad(t.getHours())}:${pad(t.getMinutes())}`;
    }
    // legend totals
    const legend = $("#chart-legend");
    if (legend) {
      legend.innerHTML = "";
      for (const [k] of SERIES) {
        const s = document.createElement("span");
        s.className = `lg lg-${k}`;
        s.textContent = k;
        const b = document.createElement("b");
        b.textContent = data.series[k].reduce((a, v) => a + v, 0).toLocaleString();
        s.appendChild(b);
        legend.appendChild(s);
      }
    }
    // tooltip
    let tip = $(".tip", box.parentNode);
    root.addEventListener("mousemove", (ev) => {
      const rect = root.getBoundingClientRect();
      const x = ((ev.clientX - rect.left) / rect.width) * W;
      const i = Math.floor((x - L) / bw);
      if (i < 0 || i >= n) { hover.setAttribute("visibility", "hidden"); if (tip) tip.hidden = true; return; }
      hover.setAttribute("x", L + i * bw);
      hover.setAttribute("visibility", "visible");
      if (!tip) { tip = document.createElement("div"); tip.className = "tip"; box.parentNode.style.position = "relative"; box.parentNode.appendChild(tip); }
      const from = new Date((data.start + i * data.bucket_s) * 1000);
      const to = new Date((data.start + (i + 1) * data.bucket_s) * 1000);
      tip.innerHTML = "";
      const head = document.createElement("div");
      head.textContent = `${pad(from.getHours())}:${pad(from.getMinutes())}:${pad(from.getSeconds())} – ${pad(to.getHours())}:${pad(to.getMinutes())}:${pad(to.getSeconds())}`;
      tip.appendChild(head);
      for (const [k] of SERIES) {
        const s = document.createElement("span");
        s.className = `lg lg-${k}`;
        s.textContent = `${k} `;
        const b = document.createElement("b");
        b.textContent = data.series[k][i];
        s.appendChild(b);
        tip.appendChild(s);
      }
      tip.hidden = false;
      const px = ev.clientX - box.parentNode.getBoundingClientRect().left;
      tip.style.left = Math.min(px + 14, box.parentNode.clientWidth - 170) + "px";
      tip.style.top = (box.offsetTop + 16) + "px";
    });
    root.addEventListener("mouseleave", () => { hover.setAttribute("visibility", "hidden"); if (tip) tip.hidden = true; });
  }

  // -- live updates --------------------------------------------------------------------------
  let source = null;
  function applyUpdate(data) {
    for (const [id, html] of Object.entries(data.fragments || {})) {
      const el = document.getElementById(id);
      if (el && el.innerHTML !== html) {
        el.innerHTML = html;
        localizeTimes(el);
      }
    }
    if (data.chart) drawChart($("#chart"), data.chart);
    for (const [name, on] of Object.entries(data.actions || {})) {
      for (const f of $$(`[data-action="${name}"]`)) f.hidden = !on;
    }
    if (data.status) document.body.dataset.status = data.status;
  }
  function connect(url) {
    if (source) source.close();
    const dot = $("#live-dot");
    source = new EventSource(url);
    source.onopen = () => dot && dot.classList.add("on");
    source.onmessage = (ev) => {
      dot && dot.classList.add("on");
      try { applyUpdate(JSON.parse(ev.data)); } catch (e) { console.error("live update", e); }
    };
    source.onerror = () => {
      dot && dot.classList.remove("on");
      // closed for good (204: the session ended): reload, which leads to the login page
      if (source.readyState === EventSource.CLOSED) setTimeout(() => window.location.reload(), 1000);
    };
  }
  function initLive() {
    const main = $("[data-live]");
    if (!main || !window.EventSource) return;
    let url = main.dataset.live;
    connect(url);
    for (const a of $$("[data-range]")) {
      a.addEventListener("click", (ev) => {
        ev.preventDefault();
        for (const b of $$("[data-range]")) b.classList.toggle("on", b === a);
        url = url.replace(/range=[^&]*/, "range=" + a.dataset.range);
        history.replaceState(null, "", "/?range=" + a.dataset.range);
        connect(url);
      });
    }
    window.addEventListener("pagehide", () => source && source.close());
  }

  // a notice such as "Message accepted." belongs to the redirect, not to the address
  function dropNoticeFromUrl() {
    const url = new URL(window.location.href);
    let changed = false;
    for (const k of ["sent", "cancelled", "retried", "error"]) {
      if (url.searchParams.has(k)) { url.searchParams.delete(k); changed = true; }
    }
    if (changed) history.replaceState(null, "", url.pathname + (url.search || ""));
  }

  document.addEventListener("DOMContentLoaded", () => {
    dropNoticeFromUrl();
    localizeTimes();
    fillTimeZones();
    initTabs();
    initRows();
    const chart = $("#chart");
    if (chart && chart.dataset.chart) {
      drawChart(chart, JSON.parse(chart.dataset.chart));
      let t;
      window.addEventListener("resize", () => { clearTimeout(t); t = setTimeout(() => drawChart(chart, chart._data), 120); });
    }
    initLive();
    setInterval(() => localizeTimes(), 5000);
  });
})();
