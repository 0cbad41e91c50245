// The submit form's Check button: POST /api/v1/jobs?dry_run=true with the form as it
// is, and show the answer without creating anything: refused (and why), or where it
// would run now / why it would wait, its estimated start and its cost against the budget.
(function () {
  var button = document.getElementById("whatif-check");
  var out = document.getElementById("whatif-answer");
  if (!button || !out) return;
  var form = button.closest("form");
  function line(text, strong) {
    var p = document.createElement("p");
    if (strong) { var b = document.createElement("strong"); b.textContent = strong; p.append(b, " "); }
    p.append(text);
    out.append(p);
  }
  function show(ok, a) {
    out.textContent = "";
    out.hidden = false;
    out.dataset.outcome = ok ? "accepted" : "refused";
    if (!ok) {
      line(a.detail || "refused", "Would be refused" + (a.code ? " (" + a.code + "):" : ":"));
      Object.keys(a.errors || {}).forEach(function (f) { line(a.errors[f].join(" "), f + ":"); });
      return;
    }
    if (a.compile_cache && a.compile_cache.cached) { line(a.compile_cache.sentence || "", "Accepted: a compile cache hit."); return; }
    if (a.would_run_now) {
      var r = a.would_run_now;
      line("on " + r.host + " cores " + r.cores + (r.borrowed ? " (borrowed: may be preempted)" : "") +
           (r.preempts ? ", preempting " + r.preempts + " borrowing job(s)" : "") + ".", "Accepted: it would start now");
    } else if (a.wait) {
      line(a.wait.reason + " (number " + a.queue_position + " in the queue)", "Accepted; it would wait: " + a.wait.reason_code + ".");
    }
    if (a.estimate) {
      var basis = a.estimate.basis || "";
      line(a.estimate.summary + ". " + basis.charAt(0).toUpperCase() + basis.slice(1) + ".", "Estimated start:");
    }
    var c = a.cost;
    if (c) {
      line(c.core_hours_expected + " NeuronCore-hours expected, " + c.core_hours_at_most + " at most (" + c.basis + ")" +
           (c.usd_expected !== null ? "; about $" + c.usd_expected + ", at most $" + c.usd_at_most : "") +
           "; the team has " + c.budget_left_core_hours + " of " + c.budget_core_hours + " left this month" +
           (c.fits_budget ? "." : ": the time limit would go beyond it."), "Cost:");
    }
  }
  button.addEventListener("click", function () {
    var data = new FormData(form);
    var body = new FormData();
    data.forEach(function (value, key) {
      if (key === "prompts_source") return;
      if (typeof value === "string" ? value === "" : !value.size) return;
      body.append(key, value);
    });
    body.append("team", button.dataset.team);
    body.append("kind", button.dataset.kind);
    var csrf = form.querySelector("[name=csrfmiddlewaretoken]");
    button.disabled = true;
    fetch("/api/v1/jobs?dry_run=true", {method: "POST", body: body, credentials: "same-origin",
                                        headers: csrf ? {"X-CSRFToken": csrf.value} : {}})
      .then(function (r) { return r.json().then(function (a) { show(r.ok, a); }); })
      .catch(function () { out.hidden = false; out.textContent = "Could not check: the server did not answer."; })
      .finally(function () { button.disabled = false; });
  });
})();
