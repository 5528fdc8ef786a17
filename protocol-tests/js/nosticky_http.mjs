// No sticky sessions over the HTTP transports: the official @microsoft/signalr client,
// forced to Server-Sent Events or Long Polling (no stateful reconnect), against two feedhub
// instances behind the round-robin TCP proxy, driven by protocol-tests/nosticky.rs.
//
// The proxy picks the next instance per TCP connection, and Node's fetch keeps connections
// alive, so the client gets an HttpClient that sends every request (negotiate, polls, sends,
// DELETE) on a fresh TCP connection: consecutive requests alternate between the instances,
// and about half of them land on the instance that does not own the connection (the one that
// answered negotiate) and must be forwarded to the owner over the backplane. The SSE stream
// itself is one GET of the `eventsource` polyfill the client uses in Node.
//
// Checks: 1,000 Echo invocations, 1,000 Record sends processed once each and in order, a
// 1,000-item server-to-client stream once each and in order, the same connection id
// throughout, OnConnected once and OnDisconnected never before stop, no onclose until stop.
// Prints messages/s each way and the echo round-trip latency (p50/p99).
//
// Env: FEEDHUB_URL (the proxy), FEEDHUB_TRANSPORT (ServerSentEvents | LongPolling),
// FEEDHUB_PROTOCOL (json | messagepack; messagepack only with LongPolling).

import assert from "node:assert/strict";
import http from "node:http";

import { Runner, env, require, withTimeout } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const TRANSPORT_NAME = env("FEEDHUB_TRANSPORT");
const PROTOCOL = env("FEEDHUB_PROTOCOL", "json");
if (TRANSPORT_NAME !== "ServerSentEvents" && TRANSPORT_NAME !== "LongPolling") {
    console.error(`FEEDHUB_TRANSPORT must be ServerSentEvents or LongPolling, not '${TRANSPORT_NAME}'`);
    process.exit(2);
}
if (PROTOCOL !== "json" && PROTOCOL !== "messagepack") {
    console.error(`FEEDHUB_PROTOCOL must be json or messagepack, not '${PROTOCOL}'`);
    process.exit(2);
}
if (PROTOCOL === "messagepack" && TRANSPORT_NAME === "ServerSentEvents") {
    console.error("MessagePack cannot run over Server-Sent Events (Text only)");
    process.exit(2);
}
const TRANSPORT = signalR.HttpTransportType[TRANSPORT_NAME];
const HUB = `${BASE_URL}/statehub`;
const COUNT = 1000;

/** What a request was, for the log and the request-order summary. */
function kindOf(method, url) {
    const u = new URL(url);
    if (u.pathname.endsWith("/negotiate")) return "negotiate";
    if (method === "GET") return "poll";
    if (method === "POST") return "send";
    return method;
}

/**
 * An HttpClient that opens a fresh TCP connection for every request (`agent: false`,
 * `Connection: close`), so the round-robin proxy spreads the requests of one SignalR
 * connection over both instances. Behaves as the client's default FetchHttpClient otherwise:
 * AbortError on abort, TimeoutError on timeout, HttpError(body or status text, status) on a
 * non-2xx answer, an ArrayBuffer for `responseType: "arraybuffer"`.
 */
class FreshConnectionHttpClient extends signalR.HttpClient {
    constructor(logger) {
        super();
        this.logger = logger;
        this.counts = { negotiate: 0, poll: 0, send: 0, DELETE: 0 };
        this.statuses = {};
        /** The first requests in issue order (`kind status`), to report the order. */
        this.first = [];
    }

