// The feedhub live feed page. Talks to the server it is served from:
//   POST /dev/token?user=ID  a demo identity (development mode only)
//   GET  /demo/users         the demo users
//   GET  /demo/feed          history of the signed-in user's feed
//   POST /demo/posts         write a post
//   /hubs/feed               SignalR hub; events arrive as FeedUpdated(post)
// Query parameters: user=1001, protocol=json|messagepack, transport=websockets|
// serversentevents|longpolling (comma-separated list allowed).
// Every piece of user data is put on the page with textContent, never as HTML.

import * as signalR from "@microsoft/signalr";
import { MessagePackHubProtocol } from "@microsoft/signalr-protocol-msgpack";

const HUB_PATH = "hubs/feed";
const MAX_POSTS_SHOWN = 200;
const MAX_SEEN_IDS = 5000;
/** Events held while a gap is being filled; beyond this they are dropped and recovered later. */
const MAX_HELD = 1000;
const MAX_TEXT = 1000;
const RETRY_DELAYS_MS = [0, 1000, 2000, 5000];
const RETRY_MAX_DELAY_MS = 10000;
/** After this long without a connection the page stops retrying and offers a button. */
const RETRY_GIVE_UP_MS = 5 * 60 * 1000;

const params = new URLSearchParams(window.location.search);
const protocolName = params.get("protocol") === "messagepack" ? "messagepack" : "json";
const $ = (id) => document.getElementById(id);

const TRANSPORT_NAMES = {
    websockets: signalR.HttpTransportType.WebSockets,
    serversentevents: signalR.HttpTransportType.ServerSentEvents,
    sse: signalR.HttpTransportType.ServerSentEvents,
    longpolling: signalR.HttpTransportType.LongPolling,
};

/** The transports allowed by `?transport=` (all of them when absent). */
function requestedTransports() {
    const raw = params.get("transport");
    if (!raw) {
        return undefined;
    }
    let mask = 0;
    for (const part of raw.toLowerCase().split(",")) {
        mask |= TRANSPORT_NAMES[part.trim()] || 0;
    }
    return mask || undefined;
}

/** Builds `?...` for the same page with some parameters changed. */
function pageUrl(changes) {
    const next = new URLSearchParams(window.location.search);
    for (const [k, v] of Object.entries(changes)) {
        if (v === null) {
            next.delete(k);
        } else {
            next.set(k, v);
        }
    }
    const q = next.toString();
    return q ? `?${q}` : window.location.pathname;
}

function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) {
        node.className = className;
    }
    if (text !== undefined) {
        node.textContent = text;
    }
    return node;
}

const AVATAR_COLORS = ["#e76f51", "#2a9d8f", "#8e5bd9", "#e9a13b", "#3b82c4", "#d6457a"];

function avatar(user, big) {
    const a = el("div", big ? "avatar big" : "avatar", (user.name || "?").slice(0, 1).toUpperCase());
    let h = 0;
    for (const ch of String(user.id)) {
        h = (h * 31 + ch.charCodeAt(0)) >>> 0;
    }
    a.style.setProperty("--avatar", AVATAR_COLORS[h % AVATAR_COLORS.length]);
    a.setAttribute("aria-hidden", "true");
    return a;
}

function formatTime(iso) {
    const d = new Date(iso);
    if (Number.isNaN(d.getTime())) {
        return "";
    }
    const now = new Date();
    const time = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit" });
    if (d.toDateString() === now.toDateString()) {
        return time;
    }
    return `${d.toLocaleDateString([], { month: "short", day: "numeric" })}, ${time}`;
}

async function fetchJson(url, options = {}) {
    const response = await fetch(url, options);
    const body = await response.text();
    if (!response.ok) {
        const err = new Error(body || `${response.status} ${response.statusText}`);
        err.status = response.status;
        throw err;
    }
    return JSON.parse(body);
}

// ---- connection state ---------------------------------------------------------------

const STATE_TEXT = {
    idle: "not connected",
    connecting: "connecting…",
    connected: "connected",
    reconnecting: "reconnecting…",
    disconnected: "disconnected",
};

function setState(state, detail) {
    const pill = $("state");
    pill.dataset.state = state;
    $("state-text").textContent = detail ? `${STATE_TEXT[state]} (${detail})` : STATE_TEXT[state];
    document.body.dataset.connection = state;
}

function describeTransport(connection) {
    const transport = connection.connection && connection.connection.transport;
    const name = transport && transport.constructor && transport.constructor.name;
    return {
        WebSocketTransport: "WebSockets",
        ServerSentEventsTransport: "Server-Sent Events",
        LongPollingTransport: "Long Polling",
    }[name] || "–";
}

