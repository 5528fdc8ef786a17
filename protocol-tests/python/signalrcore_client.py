"""Drive the Python `signalrcore` client against feedhub's /testhub.

Environment: FEEDHUB_URL (base URL), FEEDHUB_JWT_SECRET, FEEDHUB_PROTOCOL
(json | messagepack), FEEDHUB_TRANSPORT (websockets | longpolling | sse; the
client's documented option {"transport": HttpTransportType.X}). Prints one
line per test and a closing "N passed, M failed, K skipped" line; exits 0 only
if no test failed and at least one passed.

signalrcore 1.0.2 quirks this exercises (an ASP.NET server copes with all):
- it POSTs /negotiate without negotiateVersion and requires the response to
  carry an integer "negotiateVersion" (ASP.NET always writes it, 0 here);
- it then sends the handshake {"protocol":"json","version":0} (it reuses the
  negotiate version as hub protocol version; ASP.NET accepts version <= 1);
- its hand-written WebSocket client sends "Host: 127.0.0.1" without the port,
  puts the token in an Authorization header, and every hub message it sends
  carries a "headers" map;
- hub.stream() sends the StreamInvocation before the caller can subscribe,
  so items of a fast server are dropped ("no callback configured"): the
  script registers its handler first (Connection.stream);
- stop() hangs until the server sends something (see Connection.stop);
- with MessagePack its client-to-server stream messages are malformed (see
  client_stream_without_result, run with JSON only);
- hub errors (completion with error) go to the global on_error callback, not
  to the invocation's callback; client method handlers are matched by exact
  case and receive the argument list.

Its HTTP transports (1.0.2) have bugs of their own, found by capturing the
exchange with feedhub; each would fail the same way against ASP.NET Core:
- Long Polling hands at most ONE message per poll response to the hub
  (LongPollingBaseClient._append cuts the buffer at the first 0x1E and keeps
  the rest until the next poll returns). A server batches everything queued
  into one poll response (ASP.NET's LongPollingServerTransport does), so when
  two messages travel together (an invocation plus its completion, stream
  items) the rest waits for the next poll (keep-alive ping, poll timeout):
  server_push_reaches_handler and stream_yields_items are skipped.
- Long Polling always uses LongPollingTextClient (LongPollingTransport never
  receives is_binary; LongPollingBinaryClient.__init__ would raise TypeError
  from super(LongPollingTextClient, self)), which frames by 0x1E: MessagePack
  replies (varint length-prefixed) are never delivered. MessagePack over Long
  Polling cannot work (main refuses it).
- Long Polling GETs carry only "Accept: Text", not the connection's headers,
  so an access_token_factory token never reaches the polls (ASP.NET takes the
  user from the poll and would run the connection as anonymous; feedhub binds
  the connection token to the negotiating user and answers the polls 404). A
  real user passes the token in the URL as access_token instead (what browsers
  do): Connection does that for Long Polling. A 404 or 400 poll is swallowed
  (the OSError it raises is caught by its own except Exception), so the client
  re-polls in a tight loop instead of closing.
- Server-Sent Events: stop() closes the socket but its receive thread stays
  blocked in recv() until the server writes again (see Connection.stop).
- Server-Sent Events is Text-only (negotiate says so): MessagePack over SSE
  gets the handshake error, as from ASP.NET (main refuses it).
"""

import base64
import hashlib
import hmac
import json
import logging
import os
import secrets
import socket
import sys
import threading
import time
import traceback
import uuid
from urllib.parse import urlencode

from signalrcore.hub.handlers import StreamHandler
from signalrcore.hub_connection_builder import HubConnectionBuilder
from signalrcore.messages.stream_invocation_message import StreamInvocationMessage
from signalrcore.protocol.json_hub_protocol import JsonHubProtocol
from signalrcore.protocol.messagepack_protocol import MessagePackHubProtocol
from signalrcore.subject import Subject
from signalrcore.types import HttpTransportType

BASE_URL = os.environ.get("FEEDHUB_URL", "").rstrip("/")
JWT_SECRET = os.environ.get("FEEDHUB_JWT_SECRET", "")
PROTOCOL = os.environ.get("FEEDHUB_PROTOCOL", "json")
TRANSPORT = os.environ.get("FEEDHUB_TRANSPORT", "websockets")
TRANSPORTS = {
    "websockets": HttpTransportType.web_sockets,
    "longpolling": HttpTransportType.long_polling,
    "sse": HttpTransportType.server_sent_events,
}
# signalrcore's Long Polling client drops every header but Accept on its polls.
TOKEN_IN_QUERY = TRANSPORT == "longpolling"
TESTHUB = BASE_URL + "/testhub"

