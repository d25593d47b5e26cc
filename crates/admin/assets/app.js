// warren web admin: live refresh. The page's <main data-api=...> names its JSON twin; every
// data-refresh seconds this fetches it and re-renders the tables (data-cols) and values
// (data-path) from it, with the same formats the server used for the first paint.
(function () {
  "use strict";
  var main = document.querySelector("main[data-api]");
  if (!main) { return; }
  var api = main.getAttribute("data-api");
  var every = Math.max(2, parseInt(main.getAttribute("data-refresh") || "5", 10)) * 1000;
  var csrfMeta = document.querySelector("meta[name=csrf-token]");
  var csrf = csrfMeta ? csrfMeta.getAttribute("content") : "";
  var live = document.getElementById("live");

  function at(v, path) {
    if (!path) { return v; }
    var parts = path.split(".");
    for (var i = 0; i < parts.length; i++) {
      if (v === null || v === undefined) { return null; }
      v = v[parts[i]];
    }
    return v === undefined ? null : v;
  }
  function text(v) {
    if (v === null || v === undefined) { return "-"; }
    if (typeof v === "string") { return v; }
    return JSON.stringify(v);
  }
  function num(v) { return (v === null || v === undefined) ? "-" : String(v); }
  function cut(s, n) { return s.length <= n ? s : s.slice(0, n - 1) + "\u2026"; }
  function fmt(f, v, row) {
    switch (f) {
      case "num": return num(v);
      case "rate": return (typeof v === "number") ? v.toFixed(1) : "-";
      case "list": return Array.isArray(v) ? v.map(text).join(", ") : text(v);
      case "subs":
        if (!Array.isArray(v) || v.length === 0) { return "(no subscribers)"; }
        return v.map(function (s) {
          return text(s.target) + " (pending " + num(s.pending) + ", dead " + num(s.dead) + ")";
        }).join("; ");
      case "counts":
        if (!v || typeof v !== "object") { return text(v); }
        return Object.keys(v).sort().map(function (k) { return k + ": " + num(v[k]); }).join(", ");
      case "json": return cut(v === null || v === undefined ? "-" : JSON.stringify(v), 200);
      case "outcome":
        if (row.result !== null && row.result !== undefined) { return cut(JSON.stringify(row.result), 200); }
        if (row.error) { return cut(text(row.error.kind) + ": " + text(row.error.message), 200); }
        return "-";
      case "parts":
        return num(row.parts_in) + " / " + (typeof row.parts_total === "number" ? row.parts_total : "?");
      default: return text(v);
    }
  }
  function fill(t, row) {
    return t.replace(/\{([^}]+)\}/g, function (_, k) { return encodeURIComponent(text(at(row, k))); });
  }
  function replayForm(id) {
    var svc = main.getAttribute("data-svc") || "";
    var form = document.createElement("form");
    form.method = "post";
    form.action = "/api/services/" + encodeURIComponent(svc) + "/replay";
    form.className = "inline";
    [["csrf", csrf], ["id", id]].forEach(function (kv) {
      var i = document.createElement("input");
      i.type = "hidden"; i.name = kv[0]; i.value = kv[1];
      form.appendChild(i);
    });
    var b = document.createElement("button");
    b.type = "submit"; b.className = "replay"; b.textContent = "Replay";
    b.setAttribute("data-task", id);
    form.appendChild(b);
    return form;
  }
  function renderTable(table, data) {
    var cols = JSON.parse(table.getAttribute("data-cols"));
    var rows = at(data, table.getAttribute("data-path"));
    var sig = JSON.stringify(rows === undefined ? null : rows);
    if (table.getAttribute("data-sig") === sig) { return; }
    table.setAttribute("data-sig", sig);
    var body = document.createElement("tbody");
    if (!Array.isArray(rows) || rows.length === 0) {
      var tr = document.createElement("tr");
      var td = document.createElement("td");
      td.colSpan = cols.length; td.className = "empty";
      td.textContent = table.getAttribute("data-empty") || "";
      tr.appendChild(td); body.appendChild(tr);
    } else {
      rows.forEach(function (row) {
        var tr = document.createElement("tr");
        cols.forEach(function (c) {
          var td = document.createElement("td");
          var v = at(row, c.k);
          if (c.f === "replay") {
            if (typeof v === "string") { td.appendChild(replayForm(v)); } else { td.textContent = "-"; }
          } else if (c.link) {
            var a = document.createElement("a");
            a.href = fill(c.link, row);
            a.textContent = fmt(c.f, v, row);
            td.appendChild(a);
          } else {
            td.textContent = fmt(c.f, v, row);
          }
          tr.appendChild(td);
        });
        body.appendChild(tr);
      });
    }
    var old = table.querySelector("tbody");
    if (old) { table.replaceChild(body, old); } else { table.appendChild(body); }
  }
  function render(data) {
    main.querySelectorAll("table[data-cols]").forEach(function (t) { renderTable(t, data); });
    main.querySelectorAll("span[data-path]").forEach(function (s) {
      s.textContent = fmt(s.getAttribute("data-f"), at(data, s.getAttribute("data-path")), data);
    });
  }
  var busy = false;
  function refresh() {
    if (busy || document.hidden) { return; }
    busy = true;
    fetch(api, { headers: { "Accept": "application/json" }, credentials: "same-origin" })
      .then(function (r) {
        if (!r.ok) { throw new Error("HTTP " + r.status); }
        return r.json();
      })
      .then(function (data) {
        render(data);
        if (live) { live.textContent = "live \u00b7 " + new Date().toLocaleTimeString(); live.className = "live ok"; }
      })
      .catch(function (e) {
        if (live) { live.textContent = "refresh failed: " + e.message; live.className = "live bad"; }
      })
      .then(function () { busy = false; });
  }
  window.warrenRefresh = refresh;
  refresh();
  setInterval(refresh, every);
})();
