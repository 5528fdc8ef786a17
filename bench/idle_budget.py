#!/usr/bin/env python3
"""Per-connection live heap by component, from heaptrack's collapsed stacks.

The idle memory budget in bench/README.md: heaptrack records feedhub while N idle clients are
connected, feedhub is killed (SIGKILL) during the idle window, so what heaptrack counts as
"leaked" is the live heap at that moment. Then

    heaptrack_print -f feedhub.zst --print-peaks 0 --print-allocators 0 \
        --print-temporary 0 --print-leaks 0 --flamegraph-cost-type leaked -F live.fg
    bench/idle_budget.py N live.fg [more.fg ...]

prints a Markdown table of bytes per connection per component (one column per file; the
first matching rule wins, so the specific ones come first) and, for each file, the largest
stacks left in "other".
"""
import collections
import re
import sys

conns = int(sys.argv[1])
files = sys.argv[2:]
rules = [
 ("session parameters' box (kept by a moved-out Box until the session ended)", r"^(?!.*Handle::spawn)(?=.*session::task)"),
 ("identity's box (kept by a moved-out Box until the session ended)", r"^(?!.*Handle::spawn)(?!.*session::)(?=.*transports::bind)(?=.*boxed::Box<T>::new)"),
 ("session task (tokio task + session future)", r"feedhub::session::spawn.*Handle::spawn|session::spawn > .*bind_new_task|session::spawn.*Cell.*new"),
 ("WebSocket pump task (tokio task + pump future)", r"transports::websocket::\{closure\}(?!::\{closure\})[^;]*(Handle::spawn|bind_new_task)"),
 ("WebSocket stream (tungstenite read buffer, split lock, waker proxies)", r"transport::websocket::accept"),
 ("loop state (boxed Loop, invocation set)", r"session::Loop::run|Loop::new|boxed::Box<T>::new.*session::run"),
 ("link (inbound queue, wire, transport-gone token)", r"transport::link::"),
 ("connection record (Connection, aborted token, hub context token)", r"connection::Connection::new|hub::context::HubContext::new"),
 ("identity (JWT claims)", r"auth::decode|jsonwebtoken|auth::Claims"),
 ("connect request copy (headers, query string)", r"owned_headers|kept_query|transports::websocket::\{closure\}(?!.*feedhub::)"),
 ("ids and token records", r"ids::ConnectionId|negotiate::Tokens|auth::Authenticator::identity"),
 ("HTTP connection table (HttpConnection, connections map)", r"transports::register|connections::Connections::insert|transports::bind|transports::open"),
 ("hub registry, subscription and channel names", r"hub::registry|hub::subscriptions|backplane::channel|Backplane>::subscribe|hub::lifetime"),
 ("socket registration (tokio I/O driver)", r"accept_loop|PollEvented|RegistrationSet"),
 ("HTTP/admission leftovers (activity, fresh entry, hyper)", r"http::conn::|limits::|hyper::"),
 ("handshake leftovers", r"session::handshake|protocol::handshake"),
]
def clean(f):
    f = re.sub(r'::h[0-9a-f]{16}', '', f)
    f = f.replace('_$u7b$$u7b$closure$u7d$$u7d$', '{closure}').replace('$LT$','<').replace('$GT$','>').replace('$u20$',' ').replace('$C$',',').replace('..','::')
    return re.sub(r' \([^)]*\)$', '', f)
res = {}
for path in files:
    agg = collections.Counter(); other = collections.Counter()
    for line in open(path):
        stack, _, cost = line.rstrip('\n').rpartition(' ')
        fr = [clean(f) for f in stack.split(';')]
        # keep only frames from the innermost-most relevant part, joined
        text = ' > '.join(fr)
        # strip trailing frames after last feedhub frame except the lib frame right after
        for name, rx in rules:
            if re.search(rx, text):
                agg[name] += int(cost); break
        else:
            agg["other"] += int(cost)
            fh = [f for f in fr if 'feedhub::' in f]
            other[' > '.join(fh[-2:])] += int(cost)
    res[path] = (agg, other)
names = [r[0] for r in rules] + ["other"]
hdr = "| component | " + " | ".join(f.rsplit("/", 1)[-1].removesuffix(".fg") for f in files) + " |"
print(hdr); print("|---|" + "---:|"*len(files))
for n in names:
    print(f"| {n} | " + " | ".join(f"{res[f][0][n]/conns:,.0f}" for f in files) + " |")
print("| **total live heap** | " + " | ".join(f"**{sum(res[f][0].values())/conns:,.0f}**" for f in files) + " |")
for f in files:
    if True:
        print("\nother in", f)
        for k, c in res[f][1].most_common(8):
            print(f"  {c/conns:6.0f}  {k}")
