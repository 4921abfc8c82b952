// The Duplicates view: GET /api/duplicates, one row of thumbnails per group, the keeper first (green).
"use strict";

function how(group, path) {
  if (path === group.keeper) return "keep";
  const kinds = ["bytes", "pixels", "verified", "similar"];
  const pairs = group.pairs.filter((p) => p.a === path || p.b === path);
  pairs.sort((x, y) => kinds.indexOf(x.kind) - kinds.indexOf(y.kind));
  const p = pairs[0];
  return [p.kind, p.score !== null ? `cos ${p.score.toFixed(3)}` : "", p.inliers !== null ? `${p.inliers} inliers` : ""]
    .filter(Boolean).join(", ");
}

function figure(group, path, id) {
  const fig = document.createElement("figure");
  fig.className = path === group.keeper ? "keep" : "dup";
  const img = document.createElement("img");
  img.src = `/api/items/${id}/thumbnail?size=256`;
  img.alt = path;
  const cap = document.createElement("figcaption");
  const b = document.createElement("b");
  b.textContent = how(group, path);
  cap.append(b, document.createElement("br"), document.createTextNode(path));
  fig.append(img, cap);
  return fig;
}

async function load() {
  const status = document.getElementById("status");
  const out = document.getElementById("groups");
  out.replaceChildren();
  status.textContent = "finding duplicates…";
  const verify = document.getElementById("verify").checked;
  const r = await fetch(`/api/duplicates?verify=${verify}`);
  if (!r.ok) { status.textContent = `error ${r.status}`; return; }
  const doc = await r.json();
  status.textContent = `${doc.groups.length} groups, ${doc.stats.duplicates} duplicates among ${doc.stats.images} images`;
  doc.groups.forEach((g, i) => {
    const sec = document.createElement("section");
    sec.className = "group";
    const h = document.createElement("h2");
    h.textContent = `group ${i + 1}: ${g.members.length} images`;
    const row = document.createElement("div");
    row.className = "members";
    const order = [g.members.indexOf(g.keeper), ...g.members.map((_, j) => j).filter((j) => g.members[j] !== g.keeper)];
    for (const j of order) row.append(figure(g, g.members[j], g.ids[j]));
    sec.append(h, row);
    out.append(sec);
  });
}

document.getElementById("verify").addEventListener("change", load);
load();