T_START = 10.0
T_CALL = 5.0


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def make_jwt(secret: str, sub: str, expires_in: int = 3600) -> str:
    now = int(time.time())
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    payload = b64url(json.dumps({"sub": sub, "iat": now, "nbf": now - 5, "exp": now + expires_in}).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = hmac.new(secret.encode("utf-8"), signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


def uniq(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(5)}"


class Captured(logging.Handler):
    """Keeps the client's log lines of the current test for failure reports."""

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.lines = []
        self.started = time.monotonic()

    def emit(self, record):
        ms = int((time.monotonic() - self.started) * 1000)
        try:
            self.lines.append(f"[{ms} ms] client {record.levelname.lower()}: {record.getMessage()}")
        except Exception:  # noqa: BLE001 - never let logging break a test
            pass

    def reset(self):
        self.lines = []
        self.started = time.monotonic()


CAPTURE = Captured()
_CLIENT_LOGGER = logging.getLogger("SignalRCoreClient")
_CLIENT_LOGGER.addHandler(CAPTURE)
_CLIENT_LOGGER.setLevel(logging.DEBUG)
_CLIENT_LOGGER.propagate = False


class Connection:
    """A signalrcore HubConnection plus events for open/close/errors."""

    def __init__(self, url=TESTHUB, token=None):
        options = {"transport": TRANSPORTS[TRANSPORT]}
        if token is not None:
            options["access_token_factory"] = lambda: token
            if TOKEN_IN_QUERY:
                # The polls carry no Authorization header (see the module doc).
                url += ("&" if "?" in url else "?") + urlencode({"access_token": token})
        protocol = MessagePackHubProtocol() if PROTOCOL == "messagepack" else JsonHubProtocol()
        self.hub = (
            HubConnectionBuilder()
            .with_url(url, options=options)
            .with_hub_protocol(protocol)
            .build()
        )
        self.opened = threading.Event()
        self.closed = threading.Event()
        self.errors = []
        self.error_event = threading.Event()
        self.hub.on_open(self.opened.set)
        self.hub.on_close(self.closed.set)
        self.hub.on_error(self._on_error)

    def _on_error(self, message):
        self.errors.append(message)
        self.error_event.set()

    def start(self):
        self.hub.start()
        if not self.opened.wait(T_START):
            raise AssertionError(f"on_open did not fire within {T_START} s (handshake not completed)")

    def invoke(self, method, args):
        """Invokes and waits for the completion; returns its result or raises with its error."""
        done = threading.Event()
        box = {}

        def on_completion(message):
            box["message"] = message
            done.set()

        before = len(self.errors)
        result = self.hub.invoke(method, args, on_invocation=on_completion)
        deadline = time.monotonic() + T_CALL
        while time.monotonic() < deadline:
            if done.wait(0.02):
                return box["message"].result
            for err in self.errors[before:]:
                if getattr(err, "invocation_id", None) == result.invocation_id:
                    raise HubError(err.error)
        raise AssertionError(f"no completion for {method} within {T_CALL} s")

    def stream(self, method, args, callbacks):
        """Like hub.stream(method, args).subscribe(callbacks), but subscribed
        before the StreamInvocation is sent (hub.stream() races the server)."""
        invocation_id = str(uuid.uuid4())
        handler = StreamHandler(method, invocation_id)
        handler.subscribe(callbacks)
        self.hub.stream_handlers[invocation_id].append(handler)
        self.hub.transport.send(
            StreamInvocationMessage(invocation_id, method, args, headers=self.hub.headers))
        return handler

    def stop(self, timeout=T_CALL):
        """Stops the connection; returns True when on_close fired in time.

        signalrcore 1.0.2's stop() only closes its socket, which does not wake
        its own receive thread blocked in recv(): stop() then hangs until the
        server sends something (ASP.NET's next keep-alive ping, up to 15 s).
        So first end the stream the way a browser does: over WebSockets send a
        close frame (status 1000), which the server answers and closes the TCP
        connection; over Server-Sent Events shut the event stream's socket down
        (EventSource.close()). Either ends the receive thread, and stop()
        returns at once. Long Polling's stop() sends DELETE and needs no help.
        """
        client = getattr(self.hub.transport, "_client", None)
        if client is not None and not client.is_connection_closed():
            try:
                if TRANSPORT == "websockets":
                    client.send(b"\x03\xe8", opcode=0x8)
                elif TRANSPORT == "sse":
                    client.sock.shutdown(socket.SHUT_RDWR)
            except Exception as exc:  # noqa: BLE001 - best effort
                CAPTURE.lines.append(f"stream not ended: {exc!r}")
        stopper = threading.Thread(target=self._stop_quietly, daemon=True)
        stopper.start()
        stopper.join(timeout)
        if stopper.is_alive():
            CAPTURE.lines.append(f"stop() still blocked after {timeout} s")
        return self.closed.wait(0.5 if stopper.is_alive() else timeout)

    def _stop_quietly(self):
        try:
            self.hub.stop()
        except Exception as exc:  # noqa: BLE001 - cleanup only
            CAPTURE.lines.append(f"stop() raised {exc!r}")


class HubError(Exception):
    pass


class Skipped(Exception):
    """A check the client cannot pass on this transport; the reason names its bug."""


def skip_on_long_polling(what):
    if TRANSPORT == "longpolling":
        raise Skipped(
            f"signalrcore 1.0.2 Long Polling bug: {what} arrive in one poll response and "
            "LongPollingBaseClient._append hands only the first to the hub per poll"
        )


def wait_for(predicate, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout} s waiting for: {what}")


TESTS = []


def test(fn):
    TESTS.append(fn)
    return fn


@test
def echo_round_trips(cleanup):
    c = Connection()
    cleanup.append(c.stop)
    c.start()
    message = "你好，世界！ from python"
    assert c.invoke("Echo", [message]) == message
    assert c.invoke("GetActiveTransportName", []) == TRANSPORTS[TRANSPORT].value
    conn_id = c.invoke("GetCallerConnectionId", [])
    assert isinstance(conn_id, str) and conn_id, f"connection id {conn_id!r}"


@test
def server_push_reaches_handler(cleanup):
    skip_on_long_polling("the Message push and the completion")
    c = Connection()
    cleanup.append(c.stop)
    got = []
    c.hub.on("Message", lambda args: got.append(args))
    c.start()
    assert c.invoke("InvokeWithString", ["pushed to python"]) is None
    wait_for(lambda: len(got) >= 1, T_CALL, "Message push")
    time.sleep(0.1)
    assert got == [["pushed to python"]], f"pushes {got!r}"


@test
def stream_yields_items(cleanup):
    skip_on_long_polling("the stream items and the completion")
    c = Connection()
    cleanup.append(c.stop)
    c.start()
    items = []
    complete = threading.Event()
    c.stream("Stream", [], {
        "next": items.append,
        "complete": lambda _msg: complete.set(),
        "error": lambda err: items.append(("error", err)),
    })
    assert complete.wait(T_CALL), f"stream did not complete; items so far {items!r}"
    assert items == ["a", "b", "c"], f"items {items!r}"


@test
def hub_exception_reaches_on_error(cleanup):
    c = Connection()
    cleanup.append(c.stop)
    c.start()
    try:
        c.invoke("ThrowException", ["from python"])
    except HubError as err:
        assert str(err) == (
            "An unexpected error occurred invoking 'ThrowException' on the server. HubException: from python"
        ), f"error {err!r}"
    else:
        raise AssertionError("ThrowException did not fail")
    assert c.invoke("Echo", ["still alive"]) == "still alive"


@test
def token_sets_user(cleanup):
    user = uniq("py-user")
    c = Connection(token=make_jwt(JWT_SECRET, user))
    cleanup.append(c.stop)
    c.start()
    assert c.invoke("GetUserIdentifier", []) == user
    assert c.invoke("Echo", ["with token"]) == "with token"


@test
def client_stream_without_result(cleanup):
    # signalrcore's Subject sends the streaming invocation without an
    # invocation id (no completion expected); the server must run it and the
    # connection must stay healthy.
    #
    # JSON only: with MessagePack, signalrcore 1.0.2 encodes this invocation
    # as [1, headers, target, arguments, streamIds] (no invocationId slot) and
    # the stream completion without a resultKind, which is malformed; ASP.NET
    # closes the connection ("Invalid MessagePack: Reading 'target' as String
    # failed.") and so does feedhub.
    if PROTOCOL == "messagepack":
        raise Skipped("signalrcore 1.0.2 encodes client streams malformed in MessagePack")
    c = Connection()
    cleanup.append(c.stop)
    c.start()
    subject = Subject()
    c.hub.send("StreamingConcat", subject)
    for part in ["a", "b", "c"]:
        subject.next(part)
    subject.complete()
    assert c.invoke("Echo", ["after client stream"]) == "after client stream"
    assert not c.errors, f"unexpected errors {c.errors!r}"


@test
def stop_closes(cleanup):
    c = Connection()
    cleanup.append(c.stop)
    c.start()
    assert c.invoke("Echo", ["bye"]) == "bye"
    assert c.stop(), "on_close did not fire after stop()"


def main():
    if not BASE_URL or not JWT_SECRET:
        print("FEEDHUB_URL and FEEDHUB_JWT_SECRET must be set", flush=True)
        return 2
    if PROTOCOL not in ("json", "messagepack"):
        print(f"FEEDHUB_PROTOCOL must be json or messagepack, not {PROTOCOL!r}", flush=True)
        return 2
    if TRANSPORT not in TRANSPORTS:
        print(f"FEEDHUB_TRANSPORT must be one of {sorted(TRANSPORTS)}, not {TRANSPORT!r}", flush=True)
        return 2
    if PROTOCOL == "messagepack" and TRANSPORT == "sse":
        print("MessagePack needs a Binary transport; Server-Sent Events is Text-only "
              "(the server answers the handshake with an error, as ASP.NET does)", flush=True)
        return 2
    if PROTOCOL == "messagepack" and TRANSPORT == "longpolling" \
            and os.environ.get("FEEDHUB_FORCE") != "1":
        print("signalrcore 1.0.2 cannot receive MessagePack over Long Polling: it always uses "
              "LongPollingTextClient, which frames poll bodies by 0x1E, so no reply is ever "
              "delivered (LongPollingBinaryClient raises TypeError). FEEDHUB_FORCE=1 runs it anyway.",
              flush=True)
        return 2
    only = os.environ.get("FEEDHUB_ONLY")
    verbose = os.environ.get("FEEDHUB_VERBOSE") == "1"
    print(f"# signalrcore ({PROTOCOL}, {TRANSPORT}): running {len(TESTS)} tests against {BASE_URL}",
          flush=True)
    passed, failed, skipped, failures = 0, 0, 0, []
    for fn in TESTS:
        name = fn.__name__
        if only and only not in name:
            continue
        CAPTURE.reset()
        cleanup = []
        started = time.monotonic()
        error = None
        skip_reason = None
        try:
            fn(cleanup)
        except Skipped as exc:
            skip_reason = str(exc)
        except Exception as exc:  # noqa: BLE001 - report every failure
            error = exc
            error_text = "".join(traceback.format_exception(exc)).rstrip()
        for step in reversed(cleanup):
            try:
                step()
            except Exception as exc:  # noqa: BLE001
                CAPTURE.lines.append(f"cleanup failed: {exc!r}")
        ms = int((time.monotonic() - started) * 1000)
        if skip_reason is not None:
            skipped += 1
            print(f"skip {name}: {skip_reason}", flush=True)
        elif error is None:
            passed += 1
            print(f"ok   {name} ({ms} ms)", flush=True)
            if verbose:
                print("\n".join("    " + line for line in CAPTURE.lines), flush=True)
        else:
            failed += 1
            failures.append((name, error))
            print(f"FAIL {name} ({ms} ms)", flush=True)
            print("\n".join("    " + line for line in error_text.splitlines()), flush=True)
            print("  --- captured log (last 80 lines) ---", flush=True)
            print("\n".join("    " + line for line in CAPTURE.lines[-80:]), flush=True)
    if passed + failed == 0:
        failed = 1
        failures.append(("(no test ran)", "no test matched" if skipped == 0 else "every test skipped"))
    print("", flush=True)
    print(f"# signalrcore ({PROTOCOL}, {TRANSPORT}) summary", flush=True)
    for name, error in failures:
        print(f"FAILED: {name}: {error!r}", flush=True)
    print(f"{passed} passed, {failed} failed, {skipped} skipped", flush=True)
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    # signalrcore runs daemon receive threads; exit without waiting on them.
    os._exit(code)
