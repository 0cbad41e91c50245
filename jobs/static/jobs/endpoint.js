// The endpoint page: the playground streams an answer token by token through the
// endpoint's stable URL (the gateway accepts the signed-in session with the CSRF
// token), and the live figures refresh from GET /api/v1/endpoints/<id>.
(function () {
  "use strict";
  var script = document.currentScript;
  var endpointId = script && script.dataset.endpoint;

  function csrfToken(form) {
    var match = document.cookie.match(/(?:^|;\s*)csrftoken=([^;]+)/);
    if (match) return decodeURIComponent(match[1]);
    var field = form && form.querySelector("[name=csrfmiddlewaretoken]");
    return field ? field.value : "";
  }

  function tokenOf(event) {
    var choice = event && event.choices && event.choices[0];
    if (!choice) return "";
    if (typeof choice.text === "string") return choice.text;
    return (choice.delta && choice.delta.content) || "";
  }

  async function send(form) {
    var output = document.getElementById("playground-output");
    var status = document.getElementById("playground-status");
    var button = document.getElementById("playground-send");
    var body = {model: form.dataset.model, prompt: document.getElementById("playground-prompt").value,
                max_tokens: parseInt(document.getElementById("playground-max-tokens").value, 10) || 32,
                stream: true};
    output.textContent = "";
    status.textContent = "sending…";
    button.disabled = true;
    var started = performance.now(), first = null, tokens = 0;
    try {
      var response = await fetch(form.dataset.url + "/completions", {
        method: "POST", credentials: "include",
        headers: {"Content-Type": "application/json", "X-CSRFToken": csrfToken(form)},
        body: JSON.stringify(body)});
      if (!response.ok) {
        var text = await response.text(), detail = text;
        try { detail = JSON.parse(text).detail || JSON.parse(text).error.message || text; } catch (e) { /* not JSON */ }
        var retry = response.headers.get("Retry-After");
        status.textContent = "HTTP " + response.status + ": " + detail + (retry ? " (retry after " + retry + " s)" : "");
        return;
      }
      var reader = response.body.getReader(), decoder = new TextDecoder(), buffer = "";
      for (;;) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, {stream: true});
        var parts = buffer.split("\n\n");
        buffer = parts.pop();
        for (var i = 0; i < parts.length; i++) {
          var line = parts[i].split("\n").filter(function (l) { return l.indexOf("data:") === 0; }).join("");
          var data = line.slice(5).trim();
          if (!data || data === "[DONE]") continue;
          var piece = tokenOf(JSON.parse(data));
          if (!piece) continue;
          if (first === null) first = performance.now() - started;
          tokens += 1;
          var span = document.createElement("span");
          span.className = "playground-token";
          span.textContent = piece;
          output.appendChild(span);
          status.textContent = "streaming… " + tokens + " tokens";
        }
      }
      status.textContent = tokens + " tokens; first after " + (first === null ? "—" : Math.round(first) + " ms") +
        ", all after " + Math.round(performance.now() - started) + " ms";
    } catch (err) {
      status.textContent = "The endpoint's URL did not answer (" + err.message + "): is the gateway running?";
    } finally {
      button.disabled = false;
    }
  }

  var form = document.getElementById("playground-form");
  if (form) {
    form.addEventListener("submit", function (event) { event.preventDefault(); send(form); });
  }

  function refresh() {
    if (!endpointId || document.hidden) return;
    fetch("/api/v1/endpoints/" + endpointId, {credentials: "same-origin"}).then(function (r) {
      return r.ok ? r.json() : null;
    }).then(function (doc) {
      if (!doc) return;
      var badge = document.getElementById("endpoint-health");
      if (badge) { badge.textContent = doc.health; badge.className = "badge badge-large endpoint-" + doc.health.replace(/ /g, "-"); }
      var stats = doc.stats || {};
      document.querySelectorAll("[data-stat]").forEach(function (el) {
        var value = stats[el.dataset.stat];
        el.textContent = value === null || value === undefined ? "—" : value;
      });
      (doc.replicas || []).forEach(function (r) {
        var row = document.querySelector('tr[data-replica="' + r.id + '"]');
        if (!row) return;
        row.dataset.state = r.state;
        var badge = row.querySelector(".badge");
        if (badge) { badge.textContent = r.state; badge.className = "badge replica-" + r.state; }
        var cells = row.querySelectorAll("td");
        cells[4].textContent = r.util_pct === null ? "—" : r.util_pct + "%";
        cells[5].textContent = r.inflight === null ? "—" : r.inflight;
      });
    }).catch(function () { /* the next refresh tries again */ });
  }
  setInterval(refresh, 5000);
})();
