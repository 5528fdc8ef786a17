// The old @aspnet/signalr 1.1.4 client (ASP.NET Core 2.x era) against
// feedhub's /testhub. It speaks negotiate version 0: it sends no
// negotiateVersion, expects no connectionToken and connects with
// ?id=<connectionId>; over WebSockets in Node the token goes in ?access_token=.
// FEEDHUB_TRANSPORT (WebSockets | ServerSentEvents | LongPolling) picks the transport.

import assert from "node:assert/strict";

import {
    Runner, deferred, env, makeJwt, rejectsWith, require, sleep, uniq, waitUntil, withTimeout,
} from "./lib.mjs";

const signalR = require("@aspnet/signalr");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const TESTHUB = `${BASE_URL}/testhub`;
const TRANSPORT_NAME = env("FEEDHUB_TRANSPORT", "WebSockets");
const TRANSPORT = signalR.HttpTransportType[TRANSPORT_NAME];
if (TRANSPORT === undefined) {
    console.error(`unknown FEEDHUB_TRANSPORT '${TRANSPORT_NAME}'`);
    process.exit(2);
}

const T_CALL = 5000;
const T_START = 10000;

/** Records every HTTP exchange the client makes (negotiate in particular). */
class SpyHttpClient extends signalR.DefaultHttpClient {
    constructor(logger) {
        super(logger);
        this.exchanges = [];
    }

    send(request) {
        const entry = { method: request.method, url: request.url };
        this.exchanges.push(entry);
        return super.send(request).then((response) => {
            entry.status = response.statusCode;
            entry.content = response.content;
            return response;
        }, (err) => {
            entry.error = err;
            throw err;
        });
    }
}

function build(t, { token, transport = TRANSPORT } = {}) {
    const httpClient = new SpyHttpClient(t.logger);
    const options = { transport, logger: t.logger, logMessageContent: true, httpClient };
    if (token !== undefined) {
        options.accessTokenFactory = () => token;
    }
    const connection = new signalR.HubConnectionBuilder()
        .withUrl(TESTHUB, options)
        .configureLogging(t.logger)
        .build();
    connection.spy = httpClient;
    t.defer(() => connection.stop());
    return connection;
}

async function connect(t, opts) {
    const c = build(t, opts);
    await withTimeout(c.start(), T_START, "start()");
    return c;
}

function call(c, method, ...args) {
    return withTimeout(c.invoke(method, ...args), T_CALL, `invoke ${method}`);
}

const runner = new Runner(`@aspnet/signalr 1.1.4 (negotiate v0, ${TRANSPORT_NAME})`);
const test = (name, fn, opts) => runner.test(name, fn, opts);

test("negotiate v0: no negotiateVersion sent, connectionId and no connectionToken returned", async (t) => {
    const c = await connect(t);
    const negotiate = c.spy.exchanges.find((e) => /\/negotiate(\?|$)/.test(e.url));
    assert.ok(negotiate, "the client negotiated");
    t.log(`negotiate ${negotiate.method} ${negotiate.url} -> ${negotiate.status} ${negotiate.content}`);
    assert.equal(negotiate.method, "POST");
    assert.doesNotMatch(negotiate.url, /negotiateVersion/, "1.x sends no negotiateVersion");
    assert.equal(negotiate.status, 200);
    const body = JSON.parse(negotiate.content);
    assert.equal(typeof body.connectionId, "string");
    assert.ok(body.connectionId.length > 0);
    assert.equal(body.connectionToken, undefined, "a v0 response has no connectionToken");
    // ASP.NET always writes negotiateVersion (0 here); some clients require it.
    assert.equal(body.negotiateVersion, 0, "negotiateVersion is 0 (ASP.NET parity)");
    assert.ok(Array.isArray(body.availableTransports));
    const ws = body.availableTransports.find((x) => x.transport === "WebSockets");
    assert.ok(ws, "WebSockets offered");
    assert.deepEqual([...ws.transferFormats].sort(), ["Binary", "Text"]);
    // In v0 the connection id is the id the client connects with and the one the hub sees.
    assert.equal(await call(c, "GetCallerConnectionId"), body.connectionId);
});

test("Echo round-trips", async (t) => {
    const c = await connect(t);
    const message = "你好，世界！";
    assert.equal(await call(c, "Echo", message), message);
    assert.equal(await call(c, "GetActiveTransportName"), TRANSPORT_NAME);
});

test("InvokeWithString pushes Message", async (t) => {
    const c = build(t);
    const got = [];
    c.on("message", (m) => { got.push(m); });
    await withTimeout(c.start(), T_START, "start()");
    const message = "你好 SignalR！";
    assert.equal(await call(c, "InvokeWithString", message), null);
    await waitUntil(() => got.length >= 1, T_CALL, "Message push");
    assert.deepEqual(got, [message]);
});

test("Stream yields a, b, c then completes", async (t) => {
    const c = await connect(t);
    const items = [];
    const done = deferred();
    c.stream("Stream").subscribe({
        next: (item) => items.push(item),
        complete: () => done.resolve(),
        error: (err) => done.reject(err),
    });
    await withTimeout(done.promise, T_CALL, "stream completion");
    assert.deepEqual(items, ["a", "b", "c"]);
});

test("InfiniteStream cancel reaches the server (StreamCanceled)", async (t) => {
    const c = build(t);
    const canceled = deferred();
    c.on("StreamCanceled", () => canceled.resolve());
    await withTimeout(c.start(), T_START, "start()");
    const subscription = c.stream("InfiniteStream").subscribe({ next() {}, complete() {}, error() {} });
    assert.equal(await call(c, "Echo", "barrier"), "barrier");
    subscription.dispose();
    await withTimeout(canceled.promise, T_CALL, "StreamCanceled push");
});

test("ThrowException rejects with the server's message", async (t) => {
    const c = await connect(t);
    const err = await rejectsWith(c.invoke("ThrowException", "An error occurred."), T_CALL, "ThrowException");
    assert.equal(err.message,
        "An unexpected error occurred invoking 'ThrowException' on the server. HubException: An error occurred.");
});

test("access token via ?access_token= sets the user", async (t) => {
    const user = uniq("old-client");
    const c = await connect(t, { token: makeJwt(JWT_SECRET, user) });
    assert.equal(await call(c, "GetUserIdentifier"), user);
});

test("stop() closes cleanly", async (t) => {
    const c = build(t);
    const closed = deferred();
    c.onclose((err) => closed.resolve(err));
    await withTimeout(c.start(), T_START, "start()");
    assert.equal(await call(c, "Echo", "bye"), "bye");
    await withTimeout(c.stop(), T_CALL, "stop()");
    assert.equal(await withTimeout(closed.promise, T_CALL, "onclose"), undefined);
    // A 1.x client can start the same HubConnection again.
    await withTimeout(c.start(), T_START, "second start()");
    assert.equal(await call(c, "Echo", "again"), "again");
    await sleep(10);
});

await runner.run();
