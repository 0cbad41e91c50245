// The submit forms (jobs/job_new.html): below the cores field, the cores limit for the
// family chosen (the data comes with the page as json_script "family-cores").
(function () {
  var family = document.getElementById("id_family");
  var note = document.getElementById("cores-note");
  var data = JSON.parse(document.getElementById("family-cores").textContent);
  if (!family || !note) return;
  function show() {
    var f = data[family.value];
    if (!f) { note.hidden = true; return; }
    note.hidden = false;
    note.textContent = f.online
      ? "Your team may hold up to " + f.max + " " + family.value + " cores at once (" + f.guaranteed + " guaranteed + " +
        f.borrow + " borrowed); the largest " + family.value + " host online has " + f.host_cores + "."
      : "No " + family.value + " host is online: the job waits until one registers.";
  }
  family.addEventListener("change", show);
  show();
})();
