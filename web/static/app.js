// Threshold slider: marks bars above the threshold and lists them; keeps download links in sync.
(function () {
  "use strict";
  document.querySelectorAll("[data-labels]").forEach(function (section) {
    var slider = section.querySelector("[data-threshold-slider]");
    var output = section.querySelector("[data-threshold-value]");
    var list = section.querySelector("[data-findings]");
    var rows = Array.prototype.slice.call(section.querySelectorAll(".bar-row"));
    if (!slider || !list) { return; }  // not applicable, or no assessed pathology: nothing to threshold
    var perLabel = slider.hasAttribute("data-per-label");

    function update() {
      var t = parseFloat(slider.value);
      list.innerHTML = "";
      rows.forEach(function (row) {
        var p = parseFloat(row.dataset.probability);
        var limit = perLabel ? parseFloat(row.dataset.threshold) : t;
        var positive = p >= limit;
        row.classList.toggle("positive", positive);
        if (positive) {
          var li = document.createElement("li");
          li.textContent = row.dataset.pathology.replace(/_/g, " ") + " (" + p.toFixed(2) + ")";
          list.appendChild(li);
        }
      });
      if (!list.children.length) {
        var none = document.createElement("li");
        none.textContent = "No finding above threshold.";
        none.className = "none";
        list.appendChild(none);
      }
      output.textContent = perLabel ? "per label" : t.toFixed(2);
      document.querySelectorAll("[data-downloads] a").forEach(function (a) {
        var url = new URL(a.href, window.location.href);
        if (perLabel) { url.searchParams.delete("threshold"); } else { url.searchParams.set("threshold", t.toFixed(2)); }
        a.href = url.toString();
      });
    }
    slider.addEventListener("input", function () { perLabel = false; update(); });
    // The threshold is one state: releasing the slider reloads the page with ?threshold=, so the report,
    // impression, recommendations, summary card, heatmap and every download follow the same value.
    slider.addEventListener("change", function () {
      if (!section.hasAttribute("data-reload-on-threshold")) { return; }
      var url = new URL(window.location.href);
      url.searchParams.set("threshold", parseFloat(slider.value).toFixed(2));
      window.location.assign(url.toString());
    });
    update();
  });
})();

// Zoom on the image page: the viewer scrolls, the image grows (no JS: "open at full size" still works).
(function () {
  "use strict";
  var select = document.querySelector("[data-zoom]");
  var target = document.querySelector("[data-zoom-target]");
  if (!select || !target) { return; }
  select.addEventListener("change", function () {
    target.style.width = select.value + "%";
    target.style.maxWidth = "none";
  });
})();
