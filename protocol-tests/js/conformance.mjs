// Conformance of feedhub's /testhub and /authorizedhub against the official
// @microsoft/signalr client, run once per hub protocol (FEEDHUB_PROTOCOL =
// json | messagepack) and transport (FEEDHUB_TRANSPORT = WebSockets |
// ServerSentEvents | LongPolling; default WebSockets). Checks that only make
// sense on one transport are skipped on the others with the reason printed. Modelled on ASP.NET Core's own TS client functional
// tests (HubConnectionTests.ts against FunctionalTests/TestHub.cs).

import assert from "node:assert/strict";

import {
    Runner, deferred, env, makeJwt, rejectsWith, require, sleep, uniq, waitUntil, withTimeout,
} from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const PROTOCOL = env("FEEDHUB_PROTOCOL", "json");
if (PROTOCOL !== "json" && PROTOCOL !== "messagepack") {
    console.error(`FEEDHUB_PROTOCOL must be json or messagepack, not '${PROTOCOL}'`);
    process.exit(2);
}
const IS_MSGPACK = PROTOCOL === "messagepack";
const TRANSPORT_NAME = env("FEEDHUB_TRANSPORT", "WebSockets");
const TRANSPORT = signalR.HttpTransportType[TRANSPORT_NAME];
if (TRANSPORT === undefined || TRANSPORT_NAME === "None") {
    console.error(`FEEDHUB_TRANSPORT must be WebSockets, ServerSentEvents or LongPolling, not '${TRANSPORT_NAME}'`);
    process.exit(2);
}
if (IS_MSGPACK && TRANSPORT_NAME === "ServerSentEvents") {
    console.error("MessagePack cannot run over Server-Sent Events (Text only)");
    process.exit(2);
}
const IS_WS = TRANSPORT_NAME === "WebSockets";
/** Skip reason for checks of skipNegotiation, which exists only for WebSockets. */
const WS_ONLY = IS_WS ? null : `WebSockets only: skipNegotiation requires the WebSockets transport (running ${TRANSPORT_NAME})`;
const TESTHUB = `${BASE_URL}/testhub`;
const AUTHHUB = `${BASE_URL}/authorizedhub`;

// Timeouts (ms).
const T_CALL = 5000; // one invocation round trip
const T_START = 10000; // start() incl. negotiate
const QUIET = 400; // how long "nobody else got it" is watched

function protocol() {
    return IS_MSGPACK ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol();
}

/** Builds (not starts) a HubConnection; stop() is registered as cleanup. */
function build(t, { url = TESTHUB, token, options = {}, reconnect = false } = {}) {
    const httpOptions = {
        transport: TRANSPORT,
        logMessageContent: true,
        logger: t.logger,
        ...options,
    };
    if (token !== undefined) {
        httpOptions.accessTokenFactory = () => token;
    }
    let builder = new signalR.HubConnectionBuilder()
        .withUrl(url, httpOptions)
        .withHubProtocol(protocol())
        .configureLogging(t.logger);
    if (reconnect) {
        builder = builder.withAutomaticReconnect();
    }
    const connection = builder.build();
    t.defer(() => connection.stop());
    return connection;
}

/** Builds and starts a HubConnection. */
async function connect(t, opts = {}) {
    const connection = build(t, opts);
    await withTimeout(connection.start(), T_START, `start() of ${opts.url || TESTHUB}`);
    assert.equal(connection.state, signalR.HubConnectionState.Connected);
    return connection;
}

function call(connection, method, ...args) {
    return withTimeout(connection.invoke(method, ...args), T_CALL, `invoke ${method}`);
}

/** Collects every value a stream yields; resolves on complete, rejects on error. */
function collect(connection, method, ...args) {
    const items = [];
    const done = deferred();
    connection.stream(method, ...args).subscribe({
        next: (item) => items.push(item),
        complete: () => done.resolve(items),
        error: (err) => done.reject(Object.assign(err, { itemsSoFar: items })),
    });
    return withTimeout(done.promise, T_CALL, `stream ${method}`);
}

const runner = new Runner(`conformance (${PROTOCOL}, ${TRANSPORT_NAME})`);
const test = (name, fn, opts) => runner.test(name, fn, opts);

// ---------------------------------------------------------------- basics

test(`connects over ${TRANSPORT_NAME}, Echo round-trips unicode`, async (t) => {
    const c = await connect(t);
    const message = "你好，世界！ — emoji 🎉 and \"quotes\" \\ \u0000 end";
    assert.equal(await call(c, "Echo", message), message);
    assert.equal(await call(c, "GetActiveTransportName"), TRANSPORT_NAME);
});

