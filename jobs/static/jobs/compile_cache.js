// The compile form's cache answer before submitting: "cached: done at once" or
// "not cached: about N minutes (from n past compiles ...)", and the model's cached
// configurations (a click fills the form with that shape).
(function () {
  var out = document.getElementById("cache-answer");
  if (!out) return;
  var form = out.closest("form");
  var timer = null;
  var seq = 0;
  function query() {
    var params = new URLSearchParams();
    params.set("team", out.dataset.team);
    new FormData(form).forEach(function (value, key) {
      if (key !== "csrfmiddlewaretoken" && typeof value === "string" && value !== "") params.append(key, value);
    });
    return params.toString();
  }
  function fill(config) {
    ["batch_size", "sequence_length", "height", "width", "num_images_per_prompt", "tensor_parallel_size",
     "task", "auto_cast", "auto_cast_type"].forEach(function (name) {
      var field = form.elements[name];
      if (field && config[name] !== undefined) field.value = config[name];
    });
    if (form.elements.compiler_options && config.compiler_options) form.elements.compiler_options.value = config.compiler_options.join(" ");
    ask();
  }
  function show(answer) {
    out.textContent = "";
    var line = document.createElement("strong");
    line.textContent = answer.sentence;
    line.dataset.cached = answer.cached ? "yes" : "no";
    out.appendChild(line);
    if (answer.configurations && answer.configurations.length) {
      var p = document.createElement("span");
      p.textContent = " Cached configurations of this model: ";
      out.appendChild(p);
      answer.configurations.forEach(function (c, i) {
        var b = document.createElement("button");
        b.type = "button";
        b.className = "link";
        var shape = c.task === "text-to-image"
          ? c.batch_size + "×" + c.height + "×" + c.width + " (" + c.num_images_per_prompt + "/prompt)"
          : "batch " + c.batch_size + ", length " + c.sequence_length;
        b.textContent = shape + (c.tensor_parallel_size > 1 ? ", tp " + c.tensor_parallel_size : "");
        b.addEventListener("click", function () { fill(c); });
        if (i) out.appendChild(document.createTextNode(" · "));
        out.appendChild(b);
      });
    }
    out.hidden = false;
  }
  function ask() {
    var mine = ++seq;
    // No model chosen yet (a team with several): nothing to ask about, and no 400 to log.
    if (form.elements.model && !form.elements.model.value) { out.hidden = true; return; }
    fetch("/api/v1/compile-cache/answer?" + query(), {credentials: "same-origin"})
      .then(function (r) { return r.json().then(function (body) { return {ok: r.ok, body: body}; }); })
      .then(function (res) {
        if (mine !== seq) return;
        if (res.ok) show(res.body); else { out.textContent = res.body.detail || ""; out.hidden = !out.textContent; }
      })
      .catch(function () { out.hidden = true; });
  }
  form.addEventListener("input", function () { clearTimeout(timer); timer = setTimeout(ask, 250); });
  form.addEventListener("change", function () { clearTimeout(timer); timer = setTimeout(ask, 100); });
  ask();
})();
