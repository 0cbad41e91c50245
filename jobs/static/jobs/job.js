/* The job page, live: poll /jobs/<id>/status.json about once a second while the job
 * is not finished and update the status badge, reason, timeline and log in place;
 * when it finishes, fetch the server-rendered result section (/jobs/<id>/result/).
 * Plain JS, no framework. Text from the server is set with textContent, never as HTML.
 *
 * Also draws every Plotly figure on the page: an element with data-figure="<id>"
 * is drawn from the JSON in <script id="<id>" type="application/json"> (json_script).
 */
(function () {
  "use strict";

  const POLL_MS = 1000;
  const HIDDEN_POLL_MS = 5000; // a background tab polls less
  const MAX_BACKOFF_MS = 15000;
  const MAX_LOG_CHARS = 2000000; // keep the page responsive on a very chatty job

  function drawPlots(root) {
    if (!window.Plotly) return;
    root.querySelectorAll("[data-figure]").forEach(function (el) {
      const source = document.getElementById(el.dataset.figure);
      if (!source) return;
      const figure = JSON.parse(source.textContent);
      window.Plotly.newPlot(el, figure.data, figure.layout, { responsive: true, displaylogo: false });
    });
  }
  window.NeuronDeck = Object.assign(window.NeuronDeck || {}, { drawPlots: drawPlots });
  drawPlots(document);

  const configEl = document.getElementById("job-live-config");
  if (!configEl) return;
  const config = JSON.parse(configEl.textContent);
  const $ = function (id) { return document.getElementById(id); };

  let eventsAfter = config.eventsAfter;
  let logOffset = config.logOffset;
  let failures = 0;

  function setStatus(data) {
    const badge = $("job-status");
    if (badge.dataset.status !== data.status) {
      badge.className = "badge badge-large status-" + data.status;
      badge.dataset.status = data.status;
      badge.textContent = data.status;
    }
    $("job-reason").hidden = !data.show_reason;
    $("job-reason-code").textContent = data.reason_code;
    $("job-reason-text").textContent = data.reason;
    const queue = $("queue-position");
    queue.hidden = data.queue_position === null || data.queue_position === undefined;
    if (!queue.hidden) $("queue-position-value").textContent = data.queue_position;
    $("job-host").textContent = data.host || "—";
    $("job-cores").textContent = data.core_range || "—";
    $("job-attempts").textContent = data.attempts;
    $("job-started").textContent = data.started_at || "—";
    $("job-finished").textContent = data.finished_at || "—";
    const cancel = $("cancel-form");
    if (cancel && !data.can_cancel) cancel.remove();
    const suspend = $("suspend-form"), resume = $("resume-form");
    if (suspend) suspend.hidden = !data.can_suspend;
    if (resume) resume.hidden = !data.can_resume;
    renderPending(data.pending);
    renderRanks(data.ranks || [], data.gang_util || []);
    renderGangUtil(data.gang_util);
  }

  // A gang's per-host utilization chart, redrawn from each poll (jobs.lifecycle.charts
  // host_util_trace: the same traces; the layout's colorway keeps each host's colour).
  function renderGangUtil(rows) {
    const el = $("gang-util-chart");
    if (!el || !rows || !window.Plotly || !el.layout) return;
    const traces = rows.map(function (r) {
      return { type: "scatter", mode: r.t.length <= 60 ? "lines+markers" : "lines", x: r.t, y: r.util,
               name: "rank " + r.rank + " · " + r.host, line: { width: 2 }, marker: { size: 4 },
               hovertemplate: "%{fullData.name}<br>%{y:.1f} %<extra></extra>" };
    });
    const layout = Object.assign({}, el.layout);
    if (rows.some(function (r) { return r.t.length > 0; })) layout.annotations = [];
    window.Plotly.react(el, traces, layout);
  }

  // A multi-host job's table of ranks, rebuilt from each poll (a few rows).
  function renderRanks(ranks, util) {
    const table = $("gang-ranks");
    if (!table) return;
    const now = {};
    util.forEach(function (u) { now[u.rank] = u.now; });
    $("gang-empty").hidden = ranks.length > 0;
    const body = table.tBodies[0];
    body.replaceChildren();
    ranks.forEach(function (r) {
      const row = body.insertRow();
      row.dataset.rank = r.rank;
      row.insertCell().textContent = r.rank;
      const host = row.insertCell();
      if (r.host) {
        const link = document.createElement("a");
        link.href = "/hosts/" + encodeURIComponent(r.host) + "/";
        link.title = "This host's live utilization";
        link.textContent = r.host;
        host.appendChild(link);
      } else {
        host.textContent = "—";
      }
      row.insertCell().textContent = r.cores;
      const badge = document.createElement("span");
      badge.className = "badge status-" + r.state;
      badge.textContent = r.state;
      row.insertCell().appendChild(badge);
      const use = row.insertCell();
      use.className = "util-now";
      if (now[r.rank] === null || now[r.rank] === undefined) {
        use.textContent = "—";
      } else {
        const meter = document.createElement("meter");
        meter.min = 0;
        meter.max = 100;
        meter.value = now[r.rank];
        use.append(meter, " " + Math.round(now[r.rank]) + " %");
      }
      row.insertCell().textContent = r.heartbeat_at ? r.heartbeat_at.slice(-8) : "—";
      const exit = row.insertCell();
      exit.title = r.detail;
      exit.textContent = r.exit_code === null ? "—" : r.exit_code;
      if (r.detail) {
        const why = document.createElement("span");
        why.className = "muted";
        why.textContent = " " + (r.detail.length > 80 ? r.detail.slice(0, 79) + "…" : r.detail);
        exit.appendChild(why);
      }
    });
  }

  // "Why is this job waiting?": filled from the same poll as the badge, hidden the
  // moment the job leaves the queue (and shown again if it is requeued).
  function renderPending(d) {
    const box = $("pending-why");
    if (!box) return;
    box.hidden = !d;
    if (!d) return;
    $("pending-code").textContent = d.reason_code || "submitted";
    $("pending-reason").textContent = d.reason || "waiting for the scheduler";
    $("pending-hint").textContent = d.hint || "";
    const pos = $("pending-position");
    pos.textContent = "";
    if (d.position) {
      const strong = document.createElement("strong");
      strong.textContent = d.position;
      pos.append("Number ", strong, " of " + d.queue_length + " in the " + d.family + " queue" +
        (d.position > 1 ? "; ahead of it:" : ": it is next."));
    } else {
      pos.textContent = "Not yet in the dispatcher's view of the queue.";
    }
    if ($("pending-estimate-summary")) {
      $("pending-estimate-summary").textContent = d.estimate ? d.estimate.summary : "no estimate yet";
      $("pending-estimate-basis").textContent = d.estimate ? d.estimate.basis : "";
      $("pending-estimate-age").textContent = d.estimate ? d.estimate.age : "";
    }
    const list = $("pending-ahead");
    list.textContent = "";
    d.ahead.forEach(function (a) {
      const li = document.createElement("li");
      if (a.mine) {
        const link = document.createElement("a");
        link.href = "/jobs/" + a.id + "/";
        link.textContent = "#" + a.id;
        li.append(link, " " + a.kind + " · " + a.team);
      } else {
        li.append("a job of team " + a.team);
      }
      li.append(" · " + a.cores + " core" + (a.cores === 1 ? "" : "s"));
      list.append(li);
    });
  }

  function addEvents(events) {
    const list = $("timeline");
    events.forEach(function (e) {
      if (list.querySelector('[data-id="' + e.id + '"]')) return;
      const li = document.createElement("li");
      li.className = "event";
      li.dataset.id = e.id;
      const time = document.createElement("time");
      time.dateTime = e.at;
      time.textContent = e.at_display;
      const kind = document.createElement("span");
      kind.className = "badge status-" + e.kind;
      kind.textContent = e.kind;
      const who = document.createElement("span");
      who.className = "who";
      who.textContent = e.actor;
      const what = document.createElement("span");
      what.className = "what";
      what.textContent = e.message;
      li.append(time, " ", kind, " ", who, " ", what);
      list.appendChild(li);
      eventsAfter = Math.max(eventsAfter, e.id);
    });
    if (events.length) list.scrollTop = list.scrollHeight;
  }

  function appendLog(log) {
    logOffset = log.offset;
    if (!log.text) return;
    const pre = $("log");
    // Follow the end only if the reader is already there (do not yank them back).
    const atBottom = pre.scrollHeight - pre.scrollTop - pre.clientHeight < 40;
    pre.textContent += log.text;
    if (pre.textContent.length > MAX_LOG_CHARS) {
      pre.textContent = pre.textContent.slice(-MAX_LOG_CHARS);
      $("log-truncated").hidden = false;
    }
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  }

  async function reloadResult() {
    const response = await fetch(config.resultUrl, { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error("result: HTTP " + response.status);
    const section = $("result");
    section.innerHTML = await response.text(); // our own server-rendered, autoescaped fragment
    drawPlots(section);
  }

  function setLive(on, stale) {
    const indicator = $("live-indicator");
    indicator.hidden = !on;
    indicator.classList.toggle("stale", Boolean(stale));
    indicator.textContent = stale ? "reconnecting" : "live";
  }

  async function poll() {
    let done = false;
    try {
      const url = config.statusUrl + "?events_after=" + eventsAfter + "&log_offset=" + logOffset;
      const response = await fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin", cache: "no-store" });
      if (!response.ok) throw new Error("status: HTTP " + response.status);
      const data = await response.json();
      setStatus(data);
      addEvents(data.events);
      appendLog(data.log);
      if (data.finished && !data.log.more) {
        await reloadResult();
        done = true;
      }
      failures = 0;
      setLive(!done, false);
    } catch (err) {
      failures += 1;
      setLive(true, true);
      if (window.console) console.warn("NeuronDeck: job poll failed", err);
    }
    if (done) return;
    const base = document.hidden ? HIDDEN_POLL_MS : POLL_MS;
    setTimeout(poll, failures ? Math.min(base * Math.pow(2, failures), MAX_BACKOFF_MS) : base);
  }

  const log = $("log");
  log.scrollTop = log.scrollHeight;
  if (!config.finished) setTimeout(poll, POLL_MS);
})();
