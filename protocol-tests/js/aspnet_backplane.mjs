// ASP.NET Redis backplane interop: the official @microsoft/signalr client (JSON and
// MessagePack) connected to feedhub receives what a harness playing an ASP.NET server
// publishes on Redis (protocol-tests/aspnet_backplane.rs): the doc's C.2 bytes on the
// user channel and on a group channel, and an all-send with both protocols.
// Env: FEEDHUB_URL, FEEDHUB_JWT_SECRET, FEEDHUB_USER, FEEDHUB_GROUP. The script joins the
// group "ready-<user>" last: the harness publishes once it sees that subscription.

import assert from "node:assert/strict";

import { Runner, env, makeJwt, require, sleep, waitUntil, withTimeout } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const USER = env("FEEDHUB_USER");
const GROUP = env("FEEDHUB_GROUP");
const FEED_HUB = `${BASE_URL}/hubs/feed`;
const T_START = 10000;

function connect(t, protocol) {
    const c = new signalR.HubConnectionBuilder()
        .withUrl(FEED_HUB, {
            transport: signalR.HttpTransportType.WebSockets,
            accessTokenFactory: () => makeJwt(JWT_SECRET, USER),
            logger: t.logger,
        })
        .withHubProtocol(protocol === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
        .configureLogging(t.logger)
        .build();
    t.defer(() => c.stop());
    const got = [];
    c.on("FeedUpdated", (...args) => {
        t.log(`${protocol} FeedUpdated ${JSON.stringify(args)}`);
        got.push(["FeedUpdated", args]);
    });
    c.on("target", (...args) => {
        t.log(`${protocol} target ${JSON.stringify(args)}`);
        got.push(["target", args]);
    });
    return { c, got, protocol };
}

const runner = new Runner("aspnet_backplane");

runner.test("JSON and MessagePack clients receive an ASP.NET server's sends", async (t) => {
    const clients = [connect(t, "json"), connect(t, "messagepack")];
    for (const { c, protocol } of clients) {
        await withTimeout(c.start(), T_START, `start ${protocol}`);
        await withTimeout(c.invoke("Join", GROUP), T_START, `join ${protocol}`);
    }
    await withTimeout(clients[1].c.invoke("Join", `ready-${USER}`), T_START, "ready");
    for (const { got, protocol } of clients) {
        await waitUntil(() => got.length >= 3, 20000, `${protocol}: 3 messages`);
    }
    await sleep(300);
    for (const { got, protocol } of clients) {
        const sorted = got.map(([m, a]) => JSON.stringify([m, a])).sort();
        assert.deepEqual(sorted, [
            JSON.stringify(["FeedUpdated", [{ text: "hi" }]]),
            JSON.stringify(["FeedUpdated", [{ text: "hi" }]]),
            JSON.stringify(["target", []]),
        ], `${protocol} got ${JSON.stringify(got)}`);
    }
}, { timeoutMs: 45000 });

await runner.run();
