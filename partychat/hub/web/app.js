// The Party Chat page: watches the room (spectator) or joins it as a human moderator.
//
// Served by the hub itself as ES modules (this one starts the page): shared.js holds the page's
// state, render.js what it shows, connection.js the websocket, moderator.js the moderator's tools.
// No build step and nothing from elsewhere.

import { byId, state, store, stored, view } from "./shared.js";
import {
  growDraft, quietLine, setConnection, showFloor, showMessage, showParticipants, stopDraft, withdrawDraft,
} from "./render.js";
import { connect, receiveWith } from "./connection.js";
import { download, joined, leaveRoom, showRights, startModerating } from "./moderator.js";

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
  if (view === "moderate") joined();
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

// ------------------------------------------------------------ starting

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
  receiveWith(handle);
  if (view === "moderate") startModerating();
  else startWatching();
}

start();
