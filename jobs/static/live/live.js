/* Live charts: draw the server-built Plotly figures, then follow the JSON API with
 * a cursor and extend the traces in place (Plotly.extendTraces) — never redraw.
 *
 * Roots (each with data-config="<id of a json_script>"):
 *   #job-live-charts  job page: util / mem / lat / exec charts, /api/v1/jobs/<id>/metrics
 *   #host-live        host page: core heatmap, memory bars, vCPU + memory, core table
 *   #fleet-live       fleet page: the heatmap, swapped in every few seconds (Plotly.react)
 * Trace order is the contract set in jobs/live/charts.py (JOB_SERIES). Text from the server is
 * set with textContent, never as HTML. Plain JS, no framework.
 */
(function () {
  "use strict";

  const POLL_MS = 1000;
  const HIDDEN_POLL_MS = 5000; // a background tab polls less
  const MAX_BACKOFF_MS = 15000;
  // Points kept per trace while following: an hour of 1 s samples. Older points
  // scroll off the left, which bounds the page's work however long it stays open.
  const MAX_POINTS = 3600;
  const PLOT_CONFIG = { responsive: true, displaylogo: false };

  function readConfig(root) {
    const el = document.getElementById(root.dataset.config);
    return el ? JSON.parse(el.textContent) : null;
  }

  function chart(root, name) {
    return root.querySelector('[data-live-chart="' + name + '"]');
  }

  async function getJSON(url) {
    const response = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
    if (!response.ok) throw new Error(url + ": HTTP " + response.status);
    return response.json();
  }

  /* Call step() again and again: at once when it says `soon`, after POLL_MS while it
   * says `again`, backing off on errors; stop when it says neither. */
  function follow(step, firstDelay) {
    let failures = 0;
    async function tick() {
      let next;
      try {
        next = await step();
        failures = 0;
      } catch (err) {
        failures += 1;
        next = { again: true };
      }
      if (!next.again && !next.soon) return;
      const base = document.hidden ? HIDDEN_POLL_MS : POLL_MS;
      const delay = next.soon ? 0 : Math.min(base * Math.pow(2, failures), MAX_BACKOFF_MS);
      window.setTimeout(tick, delay);
    }
    window.setTimeout(tick, firstDelay === undefined ? POLL_MS : firstDelay);
  }

  function clock(ms) {
    return new Date(ms).toISOString().slice(11, 19) + " UTC";
  }

  // --- job charts ----------------------------------------------------------------

  // One state, the same as the page shows after a reload: no samples (a sentence, the
  // charts hidden: no empty axes), or the charts. They are drawn at once (hidden while
  // empty) and revealed with the first sample.
  function followJob(root) {
    const cfg = readConfig(root);
    if (!cfg) return;
    const divs = {};
    const names = cfg.charts || ["util", "mem", "lat", "exec"];
    names.forEach(function (name) {
      divs[name] = chart(root, name);
      if (divs[name]) window.Plotly.newPlot(divs[name], cfg.figures[name].data, cfg.figures[name].layout, PLOT_CONFIG);
    });
    const grid = root.querySelector("[data-live-grid]");
    const empty = root.querySelector("[data-no-samples]");
    const cores = cfg.cores.slice();
    const state = root.querySelector("[data-live-state]");
    let cursor = cfg.cursor;
    let points = cfg.points || 0;
    if (!cfg.live) return;
    follow(async function () {
      const d = await getJSON(cfg.url + "?since=" + encodeURIComponent(cursor));
      if (d.reset) {
        // Points after our cursor were trimmed (this tab fell an hour behind): start over.
        window.location.reload();
        return {};
      }
      if (d.t.length) {
        if (grid && grid.hidden) {
          grid.hidden = false;
          if (empty) empty.hidden = true;
          Object.keys(divs).forEach(function (name) { if (divs[name]) window.Plotly.Plots.resize(divs[name]); });
        }
        extendJob(divs, cores, d, cfg.series || {});
        points += d.t.length;
        root.dataset.points = String(points);
        state.textContent = (d.replay ? "replay · " : "") + "following live · last sample " + clock(d.t[d.t.length - 1]);
      }
      cursor = d.cursor || cursor;
      if (!d.live && !d.more) {
        if (points) {
          state.textContent = "the job has ended; its charts are complete";
        } else {
          state.textContent = "";
          if (empty) empty.textContent = cfg.no_samples_recorded;
        }
      }
      return { again: d.live, soon: d.more };
    });
  }

  // A line with a single point has nothing to draw: it shows a marker until a second
  // point arrives, then becomes a plain line.
  function plainLines(div) {
    const lone = [];
    const many = [];
    div.data.forEach(function (trace, i) {
      if (trace.type !== "scatter" || !trace.x) return;
      if (trace.x.length === 1 && trace.mode === "lines") lone.push(i);
      if (trace.x.length > 1 && trace.mode === "lines+markers") many.push(i);
    });
    if (lone.length) window.Plotly.restyle(div, { mode: "lines+markers" }, lone);
    if (many.length) window.Plotly.restyle(div, { mode: "lines" }, many);
  }

  // z rows of a transposed core × time heatmap: one row per time point, the values
  // of `cores` (the order the heatmap was drawn with) in each.
  function heatRows(cores, d) {
    const column = cores.map(function (core) { return d.cores.indexOf(core); });
    return d.t.map(function (_, j) {
      return column.map(function (i) { return i < 0 ? null : d.util[i][j]; });
    });
  }

  function extendJob(divs, cores, d, series) {
    if (divs.util.data[0] && divs.util.data[0].type === "heatmap") {
      if (!cores.length && d.cores.length) {
        // The page was loaded while the job waited for cores: label the rows now.
        d.cores.forEach(function (core) { cores.push(core); });
        window.Plotly.restyle(divs.util, { y: [cores.map(String)] }, [0]);
      }
      window.Plotly.extendTraces(divs.util, { x: [d.t], z: [heatRows(cores, d)] }, [0], MAX_POINTS);
    } else {
      extendLines(divs.util, cores, d);
      plainLines(divs.util);
    }
    // The other charts: the response series named for each, in trace order.
    Object.keys(series).forEach(function (name) {
      const div = divs[name];
      if (!div) return;
      const keys = series[name];
      window.Plotly.extendTraces(div, { x: keys.map(function () { return d.t; }),
        y: keys.map(function (key) { return d[key]; }) }, keys.map(function (_, i) { return i; }), MAX_POINTS);
      plainLines(div);
    });
  }

  function extendLines(div, cores, d) {
    const indices = [];
    const xs = [];
    const ys = [];
    d.cores.forEach(function (core, i) {
      let k = cores.indexOf(core);
      if (k < 0) {
        // A runtime of the job used a core outside its assignment: give it a trace.
        window.Plotly.addTraces(div, { type: "scatter", mode: "lines", name: "core " + core, x: [], y: [] });
        cores.push(core);
        k = cores.length - 1;
      }
      indices.push(k);
      xs.push(d.t);
      ys.push(d.util[i]);
    });
    window.Plotly.extendTraces(div, { x: xs, y: ys }, indices, MAX_POINTS);
  }

  // --- host page -------------------------------------------------------------------

  function followHost(root) {
    const cfg = readConfig(root);
    if (!cfg) return;
    const heat = chart(root, "heat");
    const mem = chart(root, "mem");
    const sys = chart(root, "sys");
    ["heat", "mem", "sys"].forEach(function (name) {
      window.Plotly.newPlot(chart(root, name), cfg.figures[name].data, cfg.figures[name].layout, PLOT_CONFIG);
    });
    const state = document.querySelector("[data-live-state]");
    renderCores(cfg.latest, latestOf(cfg.latest.util), latestOf(cfg.latest.mem));
    let cursor = cfg.cursor;
    follow(async function () {
      const d = await getJSON(cfg.url + "?since=" + encodeURIComponent(cursor));
      if (d.reset) {
        window.location.reload();
        return {};
      }
      cursor = d.cursor || cursor;
      if (d.t.length) {
        window.Plotly.extendTraces(heat, { x: [d.t], z: [heatRows(cfg.cores, d)] }, [0], MAX_POINTS);
        const memNow = latestOf(d.mem);
        window.Plotly.restyle(mem, { y: [memNow] }, [0]);
        window.Plotly.extendTraces(sys, { x: [d.t, d.t], y: [d.vcpu_busy, d.host_mem_used] }, [0, 1], MAX_POINTS);
        renderCores(d, latestOf(d.util), memNow);
        state.textContent = "last sample " + clock(d.t[d.t.length - 1]);
      }
      return { again: true, soon: d.more };
    });
  }

  function latestOf(columns) {
    return columns.map(function (col) { return col.length ? col[col.length - 1] : null; });
  }

  function bytes(n) {
    if (n === null || n === undefined) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
    return n.toFixed(i ? 1 : 0) + " " + units[i];
  }

  function cell(row, text, href) {
    const td = row.insertCell();
    if (href) {
      const a = document.createElement("a");
      a.href = href;
      a.textContent = text;
      td.appendChild(a);
    } else {
      td.textContent = text;
    }
    return td;
  }

  function jobLabel(entry) {
    if (entry === undefined) return ["—", null];
    if (entry === null || entry.job === null) return ["another team's job", null];
    return ["job " + entry.job, "/jobs/" + entry.job + "/"];
  }

  function renderCores(d, utilNow, memNow) {
    const body = document.querySelector("#host-cores tbody");
    const orphanOf = {};
    d.orphans.forEach(function (o) { o.cores.forEach(function (c) { orphanOf[String(c)] = o; }); });
    const rows = [];
    d.cores.forEach(function (core, i) {
      const row = document.createElement("tr");
      row.dataset.core = core;
      cell(row, String(core));
      cell(row, utilNow[i] === null || utilNow[i] === undefined ? "—" : utilNow[i].toFixed(1) + " %");
      cell(row, bytes(memNow[i]));
      const held = d.allocations[String(core)];
      const heldLabel = jobLabel(held);
      const heldCell = cell(row, heldLabel[0], heldLabel[1]);
      if (held && (utilNow[i] || 0) < 1) {
        heldCell.classList.add("idle-held");
        heldCell.appendChild(document.createTextNode(" (idle)"));
      }
      const used = d.used_by[String(core)];
      const orphan = orphanOf[String(core)];
      const usedLabel = used !== undefined ? jobLabel(used === null ? null : { job: used })
        : (orphan ? ["unattributed runtime " + orphan.tag + " (pid " + orphan.pid + ")", null] : ["—", null]);
      cell(row, usedLabel[0], usedLabel[1]);
      rows.push(row);
    });
    body.replaceChildren.apply(body, rows);
    const ecc = document.getElementById("host-ecc");
    if (ecc) {
      ecc.textContent = d.ecc ? "memory " + (d.ecc.mem_corrected + d.ecc.mem_uncorrected) + ", SRAM " +
        (d.ecc.sram_corrected + d.ecc.sram_uncorrected) + " (uncorrected " +
        (d.ecc.mem_uncorrected + d.ecc.sram_uncorrected) + ")" : "not reported";
    }
    const orphans = document.getElementById("host-orphans");
    const orphanRows = d.orphans.map(function (o) {
      const row = document.createElement("tr");
      cell(row, o.tag);
      cell(row, String(o.pid));
      cell(row, o.cores.join(", "));
      cell(row, o.reason === "unknown_job" ? "tagged for a job not placed here" : "no tag, pid or core range matches a job");
      return row;
    });
    orphans.tBodies[0].replaceChildren.apply(orphans.tBodies[0], orphanRows);
    orphans.hidden = !orphanRows.length;
    document.getElementById("host-orphans-empty").hidden = orphanRows.length > 0;
  }

  // --- fleet page ------------------------------------------------------------------

  function followFleet(root) {
    const cfg = readConfig(root);
    if (!cfg) return;
    const div = chart(root, "fleet");
    window.Plotly.newPlot(div, cfg.figure.data, cfg.figure.layout, PLOT_CONFIG);
    const summary = document.getElementById("fleet-summary");
    async function refresh() {
      const d = await getJSON(cfg.figure_url);
      // A snapshot, not a time series: react() diffs it into the existing plot.
      window.Plotly.react(div, d.figure.data, d.figure.layout, PLOT_CONFIG);
      const s = d.summary;
      summary.textContent = s.hosts + " hosts, " + s.cores + " cores, " + s.held + " allocated, " + s.idle +
        " allocated but idle" + (s.orphans ? ", " + s.orphans + " unattributed runtimes" : "") +
        (s.util_mean !== null ? "; mean utilization " + s.util_mean + " %" : "") + ".";
    }
    async function loop() {
      try {
        await refresh();
      } catch (err) {
        // keep the last picture; try again on the next round
      }
      window.setTimeout(loop, document.hidden ? cfg.poll_ms * 3 : cfg.poll_ms);
    }
    window.setTimeout(loop, cfg.poll_ms);
  }

  function start() {
    if (!window.Plotly) return;
    const job = document.getElementById("job-live-charts");
    if (job) followJob(job);
    const host = document.getElementById("host-live");
    if (host) followHost(host);
    const fleet = document.getElementById("fleet-live");
    if (fleet) followFleet(fleet);
  }

  if (document.readyState === "loading") {
    document.addEventListener("DOMContentLoaded", start);
  } else {
    start();
  }
})();