test("hub method names are case-insensitive", async (t) => {
    const c = await connect(t);
    assert.equal(await call(c, "echo", "lower"), "lower");
    assert.equal(await call(c, "ECHO", "upper"), "upper");
    assert.equal(await call(c, "eChO", "mixed"), "mixed");
});

test("connectionId matches GetCallerConnectionId", async (t) => {
    const c = await connect(t);
    assert.ok(c.connectionId, "client has a connection id after negotiate");
    assert.equal(await call(c, "GetCallerConnectionId"), c.connectionId);
    const c2 = await connect(t);
    assert.notEqual(c2.connectionId, c.connectionId, "two connections get distinct ids");
    assert.equal(await call(c2, "GetCallerConnectionId"), c2.connectionId);
});

test("send() (no invocation id) runs the method without a completion", async (t) => {
    const c = await connect(t);
    await withTimeout(c.send("Echo", "fire and forget"), T_CALL, "send Echo");
    // The connection must still be healthy and ordered afterwards.
    assert.equal(await call(c, "Echo", "after send"), "after send");
});

test("many concurrent invocations each get their own result", async (t) => {
    const c = await connect(t);
    const n = 50;
    const results = await Promise.all(
        Array.from({ length: n }, (_, i) => call(c, "Echo", `msg-${i}`)),
    );
    assert.deepEqual(results, Array.from({ length: n }, (_, i) => `msg-${i}`));
});

test("a 20 KB message round-trips", async (t) => {
    const c = await connect(t);
    const big = "x".repeat(20 * 1024);
    assert.equal(await call(c, "Echo", big), big);
});

test("stop() closes cleanly: onclose fires with no error", async (t) => {
    const c = build(t);
    const closed = deferred();
    c.onclose((err) => closed.resolve(err));
    await withTimeout(c.start(), T_START, "start");
    assert.equal(await call(c, "Echo", "x"), "x");
    await withTimeout(c.stop(), T_CALL, "stop");
    assert.equal(await withTimeout(closed.promise, T_CALL, "onclose"), undefined);
    assert.equal(c.state, signalR.HubConnectionState.Disconnected);
    assert.equal(c.connectionId, null);
});

test("can be restarted after stop and handlers stay bound", async (t) => {
    const c = build(t);
    const got = [];
    c.on("Message", (m) => { got.push(m); });
    for (let round = 0; round < 2; round += 1) {
        await withTimeout(c.start(), T_START, `start #${round}`);
        assert.equal(await call(c, "InvokeWithString", `round ${round}`), null);
        await waitUntil(() => got.length === round + 1, T_CALL, `Message #${round}`);
        await withTimeout(c.stop(), T_CALL, `stop #${round}`);
    }
    assert.deepEqual(got, ["round 0", "round 1"]);
});

test("GetNumRedirects reads the hub URL query string", async (t) => {
    const c = await connect(t, { url: `${TESTHUB}?numRedirects=7` });
    assert.equal(await call(c, "GetNumRedirects"), 7);
});

test("negotiate v1 response: negotiateVersion 1, connectionToken distinct from connectionId", async (t) => {
    const response = await withTimeout(fetch(`${TESTHUB}/negotiate?negotiateVersion=1`, { method: "POST" }),
        T_CALL, "POST negotiate");
    const text = await response.text();
    t.log(`negotiate -> ${response.status} ${text}`);
    assert.equal(response.status, 200);
    const body = JSON.parse(text);
    assert.equal(body.negotiateVersion, 1);
    assert.equal(typeof body.connectionId, "string");
    assert.equal(typeof body.connectionToken, "string");
    assert.ok(body.connectionId.length > 0 && body.connectionToken.length > 0);
    assert.notEqual(body.connectionToken, body.connectionId, "the token must not be the public id");
    const ws = (body.availableTransports || []).find((x) => x.transport === "WebSockets");
    assert.ok(ws, "WebSockets offered");
    assert.deepEqual([...ws.transferFormats].sort(), ["Binary", "Text"]);
});

// ---------------------------------------------------------------- errors

