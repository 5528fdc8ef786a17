-- feedhub's per-user feed history (src/backplane/redis_history.rs runs it with EVALSHA).
--
-- KEYS[1] = <prefix>:{<user>}:m  position: hash e (epoch), s (top offset)
-- KEYS[2] = <prefix>:{<user>}:h  events: stream, entry id <offset>-0, fields d (payload), i (event id)
-- ARGV[1] = mode: "a" append (and publish), "r" read
-- ARGV[2] = epoch to use if the position is missing (random, from the caller)
-- ARGV[3] = seconds the position lives after its last write: max(4 x history ttl, 24 h)
--
-- The position is missing when the history was lost (Redis restarted without persistence,
-- the key expired, was evicted or flushed): a new epoch starts at offset 0 and the stream
-- is deleted first (an old stream would make XADD refuse lower ids). With persistence the
-- position survives a restart, and so does the epoch.
--
-- Append, ARGV[4..]: max events, history ttl seconds, event id ("": none), redelivered
-- ("1"/"0"), payload, channel, envelope head, envelope tail.
--   Redelivered with an id: the newest 512 events are searched for that id; if found, its
--   offset is returned with duplicate = 1 and nothing is stored or published.
--   Otherwise: XADD <offset>-0 (MAXLEN exact), then the position, the EXPIREs, and
--   PUBLISH channel head .. offset .. epoch .. tail (feedhub's kind-5 envelope; the two
--   middle fields MessagePack-encoded here). XADD comes first: if it fails, nothing changed.
--   Returns {offset, epoch, duplicate}.
-- Read, ARGV[4..]: since ("": the newest), limit.
--   Returns {epoch, top, entries, newest_first}; entries as XRANGE gives them.

local meta, stream = KEYS[1], KEYS[2]
local epoch = redis.call('HGET', meta, 'e')
if not epoch then
  epoch = ARGV[2]
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', epoch, 's', 0)
  redis.call('EXPIRE', meta, ARGV[3])
end

if ARGV[1] == 'a' then
  local id = ARGV[6]
  if ARGV[7] == '1' and id ~= '' then
    local recent = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 512)
    for _, entry in ipairs(recent) do
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'i' and fields[i + 1] == id then
          return {tonumber(string.match(entry[1], '^(%d+)')), epoch, 1}
        end
      end
    end
  end
  local offset = tonumber(redis.call('HGET', meta, 's') or '0') + 1
  redis.call('XADD', stream, 'MAXLEN', ARGV[4], string.format('%d-0', offset), 'd', ARGV[8], 'i', id)
  redis.call('HSET', meta, 's', offset)
  redis.call('EXPIRE', stream, ARGV[5])
  redis.call('EXPIRE', meta, ARGV[3])
  redis.call('PUBLISH', ARGV[9], ARGV[10] .. cmsgpack.pack(offset) .. cmsgpack.pack(epoch) .. ARGV[11])
  return {offset, epoch, 0}
end

local top = tonumber(redis.call('HGET', meta, 's') or '0')
local limit = tonumber(ARGV[5])
if limit < 1 then
  return {epoch, top, {}, 0}
end
if ARGV[4] == '' then
  return {epoch, top, redis.call('XREVRANGE', stream, '+', '-', 'COUNT', limit), 1}
end
return {epoch, top, redis.call('XRANGE', stream, '(' .. ARGV[4] .. '-0', '+', 'COUNT', limit), 0}
