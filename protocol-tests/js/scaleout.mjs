// Two feedhub instances on one Redis, with the official @microsoft/signalr client:
// a user's JSON connection on instance A and MessagePack connection on instance B both
// receive events published through either instance; other users receive nothing.
// FEEDHUB_URL and FEEDHUB_URL_B are the instances; FEEDHUB_USER_PREFIX keeps user ids unique.

import assert from "node:assert/strict";

import { Runner, deferred, env, makeJwt, require, sleep, uniq, waitUntil, withTimeout, withoutOffset } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");

const URL_A = env("FEEDHUB_URL").replace(/\/+$/, "");
const URL_B = env("FEEDHUB_URL_B").replace(/\/+$/, "");
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const API_KEY = env("FEEDHUB_API_KEY");
const PREFIX = env("FEEDHUB_USER_PREFIX");

const T_CALL = 5000;
const T_START = 10000;
const QUIET = 500;

const runner = new Runner("scale-out over Redis (@microsoft/signalr, JSON + MessagePack)");
const test = (name, fn, opts) => runner.test(name, fn, opts);

async function subscriber(t, name, base, user, protocol) {
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
    const inbox = [];
    c.on("FeedUpdated", (...args) => {
        t.log(`${name} got FeedUpdated ${JSON.stringify(args)}`);
        inbox.push(withoutOffset(args));
    });
    await withTimeout(c.start(), T_START, `start ${name}`);
    return { name, c, inbox };
}

async function post(base, recipients, payload) {
    const response = await withTimeout(fetch(`${base}/api/feed`, {
        method: "POST",
        headers: { "Content-Type": "application/json", Authorization: `Bearer ${API_KEY}` },
        body: JSON.stringify({ recipients, payload }),
    }), T_CALL, "POST /api/feed");
    assert.equal(response.status, 202, await response.text());
}

function count(sub, payload) {
    return sub.inbox.filter((args) => {
        try {
            assert.deepStrictEqual(args, [payload]);
            return true;
        } catch {
            return false;
        }
    }).length;
}

async function expectExactly(subs, payload, expected) {
    await waitUntil(() => subs.filter((s) => expected.includes(s.name)).every((s) => count(s, payload) >= 1),
        T_CALL, `FeedUpdated at ${expected.join(", ")}`);
    await sleep(QUIET);
    for (const s of subs) {
        assert.equal(count(s, payload), expected.includes(s.name) ? 1 : 0, `${s.name} count of ${JSON.stringify(payload)}`);
    }
}

test("one user on two instances (JSON on A, MessagePack on B) gets every event once", async (t) => {
    const u = `${PREFIX}-u`;
    const v = `${PREFIX}-v`;
    const subs = [
        await subscriber(t, "u@A/json", URL_A, u, "json"),
        await subscriber(t, "u@B/msgpack", URL_B, u, "messagepack"),
        await subscriber(t, "v@B/json", URL_B, v, "json"),
    ];
    const p1 = { id: uniq("viaA"), text: "published on A", n: [1, 2.5, null], nested: { ok: true } };
    await post(URL_A, [u], p1);
    await expectExactly(subs, p1, ["u@A/json", "u@B/msgpack"]);
    const p2 = { id: uniq("viaB"), text: "published on B" };
    await post(URL_B, [u, v], p2);
    await expectExactly(subs, p2, ["u@A/json", "u@B/msgpack", "v@B/json"]);
    const p3 = { id: uniq("onlyV") };
    await post(URL_A, [v], p3);
    await expectExactly(subs, p3, ["v@B/json"]);
});

test("stopping the connection on one instance leaves the other receiving", async (t) => {
    const u = `${PREFIX}-w`;
    const a = await subscriber(t, "w@A/msgpack", URL_A, u, "messagepack");
    const b = await subscriber(t, "w@B/json", URL_B, u, "json");
    await withTimeout(b.c.stop(), T_CALL, "stop B");
    const p = { id: uniq("afterStop") };
    await post(URL_B, [u], p);
    const got = deferred();
    a.c.on("FeedUpdated", (x) => got.resolve(withoutOffset([x])[0]));
    if (count(a, p) === 0) {
        assert.deepEqual(await withTimeout(got.promise, T_CALL, "FeedUpdated at A"), p);
    }
    assert.equal(count(b, p), 0);
});

await runner.run();
