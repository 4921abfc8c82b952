"""The map page's script and style, plain strings (no external scripts, no CDN): a canvas that draws
the points of a 2-D layout, zooms with the wheel (about the cursor) and pans by dragging, draws the
thumbnails where the points are few or the zoom is deep, colours by any colouring of the data, and
on a click either shows the point (a standalone page) or calls ``window.deepfeatMapClick(i, path)``
(the serve Map view searches from it).

The data is a JSON object in ``<script type="application/json" id="map-data">``: ``xy`` (N pairs in
[0, 1]), ``paths``, ``thumbs`` (a data: URI, a URL or null per point), ``colourings`` (name ->
``{"kind": "category", "values": [int], "names": [str]}`` or ``{"kind": "score", "values": [float]}``).
When every thumbnail has loaded or failed the page sets ``data-thumbs-loaded`` and
``data-thumbs-failed`` (counts) on ``#map`` (for tests)."""

MAP_CSS = """
#mapwrap { position: relative; height: calc(100vh - 4.2rem); min-height: 360px; }
#map { width: 100%; height: 100%; display: block; background: var(--panel); cursor: grab; }
#map.dragging { cursor: grabbing; }
.mapbar { position: absolute; top: 0.6rem; left: 0.6rem; display: flex; gap: 0.4rem; align-items: center;
  background: var(--panel); border: 1px solid var(--line); border-radius: var(--radius); padding: 0.35rem 0.5rem;
  font-size: 0.85rem; }
.mapbar button, .mapbar select { font: inherit; }
#legend { position: absolute; top: 3.2rem; left: 0.6rem; max-height: 60%; overflow: auto; background: var(--panel);
  border: 1px solid var(--line); border-radius: var(--radius); padding: 0.4rem 0.6rem; font-size: 0.78rem; }
#legend div { display: flex; align-items: center; gap: 0.35rem; white-space: nowrap; }
#legend i { width: 0.8rem; height: 0.8rem; border-radius: 50%; display: inline-block; }
#legend .ramp { width: 9rem; height: 0.7rem; border-radius: 3px; }
#tip { position: absolute; pointer-events: none; background: var(--panel); border: 1px solid var(--line);
  border-radius: 6px; padding: 0.3rem; font-size: 0.75rem; max-width: 220px; overflow-wrap: anywhere; }
#tip img { display: block; max-width: 200px; max-height: 160px; margin-bottom: 0.2rem; }
#picked { position: absolute; top: 0.6rem; right: 0.6rem; width: 240px; background: var(--panel);
  border: 1px solid var(--line); border-radius: var(--radius); padding: 0.5rem; font-size: 0.78rem;
  overflow-wrap: anywhere; }
#picked img { width: 100%; border-radius: 6px; }
"""

