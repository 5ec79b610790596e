// The viewer's UTC offset in minutes (UTC+2 is 120) goes to the server as the `tz` cookie, so
// pages render times in local time. On the first load (no cookie, or a changed offset after a
// DST switch) it sets the cookie and reloads once; a `tz` query parameter always wins.
(function () {
  "use strict";
  var offset = -new Date().getTimezoneOffset();
  var match = document.cookie.match(/(?:^|;\s*)tz=(-?\d+)/);
  var current = match ? parseInt(match[1], 10) : null;
  if (current === offset) { return; }
  document.cookie = "tz=" + offset + "; path=/; max-age=31536000; SameSite=Lax";
  var hasQueryTz = new URLSearchParams(window.location.search).has("tz");
  var guard = "framecap-tz-reloaded";
  var already = false;
  try { already = window.sessionStorage.getItem(guard) === String(offset); } catch (e) { already = true; }
  if (!hasQueryTz && !already && document.body && document.body.dataset.tz !== String(offset)) {
    try { window.sessionStorage.setItem(guard, String(offset)); } catch (e) { /* no storage */ }
    window.location.reload();
  }
})();
