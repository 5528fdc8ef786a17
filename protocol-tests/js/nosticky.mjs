// No sticky sessions: the official @microsoft/signalr client (withStatefulReconnect)
// against two feedhub instances behind a round-robin TCP proxy, driven by
// protocol-tests/nosticky.rs. Consecutive TCP connections alternate between the
// instances, so after a cut the resumed WebSocket lands on the instance that does not own
// the connection and is relayed to the owner over the backplane.
//
// Checks: 1,000 streamed numbers and 1,000 client messages exactly once and in order across
// cuts, same connection id, no onreconnecting/onclose, the relay was used. Prints echo
// round-trip latency direct vs relayed (p50/p99).
//
// Env: FEEDHUB_URL (the proxy), FEEDHUB_PROTOCOL (json | messagepack).

import assert from "node:assert/strict";

import { Runner, env, require, sleep, withTimeout } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const PROTOCOL = env("FEEDHUB_PROTOCOL", "json");
const HUB = `${BASE_URL}/statehub`;

function build(t) {
    const c = new signalR.HubConnectionBuilder()
        .withUrl(HUB, { transport: signalR.HttpTransportType.WebSockets, logger: t.logger })
        .withHubProtocol(PROTOCOL === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
        .withStatefulReconnect()
        .configureLogging(t.logger)
        .build();
    t.defer(() => c.stop());
    return c;
}

async function echoLatencies(c, n) {
    const out = [];
    for (let i = 0; i < n; i++) {
        const t0 = performance.now();
        const v = await withTimeout(c.invoke("Echo", i), 5000, `Echo ${i}`);
        out.push(performance.now() - t0);
        assert.equal(Number(v), i);
    }
    out.sort((a, b) => a - b);
    const q = (p) => out[Math.min(out.length - 1, Math.floor(p * out.length))];
    return { p50: q(0.5), p99: q(0.99) };
}

const runner = new Runner(`no sticky sessions (${PROTOCOL}): two instances behind a round-robin proxy`);

runner.test("stateful WebSocket resumes on the other instance: 1,000 messages each way, none lost", async (t) => {
    const c = build(t);
    const events = [];
    c.onreconnecting((e) => events.push(`reconnecting: ${e}`));
    c.onclose((e) => events.push(`closed: ${e}`));
    await withTimeout(c.start(), 10000, "start");
    const id = c.connectionId;
    const [, , relaysBefore] = (await c.invoke("Resumes")).map(Number);

    // Negotiate went to one instance, the WebSocket to the other: direct to the owner.
    const direct = await echoLatencies(c, 300);

    // Cut: the resumed socket is the proxy's next connection, i.e. the other instance.
    await c.invoke("Cut");
    await sleep(300);
    assert.equal(await withTimeout(c.invoke("ConnectionId"), 5000, "ConnectionId after cut"), id);
    const [, , relaysAfter] = (await c.invoke("Resumes")).map(Number);
    assert.ok(relaysAfter > relaysBefore, "the resumed WebSocket was relayed to the owner");
    const relayed = await echoLatencies(c, 300);

    // 1,000 each way across two more cuts (owner direct again, then relayed again).
    const COUNT = 1000;
    const items = [];
    const done = new Promise((resolve, reject) => {
        c.stream("Numbers", COUNT, 1, [300, 700]).subscribe({ next: (v) => items.push(Number(v)), error: reject, complete: resolve });
    });
    const sending = (async () => {
        for (let i = 1; i <= COUNT; i++) {
            await c.send("Record", i);
            if (i % 50 === 0) await sleep(5);
        }
    })();
    await withTimeout(done, 60000, "stream");
    await withTimeout(sending, 60000, "sends");
    assert.deepEqual(items, Array.from({ length: COUNT }, (_, i) => i + 1), "1,000 streamed, once each, in order");
    const recorded = (await withTimeout(c.invoke("Recorded"), 5000, "Recorded")).map(Number);
    assert.deepEqual(recorded, Array.from({ length: COUNT }, (_, i) => i + 1), "1,000 sent, processed once each, in order");
    assert.equal(c.connectionId, id);
    assert.deepEqual((await c.invoke("Counters")).map(Number), [1, 0], "OnConnected once, OnDisconnected never");
    assert.deepEqual(events, [], "transparent to the app");
    console.log(`MEASURE nosticky-${PROTOCOL}: echo RTT direct p50=${direct.p50.toFixed(2)} ms p99=${direct.p99.toFixed(2)} ms; ` +
        `relayed p50=${relayed.p50.toFixed(2)} ms p99=${relayed.p99.toFixed(2)} ms; ` +
        `added p50=${(relayed.p50 - direct.p50).toFixed(2)} ms p99=${(relayed.p99 - direct.p99).toFixed(2)} ms`);
}, { timeoutMs: 120000 });

await runner.run();