function showConnectionInfo(connection) {
    $("transport").textContent = connection.state === signalR.HubConnectionState.Connected
        ? describeTransport(connection) : "–";
    $("protocol").textContent = protocolName === "messagepack" ? "MessagePack" : "JSON";
}

let noticeTimer;
function notice(text, kind, action) {
    const n = $("notice");
    n.textContent = text;
    if (action) {
        const button = el("button", "button small-button", action.label);
        button.type = "button";
        button.addEventListener("click", action.run);
        n.append(" ", button);
    }
    n.className = kind === "warn" ? "notice warn" : "notice";
    n.hidden = false;
    clearTimeout(noticeTimer);
    if (kind !== "warn") {
        noticeTimer = setTimeout(() => { n.hidden = true; }, 15000);
    }
}

// ---- the feed -----------------------------------------------------------------------

const seen = new Set();

function remember(id) {
    seen.add(id);
    if (seen.size > MAX_SEEN_IDS) {
        // Sets iterate in insertion order: forget the oldest.
        seen.delete(seen.values().next().value);
    }
}

/** A post from the server, or null when it is not one. */
function asPost(value) {
    if (!value || typeof value !== "object") {
        return null;
    }
    const { id, author, text, createdAt } = value;
    if (typeof id !== "string" && typeof id !== "number") {
        return null;
    }
    if (typeof text !== "string") {
        return null;
    }
    const who = author && typeof author === "object" ? author : { id: String(author ?? "?"), name: String(author ?? "?") };
    return {
        id: String(id),
        author: { id: String(who.id ?? "?"), name: String(who.name ?? who.id ?? "?") },
        text,
        createdAt: typeof createdAt === "string" ? createdAt : new Date().toISOString(),
    };
}

function renderPost(post, { live, mine }) {
    const li = el("li", live ? "post live" : "post");
    li.dataset.id = post.id;
    li.dataset.createdAt = post.createdAt;
    li.append(avatar(post.author, false));
    const body = el("div", "post-body");
    const head = el("div", "post-head");
    head.append(el("span", "post-author", post.author.name));
    const time = el("time", "post-time", formatTime(post.createdAt));
    time.dateTime = post.createdAt;
    time.title = new Date(post.createdAt).toString();
    head.append(time);
    if (mine) {
        head.append(el("span", "post-badge", "you"));
    } else if (live) {
        head.append(el("span", "post-badge", "new"));
    }
    body.append(head, el("p", "post-text", post.text));
    li.append(body);
    return li;
}

/** Shows `post` once (by id), in createdAt order, newest first. Returns true if added. */
function addPost(post, opts) {
    if (!post || seen.has(post.id)) {
        return false;
    }
    remember(post.id);
    const feed = $("feed");
    const node = renderPost(post, opts);
    let before = null;
    for (const child of feed.children) {
        if ((child.dataset.createdAt || "") <= post.createdAt) {
            before = child;
            break;
        }
    }
    feed.insertBefore(node, before);
    while (feed.children.length > MAX_POSTS_SHOWN) {
        feed.lastElementChild.remove();
    }
    $("feed-empty").hidden = feed.children.length > 0;
    return true;
}

// ---- the app ------------------------------------------------------------------------

async function showPicker() {
    $("picker").hidden = false;
    $("picker-protocol").value = protocolName;
    let users;
    try {
        users = await fetchJson("demo/users");
    } catch (err) {
        fatal(`The demo post service is not available: ${err.message}. Run the server in development mode (cargo run --release) or with --dev-identities.`);
        return;
    }
    const list = $("user-list");
    for (const user of users) {
        const a = el("a", "user-card");
        a.href = pageUrl({ user: user.id, protocol: protocolName });
        a.dataset.user = user.id;
        a.append(avatar(user, true), el("span", "name", user.name), el("span", "muted small", `#${user.id}`));
        const friends = user.friends.map((f) => (users.find((u) => u.id === f) || { name: f }).name);
        a.append(el("span", "muted small", friends.length ? `friends with ${friends.join(", ")}` : "no friends yet"));
        list.append(a);
    }
    $("picker-protocol").addEventListener("change", (e) => {
        for (const a of list.querySelectorAll("a")) {
            a.href = pageUrl({ user: a.dataset.user, protocol: e.target.value });
        }
    });
}

function fatal(message) {
    const f = $("fatal");
    f.textContent = message;
    f.hidden = false;
    setState("disconnected");
}

