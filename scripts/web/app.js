// The chat page of scripts/serve_openai_api.py. It talks to the same server's OpenAI-compatible API
// (GET /v1/models, POST /v1/chat/completions with stream: true) and keeps the conversation here, as
// OpenAI messages. Text from the model is only ever added as text nodes (textContent), never as HTML.
// With tools on, the request carries server_tools: true and the server runs the model's tool calls;
// the stream then holds every message of the turn: a delta with role "tool" is a tool result, and a
// delta with role "assistant" opens the next reply.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

// Markdown-safe rendering: ``` fences become <pre><code>, `inline code` becomes <code>, the rest stays
// plain text (white-space: pre-wrap keeps the lines). Every piece of model text is a text node.
function renderText(target, text) {
  target.replaceChildren();
  text.split("```").forEach((part, i) => {
    if (i % 2 === 1) { // inside a fence; its first line names the language
      const nl = part.indexOf("\n");
      const pre = el("pre");
      pre.appendChild(el("code", null, nl >= 0 ? part.slice(nl + 1) : ""));
      target.appendChild(pre);
      return;
    }
    part.split(/(`[^`\n]+`)/).forEach((bit, j) => {
      if (j % 2 === 1) target.appendChild(el("code", null, bit.slice(1, -1)));
      else if (bit) target.appendChild(document.createTextNode(bit));
    });
  });
}

function formatCount(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + "B";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + "M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + "K";
  return String(n);
}

// ------------------------------------------------------------------------------------------------
// The model: name, stage and size from /v1/models
// ------------------------------------------------------------------------------------------------
async function loadModel() {
  const info = $("model-info");
  try {
    const response = await fetch("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const model = (await response.json()).data[0];
    state.model = model;
    info.classList.remove("down");
    info.replaceChildren(el("b", null, model.id));
    const facts = [];
    if (model.stage) facts.push("stage " + model.stage + (model.lora ? " + " + model.lora : ""));
    if (model.parameters) facts.push(formatCount(model.parameters) + " parameters");
    if (model.hidden_size) facts.push(model.hidden_size + " hidden × " + model.num_hidden_layers + " layers" + (model.use_moe ? " (MoE)" : ""));
    if (model.tools && model.tools.length) facts.push("tools: " + model.tools.join(", "));
    info.appendChild(document.createTextNode(facts.length ? " · " + facts.join(" · ") : ""));
    if (model.max_seq_len) {
      const maxTokens = $("max-tokens");
      maxTokens.max = model.max_seq_len - 1;
      maxTokens.value = Math.min(Number(maxTokens.value), Math.floor(model.max_seq_len / 2));
    }
    if (model.raw_prompt) { // a pretrain model continues text: no chat template, no thinking switch
      $("thinking").disabled = true;
      $("thinking").title = "this model continues plain text (pretrain stage)";
    }
    const hasTools = Boolean(model.tools && model.tools.length);
    $("tools-setting").hidden = !hasTools;
    $("tools-list").hidden = !hasTools;
    if (hasTools) $("tools-list").textContent = "the server runs: " + model.tools.join(", ");
  } catch (e) {
    info.classList.add("down");
    info.textContent = "server not reachable (" + e.message + ")";
  }
}

// ------------------------------------------------------------------------------------------------
// Errors
// ------------------------------------------------------------------------------------------------
async function errorText(response) {
  let message = response.statusText;
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) message = body.error.message;
  } catch (e) { /* not JSON: keep the status text */ }
  const what = response.status < 500 ? "The server refused the request" : "The server failed";
  return what + " (" + response.status + "): " + message;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() {
  $("error").hidden = true;
  $("error").textContent = "";
}

// ------------------------------------------------------------------------------------------------
// Rendering a turn
// ------------------------------------------------------------------------------------------------
function scrollToEnd() {
  const box = $("messages");
  box.scrollTop = box.scrollHeight;
}

function addUserTurn(text) {
  const turn = el("div", "turn user");
  turn.appendChild(el("div", "role", "You"));
  const content = el("div", "content");
  renderText(content, text);
  turn.appendChild(content);
  $("messages").appendChild(turn);
  scrollToEnd();
  return turn;
}

function addAssistantTurn() {
  const root = el("div", "turn assistant");
  root.appendChild(el("div", "role", state.model ? state.model.id : "model"));
  $("messages").appendChild(root);
  scrollToEnd();
  return { root, reply: null, calls: {} };
}

// One assistant reply inside a turn (a turn with tools has several): think part, text, tool calls.
function addReply(turn) {
  const think = el("details", "think");
  think.open = true;
  think.hidden = true;
  think.appendChild(el("summary", null, "Thinking…"));
  const thinkText = el("div", "think-text");
  think.appendChild(thinkText);
  const content = el("div", "content");
  turn.root.append(think, content);
  const reply = { think, thinkText, content, reasoning: "", userToggled: false };
  think.querySelector("summary").addEventListener("click", () => { reply.userToggled = true; });
  turn.reply = reply;
  return reply;
}

function addToolCall(turn, call) {
  const box = el("div", "tool-call");
  box.appendChild(el("div", "tool-head", "tool call: " + (call.function.name || "(not a valid call)")));
  const args = el("div", "tool-args");
  const result = el("div", "tool-result pending", "running…");
  box.append(args, result);
  turn.root.appendChild(box);
  turn.calls[call.id] = { box, args, result };
  return turn.calls[call.id];
}

function applyDelta(turn, produced, delta) {
  if (delta.role === "assistant") { // a new reply (the first one, or the next one after tool results)
    produced.push({ role: "assistant", content: "", tool_calls: [] });
    addReply(turn);
    return;
  }
  if (delta.role === "tool") { // page mode: the server ran a call
    produced.push({ role: "tool", tool_call_id: delta.tool_call_id, content: delta.content });
    const view = turn.calls[delta.tool_call_id];
    if (view) {
      view.result.textContent = "→ " + delta.content;
      view.result.className = "tool-result" + (String(delta.content).startsWith("error:") ? " failed" : "");
    }
    return;
  }
  const message = produced[produced.length - 1];
  const reply = turn.reply;
  if (!message || !reply) return;
  if (delta.reasoning_content) {
    reply.reasoning += delta.reasoning_content;
    reply.think.hidden = false;
    reply.thinkText.textContent = reply.reasoning;
  }
  if (delta.content) {
    message.content += delta.content;
    renderText(reply.content, message.content);
    finishThinking(reply);
  }
  for (const piece of delta.tool_calls || []) {
    let call = message.tool_calls[piece.index];
    if (!call) {
      call = { id: piece.id, type: "function", function: { name: (piece.function && piece.function.name) || "", arguments: "" } };
      message.tool_calls[piece.index] = call;
      addToolCall(turn, call);
      finishThinking(reply);
    }
    if (piece.function && piece.function.arguments) {
      call.function.arguments += piece.function.arguments;
      turn.calls[call.id].args.textContent = call.function.arguments;
    }
  }
}

// Once the answer starts, the think part folds away (unless the reader opened or closed it).
function finishThinking(reply) {
  if (reply.think.hidden) return;
  reply.think.querySelector("summary").textContent = "Thought";
  if (!reply.userToggled) reply.think.open = false;
}

// ------------------------------------------------------------------------------------------------
// Sending a message
// ------------------------------------------------------------------------------------------------
function settings() {
  const out = {};
  const number = (id) => { const v = $(id).value.trim(); return v === "" ? undefined : Number(v); };
  const temperature = number("temperature"), topP = number("top-p"), maxTokens = number("max-tokens");
  if (temperature !== undefined) out.temperature = temperature;
  if (topP !== undefined) out.top_p = topP;
  if (maxTokens !== undefined) out.max_tokens = maxTokens;
  const thinking = $("thinking").value;
  if (!$("thinking").disabled && thinking !== "default") out.enable_thinking = thinking === "on";
  if (!$("tools-setting").hidden && $("tools").checked) out.server_tools = true;
  return out;
}

async function* sseData(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (line.startsWith("data: ")) yield line.slice(6);
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

// The messages of a turn that go into the history: calls without a result (a stopped turn) are
// dropped, and so is a reply left with nothing in it. Think parts are not sent back.
function keptMessages(produced) {
  const answered = new Set(produced.filter((m) => m.role === "tool").map((m) => m.tool_call_id));
  const out = [];
  for (const m of produced) {
    if (m.role === "assistant") {
      const calls = m.tool_calls.filter((c) => c && answered.has(c.id));
      if (!m.content && !calls.length) continue;
      out.push(calls.length ? { role: "assistant", content: m.content, tool_calls: calls } : { role: "assistant", content: m.content });
    } else {
      out.push(m);
    }
  }
  return out;
}

async function send(text) {
  hideError();
  const userTurn = addUserTurn(text);
  const userMessage = { role: "user", content: text };
  const turn = addAssistantTurn();
  const produced = [];
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  let finish = null, usage = null, stopped = false, failure = null, started = null;
  try {
    const body = { model: state.model ? state.model.id : "minimind", messages: [...state.history, userMessage],
                   stream: true, stream_options: { include_usage: true }, ...settings() };
    let response;
    try {
      response = await fetch("/v1/chat/completions", { method: "POST", headers: { "Content-Type": "application/json" },
                                                       body: JSON.stringify(body), signal: controller.signal });
    } catch (e) {
      if (e.name === "AbortError") throw e;
      throw new Error("Cannot reach the server: is scripts/serve_openai_api.py still running? (" + e.message + ")");
    }
    if (!response.ok) throw new Error(await errorText(response));
    try {
      for await (const data of sseData(response)) {
        if (data === "[DONE]") break;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error("Generation failed: " + chunk.error.message);
        if (chunk.usage) usage = chunk.usage;
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) continue;
        if (started === null) started = performance.now();
        applyDelta(turn, produced, choice.delta || {});
        if (choice.finish_reason) finish = choice.finish_reason;
        scrollToEnd();
      }
    } catch (e) {
      if (e.name === "AbortError" || e.message.startsWith("Generation failed")) throw e;
      throw new Error("The connection to the server was lost (" + e.message + ")");
    }
  } catch (e) {
    if (e.name === "AbortError") stopped = true;
    else failure = e.message;
  } finally {
    state.controller = null;
    setBusy(false);
  }

  for (const view of Object.values(turn.calls)) {
    if (view.result.classList.contains("pending")) view.result.textContent = "(not run)";
  }
  if (turn.reply) finishThinking(turn.reply);
  if (failure) { // nothing of a failed turn is kept: the message goes back into the box to try again
    turn.root.appendChild(el("div", "error", failure));
    userTurn.appendChild(el("div", "note", "not kept in the conversation"));
    showError(failure);
    if (!$("input").value) $("input").value = text;
  } else {
    state.history.push(userMessage, ...keptMessages(produced));
    if (!state.model) loadModel(); // the server was down when the page loaded
    const notes = [];
    if (stopped) notes.push("stopped");
    else if (finish === "length") notes.push("cut off at max tokens");
    else if (finish === "tool_calls") notes.push("stopped after the server's tool-round limit");
    if (usage && started !== null) {
      const seconds = (performance.now() - started) / 1000;
      notes.push(usage.completion_tokens + " tokens" + (seconds > 0 ? ", " + (usage.completion_tokens / seconds).toFixed(1) + " tokens/s" : ""));
    }
    if (notes.length) turn.root.appendChild(el("div", "note", notes.join(" · ")));
  }
  scrollToEnd();
}

// ------------------------------------------------------------------------------------------------
// Wiring
// ------------------------------------------------------------------------------------------------
$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || state.controller) return;
  $("input").value = "";
  send(text);
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
});

$("new-chat").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  hideError();
  $("input").focus();
});

loadModel();
$("input").focus();
