// Loaded synchronously in <head> (base.html), before the first paint: CSS can then
// style for a page whose scripts run (html.js) without a flash of the no-script layout.
document.documentElement.classList.add("js");
