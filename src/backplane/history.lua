-- feedhub's per-user feed history (src/backplane/redis_history.rs runs it with EVALSHA).
--
-- Keys, for each user u = 1, 2, ... the call touches:
-- KEYS[2u-1] = <prefix>:{<user>}:m  position: hash e (epoch), s (top offset)
-- KEYS[2u]   = <prefix>:{<user>}:h  events: stream, entry id <offset>-0, fields d (payload), i (event id)
-- ARGV[1] = mode: "a" append (and publish), "r" read
-- ARGV[2] = epoch to use if a position is missing (random, from the caller)
-- ARGV[3] = seconds a position lives after its last write: max(4 x history ttl, 24 h)
--
-- A position is missing when the history was lost (Redis restarted without persistence,
-- the key expired, was evicted or flushed): a new epoch starts at offset 0 and the stream
-- is deleted first (an old stream would make XADD refuse lower ids). With persistence the
-- position survives a restart, and so does the epoch.
--
-- Append, many events of many users in one call, in order. ARGV[4..]: max events, history
-- ttl seconds, U (users), the call's step and steps (see the fence below), then per user
-- its channel and envelope head (ARGV[9..8+2U]), then per event three arguments: the
-- user's index u (negative: redelivered), the event id ("": none), the payload.
--   Redelivered with an id: the user's newest 512 events are searched for that id (events
--   appended earlier in this call included); if found, nothing is stored or published and
--   the reply is -offset.
--   Otherwise: XADD <offset>-0 (MAXLEN exact), then the position (HSET s), then
--   PUBLISH channel head .. offset .. epoch .. id .. payload (feedhub's kind-5 envelope;
--   the four fields MessagePack-encoded here), then the next event. The EXPIREs of a user's
--   two keys are set at the user's first stored event in the call (a call lasts a few
--   milliseconds, so once is as good as after every event). XADD comes first: if it
--   fails, the script stops there and every earlier event is complete (stored, position
--   moved, published), nothing of this one or later ones happened.
--   Fence: a batch too large for one call is several calls in one pipeline, chained by
--   KEYS[2U+1] (present only then): call `step` of `steps` runs only if the key holds
--   step - 1, i.e. the call before it ran to its end; otherwise it changes nothing and
--   answers FENCED. So a failed call is never overtaken by a later one of the same batch.
--   Returns {epoch_1 .. epoch_U, r_1 .. r_n}: r = offset, or -offset for a duplicate.
-- Read (one user), ARGV[4..]: since ("": the newest), limit.
--   Returns {epoch, top, entries, newest_first}; entries as XRANGE gives them.

local function position(meta, stream)
  local pos = redis.call('HMGET', meta, 'e', 's')
  if pos[1] then
    return pos[1], tonumber(pos[2] or '0')
  end
  redis.call('DEL', stream)
  redis.call('HSET', meta, 'e', ARGV[2], 's', 0)
  redis.call('EXPIRE', meta, ARGV[3])
  return ARGV[2], 0
end

-- The MessagePack str header of a string of n bytes.
local function str_header(n)
  if n < 32 then return string.char(0xa0 + n) end
  if n < 256 then return string.char(0xd9, n) end
  if n < 65536 then return string.char(0xda, math.floor(n / 256), n % 256) end
  return string.char(0xdb, math.floor(n / 16777216), math.floor(n / 65536) % 256,
    math.floor(n / 256) % 256, n % 256)
end

if ARGV[1] == 'a' then
  local maxlen, ttl, meta_ttl = ARGV[4], ARGV[5], ARGV[3]
  local users = tonumber(ARGV[6])
  local step, steps = tonumber(ARGV[7]), tonumber(ARGV[8])
  local fence = KEYS[2 * users + 1]
  if fence and step > 1 and redis.call('GET', fence) ~= tostring(step - 1) then
    return redis.error_reply('FENCED an earlier call of this batch did not complete')
  end
  local epochs, tops, expired = {}, {}, {}
  local out = {}
  for u = 1, users do
    epochs[u], tops[u] = position(KEYS[2 * u - 1], KEYS[2 * u])
    out[u] = epochs[u]
  end
  for i = 9 + 2 * users, #ARGV, 3 do
    local u = tonumber(ARGV[i])
    local redelivered = u < 0
    if redelivered then u = -u end
    local meta, stream, id, payload = KEYS[2 * u - 1], KEYS[2 * u], ARGV[i + 1], ARGV[i + 2]
    local found
    if redelivered and id ~= '' then
      local recent = redis.call('XREVRANGE', stream, '+', '-', 'COUNT', 512)
      for _, entry in ipairs(recent) do
        local fields = entry[2]
        for f = 1, #fields, 2 do
          if fields[f] == 'i' and fields[f + 1] == id then
            found = tonumber(string.match(entry[1], '^(%d+)'))
            break
          end
        end
        if found then break end
      end
    end
    if found then
      out[#out + 1] = -found
    else
      local offset = tops[u] + 1
      redis.call('XADD', stream, 'MAXLEN', maxlen, string.format('%d-0', offset), 'd', payload, 'i', id)
      redis.call('HSET', meta, 's', offset)
      tops[u] = offset
      if not expired[u] then
        redis.call('EXPIRE', stream, ttl)
        redis.call('EXPIRE', meta, meta_ttl)
        expired[u] = true
      end
      -- The payload is joined in as it came (one copy), not packed by cmsgpack.
      redis.call('PUBLISH', ARGV[7 + 2 * u], ARGV[8 + 2 * u]
        .. cmsgpack.pack(offset, epochs[u], id) .. str_header(#payload) .. payload)
      out[#out + 1] = offset
    end
  end
  if fence then
    if step < steps then
      redis.call('SET', fence, step, 'PX', 60000)
    else
      redis.call('DEL', fence)
    end
  end
  return out
end

local meta, stream = KEYS[1], KEYS[2]
local epoch, top = position(meta, stream)
local limit = tonumber(ARGV[5])
if limit < 1 then
  return {epoch, top, {}, 0}
end
if ARGV[4] == '' then
  return {epoch, top, redis.call('XREVRANGE', stream, '+', '-', 'COUNT', limit), 1}
end
return {epoch, top, redis.call('XRANGE', stream, '(' .. ARGV[4] .. '-0', '+', 'COUNT', limit), 0}
