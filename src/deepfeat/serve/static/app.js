// deepfeat search page: plain JavaScript, no dependencies, everything from this server.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const els = {
    info: $("store-info"), limits: $("limits"), drop: $("dropzone"), file: $("file-input"),
    figure: $("query-figure"), qimg: $("query-image"), qcap: $("query-caption"), k: $("k-input"),
    verify: $("verify-input"), verifyControls: $("verify-controls"), rerank: $("rerank-input"),
    status: $("status"), error: $("error"), results: $("results"), resultsMeta: $("results-meta"), empty: $("empty"),
  };
  let limits = { max_upload_bytes: Infinity, top_k_max: 100 };
  let seq = 0;              // only the latest search may draw its results
  let objectUrl = null;     // preview of the current upload

  const fmtBytes = (n) => n >= 1 << 20 ? `${(n / (1 << 20)).toFixed(n % (1 << 20) ? 1 : 0)} MiB`
    : n >= 1024 ? `${Math.round(n / 1024)} KiB` : `${n} bytes`;
  const baseName = (p) => p.split(/[\\/]/).pop();
  const shortName = (p) => p.split(/[\\/]/).slice(-2).join("/");  // folder/file: often the class

  // A server started with --api-key answers 401: ask for the key once, keep it in a
  // same-site session cookie (sent with fetch and with <img> requests alike), retry.
  function askKey() {
    const key = window.prompt("This server needs an API key:");
    if (!key) return false;
    document.cookie = `deepfeat_key=${encodeURIComponent(key.trim())}; path=/; SameSite=Strict`;
    return true;
  }

  async function api(url, options, retried = false) {
    const r = await fetch(url, options);
    let body = null;
    try { body = await r.json(); } catch (_) { /* not JSON */ }
    if (r.status === 401 && !retried && askKey()) return api(url, options, true);
    if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
    return body;
  }

  function showError(msg) {
    els.error.textContent = msg;
    els.error.hidden = !msg;
  }

  function setStatus(msg) { els.status.textContent = msg; }

  function k() {
    const v = Math.round(Number(els.k.value));
    return Math.max(1, Math.min(limits.top_k_max, Number.isFinite(v) && v > 0 ? v : 24));
  }

  const VERIFY_TOP = 20;
  // spatial verification (stores with cached local features): "&verify=N" or nothing
  const verifyParam = () => (els.verify.checked && !els.verifyControls.hidden ? `&verify=${VERIFY_TOP}` : "");
  // re-ranking (diffusion, k-reciprocal): always sent, so "none" overrides a server default
  const rerankParam = () => `&rerank=${encodeURIComponent(els.rerank.value || "none")}`;
  const searchParams = () => `${verifyParam()}${rerankParam()}`;

  async function loadInfo() {
    try {
      const info = await api("/api/info");
      limits = info.limits;
      els.k.max = String(limits.top_k_max);
      if (Number(els.k.value) > limits.top_k_max) els.k.value = String(limits.top_k_max);
      const values = {
        count: info.count.toLocaleString("en"), model: info.model, feature: info.feature,
        pooling: info.pooling, post: info.post || "none", dim: String(info.dim), index: info.index,
      };
      for (const dd of els.info.querySelectorAll("dd[data-field]")) dd.textContent = values[dd.dataset.field] ?? "?";
      els.limits.textContent = `up to ${fmtBytes(limits.max_upload_bytes)}, ` +
        `${(limits.max_pixels / 1e6).toLocaleString("en")} megapixels`;
      document.title = `deepfeat search · ${values.count} images`;
      const local = Object.values(info.local_features || {});
      els.verifyControls.hidden = local.length === 0;
      if (local.length) els.verify.title = `re-rank the top ${VERIFY_TOP} by RANSAC inliers of ${local[0]} features`;
      const so = info.search_options || {};
      const current = so.rerank ? so.rerank.split(":")[0] : "none";
      els.rerank.replaceChildren();
      for (const name of so.rerank_choices || ["none"]) {
        const opt = document.createElement("option");
        // the server's own setting keeps its parameters; the others use their defaults
        opt.value = so.rerank && name === current ? so.rerank : name;
        opt.textContent = name;
        opt.selected = name === current;
        els.rerank.append(opt);
      }
    } catch (e) {
      showError(`cannot reach the server: ${e.message}`);
    }
  }

  function showQuery(src, caption) {
    els.qimg.src = src;
    els.qcap.textContent = caption;
    els.figure.hidden = false;
  }

  function render(result, token) {
    if (token !== seq) return;
    els.results.replaceChildren();
    const frag = document.createDocumentFragment();
    for (const h of result.hits) {
      const li = document.createElement("li");
      const btn = document.createElement("button");
      btn.type = "button";
      btn.className = "card";
      btn.title = `${h.path}\nscore ${h.score.toFixed(4)} · click to search by this image`;
      btn.dataset.id = String(h.id);
      const img = document.createElement("img");
      img.src = `${h.thumbnail}?size=256`;
      img.alt = baseName(h.path);
      img.decoding = "async";
      img.addEventListener("error", () => { btn.classList.add("broken"); img.alt = `${baseName(h.path)} (image unavailable)`; });
      const meta = document.createElement("span");
      meta.className = "meta";
      const rank = document.createElement("span");
      rank.className = "rank";
      rank.textContent = `#${h.rank}`;
      const score = document.createElement("span");
      score.className = "score";
      score.textContent = h.score.toFixed(3);
      const bar = document.createElement("span");
      bar.className = "bar";
      bar.style.setProperty("--s", String(Math.max(0, Math.min(1, h.score))));
      const name = document.createElement("span");
      name.className = "name";
      name.textContent = shortName(h.path);
      meta.append(rank, score);
      if (h.inliers !== undefined) {
        const inl = document.createElement("span");
        inl.className = "inliers";
        inl.textContent = `${h.inliers} inl.`;
        inl.title = "RANSAC inliers of the local-feature matches";
        meta.append(inl);
      }
      btn.append(img, bar, meta, name);
      btn.addEventListener("click", () => searchItem(h.id));
      li.append(btn);
      frag.append(li);
    }
    els.results.append(frag);
    els.empty.hidden = result.hits.length > 0;
    els.empty.textContent = result.hits.length ? "" : "No results.";
    const t = result.took_ms;
    els.resultsMeta.textContent = `· top ${result.hits.length} · ${Math.round(t.total)} ms` +
      (t.verify !== undefined ? ` (verified in ${Math.round(t.verify)} ms)` : "") +
      (result.rerank ? ` · re-ranked by ${result.rerank.split(":")[0]}` : "");
    setStatus("");
  }

  async function run(label, fetcher) {
    const token = ++seq;
    showError("");
    setStatus(label);
    document.body.classList.add("busy");
    try {
      const result = await fetcher();
      render(result, token);
      return result;
    } catch (e) {
      if (token === seq) { showError(e.message); setStatus(""); }
      return null;
    } finally {
      if (token === seq) document.body.classList.remove("busy");
    }
  }

  async function searchFile(file) {
    if (!file) return;
    if (file.size > limits.max_upload_bytes) {
      showError(`${file.name} is ${fmtBytes(file.size)}; the server accepts up to ${fmtBytes(limits.max_upload_bytes)}`);
      return;
    }
    if (objectUrl) URL.revokeObjectURL(objectUrl);
    objectUrl = URL.createObjectURL(file);
    showQuery(objectUrl, `${file.name || "pasted image"} · ${fmtBytes(file.size)}`);
    if (location.hash) history.replaceState(null, "", location.pathname);
    const form = new FormData();
    form.append("file", file, file.name || "pasted.png");
    document.dispatchEvent(new CustomEvent("deepfeat:query", { detail: { file } }));  // collection.js labels it
    const result = await run(`searching with ${file.name || "the pasted image"}…`,
      () => api(`/api/search/upload?k=${k()}${searchParams()}`, { method: "POST", body: form }));
    if (result) {
      const q = result.query;
      els.qcap.textContent = `${q.filename || "upload"} · ${q.width}×${q.height} ${q.format} · ` +
        `embed ${Math.round(result.took_ms.embed)} ms`;
    }
  }

  async function searchItem(id) {
    if (location.hash !== `#item=${id}`) history.pushState(null, "", `#item=${id}`);
    showQuery(`/api/items/${id}/thumbnail?size=512`, `item ${id}`);
    document.dispatchEvent(new CustomEvent("deepfeat:query", { detail: { id } }));
    const result = await run(`searching with item ${id}…`, () => api(`/api/search/item/${id}?k=${k()}${searchParams()}`));
    if (result) els.qcap.textContent = `${result.query.path} · ${result.query.width}×${result.query.height}`;
    window.scrollTo({ top: 0, behavior: "smooth" });
  }

  function fromHash() {
    const m = /^#item=(\d+)$/.exec(location.hash);
    if (m) searchItem(Number(m[1]));
  }

  // -- wiring ---------------------------------------------------------------------
  els.file.addEventListener("change", () => {
    searchFile(els.file.files[0]);
    els.file.value = "";  // choosing the same file again searches again
  });
  for (const type of ["dragenter", "dragover"]) {
    document.addEventListener(type, (e) => {
      if (![...(e.dataTransfer?.types || [])].includes("Files")) return;
      e.preventDefault();
      els.drop.classList.add("over");
    });
  }
  document.addEventListener("dragleave", (e) => {
    if (e.relatedTarget === null) els.drop.classList.remove("over");
  });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    els.drop.classList.remove("over");
    const file = [...(e.dataTransfer?.files || [])][0];
    if (file) searchFile(file);
  });
  document.addEventListener("paste", (e) => {
    const item = [...(e.clipboardData?.items || [])].find((i) => i.kind === "file" && i.type.startsWith("image/"));
    if (item) searchFile(item.getAsFile());
  });
  window.addEventListener("hashchange", fromHash);

  loadInfo().then(fromHash);
})();
