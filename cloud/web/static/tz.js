// The viewer's UTC offset in minutes (UTC+2 is 120) goes to the server as the `tz` cookie, so
// pages render times in local time. When the page was rendered at another offset (first visit,
// or a DST switch) it sets the cookie and reloads once; a `tz` query parameter always wins.
(function () {
  "use strict";
  var offset = -new Date().getTimezoneOffset();
  var match = document.cookie.match(/(?:^|;\s*)tz=(-?\d+)/);
  if (!match || parseInt(match[1], 10) !== offset) {
    document.cookie = "tz=" + offset + "; path=/; max-age=31536000; SameSite=Lax";
  }
  var script = document.currentScript;
  var rendered = script ? script.getAttribute("data-tz") : null;
  if (rendered === null || rendered === String(offset)) { return; }
  if (new URLSearchParams(window.location.search).has("tz")) { return; }
  var guard = "framecap-tz-reloaded";
  try {
    if (window.sessionStorage.getItem(guard) === String(offset)) { return; }  // cookies off: once
    window.sessionStorage.setItem(guard, String(offset));
  } catch (e) {
    return;  // no storage: never risk a reload loop
  }
  window.location.reload();
})();
