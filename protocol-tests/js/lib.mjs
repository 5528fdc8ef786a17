// Shared helpers for the feedhub client scripts: a tiny test runner with
// per-test timeouts and log capture, HS256 JWTs, and waiting helpers.
//
// Every script reads its target from the environment:
//   FEEDHUB_URL         base URL of the server, e.g. http://127.0.0.1:41234
//   FEEDHUB_JWT_SECRET  HS256 secret the server validates tokens with
//   FEEDHUB_API_KEY     key for POST /api/feed (feed script only)
//   FEEDHUB_PROTOCOL    json | messagepack (conformance script only)
//   FEEDHUB_VERBOSE     1 = print the captured client log of passing tests too
//   FEEDHUB_ONLY        substring filter on test names (for local debugging)

import crypto from "node:crypto";
import { createRequire } from "node:module";

export const require = createRequire(import.meta.url);

export function env(name, fallback) {
    const value = process.env[name];
    if (value === undefined || value === "") {
        if (fallback !== undefined) {
            return fallback;
        }
        console.error(`missing environment variable ${name}`);
        process.exit(2);
    }
    return value;
}

/** A random suffix so names (users, groups) never collide between runs. */
export function uniq(prefix) {
    return `${prefix}-${crypto.randomBytes(5).toString("hex")}`;
}

function b64url(buf) {
    return Buffer.from(buf).toString("base64url");
}

/**
 * An HS256 JWT with `sub` = userId. Options: expiresIn (seconds, negative for
 * an expired token), secret (to sign with a wrong key), claims (extra claims).
 */
export function makeJwt(secret, userId, { expiresIn = 3600, claims = {} } = {}) {
    const now = Math.floor(Date.now() / 1000);
    const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
    const payload = b64url(JSON.stringify({
        sub: userId,
        iat: expiresIn < 0 ? now + expiresIn - 60 : now,
        nbf: expiresIn < 0 ? now + expiresIn - 60 : now - 5,
        exp: now + expiresIn,
        ...claims,
    }));
    const signature = crypto.createHmac("sha256", secret).update(`${header}.${payload}`).digest();
    return `${header}.${payload}.${b64url(signature)}`;
}

/**
 * FeedUpdated arguments without the "offset" feedhub adds to object payloads (its
 * position in the user's history, tested by history.mjs); checks it is a positive integer.
 */
export function withoutOffset(args) {
    return args.map((a) => {
        if (a === null || typeof a !== "object" || Array.isArray(a) || !("offset" in a)) {
            return a;
        }
        if (!Number.isInteger(a.offset) || a.offset < 1) {
            throw new Error(`bad offset in ${JSON.stringify(a)}`);
        }
        const { offset, ...rest } = a;
        return rest;
    });
}

export function sleep(ms) {
    return new Promise((resolve) => setTimeout(resolve, ms));
}

/** Rejects with `what` after `ms` unless `promise` settles first. */
export function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
        timer = setTimeout(() => reject(new Error(`timed out after ${ms} ms: ${what}`)), ms);
    });
    return Promise.race([Promise.resolve(promise), timeout]).finally(() => clearTimeout(timer));
}

/** A promise with its resolve/reject exposed. */
export function deferred() {
    let resolve;
    let reject;
    const promise = new Promise((res, rej) => {
        resolve = res;
        reject = rej;
    });
    return { promise, resolve, reject };
}

/** Polls `predicate` every 10 ms until it is truthy or `ms` elapse. */
export async function waitUntil(predicate, ms, what) {
    const deadline = Date.now() + ms;
    for (;;) {
        if (predicate()) {
            return;
        }
        if (Date.now() > deadline) {
            throw new Error(`timed out after ${ms} ms waiting for: ${what}`);
        }
        await sleep(10);
    }
}

/** Asserts that `promise` rejects; returns the error. */
export async function rejectsWith(promise, ms, what) {
    try {
        const value = await withTimeout(promise, ms, what);
        throw Object.assign(new Error(`expected rejection but resolved with ${JSON.stringify(value)}: ${what}`), { unexpectedResolve: true });
    } catch (err) {
        if (err && err.unexpectedResolve) {
            throw err;
        }
        return err;
    }
}

/**
 * Runs tests one after another. Each test gets a context with:
 *   t.logger     an ILogger-compatible logger capturing the client's log lines
 *   t.log(...)   add a line to the captured log
 *   t.defer(fn)  register cleanup (run in reverse order, even on failure)
 * On failure the captured log is printed below the error.
 */
