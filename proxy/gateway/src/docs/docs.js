(function () {
  "use strict";
  var form = document.getElementById("try-form");
  if (!form) { return; }
  var $ = function (id) { return document.getElementById(id); };
  form.addEventListener("submit", function (ev) {
    ev.preventDefault();
    var base = form.getAttribute("data-base") || "";
    var key = $("try-key").value.trim();
    var init = { method: $("try-method").value, headers: { "Authorization": "Bearer " + key }, cache: "no-store", credentials: "omit", referrerPolicy: "no-referrer" };
    $("try-result").hidden = false;
    $("try-status").textContent = "…";
    fetch(base + $("try-path").value, init).then(function (r) {
      var shown = ["ratelimit", "ratelimit-policy", "x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset", "retry-after", "content-type"];
      var lines = [];
      shown.forEach(function (h) { var v = r.headers.get(h); if (v !== null) { lines.push(h + ": " + v); } });
      $("try-status").textContent = String(r.status);
      $("try-headers").textContent = lines.join("\n");
      return r.text().then(function (t) { $("try-body").textContent = t; });
    }, function (e) {
      $("try-status").textContent = "network error";
      $("try-body").textContent = String(e) + " (is this page's origin in cors.allow_origins?)";
    });
  });
})();
