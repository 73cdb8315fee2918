// The playground: posts the conversation to the console, which relays it to
// /v1/chat/completions with the user's playground key, and renders the SSE stream.
(function () {
  "use strict";

  var root, endpoint, csrf, messagesEl, form, prompt, sendBtn, stopBtn, totalEl;
  var history = [];
  var controller = null;
  var totals = { tokens: 0, micro: 0 };

  function el(tag, cls, text) {
    var node = document.createElement(tag);
    if (cls) node.className = cls;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function toMicro(cost) {
    // "0.000123" → 123 micro-credits, exactly (no float arithmetic on money).
    var parts = String(cost).split(".");
    var frac = (parts[1] || "").padEnd(6, "0").slice(0, 6);
    return parseInt(parts[0] || "0", 10) * 1000000 + parseInt(frac, 10);
  }

  function showCredits(micro) {
    var whole = Math.floor(micro / 1000000);
    var frac = String(micro % 1000000).padStart(6, "0").replace(/0+$/, "");
    if (frac.length < 2) frac = (frac + "00").slice(0, 2);
    return whole + "." + frac;
  }

  function scrollDown() {
    messagesEl.scrollTop = messagesEl.scrollHeight;
  }

  function addBubble(role, text) {
    var placeholder = document.getElementById("placeholder");
    if (placeholder) placeholder.remove();
    var bubble = el("div", "msg " + role);
    var body = el("div", "text", text || "");
    bubble.appendChild(body);
    messagesEl.appendChild(bubble);
    scrollDown();
    return bubble;
  }

  function busy(on) {
    sendBtn.disabled = on;
    stopBtn.hidden = !on;
    prompt.disabled = on;
  }

  function fail(bubble, message) {
    bubble.className = "msg error";
    bubble.querySelector(".text").textContent = message;
  }

  function request(model) {
    var msgs = [];
    var system = document.getElementById("system").value.trim();
    if (system) msgs.push({ role: "system", content: system });
    var body = { model: model, messages: msgs.concat(history) };
    var maxTokens = parseInt(document.getElementById("max_tokens").value, 10);
    if (maxTokens > 0) body.max_tokens = maxTokens;
    var temperature = document.getElementById("temperature").value;
    if (temperature !== "") body.temperature = Number(temperature);
    return body;
  }

  async function send(text) {
    var model = document.getElementById("model").value;
    history.push({ role: "user", content: text });
    addBubble("user", text);
    var bubble = addBubble("assistant pending");
    var textEl = bubble.querySelector(".text");
    var thinking = null;
    var answer = "";
    var usage = null;
    var started = performance.now();
    controller = new AbortController();
    busy(true);
    try {
      var response = await fetch(endpoint, {
        method: "POST",
        headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf },
        body: JSON.stringify(request(model)),
        signal: controller.signal,
        credentials: "same-origin",
      });
      if (!response.ok) {
        var message = "Request failed (" + response.status + ")";
        try {
          var data = await response.json();
          if (data.error && data.error.message) message = data.error.message;
        } catch (ignored) { /* not JSON: keep the status */ }
        if (response.status === 401 || response.status === 403) message += " Reload the page and try again.";
        history.pop();
        fail(bubble, message);
        return;
      }
      var reader = response.body.getReader();
      var decoder = new TextDecoder();
      var buffer = "";
      var done = false;
      while (!done) {
        var chunk = await reader.read();
        if (chunk.done) break;
        buffer += decoder.decode(chunk.value, { stream: true });
        var lines = buffer.split("\n");
        buffer = lines.pop();
        for (var i = 0; i < lines.length; i++) {
          var line = lines[i].trim();
          if (line.indexOf("data:") !== 0) continue;
          var payload = line.slice(5).trim();
          if (payload === "[DONE]") { done = true; break; }
          var event;
          try { event = JSON.parse(payload); } catch (ignored) { continue; }
          if (event.error) {
            fail(bubble, event.error.message || "The stream failed.");
            history.pop();
            return;
          }
          if (event.usage) usage = event.usage;
          var choice = event.choices && event.choices[0];
          var delta = choice && choice.delta;
          if (!delta) continue;
          if (delta.reasoning_content) {
            if (!thinking) {
              thinking = el("div", "thinking");
              bubble.insertBefore(thinking, textEl);
            }
            thinking.textContent += delta.reasoning_content;
          }
          if (delta.content) {
            answer += delta.content;
            textEl.textContent = answer;
          }
          scrollDown();
        }
      }
      bubble.classList.remove("pending");
      history.push({ role: "assistant", content: answer });
      var seconds = ((performance.now() - started) / 1000).toFixed(1);
      var stats = el("span", "stats");
      if (usage) {
        var micro = usage.cost ? toMicro(usage.cost) : 0;
        totals.tokens += (usage.prompt_tokens || 0) + (usage.completion_tokens || 0);
        totals.micro += micro;
        stats.textContent = usage.prompt_tokens + " in · " + usage.completion_tokens + " out tokens · " +
          (usage.cost || "0") + " credits · " + seconds + " s";
        totalEl.textContent = "This session: " + totals.tokens + " tokens · " + showCredits(totals.micro) + " credits";
      } else {
        stats.textContent = seconds + " s";
      }
      bubble.appendChild(stats);
    } catch (err) {
      if (err.name === "AbortError") {
        bubble.classList.remove("pending");
        history.push({ role: "assistant", content: answer });
        bubble.appendChild(el("span", "stats", "stopped: you pay only for what was generated"));
      } else {
        history.pop();
        fail(bubble, "Network error: " + err.message);
      }
    } finally {
      controller = null;
      busy(false);
      prompt.focus();
    }
  }

  document.addEventListener("DOMContentLoaded", function () {
    root = document.getElementById("playground");
    if (!root) return;
    endpoint = root.getAttribute("data-endpoint");
    csrf = document.querySelector("meta[name=csrf-token]").getAttribute("content");
    messagesEl = document.getElementById("messages");
    form = document.getElementById("composer");
    prompt = document.getElementById("prompt");
    sendBtn = document.getElementById("send");
    stopBtn = document.getElementById("stop");
    totalEl = document.getElementById("session-total");
    form.setAttribute("data-no-disable", "");
    form.addEventListener("submit", function (event) {
      event.preventDefault();
      var text = prompt.value.trim();
      if (!text || controller) return;
      prompt.value = "";
      send(text);
    });
    prompt.addEventListener("keydown", function (event) {
      if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    stopBtn.addEventListener("click", function () {
      if (controller) controller.abort();
    });
    document.getElementById("clear").addEventListener("click", function () {
      if (controller) controller.abort();
      history = [];
      messagesEl.textContent = "";
      var empty = el("div", "empty");
      empty.id = "placeholder";
      empty.appendChild(el("h3", "", "New conversation"));
      empty.appendChild(el("p", "", "Ask anything; the model sees the whole conversation."));
      messagesEl.appendChild(empty);
    });
  });
})();
