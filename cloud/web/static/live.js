// Live captions over server-sent events: newest on top, a connection indicator, a device
// selector (changing it reconnects and updates the URL, so the URL holds the page's state).
(function () {
  "use strict";
  var list = document.getElementById("live-list");
  var conn = document.getElementById("live-conn");
  var select = document.getElementById("live-device");
  var empty = document.getElementById("live-empty");
  if (!list) { return; }
  var MAX_ITEMS = 200;
  var source = null;

  function setConn(state, text) {
    conn.className = "conn " + state;
    conn.textContent = text;
    conn.dataset.state = state;
  }

  function pad(n) { return (n < 10 ? "0" : "") + n; }
  function localTime(iso) {
    var d = new Date(iso);
    if (isNaN(d.getTime())) { return iso || ""; }
    return d.getFullYear() + "-" + pad(d.getMonth() + 1) + "-" + pad(d.getDate()) + " " +
      pad(d.getHours()) + ":" + pad(d.getMinutes()) + ":" + pad(d.getSeconds());
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) { e.className = cls; }
    if (text !== undefined) { e.textContent = text; }
    return e;
  }
  function enc(s) { return encodeURIComponent(s); }

  function add(doc) {
    if (!doc || !doc.device_id || !doc.frame_id) { return; }
    var item = el("div", "live-item" + (doc.error ? " error-card" : ""));
    item.dataset.device = doc.device_id;
    item.dataset.frame = doc.frame_id;
    var frameUrl = doc.url || ("/frames/" + enc(doc.device_id) + "/" + enc(doc.frame_id));
    var a = el("a");
    a.href = frameUrl;
    if (!doc.error) {
      var img = el("img");
      img.alt = doc.caption || "";
      img.loading = "lazy";
      img.onerror = function () { img.style.visibility = "hidden"; };
      img.src = doc.thumbnail_url || ("/api/v1/frames/" + enc(doc.device_id) + "/" + enc(doc.frame_id) + "/thumbnail.jpg");
      a.appendChild(img);
    } else {
      a.appendChild(el("span", "badge err", "error"));
    }
    item.appendChild(a);
    var body = el("div", "body");
    var cap = el("div", "caption live-caption", doc.error ? doc.error : doc.caption);
    body.appendChild(cap);
    var meta = el("div", "meta small muted");
    var dev = el("a", "", doc.device_id);
    dev.href = "/devices/" + enc(doc.device_id);
    meta.appendChild(dev);
    meta.appendChild(document.createTextNode(" \u00b7 " + localTime(doc.captured_at)));
    if (typeof doc.score === "number") {
      meta.appendChild(document.createTextNode(" \u00b7 score " + doc.score.toFixed(2)));
    }
    body.appendChild(meta);
    item.appendChild(body);
    list.insertBefore(item, list.firstChild);
    while (list.children.length > MAX_ITEMS) { list.removeChild(list.lastChild); }
    if (empty) { empty.hidden = true; }
  }

  function onMessage(ev) {
    var doc;
    try { doc = JSON.parse(ev.data); } catch (e) { return; }
    if (doc && doc.doc) { doc = doc.doc; }
    add(doc);
  }

  function connect() {
    if (source) { source.close(); }
    var device = select ? select.value : "";
    var url = "/api/v1/live" + (device ? "?device=" + enc(device) : "");
    setConn("connecting", "connecting ...");
    source = new EventSource(url);
    source.onopen = function () { setConn("open", "connected"); };
    source.onerror = function () {
      setConn("error", source.readyState === EventSource.CLOSED ? "disconnected" : "reconnecting ...");
    };
    source.onmessage = onMessage;
    source.addEventListener("caption", onMessage);
  }

  if (select) {
    select.addEventListener("change", function () {
      var params = new URLSearchParams(window.location.search);
      if (select.value) { params.set("device", select.value); } else { params.delete("device"); }
      var qs = params.toString();
      window.history.replaceState(null, "", window.location.pathname + (qs ? "?" + qs : ""));
      connect();
    });
  }
  window.addEventListener("beforeunload", function () { if (source) { source.close(); } });
  connect();
})();
