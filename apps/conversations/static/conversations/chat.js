// Web chat: conversation list, streamed answers over the websocket, citations, feedback.
// Answers survive a lost connection and a page refresh: every frame carries its offset in the turn's
// event log, and a (re)connected socket asks for the rest with {"type": "resume", turn_id, offset}.
// No framework: DOM built with textContent only, so no answer or title is ever parsed as HTML.
// Strings come from Django's JavaScript catalog (/jsi18n/, loaded before this file): gettext and
// interpolate only return text, which still goes into the DOM through textContent.
(function () {
  "use strict";

  const gettext = window.gettext || ((s) => s);
  const fmt = (s, values) => (window.interpolate ? window.interpolate(s, values, true)
    : s.replace(/%\((\w+)\)s/g, (_, k) => String(values[k])));

  const boot = JSON.parse(document.getElementById("boot").textContent);
  const csrf = document.querySelector('meta[name="csrf-token"]').content;
  const $ = (id) => document.getElementById(id);
  const listEl = $("conversation-list");
  const messagesEl = $("messages");
  const input = $("message-input");
  const sendBtn = $("send");
  const titleEl = $("conversation-title");
  const kbSelect = $("kb-select");

  let conversations = boot.conversations || [];
  let sessionId = null;
  let socket = null;
  let socketReady = null;
  let pending = null; // {bubble, text, turnId, offset}: the answer being streamed
  let reconnects = 0;

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "class") node.className = v;
      else if (k === "text") node.textContent = v;
      else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
      else if (v !== null && v !== undefined) node.setAttribute(k, v);
    }
    for (const child of children) if (child) node.append(child);
    return node;
  }

  function newSessionId() {
    const bytes = new Uint8Array(16);
    crypto.getRandomValues(bytes);
    return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  async function api(method, url, body) {
    const resp = await fetch(url, {
      method, credentials: "same-origin",
      headers: { "Content-Type": "application/json", "X-CSRFToken": csrf, Accept: "application/json" },
      body: body === undefined ? undefined : JSON.stringify(body),
    });
    if (resp.status === 204) return null;
    const data = await resp.json().catch(() => ({}));
    if (!resp.ok) throw Object.assign(new Error((data.error && data.error.message) || resp.statusText), { data });
    return data;
  }

  // --- conversation list ------------------------------------------------------------------
  function renderList() {
    listEl.replaceChildren(...conversations.map((c) => el("div", { class: "conv" + (c.session_id === sessionId ? " active" : ""), "data-session": c.session_id },
      el("a", { href: "?c=" + encodeURIComponent(c.session_id), text: c.title || gettext("Untitled"), title: c.title || "",
        onclick: (e) => { e.preventDefault(); openConversation(c.session_id); } }),
      el("span", { class: "actions" },
        el("button", { type: "button", title: gettext("Rename"), "aria-label": gettext("Rename"), text: "✎", onclick: () => renameConversation(c) }),
        el("button", { type: "button", title: gettext("Archive"), "aria-label": gettext("Archive"), text: "⤓", onclick: () => archiveConversation(c) }),
        el("button", { type: "button", title: gettext("Delete"), "aria-label": gettext("Delete"), text: "✕", onclick: () => deleteConversation(c) })))));
  }

  async function refreshList() {
    try {
      const data = await api("GET", "/api/v1/conversations/?limit=100");
      conversations = data.results;
      renderList();
      const current = conversations.find((c) => c.session_id === sessionId);
      if (current) titleEl.textContent = current.title || gettext("Untitled");
    } catch (e) { /* the list is a convenience; the chat keeps working */ }
  }

  async function renameConversation(c) {
    const title = prompt(gettext("Rename conversation"), c.title || "");
    if (title === null || !title.trim()) return;
    await api("PATCH", `/api/v1/conversations/${c.session_id}/`, { title });
    await refreshList();
  }

  async function archiveConversation(c) {
    await api("PATCH", `/api/v1/conversations/${c.session_id}/`, { archived: true });
    if (c.session_id === sessionId) startNewChat();
    await refreshList();
  }

  async function deleteConversation(c) {
    if (!confirm(fmt(gettext("Delete “%(title)s” and all its messages?"), { title: c.title || gettext("Untitled") }))) return;
    await api("DELETE", `/api/v1/conversations/${c.session_id}/`);
    if (c.session_id === sessionId) startNewChat();
    await refreshList();
  }

  // --- rendering messages -----------------------------------------------------------------
  function clearMessages(showEmpty) {
    messagesEl.replaceChildren();
    if (showEmpty) {
      messagesEl.append(el("div", { id: "empty-state", class: "empty-state" },
        el("h2", { text: gettext("Ask about your company's knowledge") }),
        el("p", { text: gettext("Answers quote the documents they come from. Click a numbered citation to open the source.") })));
    }
  }

  function scrollDown() { messagesEl.scrollTop = messagesEl.scrollHeight; }

  function addUserMessage(text) {
    const empty = $("empty-state");
    if (empty) empty.remove();
    messagesEl.append(el("div", { class: "msg user" }, el("div", { class: "bubble", text })));
    scrollDown();
  }

  function addAssistantBubble() {
    const bubble = el("div", { class: "bubble streaming" });
    const wrap = el("div", { class: "msg assistant" }, bubble);
    messagesEl.append(wrap);
    scrollDown();
    return bubble;
  }

  function sourceLabel(c) {
    if (c.type === "plugin") return c.title || c.plugin;
    return c.document_title || gettext("Document");
  }

  // The answer text with every [n] turned into a link to its source.
  function renderAnswer(bubble, answer, citations) {
    const byN = new Map((citations || []).map((c) => [c.n, c]));
    bubble.replaceChildren();
    const re = /\[(\d{1,3})\]/g;
    let last = 0, m;
    while ((m = re.exec(answer)) !== null) {
      bubble.append(document.createTextNode(answer.slice(last, m.index)));
      const c = byN.get(Number(m[1]));
      if (c && c.url) {
        bubble.append(el("a", { class: "cite", href: c.url, target: "_blank", rel: "noopener",
          title: sourceLabel(c) + (c.heading ? " — " + c.heading : "") + (c.page ? " (" + fmt(gettext("page %(page)s"), { page: c.page }) + ")" : ""),
          "data-n": String(c.n), text: String(c.n) }));
      } else {
        bubble.append(el("span", { class: "cite-plain", text: m[0] }));
      }
      last = re.lastIndex;
    }
    bubble.append(document.createTextNode(answer.slice(last)));
  }

  function renderSources(citations) {
    if (!citations || !citations.length) return null;
    return el("div", { class: "sources" }, ...citations.map((c) => {
      const meta = [c.heading, c.page ? fmt(gettext("page %(page)s"), { page: c.page }) : null].filter(Boolean).join(" · ");
      const title = c.url ? el("a", { href: c.url, target: "_blank", rel: "noopener", class: "source-link", text: sourceLabel(c) })
        : el("strong", { text: sourceLabel(c) });
      return el("div", { class: "source" },
        el("span", { class: "num", text: `[${c.n}]` }),
        el("span", {}, title, meta ? el("span", { class: "meta", text: " — " + meta }) : null),
        c.snippet ? el("span", { class: "snippet", text: "“" + c.snippet + "”" }) : null);
    }));
  }

  // A thumb icon as inline SVG: emoji fonts are often missing on servers and kiosks.
  function thumb(down) {
    const ns = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(ns, "svg");
    svg.setAttribute("viewBox", "0 0 24 24");
    svg.setAttribute("class", "thumb" + (down ? " down" : ""));
    svg.setAttribute("aria-hidden", "true");
    const path = document.createElementNS(ns, "path");
    path.setAttribute("d", "M2 10h4v11H2zM8 21h9.3a2 2 0 0 0 2-1.6l1.6-7A2 2 0 0 0 19 10h-5.2l.8-4.1A2 2 0 0 0 12.7 3.5L8 9z");
    svg.append(path);
    return svg;
  }

  function renderFooter(messageId, rating, usage) {
    const footer = el("div", { class: "footer" });
    const buttons = [["up", gettext("Helpful")], ["down", gettext("Not helpful")]].map(([value, label]) =>
      el("button", { type: "button", class: "fb" + (rating === value ? " chosen" : ""), "data-rating": value,
        title: label, "aria-label": label, text: label,
        onclick: async (e) => {
          try {
            await api("POST", `/api/v1/messages/${messageId}/feedback/`, { rating: value });
            footer.querySelectorAll(".fb").forEach((b) => b.classList.toggle("chosen", b.dataset.rating === value));
          } catch (err) { e.target.title = err.message; }
        } }));
    buttons.forEach((b) => b.prepend(thumb(b.dataset.rating === "down")));
    footer.append(...buttons);
    if (usage && usage.generator) {
      const parts = [usage.generator];
      if (usage.latency_ms != null) parts.push(`${Math.round(usage.latency_ms)} ms`);
      footer.append(el("span", { class: "usage", text: parts.join(" · ") }));
    }
    return footer;
  }

  function finishAssistant(bubble, payload, rating) {
    bubble.classList.remove("streaming");
    renderAnswer(bubble, payload.answer, payload.citations);
    const sources = renderSources(payload.citations);
    if (sources) bubble.append(sources);
    bubble.append(renderFooter(payload.message_id, rating, payload.usage));
    scrollDown();
  }

  function failAssistant(bubble, frame) {
    bubble.classList.remove("streaming");
    bubble.replaceChildren(el("span", { class: "error-note", text: frame.message || gettext("Something went wrong.") }));
    const sources = frame.details && frame.details.sources;
    if (sources && sources.length) {
      bubble.append(el("div", { class: "meta", text: gettext("Sources found for your question:") }), renderSources(sources));
    }
    scrollDown();
  }

  // --- websocket --------------------------------------------------------------------------
  function connect(sid) {
    if (socket && socket.sid === sid && socket.readyState <= WebSocket.OPEN) return socketReady;
    if (socket) { socket.onclose = null; socket.close(); }
    const scheme = location.protocol === "https:" ? "wss" : "ws";
    const ws = new WebSocket(`${scheme}://${location.host}/ws/chat/${encodeURIComponent(sid)}/`);
    ws.sid = sid;
    socket = ws;
    socketReady = new Promise((resolve, reject) => {
      ws.onopen = () => { reconnects = 0; resolve(ws); };
      ws.onerror = () => reject(new Error(gettext("Could not connect to the chat service.")));
    });
    ws.onmessage = (event) => onFrame(JSON.parse(event.data));
    ws.addEventListener("open", () => { if (pending && pending.turnId && pending.resumeOnOpen) resume(ws); });
    ws.onclose = () => {
      if (socket === ws) socket = null;
      if (!pending) return;
      if (!pending.turnId || reconnects >= 8) {
        failAssistant(pending.bubble, { message: gettext("The connection was lost. Please send your message again.") });
        pending = null; setBusy(false);
        return;
      }
      // The answer goes on being generated (by this instance or, if it died, another one): reconnect
      // and ask for the rest from the last offset we have.
      pending.bubble.classList.add("reconnecting");
      pending.resumeOnOpen = true;
      const delay = Math.min(4000, 250 * 2 ** reconnects++);
      setTimeout(() => { if (pending && ws.sid === sessionId) connect(ws.sid).catch(() => {}); }, delay);
    };
    return socketReady;
  }

  function resume(ws) {
    pending.resumeOnOpen = false;
    ws.send(JSON.stringify({ type: "resume", turn_id: pending.turnId, offset: pending.offset || 0 }));
  }

  function onFrame(frame) {
    if (pending && typeof frame.offset === "number") {
      if (frame.offset <= (pending.offset || 0)) return; // already have it (a resume overlaps)
      pending.offset = frame.offset;
      pending.bubble.classList.remove("reconnecting");
    }
    if (frame.type === "turn" && pending) {
      pending.turnId = frame.turn_id;
    } else if (frame.type === "reset" && pending) {
      pending.text = "";
      pending.bubble.textContent = "";
    } else if (frame.type === "token" && pending) {
      pending.text += frame.text;
      pending.bubble.textContent = pending.text;
      scrollDown();
    } else if (frame.type === "answer" && pending) {
      const isNew = !conversations.some((c) => c.session_id === frame.session_id);
      finishAssistant(pending.bubble, frame, null);
      pending = null;
      setBusy(false);
      if (isNew) refreshList(); else bumpConversation(frame.session_id);
    } else if (frame.type === "error" && frame.code === "turn_not_found" && pending) {
      // The answer's log expired or was never there: the saved conversation is the truth.
      pending = null;
      setBusy(false);
      openConversation(sessionId);
    } else if (frame.type === "error") {
      if (pending) { failAssistant(pending.bubble, frame); pending = null; }
      else { const bubble = addAssistantBubble(); failAssistant(bubble, frame); }
      setBusy(false);
    }
  }

  function bumpConversation(sid) {
    const i = conversations.findIndex((c) => c.session_id === sid);
    if (i > 0) { conversations.unshift(conversations.splice(i, 1)[0]); renderList(); }
  }

  function setBusy(busy) {
    sendBtn.disabled = busy;
    input.disabled = busy;
    if (!busy) input.focus();
  }

  async function send(text) {
    if (!sessionId) sessionId = newSessionId();
    addUserMessage(text);
    pending = { bubble: addAssistantBubble(), text: "", turnId: null, offset: 0 };
    setBusy(true);
    try {
      const ws = await connect(sessionId);
      const frame = { type: "message", message: text };
      if (kbSelect.value) frame.knowledge_bases = [kbSelect.value];
      ws.send(JSON.stringify(frame));
      history.replaceState(null, "", "?c=" + encodeURIComponent(sessionId));
    } catch (e) {
      failAssistant(pending.bubble, { message: e.message });
      pending = null;
      setBusy(false);
    }
  }

  // --- navigation -------------------------------------------------------------------------
  async function openConversation(sid) {
    sessionId = sid;
    renderList();
    history.replaceState(null, "", "?c=" + encodeURIComponent(sid));
    const current = conversations.find((c) => c.session_id === sid);
    titleEl.textContent = (current && current.title) || gettext("Conversation");
    clearMessages(false);
    try {
      const data = await api("GET", `/api/v1/conversations/${encodeURIComponent(sid)}/messages/?limit=200`);
      let streaming = null;
      for (const m of data.results) {
        if (m.role === "user") addUserMessage(m.content);
        else if (m.status === "streaming") streaming = m;
        else finishAssistant(addAssistantBubble(), { answer: m.content, citations: m.citations, message_id: m.id,
          usage: { generator: m.generator, latency_ms: m.latency_ms } }, m.feedback);
      }
      if (streaming && streaming.turn_id) {
        // Refreshed mid-answer: show what was saved, then replay the turn's log from the start.
        const bubble = addAssistantBubble();
        bubble.textContent = streaming.content;
        pending = { bubble, text: "", turnId: streaming.turn_id, offset: 0, resumeOnOpen: true };
        setBusy(true);
      }
      if (!data.results.length) clearMessages(true);
    } catch (e) {
      clearMessages(true);
      failAssistant(addAssistantBubble(), { message: e.message });
    }
    connect(sid).then((ws) => { if (pending && pending.resumeOnOpen && ws.readyState === WebSocket.OPEN) resume(ws); })
      .catch(() => {});
  }

  function startNewChat() {
    sessionId = null;
    if (socket) { socket.onclose = null; socket.close(); socket = null; }
    history.replaceState(null, "", location.pathname);
    titleEl.textContent = gettext("New chat");
    clearMessages(true);
    renderList();
    input.focus();
  }

  // --- wiring -----------------------------------------------------------------------------
  for (const kb of boot.knowledge_bases || []) kbSelect.append(el("option", { value: kb.slug, text: kb.name }));
  $("new-chat").addEventListener("click", startNewChat);
  // The language switch posts to Django's set_language, which remembers the choice in a cookie.
  const languageSelect = $("language-select");
  if (languageSelect) languageSelect.addEventListener("change", () => {
    const next = $("language-form").querySelector('input[name="next"]');
    if (next) next.value = location.pathname + location.search;
    $("language-form").requestSubmit();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    const text = input.value.trim();
    if (!text || sendBtn.disabled) return;
    input.value = "";
    input.style.height = "auto";
    send(text);
  });
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); $("composer").requestSubmit(); }
  });
  input.addEventListener("input", () => { input.style.height = "auto"; input.style.height = Math.min(input.scrollHeight, 180) + "px"; });

  renderList();
  const initial = new URLSearchParams(location.search).get("c");
  if (initial) openConversation(initial); else input.focus();
})();