test("ThrowException rejects with the exact HubException message", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(c.invoke("ThrowException", "An error occurred."), T_CALL, "ThrowException");
    assert.equal(err.message,
        "An unexpected error occurred invoking 'ThrowException' on the server. HubException: An error occurred.");
    // The connection survives a failed invocation.
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

test("unknown hub method rejects and the connection survives (ASP.NET parity)", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(c.invoke("NoSuchMethod", 1), T_CALL, "NoSuchMethod");
    assert.match(err.message,
        /^(Failed to invoke 'NoSuchMethod' due to an error on the server\. HubException: Method does not exist\.|Unknown hub method 'NoSuchMethod')$/);
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

test("wrong argument count rejects and the connection survives (ASP.NET parity)", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(c.invoke("Echo"), T_CALL, "Echo without arguments");
    t.log(`error: ${err.message}`);
    assert.match(err.message, /^Failed to invoke 'Echo' due to an error on the server\./);
    const err2 = await rejectsWith(c.invoke("Echo", "a", "b"), T_CALL, "Echo with two arguments");
    t.log(`error: ${err2.message}`);
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

test("invoke() of a streaming method is rejected (ASP.NET parity)", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(c.invoke("Stream"), T_CALL, "invoke Stream");
    assert.equal(err.message,
        "The client attempted to invoke the streaming 'Stream' method with a non-streaming invocation.");
    const err2 = await rejectsWith(c.invoke("EmptyStream"), T_CALL, "invoke EmptyStream");
    assert.equal(err2.message,
        "The client attempted to invoke the streaming 'EmptyStream' method with a non-streaming invocation.");
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

test("stream() of a non-streaming method is rejected (ASP.NET parity)", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(collect(c, "Echo", "42"), T_CALL, "stream Echo");
    assert.equal(err.message,
        "The client attempted to invoke the non-streaming 'Echo' method with a streaming invocation.");
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

// ---------------------------------------------------------------- server -> client calls

test("InvokeWithString pushes Message to the caller (client method names case-insensitive)", async (t) => {
    const c = build(t);
    const got = [];
    c.on("mEsSaGe", (...args) => { got.push(args); });
    await withTimeout(c.start(), T_START, "start");
    const message = "你好 SignalR！";
    assert.equal(await call(c, "InvokeWithString", message), null);
    await waitUntil(() => got.length >= 1, T_CALL, "Message push");
    await sleep(100);
    assert.deepEqual(got, [[message]]);
});

test("SendCustomObject pushes the same object back as CustomObject", async (t) => {
    const c = build(t);
    const got = deferred();
    c.on("CustomObject", (obj) => got.resolve(obj));
    await withTimeout(c.start(), T_START, "start");
    await withTimeout(c.send("SendCustomObject", { Name: "test", Value: 42 }), T_CALL, "send");
    assert.deepEqual(await withTimeout(got.promise, T_CALL, "CustomObject push"), { Name: "test", Value: 42 });
    assert.equal(await call(c, "SendCustomObject", { Name: "again", Value: -1 }), null);
});

// ---------------------------------------------------------------- server -> client streams

test("Stream yields a, b, c then completes", async (t) => {
    const c = await connect(t);
    assert.deepEqual(await collect(c, "Stream"), ["a", "b", "c"]);
    // Twice on the same connection, concurrently, to check invocation id routing.
    const [x, y] = await Promise.all([collect(c, "Stream"), collect(c, "Stream")]);
    assert.deepEqual(x, ["a", "b", "c"]);
    assert.deepEqual(y, ["a", "b", "c"]);
});

test("EmptyStream completes with no items", async (t) => {
    const c = await connect(t);
    assert.deepEqual(await collect(c, "EmptyStream"), []);
});

test("StreamThrowException errors the stream with the exact message", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(collect(c, "StreamThrowException", "An error occurred."), T_CALL, "stream");
    assert.equal(err.message,
        "An unexpected error occurred invoking 'StreamThrowException' on the server. HubException: An error occurred.");
    assert.deepEqual(err.itemsSoFar, []);
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

test("disposing an InfiniteStream subscription cancels it (server calls StreamCanceled)", async (t) => {
    const c = build(t);
    const canceled = deferred();
    c.on("StreamCanceled", (...args) => canceled.resolve(args));
    await withTimeout(c.start(), T_START, "start");
    const events = [];
    const subscription = c.stream("InfiniteStream").subscribe({
        next: (item) => events.push(["next", item]),
        complete: () => events.push(["complete"]),
        error: (err) => events.push(["error", err.message]),
    });
    // Let the server start the stream before canceling it.
    assert.equal(await call(c, "Echo", "barrier"), "barrier");
    subscription.dispose();
    assert.deepEqual(await withTimeout(canceled.promise, T_CALL, "StreamCanceled push"), []);
    assert.deepEqual(events, [], "no items, completion or error after cancel");
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

// ---------------------------------------------------------------- client -> server streams

test("StreamingConcat concatenates a client-to-server stream", async (t) => {
    const c = await connect(t);
    const subject = new signalR.Subject();
    const result = c.invoke("StreamingConcat", subject);
    subject.next("Hello ");
    await sleep(20);
    subject.next("world");
    subject.next("!");
    subject.complete();
    assert.equal(await withTimeout(result, T_CALL, "StreamingConcat"), "Hello world!");
});

test("StreamingConcat with an empty client stream returns an empty string", async (t) => {
    const c = await connect(t);
    const subject = new signalR.Subject();
    const result = c.invoke("StreamingConcat", subject);
    subject.complete();
    assert.equal(await withTimeout(result, T_CALL, "StreamingConcat"), "");
});

test("two client streams at once on one connection stay separate", async (t) => {
    const c = await connect(t);
    const s1 = new signalR.Subject();
    const s2 = new signalR.Subject();
    const r1 = c.invoke("StreamingConcat", s1);
    const r2 = c.invoke("StreamingConcat", s2);
    s1.next("1a");
    s2.next("2a");
    s1.next("1b");
    s2.next("2b");
    s2.complete();
    s1.complete();
    assert.equal(await withTimeout(r2, T_CALL, "r2"), "2a2b");
    assert.equal(await withTimeout(r1, T_CALL, "r1"), "1a1b");
});

test("a client stream completed with an error fails the invocation", async (t) => {
    const c = await connect(t);
    const subject = new signalR.Subject();
    const result = c.invoke("StreamingConcat", subject);
    subject.next("Hello ");
    subject.error(new Error("Something bad"));
    const err = await rejectsWith(result, T_CALL, "StreamingConcat");
    assert.match(err.message, /^An unexpected error occurred invoking 'StreamingConcat' on the server\./);
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

// ---------------------------------------------------------------- types

test("EchoComplexObject round-trips bytes, dates, guids, arrays", async (t) => {
    const c = await connect(t);
    const complex = {
        ByteArray: IS_MSGPACK ? new Uint8Array([0x68, 0x65, 0x6c, 0x6c, 0x6f]) : "aGVsbG8=",
        DateTime: IS_MSGPACK ? new Date(Date.UTC(2002, 3, 1, 10, 20, 15)) : "2002-04-01T10:20:15Z",
        Guid: "00010203-0405-0607-0706-050403020100",
        IntArray: [0x01, 0x02, 0x03, 0xff],
        String: "Hello, World!",
    };
    const value = await call(c, "EchoComplexObject", complex);
    if (IS_MSGPACK && value && value.ByteArray instanceof Uint8Array) {
        value.ByteArray = new Uint8Array(value.ByteArray);
    }
    assert.deepEqual(value, complex);
});

test("SendComplexObject returns the canonical complex object", async (t) => {
    const c = await connect(t);
    const value = await call(c, "SendComplexObject");
    const expected = {
        ByteArray: IS_MSGPACK ? new Uint8Array([1, 2, 3]) : "AQID",
        DateTime: IS_MSGPACK ? new Date(Date.UTC(2000, 0, 1)) : "2000-01-01T00:00:00Z",
        Guid: "00010203-0405-0607-0706-050403020100",
        IntArray: [1, 2, 3],
        String: "hello world",
    };
    if (IS_MSGPACK && value && value.ByteArray instanceof Uint8Array) {
        value.ByteArray = new Uint8Array(value.ByteArray);
    }
    assert.deepEqual(value, expected);
});

test("edge-case strings round-trip through Echo", async (t) => {
    const c = await connect(t);
    // Strings that trip up framing or naive codecs: empty, look-alikes of other
    // JSON values, and the JSON record separator inside a string.
    for (const v of ["", "0", "null", "a\u001ebrecord-separator"]) {
        assert.equal(await call(c, "Echo", v), v);
    }
});

// ---------------------------------------------------------------- HTTP context

test("GetContentTypeHeader is null for the connect request (a GET)", async (t) => {
    const c = await connect(t);
    assert.equal(await call(c, "GetContentTypeHeader"), null);
});

test("GetCookie reads cookies sent with the connect request", async (t) => {
    const c = await connect(t, {
        options: { headers: { Cookie: "testCookie=testValue; testCookie2=testValue2" } },
    });
    assert.equal(await call(c, "GetCookie", "testCookie"), "testValue");
    assert.equal(await call(c, "GetCookie", "testCookie2"), "testValue2");
    assert.equal(await call(c, "GetCookie", "missingCookie"), null);
});

// ---------------------------------------------------------------- client results

test("InvokeClientResult returns the client handler's return value", async (t) => {
    const c = build(t);
    const seen = [];
    c.on("ClientResult", (v) => {
        seen.push(v);
        return v + 1;
    });
    await withTimeout(c.start(), T_START, "start");
    assert.equal(await call(c, "InvokeClientResult", 41), 42);
    assert.deepEqual(seen, [41]);
});

test("InvokeClientResult awaits an async client handler", async (t) => {
    const c = build(t);
    c.on("ClientResult", async (v) => {
        await sleep(100);
        return v * 2;
    });
    await withTimeout(c.start(), T_START, "start");
    assert.equal(await call(c, "InvokeClientResult", 21), 42);
});

test("InvokeClientResult propagates a client handler error", async (t) => {
    const c = build(t);
    c.on("ClientResult", () => {
        throw new Error("boom");
    });
    await withTimeout(c.start(), T_START, "start");
    const err = await rejectsWith(c.invoke("InvokeClientResult", 1), T_CALL, "InvokeClientResult");
    assert.match(err.message, /boom/);
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

test("InvokeClientResult without a client handler fails the invocation", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(c.invoke("InvokeClientResult", 1), T_CALL, "InvokeClientResult");
    assert.match(err.message, /Client didn't provide a result/);
    assert.equal(await call(c, "Echo", "still alive"), "still alive");
});

// ---------------------------------------------------------------- groups and users

/** Four connections: a1 and a2 are user A, b1 is user B, anon has no user. */
async function crowd(t) {
    const userA = uniq("userA");
    const userB = uniq("userB");
    const specs = [
        ["a1", userA],
        ["a2", userA],
        ["b1", userB],
        ["anon", undefined],
    ];
    const conns = {};
    for (const [name, user] of specs) {
        const c = build(t, { token: user === undefined ? undefined : makeJwt(JWT_SECRET, user) });
        const inbox = [];
        c.on("Send", (...args) => { inbox.push(args); });
        await withTimeout(c.start(), T_START, `start ${name}`);
        conns[name] = { name, user, c, inbox, id: c.connectionId };
    }
    for (const x of Object.values(conns)) {
        assert.equal(await call(x.c, "GetUserIdentifier"), x.user === undefined ? null : x.user,
            `GetUserIdentifier of ${x.name}`);
    }
    return { userA, userB, conns };
}

/**
 * Runs `action(message)` and checks that exactly the connections named in
 * `expected` receive Send(message) once, and no other connection of the crowd
 * receives it within the quiet period.
 */
async function expectDelivery(crowdConns, what, action, expected) {
    const message = uniq(what);
    const result = await withTimeout(action(message), T_CALL, what);
    assert.equal(result, null, `${what} completes with null`);
    const count = (x) => x.inbox.filter((args) => args.length === 1 && args[0] === message).length;
    const all = Object.values(crowdConns);
    await waitUntil(() => expected.every((n) => count(crowdConns[n]) >= 1), T_CALL,
        `${what}: Send(message) at ${expected.join(", ")}`).catch((err) => {
        const got = all.filter((x) => count(x) > 0).map((x) => x.name);
        throw new Error(`${err.message} (got it: [${got.join(", ")}])`);
    });
    await sleep(QUIET);
    const actual = Object.fromEntries(all.map((x) => [x.name, count(x)]));
    const wanted = Object.fromEntries(all.map((x) => [x.name, expected.includes(x.name) ? 1 : 0]));
    assert.deepEqual(actual, wanted, `${what}: deliveries per connection`);
}

test("groups: SendToGroup, SendToGroups, OthersInGroup, GroupExcept, LeaveGroup", async (t) => {
    const { conns } = await crowd(t);
    const { a1, a2, b1, anon } = conns;
    const g1 = uniq("g1");
    const g2 = uniq("g2");
    assert.equal(await call(a1.c, "JoinGroup", g1), null);
    assert.equal(await call(b1.c, "JoinGroup", g1), null);
    assert.equal(await call(a2.c, "JoinGroup", g2), null);
    // Joining twice is harmless: still one delivery.
    assert.equal(await call(a1.c, "JoinGroup", g1), null);

    await expectDelivery(conns, "SendToGroup from non-member",
        (m) => anon.c.invoke("SendToGroup", g1, m), ["a1", "b1"]);
    await expectDelivery(conns, "SendToGroup from member",
        (m) => a1.c.invoke("SendToGroup", g1, m), ["a1", "b1"]);
    await expectDelivery(conns, "SendToGroups",
        (m) => anon.c.invoke("SendToGroups", [g1, g2], m), ["a1", "a2", "b1"]);
    await expectDelivery(conns, "SendToGroups with an unknown group",
        (m) => anon.c.invoke("SendToGroups", [uniq("nobody"), g2], m), ["a2"]);
    await expectDelivery(conns, "SendToOthersInGroup",
        (m) => a1.c.invoke("SendToOthersInGroup", g1, m), ["b1"]);
    await expectDelivery(conns, "SendToGroupExcept",
        (m) => anon.c.invoke("SendToGroupExcept", g1, m, [b1.id]), ["a1"]);
    await expectDelivery(conns, "SendToGroupExcept with empty list",
        (m) => anon.c.invoke("SendToGroupExcept", g1, m, []), ["a1", "b1"]);
    await expectDelivery(conns, "SendToGroup of an empty group",
        (m) => a1.c.invoke("SendToGroup", uniq("empty"), m), []);

    assert.equal(await call(b1.c, "LeaveGroup", g1), null);
    await expectDelivery(conns, "SendToGroup after LeaveGroup",
        (m) => anon.c.invoke("SendToGroup", g1, m), ["a1"]);
    // Leaving a group one is not in is harmless.
    assert.equal(await call(b1.c, "LeaveGroup", g1), null);

    // A closed connection leaves its groups.
    await withTimeout(a1.c.stop(), T_CALL, "stop a1");
    delete conns.a1;
    await expectDelivery(conns, "SendToGroup after member disconnected",
        (m) => anon.c.invoke("SendToGroup", g1, m), []);
});

test("users: SendToUser, SendToUsers reach every connection of the user", async (t) => {
    const { userA, userB, conns } = await crowd(t);
    const { a1, b1, anon } = conns;
    await expectDelivery(conns, "SendToUser A",
        (m) => anon.c.invoke("SendToUser", userA, m), ["a1", "a2"]);
    await expectDelivery(conns, "SendToUser B from A",
        (m) => a1.c.invoke("SendToUser", userB, m), ["b1"]);
    await expectDelivery(conns, "SendToUser to self",
        (m) => b1.c.invoke("SendToUser", userB, m), ["b1"]);
    await expectDelivery(conns, "SendToUsers A+B",
        (m) => anon.c.invoke("SendToUsers", [userA, userB], m), ["a1", "a2", "b1"]);
    await expectDelivery(conns, "SendToUser unknown user",
        (m) => anon.c.invoke("SendToUser", uniq("nobody"), m), []);
    // A user id that is only a case variant of a real one is a different user (ASP.NET is ordinal).
    await expectDelivery(conns, "SendToUser case variant",
        (m) => anon.c.invoke("SendToUser", userA.toUpperCase(), m), []);

    // After a1 disconnects, user A is still reachable through a2.
    await withTimeout(a1.c.stop(), T_CALL, "stop a1");
    delete conns.a1;
    await expectDelivery(conns, "SendToUser A after one connection left",
        (m) => anon.c.invoke("SendToUser", userA, m), ["a2"]);
});

test("connections and all: SendToConnection(s), SendToAll, SendToOthers, SendToAllExcept", async (t) => {
    const { conns } = await crowd(t);
    const { a1, a2, b1, anon } = conns;
    await expectDelivery(conns, "SendToConnection",
        (m) => a1.c.invoke("SendToConnection", b1.id, m), ["b1"]);
    await expectDelivery(conns, "SendToConnection unknown id",
        (m) => a1.c.invoke("SendToConnection", "no-such-connection", m), []);
    await expectDelivery(conns, "SendToConnections",
        (m) => b1.c.invoke("SendToConnections", [a1.id, anon.id], m), ["a1", "anon"]);
    await expectDelivery(conns, "SendToAll",
        (m) => a2.c.invoke("SendToAll", m), ["a1", "a2", "b1", "anon"]);
    await expectDelivery(conns, "SendToOthers",
        (m) => a1.c.invoke("SendToOthers", m), ["a2", "b1", "anon"]);
    await expectDelivery(conns, "SendToAllExcept",
        (m) => anon.c.invoke("SendToAllExcept", m, [a2.id, b1.id]), ["a1", "anon"]);
    await expectDelivery(conns, "SendToAllExcept empty list",
        (m) => anon.c.invoke("SendToAllExcept", m, []), ["a1", "a2", "b1", "anon"]);
});

// ---------------------------------------------------------------- reconnect

test("Disconnect(true) with automatic reconnect: reconnecting, reconnected with a new id", async (t) => {
    const c = build(t, { reconnect: true });
    const reconnecting = deferred();
    const reconnected = deferred();
    const closed = [];
    c.onreconnecting((err) => reconnecting.resolve(err));
    c.onreconnected((id) => reconnected.resolve(id));
    c.onclose((err) => closed.push(err));
    const pushes = [];
    c.on("Message", (m) => { pushes.push(m); });
    await withTimeout(c.start(), T_START, "start");
    const firstId = c.connectionId;
    assert.equal(await call(c, "GetCallerConnectionId"), firstId);

    await withTimeout(c.send("Disconnect", true), T_CALL, "send Disconnect(true)");
    const err = await withTimeout(reconnecting.promise, T_CALL, "onreconnecting");
    t.log(`onreconnecting error: ${err && err.message}`);
    const newId = await withTimeout(reconnected.promise, T_START, "onreconnected");
    assert.ok(newId, "onreconnected gets the new connection id");
    assert.notEqual(newId, firstId, "a reconnect is a new connection");
    assert.equal(c.connectionId, newId);
    assert.equal(c.state, signalR.HubConnectionState.Connected);
    assert.equal(await call(c, "GetCallerConnectionId"), newId);
    assert.equal(await call(c, "Echo", "after reconnect"), "after reconnect");
    assert.equal(await call(c, "InvokeWithString", "push after reconnect"), null);
    await waitUntil(() => pushes.includes("push after reconnect"), T_CALL, "push after reconnect");
    assert.deepEqual(closed, [], "onclose must not fire on a reconnect");
});

test("Disconnect(false) with automatic reconnect: onclose, no reconnect", async (t) => {
    const c = build(t, { reconnect: true });
    let reconnecting = 0;
    const closed = deferred();
    c.onreconnecting(() => {
        reconnecting += 1;
    });
    c.onclose((err) => closed.resolve(err));
    await withTimeout(c.start(), T_START, "start");
    await withTimeout(c.send("Disconnect", false), T_CALL, "send Disconnect(false)");
    const err = await withTimeout(closed.promise, T_CALL, "onclose");
    t.log(`onclose error: ${err && err.message}`);
    await sleep(500);
    assert.equal(reconnecting, 0, "onreconnecting must not fire");
    assert.equal(c.state, signalR.HubConnectionState.Disconnected);
});

test("Disconnect(true) without automatic reconnect closes the connection", async (t) => {
    const c = build(t);
    const closed = deferred();
    c.onclose((err) => closed.resolve(err));
    await withTimeout(c.start(), T_START, "start");
    await withTimeout(c.send("Disconnect", true), T_CALL, "send Disconnect(true)");
    await withTimeout(closed.promise, T_CALL, "onclose");
    assert.equal(c.state, signalR.HubConnectionState.Disconnected);
});

test("withStatefulReconnect: a server that does not offer it still connects normally", async (t) => {
    const c = new signalR.HubConnectionBuilder()
        .withUrl(TESTHUB, { transport: TRANSPORT, logger: t.logger, logMessageContent: true })
        .withHubProtocol(protocol())
        .withStatefulReconnect()
        .configureLogging(t.logger)
        .build();
    t.defer(() => c.stop());
    await withTimeout(c.start(), T_START, "start");
    assert.equal(await call(c, "Echo", "stateful?"), "stateful?");
    assert.deepEqual(await collect(c, "Stream"), ["a", "b", "c"]);
});

if (!IS_MSGPACK) {
    // Slow (about 22 s), so only in the JSON run. ASP.NET pings every 15 s
    // (KeepAliveInterval); the client gives up after serverTimeoutInMilliseconds
    // (30 s by default) without any message. Here 20 s: only server pings keep
    // an idle connection alive.
    test("an idle connection is kept alive by server pings", async (t) => {
        const c = build(t);
        const closed = [];
        c.onclose((err) => closed.push(err));
        c.serverTimeoutInMilliseconds = 20000;
        await withTimeout(c.start(), T_START, "start");
        assert.equal(await call(c, "Echo", "before idle"), "before idle");
        await sleep(22000);
        assert.deepEqual(closed.map((e) => e && e.message), [], "the connection must not time out");
        assert.equal(c.state, signalR.HubConnectionState.Connected);
        assert.equal(await call(c, "Echo", "after idle"), "after idle");
    }, {
        timeoutMs: 40000,
        skip: TRANSPORT_NAME === "LongPolling"
            ? "Long Polling has inherent keep-alive: no server pings, and the client arms no server timeout"
            : null,
    });
}

// ---------------------------------------------------------------- skipNegotiation

test("skipNegotiation with WebSockets transport works", async (t) => {
    const c = await connect(t, { options: { skipNegotiation: true } });
    assert.equal(c.connectionId, null, "no connection id without negotiate");
    assert.equal(await call(c, "Echo", "skipped"), "skipped");
    assert.equal(await call(c, "GetActiveTransportName"), "WebSockets");
    const serverId = await call(c, "GetCallerConnectionId");
    assert.equal(typeof serverId, "string");
    assert.ok(serverId.length > 0);
    assert.deepEqual(await collect(c, "Stream"), ["a", "b", "c"]);
    assert.equal(await call(c, "GetUserIdentifier"), null);
}, { skip: WS_ONLY });

test("skipNegotiation passes the access token", async (t) => {
    const user = uniq("skipper");
    const c = await connect(t, { token: makeJwt(JWT_SECRET, user), options: { skipNegotiation: true } });
    assert.equal(await call(c, "GetUserIdentifier"), user);
}, { skip: WS_ONLY });

test("skipNegotiation + automatic reconnect survives Disconnect(true)", async (t) => {
    const c = build(t, { reconnect: true, options: { skipNegotiation: true } });
    const reconnected = deferred();
    c.onreconnected((id) => reconnected.resolve(id));
    await withTimeout(c.start(), T_START, "start");
    await withTimeout(c.send("Disconnect", true), T_CALL, "send Disconnect(true)");
    assert.equal(await withTimeout(reconnected.promise, T_START, "onreconnected"), undefined);
    assert.equal(await call(c, "Echo", "test"), "test");
}, { skip: WS_ONLY });

// ---------------------------------------------------------------- authentication

test("/testhub: anonymous has no user, a valid token sets the user", async (t) => {
    const anon = await connect(t);
    assert.equal(await call(anon, "GetUserIdentifier"), null);
    const user = uniq("user");
    const c = await connect(t, { token: makeJwt(JWT_SECRET, user) });
    assert.equal(await call(c, "GetUserIdentifier"), user);
});

test("/testhub: an invalid token is rejected with 401", async (t) => {
    const c = build(t, { token: makeJwt(`${JWT_SECRET}-wrong`, "mallory") });
    const err = await rejectsWith(c.start(), T_START, "start with bad token");
    t.log(`start error: ${err.message}`);
    assert.match(err.message, /401/);
    assert.equal(c.state, signalR.HubConnectionState.Disconnected);
});

test("/authorizedhub: start() without a token rejects with 401", async (t) => {
    const c = build(t, { url: AUTHHUB });
    const err = await rejectsWith(c.start(), T_START, "start without token");
    t.log(`start error: ${err.message}`);
    assert.match(err.message, /Status code '401'/);
    assert.equal(c.state, signalR.HubConnectionState.Disconnected);
});

test("/authorizedhub: expired and badly signed tokens are rejected with 401", async (t) => {
    for (const [what, token] of [
        ["expired", makeJwt(JWT_SECRET, "late", { expiresIn: -3600 })],
        ["bad signature", makeJwt(`not-${JWT_SECRET}`, "forger")],
        ["garbage", "not.a.jwt"],
    ]) {
        const c = build(t, { url: AUTHHUB, token });
        const err = await rejectsWith(c.start(), T_START, `start with ${what} token`);
        t.log(`${what}: ${err.message}`);
        assert.match(err.message, /401/, `${what} token`);
    }
});

test("/authorizedhub: skipNegotiation without a token is refused", async (t) => {
    const c = build(t, { url: AUTHHUB, options: { skipNegotiation: true } });
    const err = await rejectsWith(c.start(), T_START, "start without token");
    t.log(`start error: ${err.message}`);
    assert.equal(c.state, signalR.HubConnectionState.Disconnected);
}, { skip: WS_ONLY });

test("/authorizedhub: a valid token connects; Echo and GetUserIdentifier work", async (t) => {
    const user = uniq("authorized");
    const c = await connect(t, { url: AUTHHUB, token: makeJwt(JWT_SECRET, user) });
    const message = "你好，世界！";
    assert.equal(await call(c, "Echo", message), message);
    assert.equal(await call(c, "GetUserIdentifier"), user);
});

test("/authorizedhub: the token factory is called again on reconnect", async (t) => {
    const user = uniq("refresh");
    let calls = 0;
    const c = build(t, {
        url: AUTHHUB,
        reconnect: true,
        options: {
            accessTokenFactory: () => {
                calls += 1;
                return makeJwt(JWT_SECRET, user);
            },
        },
    });
    const reconnected = deferred();
    c.onreconnected((id) => reconnected.resolve(id));
    await withTimeout(c.start(), T_START, "start");
    const before = calls;
    // Induce a reconnect from the client side, like ASP.NET's own "can reconnect" test.
    c.serverTimeout();
    await withTimeout(reconnected.promise, T_START, "onreconnected");
    assert.ok(calls > before, "accessTokenFactory called again");
    assert.equal(await call(c, "GetUserIdentifier"), user);
});

await runner.run();
