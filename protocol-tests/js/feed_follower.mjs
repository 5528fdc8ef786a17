// The client recipe of README "Delivery guarantees" (plus position() for the tests): keeps a page's feed complete
// across reconnects and instance failover with the unchanged @microsoft/signalr client.
// apply(event) must be idempotent by event id; reload() refetches the feed from the app's
// own API (the history could not fill the gap).
export function feedFollower({ apply, reload }) {
    let pos = null; // { offset, epoch } of the last applied event
    let busy = null; // the Recover call in flight
    let stash = []; // events that arrived meanwhile
    let connection = null;
    const recover = () => busy ??= (async () => {
        try {
            const r = await connection.invoke("Recover", pos && { offset: pos.offset, epoch: pos.epoch });
            if (pos && !r.recovered) await reload(); // gap no longer in history, or history restarted
            else r.events.forEach(apply);
            pos = { offset: r.offset, epoch: r.epoch };
        } finally {
            busy = null;
        }
        const held = stash;
        stash = [];
        held.forEach((e) => onEvent(e, true));
    })();
    function onEvent(e, replay = false) {
        if (typeof e?.offset !== "number") return apply(e); // raw PUBLISH: live only, no offset
        if (busy || !pos) return void stash.push(e);
        if (e.offset === pos.offset + 1) { pos.offset = e.offset; return apply(e); }
        if (e.offset > pos.offset + 1) stash.push(e); // a gap: fetch the missing ones first
        else if (replay) return; // already applied
        recover(); // a gap, or offsets went back (the history restarted: new epoch)
    }
    return {
        // Call for each connection (a new one after failover), then start() it and recover().
        attach(c) {
            connection = c;
            c.on("FeedUpdated", (e) => onEvent(e));
            c.onreconnected(() => recover());
        },
        recover, // the first load (Recover(null)) and after any reconnect
        position: () => pos,
    };
}