MAP_JS = r"""
(function () {
  'use strict';
  const data = JSON.parse(document.getElementById('map-data').textContent);
  const canvas = document.getElementById('map');
  const ctx = canvas.getContext('2d');
  const tip = document.getElementById('tip');
  const picked = document.getElementById('picked');
  const select = document.getElementById('colour-by');
  const legend = document.getElementById('legend');
  const n = data.xy.length;
  const PALETTE = ['#2f6fde', '#e8590c', '#2b8a3e', '#c2255c', '#7048e8', '#0b7285', '#e67700', '#5c940d',
    '#a61e4d', '#1864ab', '#d9480f', '#087f5b', '#862e9c', '#495057', '#f08c00', '#364fc7', '#c92a2a',
    '#66a80f', '#0c8599', '#9c36b5'];
  const OTHER = '#adb5bd';
  let view = {scale: 1, x: 0, y: 0};  // screen = (unit * side) * scale + offset
  let colouring = null;
  const imgs = new Array(n).fill(null);
  let loaded = 0, failed = 0, wanted = 0, pending = false;

  function escapeHtml(s) {
    return String(s).replace(/[&<>"']/g, (c) => ({'&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;'}[c]));
  }
  function side() { return Math.min(canvas.width, canvas.height) / (window.devicePixelRatio || 1) * 0.92; }
  function pad() {
    const w = canvas.width / (window.devicePixelRatio || 1), h = canvas.height / (window.devicePixelRatio || 1);
    return [(w - side()) / 2, (h - side()) / 2];
  }
  function toScreen(i) {
    const [px, py] = pad(), s = side();
    return [(px + data.xy[i][0] * s) * view.scale + view.x, (py + data.xy[i][1] * s) * view.scale + view.y];
  }
  function ramp(t) {  // viridis-like: low = dark blue, high = yellow
    const stops = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
    t = Math.max(0, Math.min(1, t)) * (stops.length - 1);
    const a = stops[Math.floor(t)], b = stops[Math.min(stops.length - 1, Math.floor(t) + 1)], f = t - Math.floor(t);
    return 'rgb(' + a.map((v, k) => Math.round(v + (b[k] - v) * f)).join(',') + ')';
  }
  function colourOf(i) {
    if (!colouring) return PALETTE[0];
    const v = colouring.values[i];
    if (colouring.kind === 'score') {
      return ramp((v - colouring.lo) / ((colouring.hi - colouring.lo) || 1));
    }
    return v < 0 || v >= PALETTE.length ? OTHER : PALETTE[v];
  }
  function legendRow(colour, text, isRamp) {
    // built with the DOM (element.style), not markup: a page under a strict Content-Security-Policy
    // (the served Map view: style-src 'self') drops inline style attributes parsed from HTML
    const row = document.createElement('div'), swatch = document.createElement(isRamp ? 'span' : 'i');
    if (isRamp) { swatch.className = 'ramp'; swatch.style.background = colour; } else { swatch.style.background = colour; }
    if (isRamp) row.append(text[0] + ' ', swatch, ' ' + text[1]); else row.append(swatch, text);
    legend.append(row);
  }
  function setColouring(name) {
    colouring = data.colourings[name] || null;
    legend.replaceChildren();
    if (!colouring) return draw();
    if (colouring.kind === 'score') {
      colouring.lo = Math.min(...colouring.values); colouring.hi = Math.max(...colouring.values);
      const stops = [0, 0.25, 0.5, 0.75, 1].map(ramp).join(',');
      legendRow('linear-gradient(90deg,' + stops + ')', [colouring.lo.toFixed(3), colouring.hi.toFixed(3)], true);
    } else {
      colouring.names.forEach((label, k) => { if (k < PALETTE.length) legendRow(PALETTE[k], label, false); });
      if (colouring.names.length > PALETTE.length) {
        legendRow(OTHER, (colouring.names.length - PALETTE.length) + ' more', false);
      }
    }
    draw();
  }
  function thumbSize() {
    // thumbnails once there is room for them: few points, or zoomed in
    const room = side() * view.scale / Math.sqrt(Math.max(1, n));
    return room >= 18 ? Math.min(96, room * 0.9) : 0;
  }
  function draw() {
    const dpr = window.devicePixelRatio || 1;
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, canvas.width, canvas.height);
    const t = thumbSize(), w = canvas.width / dpr, h = canvas.height / dpr;
    for (let i = 0; i < n; i++) {
      const [x, y] = toScreen(i);
      if (x < -100 || y < -100 || x > w + 100 || y > h + 100) continue;
      const img = imgs[i];
      if (t && img && img.complete && img.naturalWidth) {
        const r = Math.min(t / img.naturalWidth, t / img.naturalHeight);
        const iw = img.naturalWidth * r, ih = img.naturalHeight * r;
        ctx.fillStyle = colourOf(i);
        ctx.fillRect(x - iw / 2 - 2, y - ih / 2 - 2, iw + 4, ih + 4);
        ctx.drawImage(img, x - iw / 2, y - ih / 2, iw, ih);
      } else {
        ctx.beginPath();
        ctx.arc(x, y, 3.5, 0, 2 * Math.PI);
        ctx.fillStyle = colourOf(i);
        ctx.fill();
      }
    }
  }
  function resize() {
    const dpr = window.devicePixelRatio || 1, r = canvas.getBoundingClientRect();
    canvas.width = Math.max(1, Math.round(r.width * dpr));
    canvas.height = Math.max(1, Math.round(r.height * dpr));
    draw();
  }
  function nearest(mx, my) {
    let best = -1, bd = Infinity;
    const reach = Math.max(8, thumbSize() / 2);
    for (let i = 0; i < n; i++) {
      const [x, y] = toScreen(i), d = Math.max(Math.abs(x - mx), Math.abs(y - my));
      if (d < bd) { bd = d; best = i; }
    }
    return bd <= reach ? best : -1;
  }
  function describe(i) {
    let s = '<b>' + escapeHtml(data.paths[i]) + '</b>';
    for (const [name, c] of Object.entries(data.colourings)) {
      const v = c.values[i];
      s += '<br>' + escapeHtml(name) + ': ' + (c.kind === 'score' ? v.toFixed(4) : escapeHtml(v < 0 ? 'none' : c.names[v]));
    }
    return s;
  }
  function thumbHtml(i) {
    return data.thumbs[i] ? '<img src="' + escapeHtml(data.thumbs[i]) + '" alt="">' : '';
  }
  function eventXY(e) { const r = canvas.getBoundingClientRect(); return [e.clientX - r.left, e.clientY - r.top]; }

  canvas.addEventListener('wheel', (e) => {
    e.preventDefault();
    const [mx, my] = eventXY(e), f = Math.exp(-e.deltaY * 0.0015);
    const s = Math.max(0.5, Math.min(200, view.scale * f)), g = s / view.scale;
    view = {scale: s, x: mx - (mx - view.x) * g, y: my - (my - view.y) * g};
    draw();
  }, {passive: false});
  let drag = null;
  canvas.addEventListener('mousedown', (e) => { drag = {at: eventXY(e), view: {...view}, moved: false}; });
  window.addEventListener('mouseup', (e) => {
    if (drag && !drag.moved) {
      const [mx, my] = eventXY(e), i = nearest(mx, my);
      if (i >= 0) pick(i);
    }
    drag = null; canvas.classList.remove('dragging');
  });
  canvas.addEventListener('mousemove', (e) => {
    const [mx, my] = eventXY(e);
    if (drag) {
      const dx = mx - drag.at[0], dy = my - drag.at[1];
      if (Math.abs(dx) + Math.abs(dy) > 3) { drag.moved = true; canvas.classList.add('dragging'); }
      view = {scale: drag.view.scale, x: drag.view.x + dx, y: drag.view.y + dy};
      tip.hidden = true;
      return draw();
    }
    const i = nearest(mx, my);
    if (i < 0) { tip.hidden = true; return; }
    tip.innerHTML = thumbHtml(i) + describe(i);
    tip.style.left = Math.min(mx + 14, canvas.clientWidth - 230) + 'px';
    tip.style.top = Math.min(my + 14, canvas.clientHeight - 200) + 'px';
    tip.hidden = false;
  });
  canvas.addEventListener('mouseleave', () => { tip.hidden = true; });
  function pick(i) {
    canvas.dataset.picked = String(i);
    if (typeof window.deepfeatMapClick === 'function') return window.deepfeatMapClick(i, data.paths[i]);
    picked.innerHTML = thumbHtml(i) + describe(i);
    picked.hidden = false;
  }
  function zoomBy(f) {
    const w = canvas.clientWidth / 2, h = canvas.clientHeight / 2, s = Math.max(0.5, Math.min(200, view.scale * f));
    const g = s / view.scale;
    view = {scale: s, x: w - (w - view.x) * g, y: h - (h - view.y) * g};
    draw();
  }
  document.getElementById('zoom-in').addEventListener('click', () => zoomBy(1.5));
  document.getElementById('zoom-out').addEventListener('click', () => zoomBy(1 / 1.5));
  document.getElementById('zoom-reset').addEventListener('click', () => { view = {scale: 1, x: 0, y: 0}; draw(); });
  window.deepfeatMap = {pick: pick, toScreen: toScreen, setColouring: setColouring, data: data};

  const names = Object.keys(data.colourings);
  names.forEach((name) => select.insertAdjacentHTML('beforeend', '<option>' + escapeHtml(name) + '</option>'));
  select.addEventListener('change', () => setColouring(select.value));
  if (names.length) { select.value = names[0]; }
  window.addEventListener('resize', resize);
  resize();
  setColouring(select.value);
  function oneDone(ok) {
    if (ok) loaded += 1; else failed += 1;
    if (loaded + failed === wanted) {
      canvas.dataset.thumbsLoaded = String(loaded);
      canvas.dataset.thumbsFailed = String(failed);
    }
    if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; draw(); }); }
  }
  data.thumbs.forEach((src, i) => {
    if (!src) return;
    wanted += 1;
    const img = new Image();
    img.onload = () => oneDone(true);
    img.onerror = () => { imgs[i] = null; oneDone(false); };
    img.src = src;
    imgs[i] = img;
  });
  if (!wanted) { canvas.dataset.thumbsLoaded = '0'; canvas.dataset.thumbsFailed = '0'; }
})();
"""
