// Tayori console: progressive enhancement only; every page works without this file.
(function () {
  "use strict";
  // A button with data-confirm asks before its form is sent.
  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-confirm]");
    if (button && !window.confirm(button.getAttribute("data-confirm"))) {
      event.preventDefault();
    }
  });
  // A region with data-live="1" is fetched again from its data-refresh address every two
  // seconds while it shows work in progress (queued or running).
  function refresh(region) {
    var url = region.getAttribute("data-refresh");
    fetch(url, { credentials: "same-origin", headers: { "Accept": "text/html" } })
      .then(function (response) { return response.ok ? response.text() : null; })
      .then(function (html) {
        if (html === null) { return; }
        region.innerHTML = html;
        if (!region.querySelector('[data-status="queued"], [data-status="running"]')) {
          region.removeAttribute("data-live");
        }
      })
      .catch(function () {})
      .finally(function () {
        if (region.getAttribute("data-live") === "1") {
          window.setTimeout(function () { refresh(region); }, 2000);
        }
      });
  }
  document.querySelectorAll('[data-live="1"]').forEach(function (region) {
    window.setTimeout(function () { refresh(region); }, 2000);
  });
})();