export class Runner {
    constructor(suite) {
        this.suite = suite;
        this.tests = [];
        this.current = null;
        this.strayErrors = [];
        process.on("unhandledRejection", (reason) => {
            const where = this.current ? ` (during '${this.current.name}')` : "";
            this.strayErrors.push(`unhandled promise rejection${where}: ${describe(reason)}`);
        });
        process.on("uncaughtException", (err) => {
            const where = this.current ? ` (during '${this.current.name}')` : "";
            this.strayErrors.push(`uncaught exception${where}: ${describe(err)}`);
        });
    }

    /** `skip`: a reason string; the test is not run and the reason is printed. */
    test(name, fn, { timeoutMs = 20000, skip = null } = {}) {
        this.tests.push({ name, fn, timeoutMs, skip });
    }

    async run() {
        const only = process.env.FEEDHUB_ONLY;
        const verbose = process.env.FEEDHUB_VERBOSE === "1";
        let passed = 0;
        let failed = 0;
        let skipped = 0;
        const failures = [];
        console.log(`# ${this.suite}: running ${this.tests.length} tests against ${process.env.FEEDHUB_URL}`);
        for (const test of this.tests) {
            if (only && !test.name.includes(only)) {
                continue;
            }
            if (test.skip) {
                skipped += 1;
                console.log(`skip ${test.name}: ${test.skip}`);
                continue;
            }
            const lines = [];
            const cleanups = [];
            const started = Date.now();
            const ctx = {
                name: test.name,
                log: (...args) => lines.push(`[${Date.now() - started} ms] ${args.map(String).join(" ")}`),
                defer: (fn) => cleanups.push(fn),
                logger: {
                    log: (level, message) => lines.push(`[${Date.now() - started} ms] client ${LEVELS[level] || level}: ${message}`),
                },
            };
            this.current = test;
            const strayBefore = this.strayErrors.length;
            let error = null;
            try {
                await withTimeout(test.fn(ctx), test.timeoutMs, `test '${test.name}'`);
            } catch (err) {
                error = err;
            }
            for (const cleanup of cleanups.reverse()) {
                try {
                    await withTimeout(cleanup(), 5000, "cleanup");
                } catch (err) {
                    lines.push(`cleanup failed: ${describe(err)}`);
                }
            }
            // Give late callbacks a moment to report stray errors for this test.
            await sleep(20);
            this.current = null;
            if (!error && this.strayErrors.length > strayBefore) {
                error = new Error(this.strayErrors.slice(strayBefore).join("; "));
            }
            const ms = Date.now() - started;
            if (error) {
                failed += 1;
                failures.push({ name: test.name, error });
                console.log(`FAIL ${test.name} (${ms} ms)`);
                console.log(indent(describe(error)));
                if (lines.length > 0) {
                    console.log("  --- captured log (last 80 lines) ---");
                    console.log(indent(lines.slice(-80).join("\n")));
                }
            } else {
                passed += 1;
                console.log(`ok   ${test.name} (${ms} ms)`);
                if (verbose && lines.length > 0) {
                    console.log(indent(lines.join("\n")));
                }
            }
        }
        if (passed + failed === 0) {
            failed += 1;
            failures.push({ name: "(no test ran)", error: new Error("no test matched") });
        }
        console.log("");
        console.log(`# ${this.suite} summary`);
        for (const f of failures) {
            console.log(`FAILED: ${f.name}: ${firstLine(f.error)}`);
        }
        console.log(`${passed} passed, ${failed} failed${skipped ? `, ${skipped} skipped (reasons above)` : ""}`);
        // Exit explicitly: a failed test may leave sockets or timers behind.
        process.exit(failed === 0 ? 0 : 1);
    }
}

const LEVELS = ["trace", "debug", "info", "warn", "error", "critical", "none"];

export function describe(err) {
    if (err instanceof Error) {
        let extra = err.statusCode !== undefined ? ` (statusCode ${err.statusCode})` : "";
        if (err.code === "ERR_ASSERTION" && !err.message.includes("actual - expected")) {
            // A custom assertion message hides the values: show them.
            extra += `\n  actual:   ${show(err.actual)}\n  expected: ${show(err.expected)}`;
        }
        const frames = (err.stack || "").split("\n").filter((l) => /^\s+at /.test(l)).slice(0, 5);
        return `${err.name}: ${err.message}${extra}\n${frames.join("\n")}`;
    }
    try {
        return JSON.stringify(err);
    } catch {
        return String(err);
    }
}

function show(value) {
    if (value instanceof Uint8Array) {
        return `${value.constructor.name}[${Array.from(value).join(",")}]`;
    }
    try {
        return JSON.stringify(value, (_, v) => (v instanceof Uint8Array ? `${v.constructor.name}[${Array.from(v).join(",")}]` : v));
    } catch {
        return String(value);
    }
}

function firstLine(err) {
    return describe(err).split("\n")[0];
}

function indent(text) {
    return text.split("\n").map((l) => `    ${l}`).join("\n");
}
