// Recovery on another instance with the official @microsoft/signalr client.
// FEEDHUB_URL / FEEDHUB_URL_B: two feedhub processes on one Redis; FEEDHUB_PID_A: the
// process behind FEEDHUB_URL, which this script kills (SIGKILL) mid-way.
// A user follows the feed on A with the README recipe (feed_follower.mjs); events are
// published through B; A is killed; more events are published; the page moves to B
// (MessagePack) and Recover there returns every missed event, once and in order.

import assert from "node:assert/strict";

import { feedFollower } from "./feed_follower.mjs";
import { Runner, env, makeJwt, require, sleep, uniq, waitUntil, withTimeout } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const URL_A = env("FEEDHUB_URL").replace(/\/+$/, "");
const URL_B = env("FEEDHUB_URL_B").replace(/\/+$/, "");
const PID_A = Number(env("FEEDHUB_PID_A"));
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const API_KEY = env("FEEDHUB_API_KEY");
const PREFIX = env("FEEDHUB_USER_PREFIX");
const T = 10000;

const runner = new Runner("Recover on another instance (@microsoft/signalr)");

function connect(t, base, user, protocol) {
    const c = new signalR.HubConnectionBuilder()
        .withUrl(`${base}/hubs/feed`, {
            transport: signalR.HttpTransportType.WebSockets,
            accessTokenFactory: () => makeJwt(JWT_SECRET, user),
            logger: t.logger,
        })
        .withHubProtocol(protocol === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
        .configureLogging(t.logger)
        .build();
    t.defer(() => c.stop());
    return c;
}

async function post(base, recipients, payload) {
    const response = await withTimeout(fetch(`${base}/api/feed`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${API_KEY}` },
        body: JSON.stringify({ recipients, payload }),
    }), T, "POST /api/feed");
    assert.equal(response.status, 202, await response.text());
}

runner.test("a client whose instance is killed gets every missed event from Recover on another instance", async (t) => {
    const user = `${PREFIX}-k`;
    const applied = []; // ids in apply order
    const seen = new Set();
    let reloads = 0;
    const follower = feedFollower({
        apply: (e) => {
            t.log(`apply ${JSON.stringify(e)}`);
            if (!seen.has(e.id)) { seen.add(e.id); applied.push(e); }
        },
        reload: async () => { reloads += 1; },
    });
    const a = connect(t, URL_A, user, "json");
    follower.attach(a);
    await withTimeout(a.start(), T, "start on A");
    await withTimeout(follower.recover(), T, "first load on A");
    assert.equal(follower.position().offset, 0, "a new user has no events");
    const ids = Array.from({ length: 12 }, (_, i) => uniq(`k${i + 1}`));
    for (const id of ids.slice(0, 4)) await post(URL_B, [user], { id, text: `event ${id}` });
    await waitUntil(() => applied.length === 4, T, "4 live events on A");
    assert.deepEqual(applied.map((e) => e.offset), [1, 2, 3, 4]);

    // A dies without a goodbye; events keep coming through B.
    process.kill(PID_A, "SIGKILL");
    t.log(`killed A (pid ${PID_A})`);
    for (const id of ids.slice(4, 10)) await post(URL_B, [user], { id, text: `event ${id}` });
    await waitUntil(() => a.state !== signalR.HubConnectionState.Connected, T, "A's connection closed");
    assert.equal(applied.length, 4, "nothing reached the dead instance's client");

    // The page moves to B (a load balancer would route it there) and recovers.
    const b = connect(t, URL_B, user, "messagepack");
    follower.attach(b);
    await withTimeout(b.start(), T, "start on B");
    const answer = await withTimeout(b.invoke("Recover", { offset: 4, epoch: follower.position().epoch }), T, "raw Recover on B");
    t.log(`Recover on B: ${JSON.stringify(answer)}`);
    assert.equal(answer.recovered, true);
    assert.equal(answer.epoch, follower.position().epoch, "one history, whichever instance reads it");
    assert.deepEqual(answer.events.map((e) => e.offset), [5, 6, 7, 8, 9, 10]);
    await withTimeout(follower.recover(), T, "recover on B");
    assert.deepEqual(applied.map((e) => e.id), ids.slice(0, 10), "every event once, in order");
    assert.deepEqual(applied.map((e) => e.offset), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    assert.equal(reloads, 0, "recovered: no reload");

    // Live again on B, continuing the offsets.
    for (const id of ids.slice(10)) await post(URL_B, [user], { id, text: `event ${id}` });
    await waitUntil(() => applied.length === 12, T, "live events on B");
    assert.deepEqual(applied.map((e) => e.offset).slice(10), [11, 12]);

    // A stale epoch (the history was lost) is never reported complete: the recipe reloads.
    const stale = await withTimeout(b.invoke("Recover", { offset: 12, epoch: "not-the-epoch" }), T, "stale epoch");
    assert.equal(stale.recovered, false);
    assert.equal(stale.offset, 12);
    await sleep(100);
}, { timeoutMs: 60000 });

await runner.run();
