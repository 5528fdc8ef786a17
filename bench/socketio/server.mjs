// Socket.IO peer of the feedhub benchmark: one Node process, WebSocket transport only,
// `@socket.io/redis-adapter` (classic pub/sub) for scale-out, and one room per user: a
// client connecting with `?user=ID` joins room `ID`. Events are published from outside
// with the `@socket.io/redis-emitter` wire format (the load generator writes it to Redis
// directly): PUBLISH `socket.io#/#<room>#` msgpack [uid, {type: 2, data: ["feed", payload],
// nsp: "/"}, {rooms: [room], except: [], flags: {}}]. That is the same one-PUBLISH-per-event
// work feedhub and the bare peer do for `PUBLISH feed-<user>`.
//
// Usage: node server.mjs --port 5201 --redis-url redis://127.0.0.1:6379
// Prints "LISTENING <port>" once it accepts connections.

import { createServer } from "node:http";
import { Server } from "socket.io";
import { createAdapter } from "@socket.io/redis-adapter";
import { createClient } from "redis";

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i > 0 && i + 1 < process.argv.length ? process.argv[i + 1] : fallback;
}

const port = Number(arg("port", "5201"));
const host = arg("host", "127.0.0.1");
const redisUrl = arg("redis-url", "redis://127.0.0.1:6379");

const pubClient = createClient({ url: redisUrl });
const subClient = pubClient.duplicate();
pubClient.on("error", (e) => console.error("redis pub error", e.message));
subClient.on("error", (e) => console.error("redis sub error", e.message));
await Promise.all([pubClient.connect(), subClient.connect()]);

const httpServer = createServer();
const io = new Server(httpServer, {
  transports: ["websocket"],
  serveClient: false,
  adapter: createAdapter(pubClient, subClient),
  // SignalR's keep-alive period, so idle CPU compares like with like.
  pingInterval: 15000,
  pingTimeout: 20000,
  perMessageDeflate: false,
  maxHttpBufferSize: 32 * 1024,
});

io.on("connection", (socket) => {
  const user = socket.handshake.query.user ?? socket.handshake.auth?.user;
  if (typeof user !== "string" || user.length === 0 || user.length > 128) {
    socket.disconnect(true);
    return;
  }
  socket.join(user);
});

httpServer.maxConnections = 1_000_000;
httpServer.listen(port, host, () => {
  console.log(`LISTENING ${host}:${httpServer.address().port}`);
});

function shutdown() {
  io.close();
  Promise.allSettled([pubClient.quit(), subClient.quit()]).finally(() => process.exit(0));
  setTimeout(() => process.exit(0), 2000).unref();
}
process.on("SIGTERM", shutdown);
process.on("SIGINT", shutdown);
