// RabbitMQ ingest end to end with @microsoft/signalr: events published to the FeedUpdate
// exchange (by amqplib, as a post service would) reach exactly their recipients' connections.
// FEEDHUB_PROTOCOL = json | messagepack picks the hub protocol.
//   FEEDHUB_AMQP_URL       broker URL
//   FEEDHUB_AMQP_EXCHANGE  the (test-unique) exchange feedhub consumes from
//   FEEDHUB_USER_PREFIX    unique prefix of the user ids of this run

import assert from "node:assert/strict";

import { Runner, env, makeJwt, require, sleep, uniq, waitUntil, withTimeout, withoutOffset } from "./lib.mjs";

const signalR = require("@microsoft/signalr");
const { MessagePackHubProtocol } = require("@microsoft/signalr-protocol-msgpack");
const amqp = require("amqplib");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const JWT_SECRET = env("FEEDHUB_JWT_SECRET");
const PROTOCOL = env("FEEDHUB_PROTOCOL", "json");
const AMQP_URL = env("FEEDHUB_AMQP_URL");
const EXCHANGE = env("FEEDHUB_AMQP_EXCHANGE");
const PREFIX = env("FEEDHUB_USER_PREFIX");
const FEED_HUB = `${BASE_URL}/hubs/feed`;

const T_CALL = 5000;
const T_START = 10000;
const QUIET = 500;

const A = `${PREFIX}-a`;
const B = `${PREFIX}-b`;
const C = `${PREFIX}-c`;

let publisher = null;

async function channel() {
    if (publisher === null) {
        const conn = await withTimeout(amqp.connect(AMQP_URL), T_CALL, "amqp connect");
        const ch = await withTimeout(conn.createConfirmChannel(), T_CALL, "amqp channel");
        publisher = { conn, ch };
    }
    return publisher.ch;
}

/** Publishes `body` (object → JSON, string → raw bytes) with a publisher confirm. */
async function publish(routingKey, body, options = {}) {
    const ch = await channel();
    const bytes = Buffer.from(typeof body === "string" ? body : JSON.stringify(body));
    ch.publish(EXCHANGE, routingKey, bytes, { persistent: true, contentType: "application/json", ...options });
    await withTimeout(ch.waitForConfirms(), T_CALL, `confirm of ${routingKey}`);
}

async function subscriber(t, name, user) {
    const c = new signalR.HubConnectionBuilder()
        .withUrl(FEED_HUB, {
            transport: signalR.HttpTransportType.WebSockets,
            accessTokenFactory: () => makeJwt(JWT_SECRET, user),
            logger: t.logger,
        })
        .withHubProtocol(PROTOCOL === "messagepack" ? new MessagePackHubProtocol() : new signalR.JsonHubProtocol())
        .configureLogging(t.logger)
        .build();
    t.defer(() => c.stop());
    const inbox = [];
    c.on("FeedUpdated", (...args) => {
        t.log(`${name} got FeedUpdated ${JSON.stringify(args)}`);
        inbox.push(withoutOffset(args));
    });
    await withTimeout(c.start(), T_START, `start ${name}`);
    return { name, user, c, inbox };
}

async function everyone(t) {
    return [
        await subscriber(t, "a#1", A),
        await subscriber(t, "a#2", A),
        await subscriber(t, "b", B),
        await subscriber(t, "c", C),
    ];
}

function same(a, b) {
    try {
        assert.deepStrictEqual(a, b);
        return true;
    } catch {
        return false;
    }
}

const countOf = (sub, payload) => sub.inbox.filter((args) => args.length === 1 && same(args[0], payload)).length;

/** Exactly the named subscribers get `payload` once; the others get nothing new. */
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

const runner = new Runner(`RabbitMQ ingest (${PROTOCOL})`);
const test = (name, fn, opts) => runner.test(name, fn, opts);

test("recipients body reaches every connection of each recipient and nobody else", async (t) => {
    const subs = await everyone(t);
    const payload = { kind: "post.created", text: "héllo — 你好", n: 42, neg: -7, ok: true, none: null, tags: ["x"], nested: { l: [1, 2] } };
    const id = uniq("evt");
    await publish("feed", { recipients: [A, B], payload, id });
    // The body's id travels inside the payload (inserted because the payload has none).
    await expectFeed(subs, { id, ...payload }, ["a#1", "a#2", "b"]);
});

test("routing key feed.<user> delivers the whole body to that user, with the AMQP message id", async (t) => {
    const subs = await everyone(t);
    const body = { text: "for c only", seq: 1 };
    const messageId = uniq("msg");
    await publish(`feed.${C}`, body, { messageId });
    await expectFeed(subs, { id: messageId, ...body }, ["c"]);
    // A payload with its own id keeps it; a non-object payload is forwarded unchanged.
    const own = { id: uniq("own"), text: "own id" };
    await publish(`feed.${B}`, own, { messageId: uniq("ignored") });
    await expectFeed(subs, own, ["b"]);
    await publish(`feed.${A}`, [1, "two", { three: 3 }]);
    await expectFeed(subs, [1, "two", { three: 3 }], ["a#1", "a#2"]);
});

test("a malformed message is skipped and the next good one still arrives", async (t) => {
    const subs = await everyone(t);
    await publish(`feed.${B}`, "{not json");
    await publish("feed", { payload: { orphan: true } });
    await publish("feed", { recipients: [""], payload: { bad: true } });
    const good = { text: "after the bad ones", id: uniq("good") };
    await publish(`feed.${B}`, good);
    await expectFeed(subs, good, ["b"]);
    for (const s of subs) {
        assert.ok(s.inbox.every((args) => same(args[0], good)), `${s.name} got only the good event: ${JSON.stringify(s.inbox)}`);
    }
});

test("events to one user arrive once each and in publish order", async (t) => {
    const subs = await everyone(t);
    const ch = await channel();
    const payloads = Array.from({ length: 50 }, (_, i) => ({ seq: i, id: uniq("seq") }));
    for (const p of payloads) {
        ch.publish(EXCHANGE, `feed.${C}`, Buffer.from(JSON.stringify(p)), { persistent: true });
    }
    await withTimeout(ch.waitForConfirms(), T_CALL, "confirms");
    const c = subs.find((s) => s.name === "c");
    await waitUntil(() => c.inbox.length >= payloads.length, T_CALL, "50 events at c");
    await sleep(QUIET);
    assert.deepEqual(c.inbox.map((args) => args[0]), payloads);
    for (const s of subs.filter((x) => x.name !== "c")) {
        assert.deepEqual(s.inbox, [], `${s.name} gets nothing`);
    }
});

try {
    await runner.run();
} finally {
    if (publisher) {
        await publisher.conn.close().catch(() => {});
    }
}
