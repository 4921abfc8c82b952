// deepfeat search page, collection part: when the server has your classifier (deepfeat serve
// --classifier CLF), an uploaded query is also labelled by it, shown as one line under the query
// ("your classifier: 0.97 daisy · 0.02 tulip", or "unknown (below 0.80)"). The search page
// (app.js) announces each query with a "deepfeat:query" event: {file} for an upload, {id} for a
// stored image (the line is cleared). Plain JavaScript, nothing from elsewhere.
"use strict";

(() => {
  let info = null, seq = 0;
  const line = document.createElement("p");
  line.id = "labels";
  line.className = "labels";
  line.hidden = true;

  function show(text, title) {
    line.textContent = text;
    line.title = title || "";
    line.hidden = !text;
  }

  async function classify(file) {
    const token = ++seq;
    show("your classifier: …");
    const form = new FormData();
    form.append("file", file, file.name || "pasted.png");
    try {
      const r = await fetch("/api/classify/upload?top=3", { method: "POST", body: form });
      const body = await r.json().catch(() => null);
      if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
      if (token !== seq) return;
      const res = body.results[0];
      const preds = res.predictions.map((p) => `${p.prob.toFixed(2)} ${p.label}`).join(" · ");
      const head = res.label === "unknown" ? `unknown (below ${res.threshold.toFixed(2)}): ` : "";
      show(`your classifier: ${head}${preds}`, `${info.method} over ${info.classes.length} classes; ` +
        `unknown below p = ${info.threshold.toFixed(3)}`);
      line.dataset.label = res.label;
    } catch (e) {
      if (token === seq) show(`your classifier: ${e.message}`);
    }
  }

  async function classifierInfo() {
    // asked again until known: a server with an API key answers 401 until the search page has the key
    if (info === null) {
      const r = await fetch("/api/classifier");
      if (r.ok) info = (await r.json()).classifier || false;  // false: this server has no classifier
    }
    return info;
  }

  function start() {
    const figure = document.getElementById("query-figure");
    if (!figure) return;
    figure.after(line);
    document.addEventListener("deepfeat:query", async (e) => {
      const token = ++seq;
      delete line.dataset.label;
      show("");
      if (!(e.detail && e.detail.file) || !(await classifierInfo()) || token !== seq) return;
      classify(e.detail.file);
    });
  }

  start();
})();
