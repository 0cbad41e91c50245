/* The job list, live: every few seconds ask rows.json for the state of the jobs on
 * the page and update their status, host, duration, finished time and reason in
 * place; a running job's duration ticks every second in between. On the newest page
 * a notice says when new jobs matching the filters arrived. Polling stops when no job
 * on the page can change any more (and the page does not look out for new ones).
 * Text from the server is set with textContent, never as HTML. */
(function () {
  "use strict";

  const configEl = document.getElementById("job-list-live");
  if (!configEl) return;
  const cfg = JSON.parse(configEl.textContent);
  const HIDDEN_FACTOR = 4;
  const MAX_BACKOFF_MS = 30000;
  const ACTIVE = ["pending", "queued", "running"];
  const table = document.getElementById("job-table");
  const indicator = document.getElementById("list-live");
  let failures = 0;
  let fetchedAt = Date.now();

  function rowOf(id) { return table && table.querySelector('tr[data-job="' + id + '"]'); }

  function cell(row, name) { return row.querySelector('[data-cell="' + name + '"]'); }

  function activeIds() {
    if (!table) return [];
    return Array.prototype.map.call(table.querySelectorAll("tbody tr[data-job]"), function (tr) { return tr; })
      .filter(function (tr) { return ACTIVE.indexOf(tr.dataset.status) >= 0; })
      .map(function (tr) { return tr.dataset.job; });
  }

  function formatDuration(s) {
    if (s === null || s === undefined || isNaN(s)) return "";
    if (s < 10) return s.toFixed(1) + " s";
    if (s < 60) return Math.round(s) + " s";
    if (s < 3600) return Math.floor(s / 60) + " min " + String(Math.floor(s % 60)).padStart(2, "0") + " s";
    return Math.floor(s / 3600) + " h " + String(Math.floor((s % 3600) / 60)).padStart(2, "0") + " min";
  }

  function update(row, job) {
    row.dataset.status = job.status;
    const badge = cell(row, "status").querySelector(".badge");
    if (badge && badge.textContent !== job.status) {
      badge.className = "badge status-" + job.status;
      badge.textContent = job.status;
    }
    const where = cell(row, "where");
    where.textContent = job.where;
    where.classList.toggle("muted", !job.placed);
    const duration = cell(row, "duration");
    duration.dataset.seconds = job.duration_s === null ? "" : String(job.duration_s);
    duration.dataset.running = job.running ? "1" : "";
    duration.dataset.waiting = job.waiting ? "1" : "";
    duration.classList.toggle("muted", job.waiting);
    duration.textContent = job.duration || "—";
    const finished = cell(row, "finished");
    finished.textContent = "";
    if (job.finished) {
      const time = document.createElement("time");
      time.dateTime = job.finished_iso;
      time.textContent = job.finished;
      finished.appendChild(time);
    } else {
      const dash = document.createElement("span");
      dash.className = "muted";
      dash.textContent = "—";
      finished.appendChild(dash);
    }
    const reason = cell(row, "reason");
    reason.textContent = job.reason.length > 160 ? job.reason.slice(0, 159) + "…" : job.reason;
    if (job.reason_code) reason.title = job.reason_code; else reason.removeAttribute("title");
  }

  // Between polls a running (or waiting) job's clock keeps going.
  function tick() {
    if (!table) return;
    const elapsed = (Date.now() - fetchedAt) / 1000;
    table.querySelectorAll('td[data-cell="duration"]').forEach(function (td) {
      const base = parseFloat(td.dataset.seconds);
      if (isNaN(base) || !(td.dataset.running || td.dataset.waiting)) return;
      const text = formatDuration(base + elapsed);
      td.textContent = td.dataset.waiting ? "waiting " + text : text;
    });
  }

  function showNewer(count) {
    const box = document.getElementById("new-jobs");
    if (!box) return;
    box.hidden = !count;
    if (!count) return;
    document.getElementById("new-jobs-text").textContent =
      (count >= 100 ? "100 or more new jobs" : count + " new job" + (count === 1 ? "" : "s")) +
      (cfg.status || cfg.kind ? " match these filters." : " since this page was loaded.");
    document.getElementById("new-jobs-link").href = window.location.pathname + window.location.search;
  }

  function wanted() {
    return activeIds().length > 0 || cfg.newest !== null;
  }

  async function poll() {
    const ids = activeIds();
    const query = new URLSearchParams();
    if (ids.length) query.set("ids", ids.join(","));
    if (cfg.newest !== null) query.set("newest", String(cfg.newest));
    if (cfg.status) query.set("status", cfg.status);
    if (cfg.kind) query.set("kind", cfg.kind);
    try {
      const response = await fetch(cfg.url + "?" + query.toString(), {
        credentials: "same-origin", cache: "no-store", headers: { Accept: "application/json" } });
      if (!response.ok) throw new Error("rows: HTTP " + response.status);
      const data = await response.json();
      fetchedAt = Date.now();
      data.jobs.forEach(function (job) {
        const row = rowOf(job.id);
        if (row) update(row, job);
      });
      showNewer(data.newer);
      failures = 0;
      indicator.classList.remove("stale");
      indicator.textContent = "live";
    } catch (err) {
      failures += 1;
      indicator.classList.add("stale");
      indicator.textContent = "reconnecting";
      if (window.console) console.warn("NeuronDeck: job list poll failed", err);
    }
    schedule();
  }

  function schedule() {
    indicator.hidden = !wanted();
    if (!wanted()) return;
    const base = document.hidden ? cfg.poll_ms * HIDDEN_FACTOR : cfg.poll_ms;
    window.setTimeout(poll, failures ? Math.min(base * Math.pow(2, failures), MAX_BACKOFF_MS) : base);
  }

  if (table) {
    table.querySelectorAll("tbody tr[data-job]").forEach(function (tr) {
      const td = cell(tr, "duration");
      td.dataset.running = tr.dataset.status === "running" ? "1" : "";
      td.dataset.waiting = tr.dataset.status === "pending" || tr.dataset.status === "queued" ? "1" : "";
    });
    window.setInterval(tick, 1000);
  }
  schedule();
})();
