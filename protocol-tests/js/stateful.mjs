// Stateful reconnect with the official @microsoft/signalr client
// (withStatefulReconnect()), driven by protocol-tests/stateful.rs against /statehub
// through the round-robin proxy (FEEDHUB_URL is the proxy). The hub cuts every proxied
// connection when its stream reaches the numbers in `dropAt`; the client must resume
// transparently: every number exactly once and in order, the same connection id, no
// onreconnecting/onclose, OnConnected/OnDisconnected not run again, and every message the
// client sent during the cut processed exactly once.
//
// Env: FEEDHUB_URL, FEEDHUB_PROTOCOL (json | messagepack).

import assert from "node:assert/strict";

import { Runner, env, require, sleep, withTimeout } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const PROTOCOL = env("FEEDHUB_PROTOCOL", "json");
const HUB = `${BASE_URL}/statehub`;
const T_START = 10000;

function protocol() {
    return PROTOCOL === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol();
}

function build(t) {
    const c = new signalR.HubConnectionBuilder()
        .withUrl(HUB, {
            transport: signalR.HttpTransportType.WebSockets,
            logger: t.logger,
            logMessageContent: false,
        })
        .withHubProtocol(protocol())
        .withStatefulReconnect()
        .configureLogging(t.logger)
        .build();
    t.defer(() => c.stop());
    return c;
}

const runner = new Runner(`stateful reconnect (${PROTOCOL}) via round-robin proxy`);

runner.test("a stream survives two cut connections: every item once, in order, same connection", async (t) => {
    const c = build(t);
    const events = [];
    c.onreconnecting((e) => events.push(`reconnecting: ${e}`));
    c.onreconnected(() => events.push("reconnected"));
    c.onclose((e) => events.push(`closed: ${e}`));
    await withTimeout(c.start(), T_START, "start");
    const clientId = c.connectionId;
    const serverId = await withTimeout(c.invoke("ConnectionId"), 5000, "ConnectionId");
    assert.equal(serverId, clientId);

    const COUNT = 400;
    const DROP_AT = [100, 250];
    const items = [];
    const times = [];
    const streamDone = new Promise((resolve, reject) => {
        c.stream("Numbers", COUNT, 5, DROP_AT).subscribe({
            next: (v) => { items.push(Number(v)); times.push(performance.now()); },
            error: reject,
            complete: resolve,
        });
    });
    // Meanwhile the client keeps sending: these cross the cuts too.
    const SENDS = 150;
    const sending = (async () => {
        for (let i = 1; i <= SENDS; i++) {
            await c.send("Record", i);
            await sleep(10);
        }
    })();
    await withTimeout(streamDone, 60000, "stream completion");
    await withTimeout(sending, 60000, "sends");

    const expected = Array.from({ length: COUNT }, (_, i) => i + 1);
    assert.deepEqual(items, expected, "every streamed number exactly once and in order");
    // The longest pause between two items: the cut, the reconnect and the resend.
    let gap = 0;
    for (let i = 1; i < times.length; i++) {
        gap = Math.max(gap, times[i] - times[i - 1]);
    }
    const recorded = (await withTimeout(c.invoke("Recorded"), 5000, "Recorded")).map(Number);
    assert.deepEqual(recorded, Array.from({ length: SENDS }, (_, i) => i + 1),
        "every client message processed exactly once, in order");
    assert.equal(c.connectionId, clientId, "connection id unchanged");
    assert.equal(await c.invoke("ConnectionId"), serverId, "server-side connection id unchanged");
    const counters = (await c.invoke("Counters")).map(Number);
    assert.deepEqual(counters, [1, 0], "OnConnected once, OnDisconnected never");
    assert.deepEqual(events, [], "stateful reconnect is transparent (no onreconnecting/onclose)");
    assert.equal(c.state, signalR.HubConnectionState.Connected);
    const [resumes, resent] = (await c.invoke("Resumes")).map(Number);
    assert.ok(resumes >= DROP_AT.length, `server resumed ${resumes} times`);
    console.log(`MEASURE stateful-${PROTOCOL}: ${DROP_AT.length} cuts, server resumes=${resumes}, ` +
        `messages resent=${resent}, longest item gap=${gap.toFixed(1)} ms (5 ms cadence)`);
}, { timeoutMs: 90000 });

await runner.run();
