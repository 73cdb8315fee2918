// Mesh console: small progressive enhancements. Every page works without this file.
(function () {
  "use strict";

  function copyText(text) {
    if (navigator.clipboard && window.isSecureContext) {
      return navigator.clipboard.writeText(text);
    }
    // Plain-http fallback: select a temporary textarea and copy it.
    return new Promise(function (resolve, reject) {
      var area = document.createElement("textarea");
      area.value = text;
      area.setAttribute("readonly", "");
      area.className = "sr-only";
      document.body.appendChild(area);
      area.select();
      try {
        document.execCommand("copy") ? resolve() : reject(new Error("copy refused"));
      } catch (err) {
        reject(err);
      } finally {
        document.body.removeChild(area);
      }
    });
  }

  document.addEventListener("click", function (event) {
    var button = event.target.closest("[data-copy]");
    if (!button) return;
    var target = document.querySelector(button.getAttribute("data-copy"));
    if (!target) return;
    var label = button.textContent;
    copyText(target.textContent.trim()).then(function () {
      button.textContent = "Copied";
    }, function () {
      button.textContent = "Press Ctrl+C";
      var range = document.createRange();
      range.selectNodeContents(target);
      var selection = window.getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
    }).finally(function () {
      setTimeout(function () { button.textContent = label; }, 1600);
    });
  });

  document.addEventListener("submit", function (event) {
    var form = event.target;
    var question = form.getAttribute("data-confirm");
    if (question && !window.confirm(question)) {
      event.preventDefault();
      return;
    }
    var button = form.querySelector("button[type=submit]");
    if (button && !form.hasAttribute("data-no-disable")) {
      // One submission per click: a second one would only be refused.
      setTimeout(function () { button.disabled = true; }, 0);
    }
  });

  // The key form: model checkboxes only matter when "Only these" is chosen.
  document.addEventListener("DOMContentLoaded", function () {
    var box = document.querySelector("[data-models]");
    if (!box) return;
    var radios = document.querySelectorAll("input[name=restrict]");
    function sync() {
      var only = document.querySelector("input[name=restrict][value=yes]");
      box.hidden = !(only && only.checked);
    }
    radios.forEach(function (r) { r.addEventListener("change", sync); });
    box.addEventListener("change", function () {
      var only = document.querySelector("input[name=restrict][value=yes]");
      if (only) only.checked = true;
    });
    sync();
  });
})();
