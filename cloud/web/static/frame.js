// Attention of each caption word over the frame (Xu et al. 2015, Fig. 2): the alphas of a word
// are a small grid (e.g. 7x7) drawn into a canvas of that size with a heat colormap and alpha,
// then stretched over the image by CSS with smoothing. The JSON is fetched once, on first use.
(function () {
  "use strict";
  var img = document.getElementById("frame-img");
  var canvas = document.getElementById("attn-canvas");
  var status = document.getElementById("attn-status");
  var opacity = document.getElementById("attn-opacity");
  var buttons = Array.prototype.slice.call(document.querySelectorAll(".attn-word"));
  if (!img || !canvas || buttons.length === 0) { return; }
  var url = canvas.dataset.src;
  var data = null;
  var pending = null;
  var active = -1;

  function say(text) { if (status) { status.textContent = text; } }

  function load() {
    if (data) { return Promise.resolve(data); }
    if (pending) { return pending; }
    say("computing attention ...");
    pending = fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        return r.json().catch(function () { return {}; }).then(function (body) {
          if (!r.ok) { throw new Error(body.detail || ("HTTP " + r.status)); }
          return body;
        });
      })
      .then(function (body) {
        data = body;
        say(body.model_matches === false ? "attention from model " + body.model + " (the caption came from another)" : "");
        (body.in_vocabulary || []).forEach(function (known, j) {
          var b = buttons[j];
          if (b && known === false) { b.title = "not in the model's word map (read as <unk>)"; b.classList.add("unk"); }
        });
        return body;
      })
      .catch(function (err) { pending = null; say("attention unavailable: " + err.message); throw err; });
    return pending;
  }

  // A heat colormap (black-red-yellow-white, like matplotlib's "hot"/"jet" look of the paper).
  function heat(t) {
    var r = Math.min(1, t * 3), g = Math.min(1, Math.max(0, t * 3 - 1)), b = Math.min(1, Math.max(0, t * 3 - 2));
    return [Math.round(r * 255), Math.round(g * 255), Math.round(b * 255)];
  }

  function draw(alphas, grid) {
    if (alphas.length && Array.isArray(alphas[0])) { alphas = [].concat.apply([], alphas); }  // rows
    if (!grid || grid.length !== 2) { var side = Math.round(Math.sqrt(alphas.length)); grid = [side, side]; }
    var h = grid[0], w = grid[1];
    canvas.width = w; canvas.height = h;
    var ctx = canvas.getContext("2d");
    var image = ctx.createImageData(w, h);
    var max = 0, min = Infinity, i;
    for (i = 0; i < alphas.length; i++) { max = Math.max(max, alphas[i]); min = Math.min(min, alphas[i]); }
    var span = max - min || 1;
    for (i = 0; i < w * h; i++) {
      var t = (alphas[i] - min) / span;
      var c = heat(t);
      image.data[i * 4] = c[0]; image.data[i * 4 + 1] = c[1]; image.data[i * 4 + 2] = c[2];
      image.data[i * 4 + 3] = Math.round(60 + 170 * t);  // low attention stays faintly visible
    }
    ctx.putImageData(image, 0, 0);
    canvas.style.imageRendering = "auto";  // smooth bilinear upscaling
    canvas.classList.add("on");
  }

  // The button of the n-th caption word -> the index of that word in the attention JSON (its
  // word list may differ from a plain split, e.g. an extra <end>): match words in order.
  function wordIndex(words, n) {
    var from = 0;
    for (var i = 0; i <= n; i++) {
      var w = buttons[i].textContent.trim().toLowerCase();
      var found = -1;
      for (var j = from; j < words.length; j++) {
        if (String(words[j]).toLowerCase() === w) { found = j; break; }
      }
      if (found < 0) { return n; }
      if (i === n) { return found; }
      from = found + 1;
    }
    return n;
  }

  function select(index) {
    buttons.forEach(function (b) { b.classList.toggle("on", Number(b.dataset.index) === index); });
    if (index === active || index < 0) {
      active = -1;
      canvas.classList.remove("on");
      buttons.forEach(function (b) { b.classList.remove("on"); });
      canvas.dataset.word = "";
      return;
    }
    active = index;
    load().then(function (body) {
      var j = wordIndex(body.words || [], index);
      var alphas = body.alphas && body.alphas[j];
      if (!alphas) { say("no attention for this word"); return; }
      draw(alphas, body.grid);
      canvas.dataset.word = (body.words && body.words[j]) || "";
    }).catch(function () { /* said above */ });
  }

  buttons.forEach(function (b) {
    b.addEventListener("click", function () { select(Number(b.dataset.index)); });
  });
  if (opacity) {
    var apply = function () { canvas.style.setProperty("--attn-opacity", String(opacity.value / 100)); };
    opacity.addEventListener("input", apply);
    apply();
  }
})();
