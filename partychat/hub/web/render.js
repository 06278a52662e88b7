// What the page shows: the conversation, the floor and who is in the room.
//
// Everything a participant wrote reaches the page only through textContent or text nodes, never
// as HTML. The hub decides the words and the colours (labels, colour indexes); this module only
// puts them on screen.

import { byId, state, stored } from "./shared.js";

const logEl = byId("log");

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

export function showMessage(frame) {
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
    // Only moderators (and the recipients) read this; everyone else was told only that it happened.
    el.classList.add("whisper");
    const note = document.createElement("p");
    note.className = "note";
    note.textContent = `whispered to ${frame.whispered_to}`;
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

export function growDraft(frame) {
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
export function withdrawDraft(frame) {
  if (typeof frame.from !== "string") return;
  const draft = state.drafts.get(frame.from);
  if (draft) {
    state.drafts.delete(frame.from);
    draft.el.remove();
  }
  if (typeof frame.content === "string" && frame.content) quietLine(frame.content);
}

// A reply that loses the turn (pause, a new question) is kept on screen, marked as unfinished.
export function stopDraft(sender) {
  const draft = state.drafts.get(sender);
  if (!draft) return;
  state.drafts.delete(sender);
  draft.el.classList.replace("draft", "stopped");
  const note = document.createElement("p");
  note.className = "note";
  note.textContent = "stopped before it was finished; not part of the conversation";
  draft.el.append(note);
}

export function quietLine(text, kind = "event") {
  const el = document.createElement("div");
  el.className = kind;
  const time = document.createElement("time");
  time.textContent = clock();
  const span = document.createElement("span");
  span.textContent = text;
  el.append(time, span);
  append(el);
}

// The moderator's /toggle: hide or show everyone else's messages, those shown and those to come.
export function hideOthers(hide) {
  state.hideOthers = hide;
  logEl.classList.toggle("hide-others", hide);
  for (const el of logEl.querySelectorAll(".msg.final")) {
    el.classList.toggle("hidden", hide && el.dataset.sender !== stored("name"));
  }
}

// ------------------------------------------------------------ the room's state

export function showFloor() {
  const floor = state.floor;
  const el = byId("floor");
  el.replaceChildren();
  if (!floor) return;
  const parts = [["mode", floor.mode], ["turn", floor.holder], ["turns left", String(floor.turns_left)]];
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

let rowTools = null; // the moderator's buttons for one participant, once the moderator's page set them

/** Lets the moderator's page add its buttons to each participant's row (when the hub says it moderates). */
export function addRowTools(tools) {
  rowTools = tools;
}

export function showParticipants() {
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
    // The hub's words for this participant (protocol.participant_label), and the turn frame's news.
    role.textContent = speakers.has(person.name) ? `${person.label}, has the turn` : person.label;
    item.append(name, role);
    if (rowTools && state.isModerator) item.append(rowTools(person));
    list.append(item);
  }
  const count = state.spectators;
  byId("spectators").textContent = count === null ? "" : `${count} watching`;
}

export function setConnection(text, kind) {
  const el = byId("connection");
  el.textContent = text;
  el.dataset.state = kind;
}
