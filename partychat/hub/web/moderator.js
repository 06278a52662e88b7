// The moderator's page (/moderate): joining, the input line, the room's controls and the download.
//
// The watching page never takes anything from here; the tools come out of their <template> only
// when this module mounts them.

import { byId, state, store, stored } from "./shared.js";
import { addRowTools, hideOthers, quietLine, setConnection } from "./render.js";
import { command, connect, disconnect, send } from "./connection.js";

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
    hideOthers(!state.hideOthers);
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

// The buttons in a participant's row: what the moderator would otherwise type.
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
export function showRights() {
  const me = state.participants.find((p) => p.name.toLowerCase() === stored("name").toLowerCase());
  if (!me || !state.ws) return;
  state.isModerator = Boolean(me.moderator);
  byId("controls").hidden = !state.isModerator;
  setConnection(state.isModerator ? `moderating as ${me.name}`
    : `joined as ${me.name}, not a moderator: the hub refuses commands`, "online");
}

/** The hub welcomed us: the join form gives way to the input line. */
export function joined() {
  byId("join-form").hidden = true;
  byId("say-form").hidden = false;
  byId("leave").hidden = false;
  byId("download").disabled = false;
  byId("say").focus();
}

// The hub renders the Markdown (the same the console's /save writes); the page only saves it.
export function download(frame) {
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

export function leaveRoom(reason) {
  state.joined = false;
  state.session = null;
  state.isModerator = false;
  disconnect();
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
  addRowTools(participantButtons);
}

export function startModerating() {
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
