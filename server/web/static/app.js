// EMU dashboard: live regions over server-sent events, and SLA countdowns. No framework.
// A region is an element with data-live="topic ..." and data-fragment="block"; when the
// server says a topic changed, the region is re-fetched as ?fragment=block and replaced.
(function () {
  "use strict";
  function regions() { return Array.prototype.slice.call(document.querySelectorAll("[data-live]")); }
  var inflight = {};
  function refresh(el) {
    var key = el.dataset.fragment;
    if (inflight[key]) { inflight[key] = "again"; return; }
    inflight[key] = true;
    var url = new URL(el.dataset.src || window.location.href, window.location.href);
    url.searchParams.set("fragment", key);
    fetch(url.toString(), { credentials: "same-origin", headers: { Accept: "text/html" } })
      .then(function (r) {
        if (r.status === 401) { window.location.reload(); return null; }
        return r.ok ? r.text() : null;
      })
      .then(function (html) {
        if (html !== null) { el.innerHTML = html; tick(); }
      })
      .catch(function () {})
      .then(function () {
        var again = inflight[key] === "again";
        inflight[key] = false;
        if (again) { refresh(el); }
      });
  }
  function changed(topic) {
    regions().forEach(function (el) {
      if (el.dataset.live.split(" ").indexOf(topic) >= 0) { refresh(el); }
    });
  }
  function fmt(s) {
    s = Math.abs(Math.round(s));
    if (s < 60) { return s + " s"; }
    if (s < 3600) { return Math.floor(s / 60) + " min"; }
    if (s < 86400) { return Math.floor(s / 3600) + " h " + Math.floor(s % 3600 / 60) + " min"; }
    return Math.floor(s / 86400) + " d " + Math.floor(s % 86400 / 3600) + " h";
  }
  // SLA countdowns: text, icon and colour change together (colour is never the only signal).
  // Counted on the server's clock: the page says what time it was rendered at.
  var skew = document.body && document.body.dataset.now ? Date.parse(document.body.dataset.now) - Date.now() : 0;
  function tick() {
    var now = Date.now() + (isNaN(skew) ? 0 : skew);
    document.querySelectorAll(".sla[data-due]").forEach(function (el) {
      var st = el.dataset.state;
      if (!el.dataset.due || st === "paused" || st === "stopped") { return; }
      var due = Date.parse(el.dataset.due), warn = Date.parse(el.dataset.warn || el.dataset.due);
      var state = now >= due ? "breach" : (now >= warn ? "warning" : "ok");
      el.className = "sla sla-" + state;
      el.dataset.state = state;
      el.querySelector(".sla-icon").textContent = state === "breach" ? "✖" : (state === "warning" ? "⚠" : "●");
      el.querySelector(".sla-word").textContent = state === "breach" ? "BREACHED" : (state === "warning" ? "WARNING" : "on track");
      el.querySelector(".sla-left").textContent = el.dataset.kind + ": " +
        (now >= due ? fmt((now - due) / 1000) + " over" : fmt((due - now) / 1000) + " left");
    });
  }
  function start() {
    tick();
    window.setInterval(tick, 1000);
    var topics = [];
    regions().forEach(function (el) {
      el.dataset.live.split(" ").forEach(function (t) { if (t && topics.indexOf(t) < 0) { topics.push(t); } });
    });
    if (!topics.length || !window.EventSource) { return; }
    var q = topics.map(function (t) { return "topic=" + encodeURIComponent(t); }).join("&");
    var es = new EventSource("/events?" + q);
    var status = document.querySelector(".live-state");
    es.addEventListener("hello", function () {
      // (re)connected: catch up on anything that changed while the stream was not open
      regions().forEach(refresh);
      document.body.dataset.live = "on";
      if (status) { status.textContent = "Live updates on."; }
    });
    es.addEventListener("change", function (e) { changed(e.data); });
    es.addEventListener("logout", function () { es.close(); window.location.reload(); });
    es.onerror = function () {
      document.body.dataset.live = "off";
      if (status) { status.textContent = "Live updates paused; reconnecting…"; }
    };
  }
  if (document.readyState === "loading") { document.addEventListener("DOMContentLoaded", start); }
  else { start(); }
})();
// Recording replay: re-types an asciicast's output events with their timing (gaps capped).
(function () {
  "use strict";
  document.addEventListener("click", function (e) {
    var btn = e.target.closest ? e.target.closest("[data-replay]") : null;
    if (!btn) { return; }
    var screen = document.getElementById(btn.dataset.replay);
    var data = document.getElementById(btn.dataset.replay + "-events");
    if (!screen || !data) { return; }
    var events = JSON.parse(data.textContent || "[]"), i = 0, last = 0;
    screen.textContent = "";
    btn.disabled = true;
    function step() {
      if (i >= events.length) { btn.disabled = false; return; }
      screen.textContent += events[i][1].replace(/\r\n/g, "\n");
      screen.scrollTop = screen.scrollHeight;
      var next = i + 1 < events.length ? events[i + 1][0] : events[i][0];
      var wait = Math.min(Math.max(next - events[i][0], 0), 1.5) * 1000;
      i += 1;
      window.setTimeout(step, wait);
    }
    step();
  });
})();
