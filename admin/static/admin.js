// Live refresh of the dashboard's status tables. The page works without it: the rows
// come rendered (and escaped) by the server, from /status.json, every few seconds.
(function () {
  "use strict";
  var workers = document.querySelector("#workers tbody");
  var listeners = document.querySelector("#listeners tbody");
  var lastReload = document.getElementById("last-reload");
  var note = document.getElementById("live-note");
  if (!workers || !listeners || !window.fetch) { return; }
  if (note) { note.textContent = "Live: refreshed every 2 seconds."; }

  function refresh() {
    if (document.hidden) { return; }
    fetch("/status.json", {credentials: "same-origin", cache: "no-store"})
      .then(function (response) {
        if (response.redirected || !response.ok) { throw new Error("status " + response.status); }
        return response.json();
      })
      .then(function (status) {
        workers.innerHTML = status.html.workers;
        listeners.innerHTML = status.html.listeners;
        if (lastReload) { lastReload.textContent = status.html.last_reload; }
        if (note) { note.textContent = "Live: refreshed every 2 seconds."; }
      })
      .catch(function () {
        if (note) { note.textContent = "Live refresh failed; reload the page."; }
      });
  }
  window.setInterval(refresh, 2000);
}());
