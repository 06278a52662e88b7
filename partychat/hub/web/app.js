// The Party Chat page: watches the room (spectator) or joins it as a human moderator.
//
// Served by the hub itself; no build step and nothing from elsewhere. Everything a participant
// wrote reaches the page only through textContent or text nodes, never as HTML.
"use strict";

(() => {
  const view = location.pathname === "/moderate" ? "moderate" : "watch";
  const byId = (id) => document.getElementById(id);
  const logEl = byId("log");
  const PROTOCOL = 1;
  const RETRY_FIRST_S = 1;
  const RETRY_MAX_S = 30;

  const state = {
    config: null,
    ws: null,
    retries: 0,
    retryTimer: null,
    joined: false, // false until the user asks to watch or join; a fatal refusal sets it back
    roomId: null,
    lastSeq: null, // highest sequence number shown: a reconnect asks the hub for what came after it
    shownIds: new Set(),
    drafts: new Map(), // sender -> {el, text, turn}
    floor: null,
    participants: [],
    spectators: null,
    session: null, // lets a reconnecting moderator reclaim its name; never stored
    isModerator: false,
    hideOthers: false,
    commands: {},
  };

  // ------------------------------------------------------------ storage (this tab only)

  const stored = (key) => sessionStorage.getItem(`partychat.${key}`) || "";
  const store = (key, value) => {
    if (value) sessionStorage.setItem(`partychat.${key}`, value);
    else sessionStorage.removeItem(`partychat.${key}`);
  };

  // ------------------------------------------------------------ the conversation

  // The hub picks each speaker's colour (the console's too); style.css turns the index into a colour.
  function paint(el, colour) {
    if (Number.isInteger(colour)) el.dataset.colour = String(colour);
  }

  function nearBottom() {
    return logEl.scrollHeight - logEl.scrollTop - logEl.clientHeight < 80;
  }

  function append(el) {
    const follow = nearBottom();
    logEl.append(el);
    if (follow) logEl.scrollTop = logEl.scrollHeight;
  }

  function clock(ts) {
    const when = ts ? new Date(ts * 1000) : new Date();
    return when.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hourCycle: "h23" });
  }

  // Model text as readable paragraphs: blank lines split paragraphs, ``` fences keep code as typed.
  function renderText(el, text) {
    el.replaceChildren();
    text.split("```").forEach((block, index) => {
      if (index % 2 === 1) {
        const pre = document.createElement("pre");
        pre.textContent = block.replace(/^[\w+-]*\n/, "");
        el.append(pre);
        return;
      }
      for (const paragraph of block.split(/\n\s*\n/)) {
        if (!paragraph.trim()) continue;
        const p = document.createElement("p");
        paragraph.trim().split("\n").forEach((line, i) => {
          if (i) p.append(document.createElement("br"));
          p.append(line);
        });
        el.append(p);
      }
    });
  }

  function messageElement(sender, role, colour, ts) {
    const el = document.createElement("article");
    el.className = `msg ${role === "human" ? "human" : "model"}`;
    el.dataset.sender = sender;
    paint(el, colour);
    const head = document.createElement("div");
    head.className = "head";
    const who = document.createElement("span");
    who.className = "who";
    who.textContent = sender;
    const time = document.createElement("time");
    time.textContent = clock(ts);
    head.append(who, time);
    const body = document.createElement("div");
    body.className = "body";
    el.append(head, body);
    return el;
  }

  function showMessage(frame) {
    if (typeof frame.from !== "string" || typeof frame.content !== "string") return;
    if (typeof frame.seq === "number") {
      if (state.lastSeq !== null && frame.seq <= state.lastSeq) return; // already shown
      state.lastSeq = frame.seq;
    }
    if (frame.id) {
      if (state.shownIds.has(frame.id)) return;
      state.shownIds.add(frame.id);
    }
    const el = messageElement(frame.from, frame.role, frame.colour, frame.ts);
    el.classList.add("final");
    if (typeof frame.seq === "number") el.dataset.seq = String(frame.seq);
    if (frame.id) el.dataset.id = String(frame.id);
    if (frame.replay) el.classList.add("earlier");
    if (state.hideOthers && frame.from !== stored("name")) el.classList.add("hidden");
    renderText(el.querySelector(".body"), frame.content);
    if (frame.interrupted === true) {
      // Cut short by /stop: what was said so far is part of the conversation, marked as unfinished.
      el.classList.add("interrupted");
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = "interrupted by the moderator";
      el.append(note);
    }
    if (frame.whisper === true) {
      // Only the moderators (and the recipients) read this; everyone else was told only that it happened.
      el.classList.add("whisper");
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = `whispered to ${whisperedTo(frame)}`;
      el.append(note);
    }
    if (typeof frame.replaces === "string") {
      // /retry: the new version takes the old one's place; replies that came after it stay as they were.
      el.classList.add("retried");
      const note = document.createElement("p");
      note.className = "note";
      note.textContent = "written again at the moderator's request";
      el.append(note);
      const old = [...logEl.querySelectorAll(".msg.final")].find((m) => m.dataset.id === frame.replaces);
      if (old) {
        old.replaceWith(el);
        return;
      }
    }
    const draft = state.drafts.get(frame.from);
    if (draft) {
      state.drafts.delete(frame.from);
      const follow = nearBottom();
      draft.el.replaceWith(el);
      if (follow) logEl.scrollTop = logEl.scrollHeight;
    } else {
      append(el);
    }
  }

  function whisperedTo(message) {
    const others = (message.recipients || []).filter((n) => n.toLowerCase() !== message.from.toLowerCase());
    return others.length ? others.join(", ") : "the moderators";
  }

  function growDraft(frame) {
    if (typeof frame.from !== "string" || typeof frame.content !== "string") return;
    let draft = state.drafts.get(frame.from);
    if (draft && draft.turn !== frame.turn) {
      stopDraft(frame.from);
      draft = undefined;
    }
    if (!draft) {
      const el = messageElement(frame.from, "model", frame.colour);
      el.classList.add("draft");
      draft = { el, text: "", turn: frame.turn };
      state.drafts.set(frame.from, draft);
      append(el);
    }
    draft.text += frame.content;
    const follow = nearBottom();
    renderText(draft.el.querySelector(".body"), draft.text);
    if (follow) logEl.scrollTop = logEl.scrollHeight;
  }

  // A persona took an attempt back (a guard would have withheld it): what it streamed was never said.
  function withdrawDraft(frame) {
    if (typeof frame.from !== "string") return;
    const draft = state.drafts.get(frame.from);
    if (draft) {
      state.drafts.delete(frame.from);
      draft.el.remove();
    }
    if (typeof frame.content === "string" && frame.content) quietLine(frame.content);
  }

  // A reply that loses the turn (pause, a new question) is kept on screen, marked as unfinished.
  function stopDraft(sender) {
    const draft = state.drafts.get(sender);
    if (!draft) return;
    state.drafts.delete(sender);
    draft.el.classList.replace("draft", "stopped");
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = "stopped before it was finished; not part of the conversation";
    draft.el.append(note);
  }

  function quietLine(text, kind = "event") {
    const el = document.createElement("div");
    el.className = kind;
    const time = document.createElement("time");
    time.textContent = clock();
    const span = document.createElement("span");
    span.textContent = text;
    el.append(time, span);
    append(el);
  }

  // ------------------------------------------------------------ the room's state

  function showFloor() {
    const floor = state.floor;
    const el = byId("floor");
    el.replaceChildren();
    if (!floor) return;
    const parts = [["mode", floor.mode]];
    const speakers = floor.speakers || [];
    const turn = floor.paused ? "nobody (paused)"
      : speakers.length === 0 ? "the moderator" : speakers.length > 1 ? "any model" : speakers[0];
    parts.push(["turn", turn], ["turns left", String(floor.turns_left)]);
    for (const [label, value] of parts) {
      const item = document.createElement("span");
      const key = document.createElement("b");
      key.textContent = `${label}: `;
      item.append(key, value);
      el.append(item);
    }
    if (floor.paused) {
      const badge = document.createElement("span");
      badge.className = "paused";
      badge.textContent = "paused";
      el.append(badge);
    }
    const pause = byId("pause");
    if (pause) pause.textContent = floor.paused ? "Resume" : "Pause";
    const mode = byId("mode");
    if (mode && document.activeElement !== mode) mode.value = floor.mode;
  }

  function showParticipants() {
    const list = byId("participants");
    list.replaceChildren();
    const speakers = new Set(state.floor && !state.floor.paused ? state.floor.speakers : []);
    for (const person of state.participants) {
      const item = document.createElement("li");
      paint(item, person.colour);
      if (speakers.has(person.name)) item.classList.add("speaking");
      const name = document.createElement("span");
      name.className = "who";
      name.textContent = person.name;
      const role = document.createElement("span");
      role.className = "role";
      const roles = [person.role];
      if (person.moderator) roles.push("moderator");
      if (person.muted) roles.push("muted");
      if ("on_stage" in person) roles.push(person.on_stage ? "on stage" : "off stage");
      if (speakers.has(person.name)) roles.push("has the turn");
      role.textContent = roles.join(", ");
      item.append(name, role);
      if (view === "moderate" && state.isModerator) item.append(participantButtons(person));
      list.append(item);
    }
    const count = state.spectators;
    byId("spectators").textContent = count === null ? "" : `${count} watching`;
  }

  function participantButtons(person) {
    const box = document.createElement("span");
    box.className = "actions";
    const button = (label, action) => {
      const b = document.createElement("button");
      b.type = "button";
      b.textContent = label;
      b.addEventListener("click", action);
      box.append(b);
      return b;
    };
    if (person.role === "model") {
      const prefill = (text) => {
        const input = byId("say");
        input.value = text;
        input.focus();
      };
      button("To", () => prefill(`/to ${person.name} `));
      button("Whisper", () => prefill(`/whisper ${person.name} `));
      if (person.on_stage === false) button("Enter", () => command("enter", [person.name]));
      else button("Exit", () => command("exit", [person.name]));
      button("Retry", () => command("retry", [person.name])).title = `${person.name} writes its last reply again`;
    }
    if (person.name.toLowerCase() !== (stored("name") || "").toLowerCase()) {
      button(person.muted ? "Unmute" : "Mute", () => command(person.muted ? "unmute" : "mute", [person.name]));
      const kick = button("Kick", () => {
        if (kick.dataset.armed) command("kick", [person.name]);
        else {
          kick.dataset.armed = "1";
          kick.textContent = "Kick?";
        }
      });
    }
    return box;
  }

  // The hub decides who moderates (the moderator token); the page shows what it decided.
  function showRights() {
    const me = state.participants.find((p) => p.name.toLowerCase() === stored("name").toLowerCase());
    if (!me || !state.ws) return;
    state.isModerator = Boolean(me.moderator);
    byId("controls").hidden = !state.isModerator;
    setConnection(state.isModerator ? `moderating as ${me.name}`
      : `joined as ${me.name}, not a moderator: the hub refuses commands`, "online");
  }

  // ------------------------------------------------------------ frames from the hub

  function handle(frame) {
    switch (frame.type) {
      case "message": showMessage(frame); break;
      case "partial": growDraft(frame); break;
      case "withdrawn": withdrawDraft(frame); break;
      case "turn": {
        state.floor = frame;
        const speaking = new Set(frame.paused ? [] : frame.speakers);
        for (const sender of [...state.drafts.keys()]) if (!speaking.has(sender)) stopDraft(sender);
        showFloor();
        showParticipants();
        break;
      }
      case "presence":
        state.participants = Array.isArray(frame.participants) ? frame.participants : [];
        if (typeof frame.spectators === "number") state.spectators = frame.spectators;
        if (view === "moderate") showRights();
        showParticipants();
        break;
      case "roster": quietLine(frame.content || ""); break; // the hub's sentence, as the console shows it
      case "history": download(frame); break;
      case "error":
        quietLine(frame.content, "error");
        if (state.config.ends_conversation.includes(frame.code)) refused(frame);
        break;
      case "system": system(frame); break;
      default: break; // a newer hub's frame this page does not know
    }
  }

  function system(frame) {
    if (frame.event === "welcome") {
      welcome(frame);
      return;
    }
    if (frame.event === "error") {
      quietLine(frame.content, "error");
      // A refused registration: only a full or stopping hub is worth trying again (protocol.RETRY_LATER).
      if (!state.config.retry_later.includes(frame.code)) refused(frame);
      return;
    }
    quietLine(frame.content);
  }

  function welcome(frame) {
    state.retries = 0;
    if (state.roomId && frame.room && frame.room !== state.roomId) {
      // Another conversation: the old sequence numbers mean nothing here.
      state.lastSeq = null;
      state.shownIds.clear();
      quietLine("The hub started a new conversation; what follows is from it.");
    }
    state.roomId = frame.room || state.roomId;
    state.session = frame.session || state.session;
    setConnection(view === "moderate" ? `joined as ${stored("name")}` : "watching", "online");
    if (view === "moderate") {
      byId("join-form").hidden = true;
      byId("say-form").hidden = false;
      byId("leave").hidden = false;
      byId("download").disabled = false;
      byId("say").focus();
    }
  }

  // The hub refused us for a reason retrying cannot fix: ask the person again.
  function refused(frame) {
    state.joined = false;
    if (frame.code === "unauthorized") store("token", "");
    if (view === "watch") {
      byId("token-form").hidden = false;
      return;
    }
    leaveRoom(frame.content);
  }

  // ------------------------------------------------------------ the connection

  function setConnection(text, kind) {
    const el = byId("connection");
    el.textContent = text;
    el.dataset.state = kind;
  }

  function hello() {
    const frame = { protocol: PROTOCOL };
    if (view === "moderate") {
      Object.assign(frame, { name: stored("name"), type: "human", stream: true });
      if (stored("moderator-token")) frame.moderator_token = stored("moderator-token");
      if (state.session) frame.session = state.session;
    } else {
      frame.type = "spectator";
    }
    if (stored("token")) frame.token = stored("token");
    if (state.lastSeq !== null) frame.last_seq = state.lastSeq;
    return frame;
  }

  function connect() {
    clearTimeout(state.retryTimer);
    const scheme = location.protocol === "https:" ? "wss:" : "ws:";
    const ws = new WebSocket(`${scheme}//${location.host}/`);
    state.ws = ws;
    setConnection("connecting…", "connecting");
    ws.addEventListener("open", () => ws.send(JSON.stringify(hello())));
    ws.addEventListener("message", (event) => {
      let frame;
      try {
        frame = JSON.parse(event.data);
      } catch {
        return;
      }
      if (frame && typeof frame === "object") handle(frame);
    });
    ws.addEventListener("close", () => {
      if (state.ws !== ws) return;
      state.ws = null;
      for (const sender of [...state.drafts.keys()]) stopDraft(sender);
      if (state.joined) retryLater();
    });
  }

  // Back-off: 1 s, 2 s, 4 s … 30 s, with a little jitter so a room of pages does not return at once.
  function retryLater() {
    const delay = Math.min(RETRY_FIRST_S * 2 ** state.retries, RETRY_MAX_S) * (0.8 + Math.random() * 0.4);
    state.retries += 1;
    setConnection(`connection lost; trying again in ${Math.round(delay)} s`, "offline");
    state.retryTimer = setTimeout(connect, delay * 1000);
  }

  function send(frame) {
    if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
      quietLine("Not sent: the page is not connected to the hub right now.", "error");
      return false;
    }
    state.ws.send(JSON.stringify(frame));
    return true;
  }

  function command(name, args = []) {
    return send({ type: "command", name, args });
  }

  // ------------------------------------------------------------ moderating

  const LOCAL = {
    help: "this list",
    toggle: "hide or show other people's messages",
    save: "download the conversation the hub holds as Markdown",
    quit: "leave the room (the page goes on showing nothing new)",
  };

  // The same lines the console takes: text is a message, /name args a command, // a literal slash.
  function typed(line) {
    const text = line.trim();
    if (!text) return true;
    if (!text.startsWith("/") || text.startsWith("//")) {
      return send({ type: "message", content: text.startsWith("//") ? text.slice(1) : text });
    }
    const [name, ...args] = text.slice(1).split(/\s+/);
    const lower = name.toLowerCase();
    if (lower === "help") {
      for (const [n, help] of Object.entries({ ...state.commands, ...LOCAL })) {
        quietLine(help.startsWith("/") ? help : `/${n}: ${help}`, "help");
      }
      quietLine("Anything else is sent to the room as a message.", "help");
      return true;
    }
    if (lower === "toggle") {
      state.hideOthers = !state.hideOthers;
      logEl.classList.toggle("hide-others", state.hideOthers);
      for (const el of logEl.querySelectorAll(".msg.final")) {
        el.classList.toggle("hidden", state.hideOthers && el.dataset.sender !== stored("name"));
      }
      quietLine(state.hideOthers ? "Other people's messages are hidden." : "Messages are shown.");
      return true;
    }
    if (lower === "save") return command("history");
    if (lower === "quit") {
      leaveRoom("You left the room.");
      return true;
    }
    if (lower in state.commands) return command(lower, args);
    quietLine(`Unknown command /${name}; type /help for the list (start with // to send a literal /).`, "error");
    return false;
  }

  // The hub renders the Markdown (the same the console's /save writes); the page only saves it.
  function download(frame) {
    const messages = Array.isArray(frame.messages) ? frame.messages : [];
    const blob = new Blob([typeof frame.markdown === "string" ? frame.markdown : ""],
      { type: "text/markdown;charset=utf-8" });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(blob);
    link.download = `chat-${new Date().toISOString().slice(0, 19).replace(/[-:]/g, "").replace("T", "-")}.md`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(link.href), 10000);
    quietLine(`Downloaded ${messages.length} messages as ${link.download}.`);
  }

  function leaveRoom(reason) {
    state.joined = false;
    state.session = null;
    state.isModerator = false;
    const ws = state.ws;
    state.ws = null;
    if (ws) ws.close(1000, "left");
    clearTimeout(state.retryTimer);
    store("name", "");
    setConnection("not joined", "offline");
    byId("say-form").hidden = true;
    byId("controls").hidden = true;
    byId("leave").hidden = true;
    byId("download").disabled = true;
    byId("join-error").textContent = reason || "";
    showJoinForm();
  }

  function showJoinForm() {
    byId("join-form").hidden = false;
    byId("name").value = stored("name") || byId("name").value;
    byId("moderator-token-label").hidden = !state.config.needs_moderator_token;
    byId("token-label").hidden = !state.config.needs_token;
    byId("token").required = state.config.needs_token;
    byId("name").focus();
  }

  // The watching page has no input at all; the moderator's tools come out of their template here.
  function mountModeratorTools() {
    byId("token-form").remove();
    const tools = byId("moderator-tools").content;
    byId("nav").prepend(tools.getElementById("nav-tools"));
    byId("side").append(tools.getElementById("controls"));
    document.body.append(tools.getElementById("say-form"), tools.getElementById("join-form"));
    const link = byId("switch-view");
    link.href = "/";
    link.textContent = "Watch only";
    document.title = "Party Chat · moderate";
    setConnection("not joined", "offline");
  }

  function startModerating() {
    mountModeratorTools();
    state.commands = state.config.commands || {};
    byId("join-form").addEventListener("submit", (event) => {
      event.preventDefault();
      store("name", byId("name").value.trim());
      if (state.config.needs_moderator_token) store("moderator-token", byId("moderator-token").value);
      if (state.config.needs_token) store("token", byId("token").value);
      byId("join-error").textContent = "";
      state.joined = true;
      state.retries = 0;
      connect();
    });
    byId("say-form").addEventListener("submit", (event) => {
      event.preventDefault();
      const input = byId("say");
      if (typed(input.value)) input.value = "";
    });
    byId("pause").addEventListener("click", () => command(state.floor && state.floor.paused ? "resume" : "pause"));
    byId("stop").addEventListener("click", () => command("stop"));
    byId("retry").addEventListener("click", () => command("retry"));
    byId("mode").addEventListener("change", (event) => command("mode", [event.target.value]));
    byId("set-turns").addEventListener("click", () => command("turns", [byId("turns").value]));
    byId("download").addEventListener("click", () => command("history"));
    byId("leave").addEventListener("click", () => leaveRoom("You left the room."));
    if (stored("name") && (!state.config.needs_token || stored("token"))) {
      state.joined = true;
      connect();
    } else {
      showJoinForm();
    }
  }

  function startWatching() {
    const form = byId("token-form");
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      store("token", byId("token").value);
      form.hidden = true;
      state.joined = true;
      connect();
    });
    if (state.config.needs_token && !stored("token")) {
      form.hidden = false;
      setConnection("needs the room token", "offline");
      return;
    }
    state.joined = true;
    connect();
  }

  async function start() {
    try {
      const response = await fetch("/config.json", { cache: "no-cache" });
      state.config = await response.json();
    } catch {
      setConnection("cannot reach the hub; reload the page to try again", "offline");
      return;
    }
    if (view === "moderate") startModerating();
    else startWatching();
  }

  start();
})();
