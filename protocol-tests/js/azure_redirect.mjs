// The official @microsoft/signalr client through an Azure SignalR serverless negotiate
// redirect (protocol-tests/azure_rest.rs starts feedhub and the "app").
//
// The client is pointed at the app (FEEDHUB_APP_URL); the app's negotiate answers
// {"url": "<feedhub>/client/?hub=feed", "accessToken": "<JWT signed with the access key>"},
// and the client follows it: it negotiates at <feedhub>/client/negotiate?hub=feed with the
// token and connects to <feedhub>/client/?hub=feed&id=… over FEEDHUB_TRANSPORT. The test
// then sends "Msg" to the token's user through the REST API; the script prints
// "received <text>" and passes when the text is FEEDHUB_EXPECT.
//
//   FEEDHUB_APP_URL     the app's hub URL (its /negotiate redirects)
//   FEEDHUB_TRANSPORT   WebSockets | ServerSentEvents | LongPolling
//   FEEDHUB_EXPECT      the text the REST send carries

import { env, require } from "./lib.mjs";

const signalR = require("@microsoft/signalr");

const appUrl = env("FEEDHUB_APP_URL");
const transport = env("FEEDHUB_TRANSPORT", "WebSockets");
const expect = env("FEEDHUB_EXPECT");

const conn = new signalR.HubConnectionBuilder()
    .withUrl(appUrl, { transport: signalR.HttpTransportType[transport] })
    .configureLogging(signalR.LogLevel.Warning)
    .build();
const got = new Promise((resolve) => conn.on("Msg", (text) => resolve(text)));
const timeout = (ms, what) =>
    new Promise((_, reject) => setTimeout(() => reject(new Error(`timed out: ${what}`)), ms));

try {
    await Promise.race([conn.start(), timeout(15000, "start")]);
    console.log(`connected ${conn.connectionId} over ${transport}`);
    const text = await Promise.race([got, timeout(20000, "the REST send")]);
    console.log(`received ${text}`);
    if (text !== expect) {
        console.log(`FAILED: expected ${expect}`);
        console.log("0 passed, 1 failed");
        process.exit(1);
    }
    await conn.stop();
    console.log("1 passed, 0 failed");
    process.exit(0);
} catch (e) {
    console.log(`FAILED: ${e}`);
    console.log("0 passed, 1 failed");
    process.exit(1);
}
