/* What every page of the console shares, loaded by base.html (plain JS, no framework):
 *
 * - the phone navigation: the Menu button opens the links below the top bar;
 * - an open menu (details.menu) closes on a click elsewhere or on Escape;
 * - form[data-confirm]: asks before submitting (e.g. Cancel job);
 * - every POST form: its submit button is disabled and shows progress while the
 *   request runs (no double submit); a form with a chosen file is sent with
 *   XMLHttpRequest so the upload shows a percentage, and the answer replaces the page
 *   as a normal submit would (the URL follows a redirect);
 * - [data-copy]: copies the text of the element it names (the new API token);
 * - [data-choice]: radio buttons that pick one of several inputs (prompts typed or a
 *   prompts file): the other inputs are hidden and disabled, so only one is sent;
 * - select[data-autosubmit]: choosing an option submits its form (filters).
 *
 * No page has inline script or style (the Content-Security-Policy refuses them):
 * behaviour goes here or in a static file of the page's area, driven by data-*
 * attributes.
 */
(function () {
  "use strict";

  // --- navigation and menus -----------------------------------------------------------

  function setupNav() {
    const bar = document.getElementById("topbar");
    const toggle = bar && bar.querySelector(".nav-toggle");
    if (!toggle) return;
    toggle.addEventListener("click", function () {
      const open = !bar.classList.contains("nav-open");
      bar.classList.toggle("nav-open", open);
      toggle.setAttribute("aria-expanded", open ? "true" : "false");
    });
  }

  function setupMenus() {
    document.addEventListener("click", function (event) {
      document.querySelectorAll("details.menu[open]").forEach(function (menu) {
        if (!menu.contains(event.target)) menu.open = false;
      });
    });
    document.addEventListener("keydown", function (event) {
      if (event.key !== "Escape") return;
      document.querySelectorAll("details.menu[open]").forEach(function (menu) { menu.open = false; });
    });
  }

  // --- forms ---------------------------------------------------------------------------

  function submitButtons(form) {
    return Array.prototype.slice.call(form.querySelectorAll("button[type=submit], button:not([type]), input[type=submit]"));
  }

  function busyLabel(form, button) {
    if (form.dataset.busy) return form.dataset.busy;
    const text = (button.textContent || "").trim();
    const verb = text.split(/\s+/)[0].toLowerCase();
    const labels = { upload: "Uploading…", submit: "Submitting…", save: "Saving…", create: "Creating…",
                     cancel: "Cancelling…", delete: "Deleting…", add: "Adding…", apply: "Applying…",
                     drain: "Draining…", undrain: "Undraining…", log: "Logging out…" };
    return labels[verb] || "Working…";
  }

  function setBusy(form, submitter) {
    form.dataset.submitting = "true";
    const buttons = submitButtons(form);
    const main = submitter && buttons.indexOf(submitter) >= 0 ? submitter : buttons[0];
    if (main) {
      main.dataset.label = main.innerHTML;
      main.textContent = busyLabel(form, main);
      main.setAttribute("aria-busy", "true");
    }
    // Disabled after the browser has read the form's data (a disabled submitter
    // would drop its own name=value from the request).
    window.setTimeout(function () { buttons.forEach(function (b) { b.disabled = true; }); }, 0);
    return main;
  }

  function clearBusy(form) {
    delete form.dataset.submitting;
    submitButtons(form).forEach(function (b) {
      b.disabled = false;
      b.removeAttribute("aria-busy");
      if (b.dataset.label !== undefined) { b.innerHTML = b.dataset.label; delete b.dataset.label; }
    });
  }

  function hasFile(form) {
    return Array.prototype.some.call(form.querySelectorAll("input[type=file]"), function (input) {
      return !input.disabled && input.files && input.files.length > 0;
    });
  }

  function progressBox(form) {
    let box = form.querySelector(".upload-progress");
    if (!box) {
      box = document.createElement("div");
      box.className = "upload-progress";
      box.setAttribute("role", "status");
      const bar = document.createElement("progress");
      bar.max = 100;
      const text = document.createElement("span");
      box.append(bar, text);
      const actions = form.querySelector(".actions") || form;
      actions.appendChild(box);
    }
    return { bar: box.querySelector("progress"), text: box.querySelector("span") };
  }

  function showResponse(xhr, form) {
    // The answer replaces the page, as it would after a normal submit: a redirect's
    // target (pushed onto the history) or the form again with its errors.
    const target = xhr.responseURL || form.action;
    if (target && target !== window.location.href) window.history.pushState(null, "", target);
    document.open();
    document.write(xhr.responseText);
    document.close();
  }

  function upload(form, button) {
    const progress = progressBox(form);
    const xhr = new XMLHttpRequest();
    xhr.open("POST", form.action || window.location.href);
    xhr.upload.addEventListener("progress", function (event) {
      if (!event.lengthComputable) return;
      const pct = Math.round((event.loaded / event.total) * 100);
      progress.bar.value = pct;
      progress.text.textContent = "Uploading… " + pct + " %";
      if (button) button.textContent = "Uploading… " + pct + " %";
    });
    xhr.upload.addEventListener("load", function () {
      progress.bar.removeAttribute("value"); // indeterminate while the server checks the file
      progress.text.textContent = "Uploaded; checking the file…";
      if (button) button.textContent = "Checking…";
    });
    xhr.addEventListener("load", function () { showResponse(xhr, form); });
    xhr.addEventListener("error", function () {
      clearBusy(form);
      progress.text.textContent = "The upload failed (connection lost). Try again.";
    });
    xhr.send(new FormData(form));
  }

  function setupForms() {
    document.addEventListener("submit", function (event) {
      const form = event.target;
      if (!(form instanceof HTMLFormElement)) return;
      if (form.dataset.confirm && !window.confirm(form.dataset.confirm)) {
        event.preventDefault();
        return;
      }
      if ((form.method || "get").toLowerCase() !== "post" || event.defaultPrevented) return;
      if (form.dataset.submitting) { // a second click while the first request runs
        event.preventDefault();
        return;
      }
      const button = setBusy(form, event.submitter);
      if (hasFile(form) && window.FormData && window.XMLHttpRequest) {
        event.preventDefault();
        upload(form, button);
      }
    });
    // Back to a page kept in the back/forward cache: its buttons work again.
    window.addEventListener("pageshow", function (event) {
      if (event.persisted) document.querySelectorAll("form[data-submitting]").forEach(clearBusy);
    });
  }

  // --- copy --------------------------------------------------------------------------

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) return navigator.clipboard.writeText(text);
    return new Promise(function (resolve, reject) {
      const area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.style.position = "fixed";
      area.style.opacity = "0";
      document.body.appendChild(area);
      area.select();
      const ok = document.execCommand && document.execCommand("copy");
      area.remove();
      if (ok) resolve(); else reject(new Error("copy refused"));
    });
  }

  function setupCopy() {
    document.querySelectorAll("[data-copy]").forEach(function (button) {
      const source = document.getElementById(button.dataset.copy);
      if (!source) return;
      button.hidden = false;
      const status = document.createElement("span");
      status.className = "copied";
      status.setAttribute("role", "status");
      button.insertAdjacentElement("afterend", status);
      button.addEventListener("click", function () {
        copyText(source.textContent.trim()).then(function () {
          status.textContent = "Copied";
          button.textContent = "Copied";
        }, function () {
          const range = document.createRange();
          range.selectNodeContents(source);
          const selection = window.getSelection();
          selection.removeAllRanges();
          selection.addRange(range);
          status.textContent = "Selected: press Ctrl+C (⌘C) to copy";
        });
      });
    });
  }

  // --- one of several inputs ---------------------------------------------------------

  function setupChoices() {
    document.querySelectorAll("[data-choice]").forEach(function (group) {
      const radios = group.querySelectorAll("input[type=radio][data-choice-for]");
      function apply() {
        radios.forEach(function (radio) {
          const panel = document.getElementById(radio.dataset.choiceFor);
          if (!panel) return;
          panel.hidden = !radio.checked;
          panel.querySelectorAll("input, textarea, select").forEach(function (input) { input.disabled = !radio.checked; });
        });
      }
      radios.forEach(function (radio) { radio.addEventListener("change", apply); });
      group.classList.add("choice-ready");
      apply();
    });
  }

  function setupAutosubmit() {
    document.querySelectorAll("select[data-autosubmit]").forEach(function (select) {
      select.addEventListener("change", function () { if (select.form) select.form.submit(); });
    });
  }

  function start() {
    setupNav();
    setupMenus();
    setupForms();
    setupCopy();
    setupChoices();
    setupAutosubmit();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
