// Draws the usage pages' Plotly figures. The server sends each figure (zero-filled
// series, layout, colours) with json_script; this only hands them to Plotly.js.
(function () {
  "use strict";
  var config = {responsive: true, displaylogo: false, modeBarButtonsToRemove: ["lasso2d", "select2d"]};
  document.querySelectorAll("[data-figure]").forEach(function (el) {
    var source = document.getElementById(el.getAttribute("data-figure"));
    if (!source) { return; }
    var figure = JSON.parse(source.textContent);
    Plotly.newPlot(el, figure.data, figure.layout, config);
  });
  // The date inputs only matter for a custom range: picking a date switches to it.
  var range = document.getElementById("usage-range");
  document.querySelectorAll(".usage-range input[type=date]").forEach(function (input) {
    input.addEventListener("change", function () { if (range) { range.value = "custom"; } });
  });
})();