async function startSession(userId) {
    $("session").hidden = false;
    $("protocol-select").value = protocolName;
    $("protocol-select").addEventListener("change", (e) => {
        window.location.search = pageUrl({ protocol: e.target.value });
    });
    $("switch-user").href = pageUrl({ user: null });
    showConnectionInfo({ state: null });

    let token;
    let users;
    try {
        token = (await fetchJson(`dev/token?user=${encodeURIComponent(userId)}`, { method: "POST" })).token;
        users = await fetchJson("demo/users");
    } catch (err) {
        fatal(`Cannot sign in as ${userId}: ${err.message}`);
        return;
    }
    const me = users.find((u) => u.id === userId);
    if (!me) {
        fatal(`${userId} is not a demo user.`);
        return;
    }
    document.title = `${me.name} · feedhub live feed`;
    $("me").textContent = `${me.name} (#${me.id})`;
    $("me-avatar").replaceWith(Object.assign(avatar(me, true), { id: "me-avatar" }));
    const friendNames = me.friends.map((f) => (users.find((u) => u.id === f) || { name: f }).name);
    $("me-friends").textContent = friendNames.length
        ? `Friends: ${friendNames.join(", ")}. You see your own and your friends' posts.`
        : "No friends yet: you see only your own posts.";

    const auth = { Authorization: `Bearer ${token}` };

    /** Loads the feed history; returns how many posts were new to the page. */
    async function loadFeed(live) {
        const data = await fetchJson("demo/feed?limit=50", { headers: auth });
        let added = 0;
        for (const raw of data.posts) {
            if (addPost(asPost(raw), { live, mine: raw.author && raw.author.id === me.id })) {
                added += 1;
            }
        }
        return added;
    }

    const connection = new signalR.HubConnectionBuilder()
        .withUrl(HUB_PATH, { accessTokenFactory: () => token, transport: requestedTransports() })
        .withHubProtocol(protocolName === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
        .withAutomaticReconnect({
            nextRetryDelayInMilliseconds: (ctx) => (ctx.elapsedMilliseconds > RETRY_GIVE_UP_MS
                ? null
                : RETRY_DELAYS_MS[ctx.previousRetryCount] ?? RETRY_MAX_DELAY_MS),
        })
        .configureLogging(signalR.LogLevel.Warning)
        .build();
    window.feedhubDemo = { connection, user: me, protocol: protocolName };

    // ---- ordered delivery and recovery (see README "Delivery guarantees") ----
    // Every feed event carries its per-user `offset` (+1 per event) and the hub's `Recover`
    // returns what came after a position, on whichever instance the page is connected to.
    // `position` is the last offset applied and the history's epoch; events ahead of it
    // wait in `held` while a Recover call fills the gap (one call at a time).
    let position = null;
    const held = new Map();
    let recovering = null;
    // For tests and the console: where the page is in the feed.
    Object.defineProperty(window.feedhubDemo, "position", { get: () => (position ? { ...position } : null) });

    function applyEvent(payload, live) {
        const post = asPost(payload);
        if (!post) {
            console.warn("ignoring a FeedUpdated that is not a post", payload);
            return false;
        }
        return addPost(post, { live, mine: post.author.id === me.id });
    }

    /** Applies held events that continue `position`; true when some are still ahead of a gap. */
    function drainHeld() {
        for (;;) {
            const next = held.get(position.offset + 1);
            if (next === undefined) {
                break;
            }
            held.delete(position.offset + 1);
            position.offset += 1;
            applyEvent(next, true);
        }
        for (const offset of held.keys()) {
            if (offset <= position.offset) {
                held.delete(offset);
            }
        }
        return held.size > 0;
    }

    /** Asks the hub for everything after `position` (or the newest events when null). */
    async function recover(reason) {
        if (recovering) {
            return recovering;
        }
        recovering = (async () => {
            try {
                for (let round = 0; round < 5; round += 1) {
                    const asked = position;
                    const result = await connection.invoke("Recover", asked ? { offset: asked.offset, epoch: asked.epoch } : null);
                    let applied = 0;
                    if (asked && !result.recovered) {
                        // The history no longer reaches back (or was lost): reload the page's feed.
                        applied = await loadFeed(true);
                    } else {
                        for (const event of result.events) {
                            if (typeof event.offset === "number" && asked && event.offset <= asked.offset) {
                                continue;
                            }
                            if (applyEvent(event, asked !== null)) {
                                applied += 1;
                            }
                        }
                    }
                    position = { offset: result.offset, epoch: result.epoch };
                    if (!drainHeld()) {
                        return { applied, recovered: result.recovered || !asked };
                    }
                }
                // Still a gap after several rounds: the events in between are gone for good.
                const rest = [...held.keys()].sort((a, b) => a - b);
                for (const offset of rest) {
                    applyEvent(held.get(offset), true);
                    position.offset = offset;
                }
                held.clear();
                return { applied: rest.length, recovered: false };
            } finally {
                recovering = null;
            }
        })();
        console.debug("recovering", reason);
        return recovering;
    }

    connection.on("FeedUpdated", (payload) => {
        const offset = payload && typeof payload === "object" ? payload.offset : undefined;
        if (typeof offset !== "number") {
            // A raw publish (no history, no offset): show it as it comes.
            applyEvent(payload, true);
            return;
        }
        if (position === null || recovering) {
            if (held.size < MAX_HELD) {
                held.set(offset, payload);
            }
            return;
        }
        if (offset <= position.offset) {
            return; // already applied
        }
        if (offset === position.offset + 1) {
            position.offset = offset;
            applyEvent(payload, true);
            return;
        }
        // A gap: keep this one and fetch what is missing.
        if (held.size < MAX_HELD) {
            held.set(offset, payload);
        }
        recover("gap").catch((err) => console.warn("recover failed", err));
    });
    connection.onreconnecting((err) => {
        setState("reconnecting");
        showConnectionInfo(connection);
        notice(`Connection lost${err ? ` (${err.message})` : ""}. Reconnecting…`, "warn");
    });
    /** Recovers after a (re)connection and says what was missed. */
    async function catchUp(prefix) {
        try {
            const { applied, recovered } = await recover("reconnected");
            const what = applied === 0 ? "No posts were missed." : `${applied} missed post${applied === 1 ? "" : "s"} loaded.`;
            notice(`${prefix} ${recovered ? what : `The history did not reach back far enough; the feed was reloaded. ${what}`}`);
        } catch (err) {
            notice(`${prefix} The feed could not be refreshed: ${err.message}`, "warn");
        }
    }

    connection.onreconnected(async () => {
        setState("connected");
        showConnectionInfo(connection);
        notice("Reconnected. Checking for posts you missed…");
        await catchUp("Reconnected.");
    });
    connection.onclose((err) => {
        setState("disconnected");
        showConnectionInfo(connection);
        notice(`Disconnected${err ? `: ${err.message}` : ""}.`, "warn", {
            label: "Reconnect",
            run: async () => {
                $("notice").hidden = true;
                await connect();
                await catchUp("Reconnected.");
            },
        });
    });

    setupComposer(auth, me);

    // The history first, so live posts land on top of it (duplicates are dropped by id).
    try {
        await loadFeed(false);
    } catch (err) {
        notice(`Could not load the feed: ${err.message}`, "warn");
    }
    $("feed-empty").hidden = $("feed").children.length > 0;

    /** Starts the connection; withAutomaticReconnect covers lost ones, this the first. */
    async function connect() {
        let attempt = 0;
        for (;; attempt += 1) {
            setState("connecting");
            try {
                await connection.start();
                break;
            } catch (err) {
                const delay = RETRY_DELAYS_MS[attempt + 1] ?? RETRY_MAX_DELAY_MS;
                setState("disconnected", `retrying in ${Math.round(delay / 1000)} s`);
                console.warn("connection failed", err);
                await new Promise((r) => setTimeout(r, delay));
            }
        }
        setState("connected");
        showConnectionInfo(connection);
        return attempt;
    }

    const attempts = await connect();
    // The feed's position (and, after failed attempts, posts written while we could not
    // connect: loadFeed above ran before them).
    try {
        await recover("start");
        if (attempts > 0) {
            await loadFeed(true);
        }
    } catch (err) {
        notice(`Could not read the feed's position: ${err.message}`, "warn");
    }
}

function setupComposer(auth, me) {
    const form = $("composer");
    const text = $("post-text");
    const count = $("post-count");
    const error = $("post-error");
    const button = $("post-button");
    const update = () => {
        count.textContent = `${text.value.length} / ${MAX_TEXT}`;
        button.disabled = text.value.trim().length === 0;
    };
    text.addEventListener("input", update);
    text.addEventListener("keydown", (e) => {
        if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) {
            form.requestSubmit();
        }
    });
    form.addEventListener("submit", async (e) => {
        e.preventDefault();
        const value = text.value.trim();
        if (!value) {
            return;
        }
        button.disabled = true;
        error.textContent = "";
        try {
            const post = await fetchJson("demo/posts", {
                method: "POST",
                headers: { ...auth, "Content-Type": "application/json" },
                body: JSON.stringify({ text: value }),
            });
            addPost(asPost(post), { live: true, mine: true });
            text.value = "";
        } catch (err) {
            error.textContent = `Not posted: ${err.message}`;
        }
        update();
        text.focus();
    });
    update();
    text.placeholder = `What's happening, ${me.name}?`;
}

function main() {
    $("protocol").textContent = protocolName === "messagepack" ? "MessagePack" : "JSON";
    const user = params.get("user");
    if (user) {
        startSession(user);
    } else {
        showPicker();
    }
}

main();
