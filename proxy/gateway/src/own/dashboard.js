(function () {
  "use strict";
  // The key lives in this variable only: never in a URL, a cookie or storage.
  var key = null;
  var timer = null;
  var $ = function (id) { return document.getElementById(id); };
  var STATUS = { active: "Active", past_due: "Past due", paused: "Paused", canceling: "Cancels at period end", canceled: "Cancelled", suspended: "Suspended" };

  function headers(extra) {
    var h = { "Authorization": "Bearer " + key, "Accept": "application/json" };
    for (var k in extra) { h[k] = extra[k]; }
    return h;
  }
  function call(method, path, body) {
    var init = { method: method, headers: headers(body ? { "Content-Type": "application/x-www-form-urlencoded" } : {}), cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
    if (body) { init.body = body; }
    return fetch(path, init).then(function (r) {
      return r.text().then(function (t) {
        var j = null;
        try { j = JSON.parse(t); } catch (e) { j = null; }
        return { status: r.status, ok: r.ok, body: j };
      });
    });
  }
  function showError(msg) { var e = $("error"); e.textContent = msg; e.hidden = !msg; }
  function text(el, t) { el.textContent = t; return el; }
  function make(tag, cls, t) { var el = document.createElement(tag); if (cls) { el.className = cls; } if (t !== undefined) { el.textContent = t; } return el; }
  function inWords(secs) {
    if (secs < 60) { return secs + " s"; }
    if (secs < 3600) { return Math.round(secs / 60) + " min"; }
    if (secs < 172800) { return Math.round(secs / 3600) + " h"; }
    return Math.round(secs / 86400) + " days";
  }
  function status(s) { var b = $("status"); b.className = "badge " + (s || ""); b.textContent = STATUS[s] || ""; b.hidden = !s; }

  function render(u) {
    $("account").hidden = false;
    text($("plan"), u.plan);
    text($("customer"), "Customer " + u.customer);
    status(u.subscription);
    var list = $("limits");
    list.textContent = "";
    (u.policies || []).forEach(function (p) {
      var used = Math.max(0, p.limit - p.remaining);
      var pct = p.limit > 0 ? Math.min(100, Math.round(100 * used / p.limit)) : 100;
      var li = make("li");
      var head = make("div", "limit-head");
      head.appendChild(make("strong", "", p.name + " (" + p.window + ")"));
      head.appendChild(make("span", "", used.toLocaleString() + " / " + p.limit.toLocaleString() + " used"));
      li.appendChild(head);
      var bar = make("div", "bar");
      bar.setAttribute("role", "progressbar");
      bar.setAttribute("aria-label", p.name + " used");
      bar.setAttribute("aria-valuemin", "0");
      bar.setAttribute("aria-valuemax", String(p.limit));
      bar.setAttribute("aria-valuenow", String(used));
      var fill = make("div", "fill" + (pct >= 100 ? " full" : pct >= 80 ? " high" : ""));
      fill.style.width = pct + "%";
      bar.appendChild(fill);
      li.appendChild(bar);
      var at = new Date(Date.now() + p.reset * 1000);
      li.appendChild(make("span", "help", p.remaining.toLocaleString() + " left, resets in " + inWords(p.reset) + " (" + at.toLocaleString() + ")"));
      list.appendChild(li);
    });
    $("unlimited").hidden = (u.policies || []).length > 0;
    // Prepaid credits, for a plan that has them.
    $("credits").hidden = !u.credits;
    if (u.credits) {
      text($("credits-left"), u.credits.remaining.toLocaleString() + " credits left");
      text($("credits-detail"), u.credits.used.toLocaleString() + " of " + u.credits.granted.toLocaleString() + " used this period");
    }
    text($("period"), "From " + new Date(u.period.start).toLocaleDateString() + " until " + new Date(u.period.end).toLocaleDateString());
    var body = $("usage").querySelector("tbody");
    body.textContent = "";
    var meters = Object.keys(u.usage || {});
    meters.forEach(function (m) {
      var tr = make("tr");
      tr.appendChild(make("td", "", m));
      tr.appendChild(make("td", "", u.usage[m].toLocaleString()));
      body.appendChild(tr);
    });
    $("usage").hidden = meters.length === 0;
    $("no-usage").hidden = meters.length > 0;
    // A subscriber changes plans in the billing portal; a second checkout
    // would start a second subscription.
    var subscribed = u.subscription && u.subscription !== "canceled";
    document.querySelectorAll("[data-plan]").forEach(function (b) {
      var current = b.getAttribute("data-plan") === u.plan;
      b.hidden = !!subscribed;
      b.disabled = current;
      b.textContent = current ? "Current plan: " + u.plan : "Upgrade to " + b.getAttribute("data-plan");
    });
    // Credit packs, for a plan that spends credits (a subscriber too).
    document.querySelectorAll("[data-credits]").forEach(function (b) { b.hidden = !u.credits; });
    var note = $("change-note");
    if (note) { note.hidden = !subscribed; }
  }

  function load() {
    return call("GET", "/_tollgate/usage").then(function (r) {
      if (r.ok && r.body) { showError(""); render(r.body); return; }
      var detail = r.body && r.body.detail ? r.body.detail : "HTTP " + r.status;
      if (r.status === 403) {
        // Suspended: the account can still pay through the portal.
        $("account").hidden = false;
        status("suspended");
        showError("This account is suspended. " + detail);
        return;
      }
      showError(detail);
      if (r.status === 401) { forget(false); }
    }, function () { showError("The API could not be reached."); });
  }

  function go(path, body, button) {
    button.disabled = true;
    call("POST", path, body).then(function (r) {
      if (r.ok && r.body && r.body.url) { window.location.assign(r.body.url); return; }
      button.disabled = false;
      showError(r.body && r.body.detail ? r.body.detail : "HTTP " + r.status);
    }, function () { button.disabled = false; showError("The API could not be reached."); });
  }

  function forget(clearError) {
    key = null;
    if (timer) { clearInterval(timer); timer = null; }
    $("account").hidden = true;
    if (clearError) { showError(""); }
    $("key").focus();
  }

  $("key-form").addEventListener("submit", function (ev) {
    ev.preventDefault();
    var v = $("key").value.trim();
    if (!v) { return; }
    key = v;
    $("key").value = "";
    load();
    if (timer) { clearInterval(timer); }
    timer = setInterval(function () { if (key && !document.hidden) { load(); } }, 15000);
  });
  document.querySelectorAll("[data-plan]").forEach(function (b) {
    b.addEventListener("click", function () { go("/_tollgate/billing/checkout", "plan=" + encodeURIComponent(b.getAttribute("data-plan")), b); });
  });
  document.querySelectorAll("[data-credits]").forEach(function (b) {
    b.addEventListener("click", function () { go("/_tollgate/billing/checkout", "credits=" + encodeURIComponent(b.getAttribute("data-credits")), b); });
  });
  var portal = $("portal");
  if (portal) { portal.addEventListener("click", function () { go("/_tollgate/billing/portal", null, portal); }); }
  $("refresh").addEventListener("click", load);
  $("forget").addEventListener("click", function () { forget(true); });
})();
