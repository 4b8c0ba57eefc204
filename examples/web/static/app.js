// The page of the web example (examples/web): it starts and stops a run through its
// backend, and follows the run's events straight from runservice with EventSource and a
// read token, the one credential that goes in a URL.
//
// Resuming. Each data event's `id:` is the offset after it. When the connection drops,
// the browser reconnects by itself and sends the last one as Last-Event-ID, which
// runservice resumes from. The events shown and the offset after them are saved together
// in sessionStorage after each data event, so a reloaded page shows them again and opens
// a new stream from that offset. Every event that arrives is shown as it arrives, none
// skipped as "seen already": a duplicate or a gap in the stream would show on the page.
"use strict";

const KEY = "runservice-web-example";
const TERMINAL = new Set([
  "RUN_STATE_SUCCEEDED",
  "RUN_STATE_FAILED",
  "RUN_STATE_STOPPED",
  "RUN_STATE_INTERRUPTED",
  "RUN_STATE_TIMED_OUT",
]);
const RENEW_BEFORE_MS = 5_000; // a read token this close to its expiry is renewed first
const RETRY_MS = 2_000; // the wait before a new stream when runservice refused one

// {runId, offset, events, state, token, expireTime, eventsUrl}, or null before a run.
let saved = load();
let source = null; // the EventSource following saved.runId
let generation = 0; // moves on whenever the stream is closed, to drop stale callbacks
let retry = null; // the timer of the next try, after a refusal
let connections = 0; // opens of the stream on this page, the browser's reconnects included

const $ = (id) => document.getElementById(id);

function load() {
  try {
    return JSON.parse(sessionStorage.getItem(KEY));
  } catch {
    return null;
  }
}

function save() {
  sessionStorage.setItem(KEY, JSON.stringify(saved));
}

async function post(path, body = {}) {
  const response = await fetch(path, {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify(body),
  });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.detail || `${response.status} ${response.statusText}`);
  return answer;
}

function finished() {
  return saved !== null && TERMINAL.has(saved.state);
}

function tokenFresh() {
  return Boolean(saved.token) && Date.parse(saved.expireTime) - Date.now() > RENEW_BEFORE_MS;
}

function closeStream() {
  generation += 1;
  clearTimeout(retry);
  retry = null;
  if (source !== null) source.close();
  source = null;
}

// Opens a stream of the run from the saved offset, with a fresh read token if needed.
async function follow() {
  closeStream();
  if (saved === null || finished()) return render();
  const mine = generation;
  if (!tokenFresh()) {
    try {
      const minted = await post(`/api/runs/${saved.runId}/token`);
      if (mine !== generation) return;
      saved.token = minted.token;
      saved.expireTime = minted.expire_time;
      saved.eventsUrl = minted.events_url;
      save();
    } catch (error) {
      if (mine === generation) retryLater(error.message);
      return;
    }
  }
  const url = new URL(saved.eventsUrl);
  url.search = new URLSearchParams({ offset: saved.offset, live: "sse", access_token: saved.token });
  const stream = new EventSource(url);
  stream.addEventListener("open", () => {
    connections += 1;
    showProblem("");
    render();
  });
  stream.addEventListener("data", (e) => onData(e));
  stream.addEventListener("control", (e) => {
    if (JSON.parse(e.data).streamClosed) closeStream();
    render();
  });
  stream.addEventListener("error", (e) => onError(stream, e));
  source = stream;
  render();
}

function onData(e) {
  for (const event of JSON.parse(e.data)) {
    saved.events.push(event);
    if (event.type === "run.state") saved.state = event.state;
    $("events").append(item(event));
  }
  saved.offset = e.lastEventId;
  save();
  if (finished()) closeStream();
  render();
}

function onError(stream, e) {
  if (stream !== source) return;
  if (e.data !== undefined) {
    // runservice's own `error` event, after which it ends the response: an expired read
    // token (renewed at once), or a failure on its side (tried again after a while).
    const problem = JSON.parse(e.data);
    closeStream();
    if (problem.reason === "TOKEN_EXPIRED") {
      saved.token = null;
      follow();
    } else {
      retryLater(problem.detail);
    }
  } else if (stream.readyState === EventSource.CLOSED) {
    // runservice answered the browser's reconnect with an error (an expired token's 401,
    // a draining server's 503): the browser gives up, the page starts a new stream.
    closeStream();
    saved.token = null;
    retryLater("the stream was refused; trying again");
  }
  // Otherwise the connection dropped and the browser reconnects by itself, sending
  // Last-Event-ID.
  render();
}

function retryLater(message) {
  showProblem(message);
  clearTimeout(retry);
  retry = setTimeout(follow, RETRY_MS);
  render();
}

function item(event) {
  const li = document.createElement("li");
  li.dataset.seq = event.seq; // an int64: a string in JSON
  li.dataset.type = event.type;
  const seq = document.createElement("span");
  seq.className = "seq";
  seq.textContent = event.seq;
  const type = document.createElement("span");
  type.className = "type";
  type.textContent = event.type;
  const payload = document.createElement("code");
  payload.textContent =
    event.type === "run.state"
      ? [event.state, event.error?.message].filter(Boolean).join(": ")
      : JSON.stringify(event.data ?? event.text ?? event.value ?? "");
  li.append(seq, type, payload);
  if (TERMINAL.has(event.state)) li.classList.add("terminal");
  return li;
}

function showProblem(message) {
  $("problem").textContent = message;
  $("problem").hidden = !message;
}

function streamText() {
  if (source === null) return finished() ? "closed: the run ended" : retry ? "waiting" : "closed";
  if (source.readyState === EventSource.OPEN) return "open";
  return connections === 0 ? "connecting" : "reconnecting";
}

function render() {
  $("run-id").textContent = saved?.runId ?? "none";
  $("state").textContent = saved?.state || (saved ? "starting" : "none");
  $("state").dataset.terminal = String(finished());
  $("stream").textContent = streamText();
  $("offset").textContent = saved?.offset ?? "none";
  $("connections").textContent = String(connections);
  $("count-shown").textContent = String($("events").children.length);
  $("start").disabled = saved !== null && !finished();
  $("stop").disabled = saved === null || finished();
}

$("start-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  $("start").disabled = true;
  try {
    const input = { count: Number($("count").value), interval: Number($("interval").value) };
    const { run } = await post("/api/runs", input);
    closeStream();
    saved = { runId: run.run_id, offset: "-1", events: [], state: "", token: null };
    save();
    connections = 0;
    $("events").replaceChildren();
    follow();
  } catch (error) {
    showProblem(error.message);
    render();
  }
});

$("stop").addEventListener("click", async () => {
  $("stop").disabled = true;
  try {
    await post(`/api/runs/${saved.runId}/stop`); // the terminal event comes on the stream
  } catch (error) {
    showProblem(error.message);
    render();
  }
});

for (const event of saved?.events ?? []) $("events").append(item(event));
follow();
