// The page's one websocket to the hub: the first frame, reconnecting with back-off, sending.
//
// A reconnect sends the last sequence number shown, so the hub replays only what the page missed.

import { state, stored, view } from "./shared.js";
import { quietLine, setConnection, stopDraft } from "./render.js";

const PROTOCOL = 1;
const RETRY_FIRST_S = 1;
const RETRY_MAX_S = 30;

let onFrame = () => {};

/** The function every frame from the hub goes to (set once, before the first connect). */
export function receiveWith(handler) {
  onFrame = handler;
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

export function connect() {
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
    if (frame && typeof frame === "object") onFrame(frame);
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

/** Closes the connection on purpose: no retry follows. */
export function disconnect() {
  const ws = state.ws;
  state.ws = null;
  if (ws) ws.close(1000, "left");
  clearTimeout(state.retryTimer);
}

export function send(frame) {
  if (!state.ws || state.ws.readyState !== WebSocket.OPEN) {
    quietLine("Not sent: the page is not connected to the hub right now.", "error");
    return false;
  }
  state.ws.send(JSON.stringify(frame));
  return true;
}

export function command(name, args = []) {
  return send({ type: "command", name, args });
}
