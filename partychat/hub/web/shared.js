// What every module of the page shares: which page this is, the page's state, and this tab's storage.
//
// Modules (not one script) so each part can be read on its own; no build step, and the hub's CSP
// (script-src 'self') allows them because the browser fetches each from the hub itself.

/** "moderate" on /moderate, where the moderator's tools come in; "watch" everywhere else. */
export const view = location.pathname === "/moderate" ? "moderate" : "watch";

export const byId = (id) => document.getElementById(id);

export const state = {
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

// Storage for this tab only: a reload keeps the name and tokens, another tab asks again.
export const stored = (key) => sessionStorage.getItem(`partychat.${key}`) || "";
export const store = (key, value) => {
  if (value) sessionStorage.setItem(`partychat.${key}`, value);
  else sessionStorage.removeItem(`partychat.${key}`);
};