    send(request) {
        if (request.abortSignal && request.abortSignal.aborted) {
            return Promise.reject(new signalR.AbortError());
        }
        if (!request.method) return Promise.reject(new Error("No method defined."));
        if (!request.url) return Promise.reject(new Error("No url defined."));
        const kind = kindOf(request.method, request.url);
        this.counts[kind] = (this.counts[kind] || 0) + 1;
        const entry = { kind, status: "pending" };
        if (this.first.length < 12) this.first.push(entry);

        let body;
        const headers = { "X-Requested-With": "XMLHttpRequest", ...(request.headers || {}), Connection: "close" };
        if (request.content !== undefined && request.content !== "") {
            if (request.content instanceof ArrayBuffer || ArrayBuffer.isView(request.content)) {
                body = ArrayBuffer.isView(request.content)
                    ? Buffer.from(request.content.buffer, request.content.byteOffset, request.content.byteLength)
                    : Buffer.from(request.content);
                headers["Content-Type"] = "application/octet-stream";
            } else {
                body = Buffer.from(String(request.content), "utf8");
                headers["Content-Type"] = "text/plain;charset=UTF-8";
            }
        }
        headers["Content-Length"] = String(body ? body.length : 0);

        return new Promise((resolve, reject) => {
            let settled = false;
            let timer = null;
            const finish = (err, value) => {
                if (settled) return;
                settled = true;
                if (timer) clearTimeout(timer);
                if (request.abortSignal) request.abortSignal.onabort = null;
                entry.status = err ? (err.statusCode || (err.constructor && err.constructor.name) || "error") : value.statusCode;
                this.statuses[entry.status] = (this.statuses[entry.status] || 0) + 1;
                if (err) reject(err);
                else resolve(value);
            };
            const req = http.request(request.url, { method: request.method, headers, agent: false }, (res) => {
                const chunks = [];
                res.on("data", (c) => chunks.push(c));
                res.on("error", (e) => finish(e));
                res.on("aborted", () => finish(new Error(`${kind}: response aborted`)));
                res.on("end", () => {
                    const buf = Buffer.concat(chunks);
                    const status = res.statusCode;
                    const statusText = res.statusMessage || "";
                    if (status < 200 || status > 299) {
                        const text = buf.toString("utf8");
                        this.logger.log(signalR.LogLevel.Warning, `${request.method} ${request.url}: ${status} ${text || statusText}`);
                        finish(new signalR.HttpError(text || statusText, status));
                        return;
                    }
                    const content = request.responseType === "arraybuffer"
                        ? buf.buffer.slice(buf.byteOffset, buf.byteOffset + buf.length)
                        : buf.toString("utf8");
                    finish(null, new signalR.HttpResponse(status, statusText, content));
                });
            });
            req.on("error", (e) => finish(e));
            if (request.abortSignal) {
                request.abortSignal.onabort = () => {
                    req.destroy();
                    finish(new signalR.AbortError());
                };
            }
            if (request.timeout) {
                timer = setTimeout(() => {
                    this.logger.log(signalR.LogLevel.Warning, "Timeout from HTTP request.");
                    req.destroy();
                    finish(new signalR.TimeoutError());
                }, request.timeout);
            }
            req.end(body);
        });
    }

    getCookieString() {
        return "";
    }
}

