// The official @microsoft/signalr client against feedhub serving TLS: FEEDHUB_URL is
// https://localhost:PORT, and the test CA that signed the server's certificate is trusted
// through NODE_EXTRA_CA_CERTS (no certificate check is switched off). Every transport:
// WebSockets (wss://, JSON and MessagePack), Server-Sent Events and Long Polling (https://);
// each connection calls WhoAmI and receives a feed event published over https.

import assert from "node:assert/strict";

import { Runner, env, makeJwt, require, uniq, waitUntil, withTimeout } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const API_KEY = env("FEEDHUB_API_KEY");
const FEED_HUB = `${BASE_URL}/hubs/feed`;

const T_START = 10000;
const T_CALL = 5000;

assert.ok(BASE_URL.startsWith("https://"), `FEEDHUB_URL must be https: ${BASE_URL}`);
assert.ok(process.env.NODE_EXTRA_CA_CERTS, "NODE_EXTRA_CA_CERTS names the test CA");

const runner = new Runner("official client over TLS");

async function publish(user, payload) {
    const response = await withTimeout(fetch(`${BASE_URL}/api/feed`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${API_KEY}` },
        body: JSON.stringify({ recipients: [user], payload }),
    }), T_CALL, "POST /api/feed over https");
    assert.equal(response.status, 202, await response.text());
}

function check(name, transport, protocol) {
    runner.test(name, async (t) => {
        const user = uniq("tls");
        const c = new signalR.HubConnectionBuilder()
            .withUrl(FEED_HUB, {
                transport,
                accessTokenFactory: () => makeJwt(JWT_SECRET, user),
                logger: t.logger,
            })
            .withHubProtocol(protocol === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
            .configureLogging(t.logger)
            .build();
        t.defer(() => c.stop());
        const inbox = [];
        c.on("FeedUpdated", (event) => inbox.push(event));
        await withTimeout(c.start(), T_START, "start");
        assert.equal(await withTimeout(c.invoke("WhoAmI"), T_CALL, "WhoAmI"), user);
        const text = `over TLS ${uniq("post")}`;
        await publish(user, { text });
        await waitUntil(() => inbox.some((e) => e && e.text === text), T_CALL, "FeedUpdated over TLS");
    });
}

check("WebSockets (wss://) with JSON", signalR.HttpTransportType.WebSockets, "json");
check("WebSockets (wss://) with MessagePack", signalR.HttpTransportType.WebSockets, "messagepack");
check("Server-Sent Events over https", signalR.HttpTransportType.ServerSentEvents, "json");
check("Long Polling over https with MessagePack", signalR.HttpTransportType.LongPolling, "messagepack");

runner.test("plain http:// to the TLS port is refused with a clear 400", async () => {
    const plain = BASE_URL.replace(/^https:/, "http:");
    const response = await withTimeout(fetch(`${plain}/healthz`), T_CALL, "plain GET");
    assert.equal(response.status, 400);
    assert.match(await response.text(), /https:\/\//);
});

await runner.run();
