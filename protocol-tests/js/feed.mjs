// The feed hub (/hubs/feed) with @microsoft/signalr: JWT-only connections,
// events published by POST /api/feed and delivered per user as FeedUpdated.
// FEEDHUB_PROTOCOL = json | messagepack picks the hub protocol.

import assert from "node:assert/strict";

import {
    Runner, deferred, env, makeJwt, rejectsWith, require, sleep, uniq, waitUntil, withTimeout, withoutOffset,
} from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const API_KEY = env("FEEDHUB_API_KEY");
const PROTOCOL = env("FEEDHUB_PROTOCOL", "json");
const FEED_HUB = `${BASE_URL}/hubs/feed`;
const FEED_API = `${BASE_URL}/api/feed`;

const T_CALL = 5000;
const T_START = 10000;
const QUIET = 500;

function build(t, { token, options = {} } = {}) {
    const httpOptions = {
        transport: signalR.HttpTransportType.WebSockets,
        logMessageContent: true,
        logger: t.logger,
        ...options,
    };
    if (token !== undefined) {
        httpOptions.accessTokenFactory = () => token;
    }
    const c = new signalR.HubConnectionBuilder()
        .withUrl(FEED_HUB, httpOptions)
        .withHubProtocol(PROTOCOL === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
        .configureLogging(t.logger)
        .build();
    t.defer(() => c.stop());
    return c;
}

/** A started feed connection for `user` that records every FeedUpdated. */
async function subscriber(t, name, user) {
    const c = build(t, { token: makeJwt(JWT_SECRET, user) });
    const inbox = [];
    c.on("FeedUpdated", (...args) => {
        t.log(`${name} got FeedUpdated ${JSON.stringify(args)}`);
        inbox.push(withoutOffset(args));
    });
    await withTimeout(c.start(), T_START, `start ${name}`);
    return { name, user, c, inbox };
}

async function post(body, { key = API_KEY, headers = {} } = {}) {
    const h = { "Content-Type": "application/json", ...headers };
    if (key !== null) {
        h.Authorization = `Bearer ${key}`;
    }
    const response = await withTimeout(fetch(FEED_API, {
        method: "POST",
        headers: h,
        body: typeof body === "string" ? body : JSON.stringify(body),
    }), T_CALL, "POST /api/feed");
    const text = await response.text();
    return { status: response.status, text };
}

async function everyone(t) {
    return [
        await subscriber(t, "1002#1", "1002"),
        await subscriber(t, "1002#2", "1002"),
        await subscriber(t, "1003", "1003"),
        await subscriber(t, "1004", "1004"),
    ];
}

function countOf(sub, payload) {
    return sub.inbox.filter((args) => args.length === 1 && isDeepEqual(args[0], payload)).length;
}

function isDeepEqual(a, b) {
    try {
        assert.deepStrictEqual(a, b);
        return true;
    } catch {
        return false;
    }
}

/** Checks exactly the named subscribers got `payload` once; the rest nothing new. */
async function expectFeed(subs, payload, expected) {
    await waitUntil(() => subs.filter((s) => expected.includes(s.name)).every((s) => countOf(s, payload) >= 1),
        T_CALL, `FeedUpdated at ${expected.join(", ")}`).catch((err) => {
        const got = subs.map((s) => `${s.name}: ${JSON.stringify(s.inbox)}`).join("; ");
        throw new Error(`${err.message} (inboxes: ${got})`);
    });
    await sleep(QUIET);
    const actual = Object.fromEntries(subs.map((s) => [s.name, countOf(s, payload)]));
    const wanted = Object.fromEntries(subs.map((s) => [s.name, expected.includes(s.name) ? 1 : 0]));
    assert.deepEqual(actual, wanted, "FeedUpdated deliveries per connection");
}

const runner = new Runner(`feed hub (${PROTOCOL})`);
const test = (name, fn, opts) => runner.test(name, fn, opts);

test("POST /api/feed for 1002 and 1003 reaches all their connections and not 1004", async (t) => {
    const subs = await everyone(t);
    const payload = {
        id: uniq("evt"),
        kind: "post.created",
        text: "héllo wörld — 你好",
        count: 42,
        negative: -7,
        big: 2 ** 40,
        flag: true,
        nothing: null,
        tags: ["a", "b"],
        nested: { list: [1, 2, 3], empty: {}, deeper: { ok: false } },
    };
    const r = await post({ recipients: ["1002", "1003"], payload });
    t.log(`POST -> ${r.status} ${r.text}`);
    assert.equal(r.status, 202, `POST /api/feed status (body: ${r.text})`);
    await expectFeed(subs, payload, ["1002#1", "1002#2", "1003"]);
    for (const s of subs) {
        assert.ok(s.inbox.every((args) => args.length === 1), `${s.name}: FeedUpdated has exactly one argument`);
    }
});

test("events to one user arrive once each and in order", async (t) => {
    const subs = await everyone(t);
    const payloads = Array.from({ length: 10 }, (_, i) => ({ seq: i, id: uniq("seq") }));
    for (const payload of payloads) {
        const r = await post({ recipients: ["1003"], payload });
        assert.equal(r.status, 202, `POST #${payload.seq} (body: ${r.text})`);
    }
    const s1003 = subs.find((s) => s.name === "1003");
    await waitUntil(() => s1003.inbox.length >= payloads.length, T_CALL, "10 events at 1003");
    await sleep(QUIET);
    assert.deepEqual(s1003.inbox.map((args) => args[0]), payloads);
    for (const s of subs.filter((x) => x.name !== "1003")) {
        assert.deepEqual(s.inbox, [], `${s.name} gets nothing`);
    }
});

test("unknown and duplicate recipients are harmless", async (t) => {
    const subs = await everyone(t);
    const payload = { id: uniq("dup") };
    const r = await post({ recipients: ["9999", "1004", "1004"], payload });
    assert.equal(r.status, 202, `POST status (body: ${r.text})`);
    // A user listed twice is still one recipient (ASP.NET's Clients.Users semantics would send twice;
    // the feed API is per-recipient, so accept one or two deliveries but nobody else).
    const s1004 = subs.find((s) => s.name === "1004");
    await waitUntil(() => countOf(s1004, payload) >= 1, T_CALL, "event at 1004");
    await sleep(QUIET);
    assert.ok(countOf(s1004, payload) <= 2, "at most one delivery per listing");
    for (const s of subs.filter((x) => x.name !== "1004")) {
        assert.equal(countOf(s, payload), 0, `${s.name} gets nothing`);
    }
});

test("POST /api/feed with a wrong or missing API key is 401 and delivers nothing", async (t) => {
    const subs = await everyone(t);
    const payload = { id: uniq("forged") };
    const wrong = await post({ recipients: ["1002", "1003", "1004"], payload }, { key: `${API_KEY}-wrong` });
    assert.equal(wrong.status, 401, `wrong key (body: ${wrong.text})`);
    const missing = await post({ recipients: ["1002", "1003", "1004"], payload }, { key: null });
    assert.equal(missing.status, 401, `missing key (body: ${missing.text})`);
    await sleep(QUIET);
    for (const s of subs) {
        assert.deepEqual(s.inbox, [], `${s.name} gets nothing`);
    }
});

test("a disconnected connection no longer receives, the user's other one does", async (t) => {
    const subs = await everyone(t);
    await withTimeout(subs[0].c.stop(), T_CALL, "stop 1002#1");
    const payload = { id: uniq("after-stop") };
    const r = await post({ recipients: ["1002"], payload });
    assert.equal(r.status, 202);
    await expectFeed(subs, payload, ["1002#2"]);
});

test("start() with an invalid token is rejected with 401", async (t) => {
    for (const [what, token] of [
        ["bad signature", makeJwt(`${JWT_SECRET}-wrong`, "1002")],
        ["expired", makeJwt(JWT_SECRET, "1002", { expiresIn: -3600 })],
        ["garbage", "garbage"],
    ]) {
        const c = build(t, { token });
        const err = await rejectsWith(c.start(), T_START, `start with ${what} token`);
        t.log(`${what}: ${err.message}`);
        assert.match(err.message, /401/, `${what} token`);
        assert.equal(c.state, signalR.HubConnectionState.Disconnected);
    }
});

test("start() without a token is rejected with 401", async (t) => {
    const c = build(t);
    const err = await rejectsWith(c.start(), T_START, "start without token");
    assert.match(err.message, /Status code '401'/);
});

test("skipNegotiation with a token connects and receives", async (t) => {
    const c = build(t, { token: makeJwt(JWT_SECRET, "1004"), options: { skipNegotiation: true } });
    const got = deferred();
    c.on("FeedUpdated", (p) => got.resolve(withoutOffset([p])[0]));
    await withTimeout(c.start(), T_START, "start");
    const payload = { id: uniq("skip") };
    const r = await post({ recipients: ["1004"], payload });
    assert.equal(r.status, 202);
    assert.deepEqual(await withTimeout(got.promise, T_CALL, "FeedUpdated"), payload);
});

await runner.run();