function build(t) {
    const httpClient = new FreshConnectionHttpClient(t.logger);
    const c = new signalR.HubConnectionBuilder()
        .withUrl(HUB, { transport: TRANSPORT, logger: t.logger, httpClient })
        .withHubProtocol(PROTOCOL === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
        .configureLogging(t.logger)
        .build();
    c.http = httpClient;
    t.defer(() => c.stop());
    return c;
}

function quantiles(samples) {
    const s = [...samples].sort((a, b) => a - b);
    const q = (p) => s[Math.min(s.length - 1, Math.floor(p * s.length))];
    return { p50: q(0.5), p99: q(0.99) };
}

const ONE_TO_N = Array.from({ length: COUNT }, (_, i) => i + 1);

const runner = new Runner(`no sticky sessions over ${TRANSPORT_NAME} (${PROTOCOL}): two instances behind a round-robin proxy`);

runner.test(`${TRANSPORT_NAME} across instances: 1,000 echoes, 1,000 sends, 1,000 streamed, one connection`, async (t) => {
    const c = build(t);
    const events = [];
    c.onreconnecting((e) => events.push(`reconnecting: ${e}`));
    c.onclose((e) => events.push(`closed: ${e}`));
    const order = () => c.http.first.map((e) => `${e.kind}=${e.status}`).join(" ");
    try {
        await withTimeout(c.start(), 15000, "start");
    } catch (err) {
        // The request order tells where it broke (the proxy alternates instances per request).
        err.message += ` (HTTP requests so far, in issue order: ${order()})`;
        throw err;
    }
    assert.equal(c.state, signalR.HubConnectionState.Connected);
    const id = c.connectionId;
    assert.ok(id, "a connection id");
    console.log(`# HTTP requests until start() resolved, in issue order: ${order()}`);

    // 1,000 invocations, one at a time: each a POST (and on Long Polling a poll answer),
    // alternating between the instances.
    const rtts = [];
    const echoStart = performance.now();
    for (let i = 0; i < COUNT; i++) {
        const t0 = performance.now();
        const v = await withTimeout(c.invoke("Echo", i), 10000, `Echo ${i}`);
        rtts.push(performance.now() - t0);
        assert.equal(Number(v), i, `Echo ${i}`);
    }
    const echoMs = performance.now() - echoStart;
    const rtt = quantiles(rtts);
    assert.equal(await withTimeout(c.invoke("ConnectionId"), 10000, "ConnectionId"), id, "same connection id after the echoes");

    // 1,000 client -> server messages, each its own POST, processed once each, in order.
    const upStart = performance.now();
    for (let i = 1; i <= COUNT; i++) {
        await withTimeout(c.send("Record", i), 10000, `send Record ${i}`);
    }
    const recorded = (await withTimeout(c.invoke("Recorded"), 10000, "Recorded")).map(Number);
    const upMs = performance.now() - upStart;
    assert.deepEqual(recorded, ONE_TO_N, "1,000 sent, processed once each, in order");

    // 1,000 server -> client stream items, once each, in order.
    const items = [];
    const downStart = performance.now();
    await withTimeout(new Promise((resolve, reject) => {
        c.stream("Numbers", COUNT, 0, []).subscribe({ next: (v) => items.push(Number(v)), error: reject, complete: resolve });
    }), 60000, "stream Numbers(1000)");
    const downMs = performance.now() - downStart;
    assert.deepEqual(items, ONE_TO_N, "1,000 streamed, once each, in order");

    assert.equal(c.connectionId, id, "same connection id throughout");
    assert.equal(await withTimeout(c.invoke("ConnectionId"), 10000, "ConnectionId"), id, "the server sees the same connection");
    assert.deepEqual((await withTimeout(c.invoke("Counters"), 10000, "Counters")).map(Number), [1, 0],
        "OnConnected once (on one instance), OnDisconnected never");
    assert.deepEqual(events, [], "no onclose/onreconnecting before stop");
    assert.equal(c.state, signalR.HubConnectionState.Connected);

    await withTimeout(c.stop(), 10000, "stop");
    assert.deepEqual(events, ["closed: undefined"], "onclose once, without error, on stop");

    const h = c.http;
    console.log(`# requests: ${JSON.stringify(h.counts)} statuses: ${JSON.stringify(h.statuses)}`);
    const rate = (ms) => (COUNT / (ms / 1000)).toFixed(0);
    console.log(`MEASURE nosticky-${TRANSPORT_NAME}-${PROTOCOL}: client->server ${rate(upMs)} msg/s (1,000 sends + Recorded, ${upMs.toFixed(0)} ms); ` +
        `server->client ${rate(downMs)} msg/s (1,000-item stream, ${downMs.toFixed(0)} ms); ` +
        `echo RTT p50=${rtt.p50.toFixed(2)} ms p99=${rtt.p99.toFixed(2)} ms (${rate(echoMs)} echoes/s); ` +
        `${Object.values(h.counts).reduce((a, b) => a + b, 0)} HTTP requests on fresh TCP connections`);
}, { timeoutMs: 180000 });

await runner.run();
