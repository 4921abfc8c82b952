// deepfeat Map view (/map): a click on a point searches the store from that stored image and lists
// the results beside the map; a result's button picks it on the map (and searches from it), its
// link opens it on the search page. The map itself is deepfeat.collection's map script (/map/map.js),
// which calls window.deepfeatMapClick(i, path) on a click. No dependencies, nothing from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const K = 12;
  let seq = 0;
  const shortName = (p) => p.split(/[\\/]/).slice(-2).join("/");

  function rowOfId(id) {
    const ids = window.deepfeatMap ? window.deepfeatMap.data.ids : [];
    return ids.indexOf(id);
  }

  async function searchFrom(i) {
    const data = window.deepfeatMap.data, id = data.ids[i], token = ++seq;
    const panel = $("map-results"), status = $("map-status"), list = $("map-hits");
    panel.hidden = false;
    $("map-query").textContent = shortName(data.paths[i]);
    status.textContent = "searching…";
    list.replaceChildren();
    let body = null;
    try {
      const r = await fetch(`/api/search/item/${id}?k=${K}`);
      body = await r.json().catch(() => null);
      if (!r.ok) throw new Error((body && body.error) || `${r.status} ${r.statusText}`);
    } catch (e) {
      if (token === seq) status.textContent = `search failed: ${e.message}`;
      return;
    }
    if (token !== seq) return;
    for (const h of body.hits) {
      const li = document.createElement("li"), btn = document.createElement("button"), img = document.createElement("img");
      btn.type = "button";
      btn.dataset.id = String(h.id);
      btn.title = `${h.path}\nscore ${h.score.toFixed(4)} · click: pick it on the map`;
      img.src = `${h.thumbnail}?size=192`;
      img.alt = shortName(h.path);
      const cap = document.createElement("span");
      cap.textContent = `${h.score.toFixed(3)} ${shortName(h.path)}`;
      btn.append(img, cap);
      btn.addEventListener("click", () => { const j = rowOfId(h.id); if (j >= 0) window.deepfeatMap.pick(j); });
      const open = document.createElement("a");
      open.href = `/#item=${h.id}`;
      open.textContent = "open in search";
      li.append(btn, open);
      list.append(li);
    }
    status.textContent = `${body.hits.length} nearest · ${Math.round(body.took_ms.total)} ms`;
    document.body.dataset.searchedId = String(id);  // for tests: the last search drawn
  }

  window.deepfeatMapClick = (i) => { searchFrom(i); };
})();
