// The feed hub (/hubs/feed) with @microsoft/signalr and tokens of an identity
// provider: RS256, verified with the provider's public key (protocol-tests/jwt.rs
// makes the tokens and starts the server with --jwt-public-key or --jwt-jwks-url).
//
// Environment (besides FEEDHUB_URL):
//   FEEDHUB_USER           the user the tokens name
//   FEEDHUB_RS256_TOKEN    a valid RS256 token (an hour)
//   FEEDHUB_FOREIGN_TOKEN  an RS256 token signed with a key the server does not know
//   FEEDHUB_SHORT_TOKEN    a valid RS256 token that expires a few seconds after the start

import assert from "node:assert/strict";

import { Runner, deferred, env, rejectsWith, require, withTimeout } from "./lib.mjs";

const signalR = require("@microsoft/signalr");

const BASE_URL = env("FEEDHUB_URL").replace(/\/+$/, "");
const USER = env("FEEDHUB_USER");
const TOKEN = env("FEEDHUB_RS256_TOKEN");
const FOREIGN = env("FEEDHUB_FOREIGN_TOKEN");
const SHORT = env("FEEDHUB_SHORT_TOKEN");
const FEED_HUB = `${BASE_URL}/hubs/feed`;

const T_CALL = 5000;
const T_START = 10000;
// The short token lives a few seconds; the close follows its expiry.
const T_EXPIRY = 20000;

const runner = new Runner("JWT (RS256) with @microsoft/signalr");
const test = (name, fn, opts) => runner.test(name, fn, opts);

function build(t, tokenFactory, reconnect) {
    let b = new signalR.HubConnectionBuilder()
        .withUrl(FEED_HUB, {
            transport: signalR.HttpTransportType.WebSockets,
            accessTokenFactory: tokenFactory,
            logger: t.logger,
        })
        .configureLogging(t.logger);
    if (reconnect) {
        b = b.withAutomaticReconnect([0, 500, 1000, 2000]);
    }
    const c = b.build();
    t.defer(() => c.stop());
    return c;
}

// First: the short token must still be valid when this starts.
test("an expiring token: Close with the reason, allowReconnect, back with a fresh token", async (t) => {
    // The first connection (negotiate and the WebSocket both ask the factory) gets the
    // short token; once the server closed it, the reconnect gets a fresh one.
    let fresh = 0;
    let expired = false;
    const c = build(t, () => {
        if (!expired) {
            return SHORT;
        }
        fresh++;
        return TOKEN;
    }, true);
    const reconnecting = deferred();
    const reconnected = deferred();
    const closed = deferred();
    c.onreconnecting((err) => {
        expired = true;
        reconnecting.resolve(err);
    });
    c.onreconnected((id) => reconnected.resolve(id));
    c.onclose((err) => closed.resolve(err));
    await withTimeout(c.start(), T_START, "start");
    assert.equal(await withTimeout(c.invoke("WhoAmI"), T_CALL, "WhoAmI"), USER);
    // allowReconnect: true makes the client reconnect instead of closing for good.
    const err = await withTimeout(
        Promise.race([reconnecting.promise, closed.promise.then((e) => {
            throw new Error(`closed without reconnecting: ${e}`);
        })]),
        T_EXPIRY,
        "the close at token expiry",
    );
    t.log(`reconnecting after: ${err && err.message}`);
    assert.match(String(err && err.message), /access token expired/);
    await withTimeout(reconnected.promise, T_START, "the reconnect with a fresh token");
    assert.ok(fresh >= 1, "the token factory was asked again");
    assert.equal(await withTimeout(c.invoke("WhoAmI"), T_CALL, "WhoAmI after the reconnect"), USER);
});

test("an RS256 token connects and names its user (sub)", async (t) => {
    const c = build(t, () => TOKEN);
    await withTimeout(c.start(), T_START, "start");
    assert.equal(await withTimeout(c.invoke("WhoAmI"), T_CALL, "WhoAmI"), USER);
});

test("an RS256 token signed with an unknown key gets 401", async (t) => {
    const c = build(t, () => FOREIGN);
    const err = await rejectsWith(c.start(), T_START, "start with a foreign token");
    assert.match(err.message, /401/);
});

await runner.run();
