#!/usr/bin/env python3
"""Half-open connection attack (issue 14) against one or more servers, side by side.

For each server: opens N connections from 127.0.0.2 ... 127.0.0.(1+A), each sending half a
request head and nothing more, holds them for --hold seconds (with --reopen, every dropped
one is opened again at once, a sustained attack), and meanwhile probes GET /healthz from
127.0.0.1 on a new connection every --probe-ms. Prints per server: connections opened and
refused, seconds until the server dropped a half-open connection (p50/max), /healthz latency
p50/p99 and errors (non-200, timeouts, resets), and the load average before and after.

    python3 bench/halfopen.py --server main=127.0.0.1:5801 --server new=127.0.0.1:5802 \
        --conns 20000 --addrs 40 --hold 30

Raises its own RLIMIT_NOFILE (as root, the hard limit too) to fit the connections.
"""

import argparse
import asyncio
import resource
import socket
import time


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    i = min(len(values) - 1, max(0, int(round(p / 100.0 * (len(values) - 1)))))
    return values[i]


async def open_half(host, port, src, stats, drops, stop, reopen):
    while not stop.is_set():
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.bind((src, 0))
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (host, port)), 10)
            sock.send(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-half: ")
        except Exception:
            stats["connect_errors"] += 1
            sock.close()
            if not reopen:
                return
            await asyncio.sleep(0.05)
            continue
        stats["opened"] += 1
        started = time.monotonic()
        loop = asyncio.get_running_loop()
        got = b""
        try:
            while not stop.is_set():
                reader = loop.sock_recv(sock, 4096)
                done, _ = await asyncio.wait(
                    [asyncio.ensure_future(reader), asyncio.ensure_future(stop.wait())],
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if stop.is_set():
                    break
                data = next(iter(done)).result()
                if not data:
                    break
                got += data
        except Exception:
            pass
        sock.close()
        if stop.is_set():
            stats["held_at_end"] += 1
            return
        if got.startswith(b"HTTP/1.1 503") or got.startswith(b"HTTP/1.1 429"):
            stats["refused_" + got[9:12].decode()] += 1
        else:
            drops.append(time.monotonic() - started)
        if not reopen:
            return


async def probe(host, port, lat, errors, stop, interval):
    while not stop.is_set():
        t0 = time.monotonic()
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection(host, port, local_addr=("127.0.0.1", 0)), 2)
            w.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            data = await asyncio.wait_for(r.read(), 2)
            w.close()
            if data.startswith(b"HTTP/1.1 200"):
                lat.append((time.monotonic() - t0) * 1000.0)
            else:
                errors[data[:12].decode(errors="replace") or "closed"] = errors.get(data[:12].decode(errors="replace") or "closed", 0) + 1
        except asyncio.TimeoutError:
            errors["timeout"] = errors.get("timeout", 0) + 1
        except Exception as e:
            errors[type(e).__name__] = errors.get(type(e).__name__, 0) + 1
        await asyncio.sleep(max(0.0, interval - (time.monotonic() - t0)))


async def attack(name, target, args):
    host, port = target.rsplit(":", 1)
    port = int(port)
    stats = {"opened": 0, "connect_errors": 0, "held_at_end": 0, "refused_503": 0, "refused_429": 0}
    drops, lat, errors = [], [], {}
    stop = asyncio.Event()
    before = loadavg()
    probe_task = asyncio.ensure_future(probe(host, port, lat, errors, stop, args.probe_ms / 1000.0))
    tasks = []
    t0 = time.monotonic()
    for i in range(args.conns):
        src = f"127.0.0.{2 + i % args.addrs}"
        tasks.append(asyncio.ensure_future(open_half(host, port, src, stats, drops, stop, args.reopen)))
    await asyncio.sleep(args.hold)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    await probe_task
    after = loadavg()
    print(
        f"[{name}] {target}: conns={args.conns} addrs={args.addrs} hold={args.hold}s reopen={args.reopen} "
        f"opened={stats['opened']} connect_errors={stats['connect_errors']} "
        f"refused_503={stats['refused_503']} refused_429={stats['refused_429']} held_at_end={stats['held_at_end']}"
    )
    print(
        f"[{name}]   half-open dropped by server: {len(drops)}; seconds until dropped p50={pct(drops, 50):.2f} "
        f"min={min(drops) if drops else float('nan'):.2f} max={max(drops) if drops else float('nan'):.2f}"
    )
    print(
        f"[{name}]   /healthz: ok={len(lat)} p50={pct(lat, 50):.1f} ms p99={pct(lat, 99):.1f} ms "
        f"max={max(lat) if lat else float('nan'):.1f} ms errors={errors}"
    )
    print(f"[{name}]   loadavg before: {before}  after: {after}  (elapsed {time.monotonic() - t0:.1f}s)")


async def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--server", action="append", required=True, help="name=host:port")
    ap.add_argument("--conns", type=int, default=20000)
    ap.add_argument("--addrs", type=int, default=40)
    ap.add_argument("--hold", type=float, default=30.0)
    ap.add_argument("--probe-ms", type=float, default=100.0)
    ap.add_argument("--reopen", action="store_true")
    ap.add_argument("--pause", type=float, default=5.0, help="seconds between servers")
    args = ap.parse_args()
    want = args.conns + 2048
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, max(want, resource.getrlimit(resource.RLIMIT_NOFILE)[1])))
    except (ValueError, OSError) as e:
        print(f"could not raise RLIMIT_NOFILE to {want}: {e}")
    print(f"RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)}; loadavg {loadavg()}")
    for i, s in enumerate(args.server):
        name, target = s.split("=", 1)
        if i:
            await asyncio.sleep(args.pause)
        await attack(name, target, args)


if __name__ == "__main__":
    asyncio.run(main())
