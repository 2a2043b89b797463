-- ShopFlow job store: every state change of a job, atomically, next to Dramatiq's own keys.
--
-- jobs(keys=[ns, events], args=[command, now_ms, now_iso, ...command args])
--
-- ns is the Dramatiq namespace; events is the Redis Stream of job lifecycle
-- events (the notifier's "jobs" channel). Dramatiq's layout is kept, so a
-- message written the documented way (HSET ns:Q.msgs ID JSON; RPUSH ns:Q ID)
-- is consumed like any other:
--
--   ns:Q                 list of waiting message ids, priority 0, oldest first   (Dramatiq)
--   ns:Q.msgs            hash message id -> message JSON                         (Dramatiq)
--   ns:__acks__.W.Q      set of ids worker W fetched and has not finished         (Dramatiq)
--   ns:__heartbeats__    zset worker id -> last heartbeat (ms)                    (Dramatiq)
--   ns:Q.hi / ns:Q.lo    zsets of waiting ids with priority > 0 / < 0
--   ns:Q.seq             counter keeping equal priorities first-in first-out
--   ns:Q.delayed         zset id -> due time (ms): delayed jobs and retries
--   ns:Q.wake            list of wake-up tokens an idle consumer blocks on
--   ns:Q.active          zset job id -> start time (ms)
--   ns:Q.completed|failed|dead|cancelled   zsets job id -> end time (ms), trimmed to keep-last-N
--   ns:Q.stats           hash of totals (enqueued, completed, failed, retried, stalled, dead, ...);
--                        each job's end is counted once (removed: deleted before it ended;
--                        deleting an ended job's record, like trimming, counts nothing)
--   ns:__queues__.W      set of the queues worker W consumes (for the stall sweep)
--   ns:__running__.W     set of the job ids worker W is running (all its queues)
--   ns:__alone__.W       id of the job that must run alone on worker W (a suspect of
--                        killing its worker): no other job starts there meanwhile
--   ns:paused            set of paused queue names
--   ns:job:J             hash: the record of job J (state, attempts, times, result, error, ...)
--   ns:jobhist:J         list: the last events of job J, newest first
--   ns:dedup:J           "state:until_ms" with a time to live: trimmed J ran and may not be sent again before until_ms
--   ns:limit:NAME        zset token -> lease expiry (ms): a concurrency limit's holders
--   ns:rate:NAME         zset token -> start time (ms): a rate limit's recent starts

local ns = KEYS[1]
local events = KEYS[2]
local command = ARGV[1]
local now = tonumber(ARGV[2])
local now_iso = ARGV[3]

local SEQ_SPAN = 100000000000000  -- 1e14: room for the sequence under each priority level
local WAKE_TOKENS = 64
local HISTORY = 20
local EVENTS_MAXLEN = 10000
local TEXT_MAX = 2000
-- A job that has died in company this many times runs alone from then on: if it is the
-- one killing its workers, its next death is its own and counts towards the quarantine.
local ISOLATE_AFTER_SHARED_DEATHS = 2
-- How long a suspect keeps a worker to itself if nobody renews it (the keeper does).
local DEFAULT_ALONE_LEASE_MS = 60000

local function qkey(queue, suffix)
    if suffix == "" then return ns .. ":" .. queue end
    return ns .. ":" .. queue .. "." .. suffix
end

local function job_key(job_id) return ns .. ":job:" .. job_id end
local function hist_key(job_id) return ns .. ":jobhist:" .. job_id end

-- A string cut to TEXT_MAX; nil for anything else (cjson's null, numbers, tables).
local function short(text)
    if type(text) ~= "string" then return nil end
    if string.len(text) > TEXT_MAX then return string.sub(text, 1, TEXT_MAX) end
    return text
end

-- One lifecycle event: on the stream (for the dashboard and the notifier) and in the job's history.
local function event(job_id, queue, actor, kind, extra)
    local payload = {job_id = job_id, queue = queue, actor = actor, event = kind}
    if extra then
        for k, v in pairs(extra) do payload[k] = v end
    end
    local text = cjson.encode(payload)
    -- "id" is the outbox row's id on outbox events; job events have none (the job id is in
    -- the payload), so the notifier's de-duplication of re-published rows leaves them alone.
    redis.call("xadd", events, "MAXLEN", "~", EVENTS_MAXLEN, "*",
        "id", "", "type", "job." .. kind, "payload", text, "correlation_id", "", "at", now_iso)
    local hist = hist_key(job_id)
    redis.call("lpush", hist, cjson.encode({at = now, event = kind, detail = extra or {}}))
    redis.call("ltrim", hist, 0, HISTORY - 1)
end

local function paused(queue)
    return redis.call("sismember", ns .. ":paused", queue) == 1
end

local function wake(queue)
    if paused(queue) then return end
    local key = qkey(queue, "wake")
    redis.call("lpush", key, "1")
    redis.call("ltrim", key, 0, WAKE_TOKENS - 1)
end

-- Park a message id in the delayed set until eta. An idle consumer sleeps until the due time
-- it saw at its last fetch (or its idle timeout): if this one is due earlier, wake one, so
-- it looks again and sleeps until this one instead.
local function add_delayed(queue, rid, eta)
    local key = qkey(queue, "delayed")
    redis.call("zadd", key, eta, rid)
    if redis.call("zrange", key, 0, 0)[1] == rid then wake(queue) end
end

-- Put a message id where a consumer finds it, by priority; returns its place (seq), which
-- the job's record keeps. A new place is the tail of its priority. at_head gives back the
-- place a job had (redeliveries, jobs held back by a limit): the head of the plain list,
-- or `seq`, its old place, among jobs of its priority (their head without one).
local function push_waiting(queue, rid, priority, at_head, seq)
    priority = tonumber(priority) or 0
    if not at_head then seq = redis.call("incr", qkey(queue, "seq")) end
    if priority == 0 then
        if at_head then
            redis.call("lpush", qkey(queue, ""), rid)
        else
            redis.call("rpush", qkey(queue, ""), rid)
        end
    elseif priority > 0 then
        redis.call("zadd", qkey(queue, "hi"), (10 - priority) * SEQ_SPAN + (seq or 0), rid)
    else
        redis.call("zadd", qkey(queue, "lo"), (-priority) * SEQ_SPAN + (seq or 0), rid)
    end
    wake(queue)
    return seq
end

local function remove_waiting(queue, rid)
    local n = redis.call("lrem", qkey(queue, ""), 1, rid)
    n = n + redis.call("zrem", qkey(queue, "hi"), rid)
    n = n + redis.call("zrem", qkey(queue, "lo"), rid)
    return n
end

local function waiting_count(queue)
    return redis.call("llen", qkey(queue, "")) + redis.call("zcard", qkey(queue, "hi"))
        + redis.call("zcard", qkey(queue, "lo"))
end

local function decode(text)
    local ok, value = pcall(cjson.decode, text)
    if ok and type(value) == "table" then return value end
    return nil
end

local function message_job_id(msg)
    local options = msg.options or {}
    return options.job_id or msg.message_id
end

-- How many failed/cancelled jobs the queue keeps for this message: its own keep_failed
-- option, else `default` (the caller's setting; nil: the caller trims nothing).
local function keep_failed_of(msg, default)
    local keep = msg and tonumber((msg.options or {}).keep_failed)
    return keep or tonumber(default)
end

local function message_priority(msg)
    local options = msg.options or {}
    return tonumber(options.priority) or 0
end

-- The place the job of a message had in its queue (nil: no record, or it never waited).
local function place_of(msg)
    if not msg then return nil end
    return tonumber(redis.call("hget", job_key(message_job_id(msg)), "seq"))
end

-- The end time as a score that keeps jobs ending in the same millisecond in order.
local function ended_score(queue)
    local seq = redis.call("incr", qkey(queue, "endseq")) % 1000
    return now + seq / 1000
end

local function stat(queue, field, n)
    redis.call("hincrby", qkey(queue, "stats"), field, n or 1)
end

-- Keep the newest `keep` entries of a finished-jobs index; forget the records of the rest.
local function trim(queue, state, keep, dedup_s)
    local idx = qkey(queue, state)
    local extra = redis.call("zcard", idx) - keep
    if extra <= 0 then return end
    local ids = redis.call("zrange", idx, 0, extra - 1)
    redis.call("zremrangebyrank", idx, 0, extra - 1)
    for _, job_id in ipairs(ids) do
        local key = job_key(job_id)
        local explicit = redis.call("hget", key, "explicit")
        local deadline = tonumber(redis.call("hget", key, "dedup_until_ms")) or 0
        if explicit == "1" and deadline > now then
            -- The deadline rides in the value: enqueue trusts it, not the key's existence
            -- (a time to live runs on Redis's clock, the window on the callers').
            redis.call("set", ns .. ":dedup:" .. job_id, state .. ":" .. deadline, "PX", deadline - now)
        end
        redis.call("del", key, hist_key(job_id))
    end
end

local function record_fields(key, fields)
    local flat = {}
    for k, v in pairs(fields) do
        table.insert(flat, k)
        table.insert(flat, v)
    end
    redis.call("hset", key, unpack(flat))
end

local ACTIVE_STATES = {waiting = true, delayed = true, active = true}
local DUPLICATE_STATES = {waiting = true, delayed = true, active = true, completed = true, skipped = true}
local RETRYABLE_STATES = {failed = true, dead = true, cancelled = true}
local INDEXED_STATES = {completed = true, skipped = true, failed = true, dead = true, cancelled = true}
local ENDED_STATES = INDEXED_STATES

local function index_of(state)
    if state == "skipped" then return "completed" end
    return state
end

-- Whether a completed (or skipped) job's de-duplication window (dedup_s after it finished)
-- is over; a job still waiting or running always blocks re-sends.
local function dedup_over(key, state)
    if state ~= "completed" and state ~= "skipped" then return false end
    local deadline = tonumber(redis.call("hget", key, "dedup_until_ms"))
    return deadline ~= nil and deadline <= now
end

-- enqueue(queue, rid, job_id, actor, message, priority, eta_ms, max_len, explicit, max_attempts)
-- -> {"enqueued", state} | {"duplicate", state, rid} | {"full", size}
local function cmd_enqueue(a)
    local queue, rid, job_id, actor, message = a[1], a[2], a[3], a[4], a[5]
    local priority, eta, max_len = tonumber(a[6]), tonumber(a[7]), tonumber(a[8])
    local explicit, max_attempts = a[9], a[10]
    local key = job_key(job_id)
    if explicit == "1" then
        local state = redis.call("hget", key, "state")
        if state and DUPLICATE_STATES[state] and not dedup_over(key, state) then
            return {"duplicate", state, redis.call("hget", key, "rid") or ""}
        end
        local dedup_key = ns .. ":dedup:" .. job_id
        local ran = redis.call("get", dedup_key)
        if ran then
            local ran_state, deadline = string.match(ran, "^(%a+):(%d+)$")
            if not deadline or tonumber(deadline) > now then
                return {"duplicate", ran_state or ran, ""}
            end
            redis.call("del", dedup_key)  -- its window is over: it blocks nothing
        end
        if state then
            -- A failed, dead or cancelled job, or one completed longer than its dedup_s
            -- ago, sent again under its id: a fresh run.
            local old_queue = redis.call("hget", key, "queue") or queue
            redis.call("zrem", qkey(old_queue, index_of(state)), job_id)
            redis.call("del", key, hist_key(job_id))
        end
    end
    if max_len > 0 then
        local size = waiting_count(queue) + redis.call("zcard", qkey(queue, "delayed"))
        if size >= max_len then return {"full", size} end
    end
    redis.call("hset", qkey(queue, "msgs"), rid, message)
    local state = "waiting"
    local seq = 0
    if eta > now then
        state = "delayed"
        add_delayed(queue, rid, eta)
    else
        seq = push_waiting(queue, rid, priority, false)
    end
    record_fields(key, {
        id = job_id, queue = queue, actor = actor, state = state, rid = rid,
        created_ms = now, enqueued_ms = now, attempt = 0, max_attempts = max_attempts,
        priority = priority, explicit = explicit, deaths = 0, run_at_ms = math.max(eta, now),
        seq = seq,
    })
    stat(queue, "enqueued")
    if state == "delayed" then
        event(job_id, queue, actor, "delayed", {run_at_ms = eta, priority = priority})
    else
        event(job_id, queue, actor, "waiting", {priority = priority})
    end
    return {"enqueued", state}
end

-- Move due delayed messages of a queue to its waiting structures (at most `limit`). A job
-- that was held back by a limit ("front" on its record) gets its old place back, so a
-- backlog sent meanwhile neither starves it nor overtakes it.
local function promote(queue, limit)
    local delayed = qkey(queue, "delayed")
    local due = redis.call("zrangebyscore", delayed, "-inf", now, "LIMIT", 0, limit)
    if #due == 0 then return end
    local msgs = qkey(queue, "msgs")
    local fronted = {}  -- {seq, rid} of plain-list jobs going back to the head
    for _, rid in ipairs(due) do
        redis.call("zrem", delayed, rid)
        local text = redis.call("hget", msgs, rid)
        local msg = text and decode(text)
        if msg then
            local job_id = message_job_id(msg)
            local key = job_key(job_id)
            local priority = message_priority(msg)
            local record = redis.call("hmget", key, "state", "front", "seq")
            if record[1] then
                redis.call("hset", key, "state", "waiting")
                event(job_id, queue, msg.actor_name or "", "waiting", {promoted = true})
            end
            if record[2] == "1" then
                redis.call("hdel", key, "front")
                local seq = tonumber(record[3])
                if priority == 0 then
                    table.insert(fronted, {seq or 0, rid})
                else
                    push_waiting(queue, rid, priority, true, seq)
                end
            else
                local seq = push_waiting(queue, rid, priority, false)
                if record[1] then redis.call("hset", key, "seq", seq) end
            end
        elseif text then
            push_waiting(queue, rid, 0, false)
        end
    end
    -- Back to the head in their old order: the latest place first, so the earliest ends up
    -- in front.
    table.sort(fronted, function(x, y) return x[1] > y[1] end)
    for _, item in ipairs(fronted) do redis.call("lpush", qkey(queue, ""), item[2]) end
    if #fronted > 0 then wake(queue) end
end

-- Park message rid of a queue (its body in Q.msgs) in the delayed set until eta: the
-- record becomes (or is created) delayed, as if it had been sent with that delay.
local function park(queue, rid, msg, eta)
    add_delayed(queue, rid, eta)
    local job_id, actor = rid, ""
    if msg then
        job_id, actor = message_job_id(msg), msg.actor_name or ""
    end
    local key = job_key(job_id)
    if redis.call("exists", key) == 1 then
        record_fields(key, {state = "delayed", rid = rid, run_at_ms = eta})
    else
        record_fields(key, {id = job_id, queue = queue, actor = actor, state = "delayed",
            rid = rid, created_ms = now, enqueued_ms = now, attempt = 0, max_attempts = 0,
            priority = msg and message_priority(msg) or 0, explicit = "0", deaths = 0,
            run_at_ms = eta})
        stat(queue, "enqueued")
    end
    event(job_id, queue, actor, "delayed", {run_at_ms = eta})
end

-- Dramatiq's own delayed messages (a plain Dramatiq producer's enqueue(delay=...), or a
-- producer that copies its layout) are written to ns:Q.DQ with options.eta. No worker here
-- consumes that queue: move them to Q's delayed set by their eta, where they wait like any
-- delayed job (the consumer takes the eta off when it runs them).
local function adopt_dramatiq_delayed(queue)
    local dq = qkey(queue .. ".DQ", "")
    if redis.call("llen", dq) == 0 then return end
    local dq_msgs = qkey(queue .. ".DQ", "msgs")
    for _, rid in ipairs(redis.call("lpop", dq, 1000)) do
        local text = redis.call("hget", dq_msgs, rid)
        redis.call("hdel", dq_msgs, rid)
        if text then
            redis.call("hset", qkey(queue, "msgs"), rid, text)
            local msg = decode(text)
            local eta = msg and tonumber((msg.options or {}).eta) or now
            park(queue, rid, msg, math.floor(eta))
        end
    end
end

-- park(queue, worker, rid, eta_ms) -> {"parked"} | {"lost"}: a fetched message whose
-- options.eta is still ahead (written so by an outside producer) waits in the delayed set.
local function cmd_park(a)
    local queue, worker, rid, eta = a[1], a[2], a[3], tonumber(a[4])
    if redis.call("srem", ns .. ":__acks__." .. worker .. "." .. queue, rid) == 0 then
        return {"lost"}
    end
    local text = redis.call("hget", qkey(queue, "msgs"), rid)
    if not text then return {"lost"} end
    park(queue, rid, decode(text), eta)
    return {"parked"}
end

-- fetch(queue, worker, count) -> {next_due_ms or "", id1, message JSON 1, id2, ...}
local function cmd_fetch(a)
    local queue, worker, count = a[1], a[2], tonumber(a[3])
    redis.call("zadd", ns .. ":__heartbeats__", now, worker)
    redis.call("sadd", ns .. ":__queues__." .. worker, queue)
    adopt_dramatiq_delayed(queue)
    promote(queue, 1000)
    local next_due = redis.call("zrange", qkey(queue, "delayed"), 0, 0, "WITHSCORES")
    local reply = {next_due[2] or ""}
    if paused(queue) or count <= 0 then return reply end
    local ids = {}
    local popped = redis.call("zpopmin", qkey(queue, "hi"), count)
    for i = 1, #popped, 2 do table.insert(ids, popped[i]) end
    if #ids < count then
        local plain = redis.call("lpop", qkey(queue, ""), count - #ids)
        if plain then
            for _, rid in ipairs(plain) do table.insert(ids, rid) end
        end
    end
    if #ids < count then
        popped = redis.call("zpopmin", qkey(queue, "lo"), count - #ids)
        for i = 1, #popped, 2 do table.insert(ids, popped[i]) end
    end
    if #ids < count then
        -- Nothing waits any more: drop the wake-up tokens of the jobs just taken, so no idle
        -- consumer wakes for them and fetches nothing. A later enqueue pushes a new token.
        redis.call("del", qkey(queue, "wake"))
    end
    if #ids == 0 then return reply end
    redis.call("sadd", ns .. ":__acks__." .. worker .. "." .. queue, unpack(ids))
    local bodies = redis.call("hmget", qkey(queue, "msgs"), unpack(ids))
    for i = 1, #ids do
        if bodies[i] then
            table.insert(reply, ids[i])
            table.insert(reply, bodies[i])
        else
            -- An id without a body (removed meanwhile): nothing to run, nothing to hold.
            redis.call("srem", ns .. ":__acks__." .. worker .. "." .. queue, ids[i])
        end
    end
    return reply
end

-- Check every limit; take them all or none. limits: [{key, concurrency, rate, window_ms, lease_ms}]
local function take_limits(limits, token)
    for _, l in ipairs(limits) do
        if (tonumber(l.concurrency) or 0) > 0 then
            local key = ns .. ":limit:" .. l.key
            redis.call("zremrangebyscore", key, "-inf", now)
            if not redis.call("zscore", key, token) and
                    redis.call("zcard", key) >= tonumber(l.concurrency) then
                return 0
            end
        end
        if (tonumber(l.rate) or 0) > 0 then
            local key = ns .. ":rate:" .. l.key
            local window = tonumber(l.window_ms)
            redis.call("zremrangebyscore", key, "-inf", now - window)
            if redis.call("zcard", key) >= tonumber(l.rate) then
                local oldest = redis.call("zrange", key, 0, 0, "WITHSCORES")
                return math.max(1, tonumber(oldest[2]) + window - now)
            end
        end
    end
    for _, l in ipairs(limits) do
        if (tonumber(l.concurrency) or 0) > 0 then
            redis.call("zadd", ns .. ":limit:" .. l.key, now + tonumber(l.lease_ms), token)
        end
        if (tonumber(l.rate) or 0) > 0 then
            local key = ns .. ":rate:" .. l.key
            redis.call("zadd", key, now, token .. ":" .. now)
            redis.call("pexpire", key, tonumber(l.window_ms) * 2)
        end
    end
    return -1
end

-- start(queue, rid, job_id, actor, worker, attempt, limits JSON[, policy JSON[, lease_ms]])
-- -> {"run", attempt} | {"cancelled"} | {"done", state} | {"stale", why}
--  | {"limited", wait_ms[, "alone" | "isolated"]}
-- policy: the job's retry policy ({attempts, backoff, backoff_ms, backoff_max_ms, jitter}),
-- kept on the record for the stall sweep, which runs a stalled job again under it. attempt
-- in the reply: the attempt this run is (a stall used one the message does not know of).
-- A job marked to run alone (see stall) keeps the worker to itself (lease_ms, renewed by
-- the keeper) and starts once nothing else runs there ("limited", "isolated" until then);
-- meanwhile, and while it runs, no other job starts on that worker ("limited", "alone": it
-- waits, then goes back to its place).
-- Only a copy the worker still holds, of the job's current run, starts: the sweep takes
-- back what a worker presumed dead had fetched and gives it to another, and the copy left
-- in the presumed-dead worker's memory must not run a second time.
local function cmd_start(a)
    local queue, rid, job_id, actor, worker, attempt, limits = a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    local policy = a[8] or ""
    local key = job_key(job_id)
    local state = redis.call("hget", key, "state")
    if state and ENDED_STATES[state] then return {"done", state} end
    if redis.call("sismember", ns .. ":__acks__." .. worker .. "." .. queue, rid) == 0 then
        return {"stale", "taken back from this worker"}
    end
    local current = state and redis.call("hget", key, "rid")
    if current and current ~= rid then return {"stale", "superseded by a newer run"} end
    if redis.call("hget", key, "cancel_requested") == "1" then return {"cancelled"} end
    local running_key = ns .. ":__running__." .. worker
    local alone_key = ns .. ":__alone__." .. worker
    local alone = redis.call("get", alone_key)
    if alone and alone ~= job_id then return {"limited", "50", "alone"} end
    if state and redis.call("hget", key, "isolate") == "1" then
        redis.call("set", alone_key, job_id, "PX", tonumber(a[9]) or DEFAULT_ALONE_LEASE_MS)
        if redis.call("scard", running_key) > 0 then return {"limited", "50", "isolated"} end
    end
    if limits ~= "" then
        local wait = take_limits(cjson.decode(limits), rid)
        if wait >= 0 then return {"limited", tostring(wait)} end
    end
    if not state then
        -- A message written straight to Redis by another producer: give it a record now.
        record_fields(key, {id = job_id, queue = queue, actor = actor, created_ms = now,
            enqueued_ms = now, explicit = "0", deaths = 0, priority = 0, max_attempts = 0})
        stat(queue, "enqueued")
    end
    attempt = math.max(tonumber(attempt) or 1, tonumber(redis.call("hget", key, "next_attempt")) or 0)
    record_fields(key, {state = "active", rid = rid, started_ms = now, worker = worker,
        attempt = attempt})
    if policy ~= "" then
        local p = decode(policy)
        record_fields(key, {policy = policy, max_attempts = (p and tonumber(p.attempts)) or 0})
    end
    redis.call("zadd", qkey(queue, "active"), now, job_id)
    redis.call("sadd", running_key, job_id)
    event(job_id, queue, actor, "active", {attempt = attempt, worker = worker})
    return {"run", tostring(attempt)}
end

local function release_limits(limit_keys, token)
    for _, name in ipairs(limit_keys) do
        redis.call("zrem", ns .. ":limit:" .. name, token)
    end
end

-- finish(queue, rid, job_id, actor, worker, outcome, detail JSON, keep, dedup_s, limit keys JSON,
--        new_rid, new_message, eta_ms, priority[, tally key, tally field, tally ttl_s])
--   -> {"ok"} | {"lost"}
-- outcome: completed | skipped | failed | cancelled | retry | requeue | ack
-- tally: a count kept elsewhere (the queue monitor's outcomes per minute), added here so it
-- goes with the outcome: once, in the same step, and not by a run that lost the job.
local function cmd_finish(a)
    local queue, rid, job_id, actor, worker, outcome = a[1], a[2], a[3], a[4], a[5], a[6]
    local detail = decode(a[7]) or {}
    local keep, dedup_s = tonumber(a[8]), tonumber(a[9])
    local key = job_key(job_id)
    local msgs = qkey(queue, "msgs")
    release_limits(cjson.decode(a[10]), rid)
    local held = redis.call("srem", ns .. ":__acks__." .. worker .. "." .. queue, rid)
    -- Letting go of a copy we no longer hold touches nothing: its body may be another
    -- worker's now (the sweep handed the same message id back to the queue).
    if held == 0 and outcome == "ack" then return {"lost"} end
    -- Not running here any more (a run that ended, or a start that did not happen); a job
    -- that kept this worker to itself lets it go.
    redis.call("srem", ns .. ":__running__." .. worker, job_id)
    local alone_key = ns .. ":__alone__." .. worker
    if redis.call("get", alone_key) == job_id then redis.call("del", alone_key) end
    if held == 0 then
        -- The stall sweep took this message back (we were presumed dead). If it still
        -- waits, take it out of the queue again and record our outcome; if another
        -- worker has started or finished it since, that run owns the record. So does a
        -- run of another id: this worker handed the job back when it stopped (release).
        local state = redis.call("hget", key, "state")
        if (state ~= "waiting" and state ~= "delayed") or
                redis.call("hget", key, "worker") ~= worker or
                redis.call("hget", key, "rid") ~= rid then
            return {"lost"}
        end
        remove_waiting(queue, rid)
        redis.call("zrem", qkey(queue, "delayed"), rid)
        redis.call("hdel", key, "next_attempt")
    end
    if a[15] and a[15] ~= "" then
        redis.call("hincrby", a[15], a[16], 1)
        redis.call("expire", a[15], tonumber(a[17]))
    end
    local message = redis.call("hget", msgs, rid)
    redis.call("hdel", msgs, rid)
    if outcome == "ack" then return {"ok"} end
    redis.call("zrem", qkey(queue, "active"), job_id)
    if redis.call("exists", key) == 0 then
        -- Never started here (garbage or an unknown actor from another producer): still
        -- leave a record of what happened to it, never a silent drop. First sight of it,
        -- as in start and park: it counts as sent, so that its end below has a send.
        record_fields(key, {id = job_id, queue = queue, actor = actor, created_ms = now,
            enqueued_ms = now, explicit = "0", deaths = 0, priority = 0, max_attempts = 0,
            attempt = 0})
        stat(queue, "enqueued")
    end
    if outcome == "retry" or outcome == "requeue" then
        local new_rid, new_message = a[11], a[12]
        local eta, priority = tonumber(a[13]), tonumber(a[14])
        redis.call("hset", msgs, new_rid, new_message)
        local requeue = outcome == "requeue"  -- handed back without using an attempt
        local fields = {state = "waiting", rid = new_rid, run_at_ms = math.max(eta, now)}
        if eta > now then
            fields.state = "delayed"
            add_delayed(queue, new_rid, eta)
            if requeue then fields.front = "1" end  -- it gets its place back when due
        else
            local seq = tonumber(redis.call("hget", key, "seq"))
            seq = push_waiting(queue, new_rid, priority, requeue, seq)
            if seq then fields.seq = seq end
        end
        record_fields(key, fields)
        if outcome == "retry" then
            redis.call("hset", key, "error", short(detail.error) or "")
            stat(queue, "retried")
            event(job_id, queue, actor, "retrying", {attempt = detail.attempt,
                error = short(detail.error), run_at_ms = eta})
        end
        return {"ok"}
    end
    local state = outcome
    record_fields(key, {state = state, finished_ms = now})
    -- The message stays with the record: to inspect an ended job and to retry a failed one.
    if message then redis.call("hset", key, "message", message) end
    if outcome == "completed" or outcome == "skipped" then
        redis.call("hset", key, "dedup_until_ms", now + dedup_s * 1000)
        if short(detail.result) then redis.call("hset", key, "result", short(detail.result)) end
        if short(detail.reason) then redis.call("hset", key, "reason", short(detail.reason)) end
    elseif short(detail.error) then
        redis.call("hset", key, "error", short(detail.error))
    end
    redis.call("zadd", qkey(queue, index_of(state)), ended_score(queue), job_id)
    stat(queue, state)
    local started = tonumber(redis.call("hget", key, "started_ms")) or now
    event(job_id, queue, actor, state, {attempt = detail.attempt, error = short(detail.error),
        result = short(detail.result), reason = short(detail.reason), duration_ms = now - started})
    trim(queue, index_of(state), keep, dedup_s)
    return {"ok"}
end

-- The delay before retry number retries_so_far + 1 (RetryPolicy.delay_ms in options.py).
local function backoff_ms(policy, retries_so_far, unit)
    local base = tonumber(policy.backoff_ms) or 0
    if policy.backoff ~= "fixed" then
        base = math.min(base * 2 ^ math.min(retries_so_far, 30),
            tonumber(policy.backoff_max_ms) or base)
    end
    if policy.jitter ~= false then base = base * (1 + 0.25 * (2 * unit - 1)) end
    return math.max(0, math.floor(base))
end

-- The jobs a dead worker was running: [{rid, text, msg, job_id, queue}], and what it had
-- only fetched: [{queue, rid, text, msg}].
local function held_by(w)
    local running, fetched = {}, {}
    for _, queue in ipairs(redis.call("smembers", ns .. ":__queues__." .. w)) do
        local acks = ns .. ":__acks__." .. w .. "." .. queue
        for _, rid in ipairs(redis.call("smembers", acks)) do
            local text = redis.call("hget", qkey(queue, "msgs"), rid)
            local msg = text and decode(text)
            local item = {queue = queue, rid = rid, text = text, msg = msg}
            if msg then
                item.job_id = message_job_id(msg)
                local key = job_key(item.job_id)
                if redis.call("hget", key, "state") == "active" and
                        redis.call("hget", key, "worker") == w then
                    table.insert(running, item)
                else
                    table.insert(fetched, item)
                end
            elseif text then
                table.insert(fetched, item)
            end
        end
        redis.call("del", acks)
    end
    return running, fetched
end

-- A job that was running on a dead worker: stalled. When it ran alone there, the death is
-- its own: it counts towards the poison-pill quarantine (deaths) and used its attempt (it
-- runs again after its backoff, or fails for good, "stalled"). A death shared with other
-- jobs is nobody's for sure (any of them may have killed the worker): it counts as a
-- shared death, costs no attempt (the same attempt runs again after the backoff), and a
-- job that has died in company ISOLATE_AFTER_SHARED_DEATHS times runs alone from then on,
-- so a pill that only ever died next to others soon dies alone, while its bystanders lose
-- nothing and run alone once, safely.
local function stall(item, w, sole, poison, default_policy, unit, keep_failed)
    local queue, job_id, rid, text, msg = item.queue, item.job_id, item.rid, item.text, item.msg
    local key = job_key(job_id)
    local actor = msg.actor_name or ""
    local deaths = tonumber(redis.call("hget", key, "deaths")) or 0
    local shared = tonumber(redis.call("hget", key, "shared_deaths")) or 0
    if sole then
        deaths = redis.call("hincrby", key, "deaths", 1)
    else
        shared = redis.call("hincrby", key, "shared_deaths", 1)
    end
    local attempt = tonumber(redis.call("hget", key, "attempt")) or 1
    local policy = decode(redis.call("hget", key, "policy") or "")
    if not policy then
        -- Started without its policy (an older worker): the default backoff, and the
        -- attempts the producer resolved when it sent the job, if it did.
        policy = {}
        for k, v in pairs(default_policy) do policy[k] = v end
        local max_attempts = tonumber(redis.call("hget", key, "max_attempts")) or 0
        if max_attempts > 0 then policy.attempts = max_attempts end
    end
    redis.call("zrem", qkey(queue, "active"), job_id)
    stat(queue, "stalled")
    local found = {job_id = job_id, queue = queue, actor = actor, deaths = deaths,
        shared_deaths = shared, attempt = attempt, args = msg.args,
        critical = (msg.options or {}).critical == true}
    local function ended(state, reason)
        record_fields(key, {state = state, finished_ms = now, message = text, reason = reason})
        redis.call("hdel", qkey(queue, "msgs"), rid)
        redis.call("hdel", key, "next_attempt")
        redis.call("zadd", qkey(queue, state), ended_score(queue), job_id)
        stat(queue, state)
        found.outcome = state
        found.reason = reason
        -- Failed jobs are kept up to keep-last-N, as the ones a worker fails; the dead
        -- (quarantined) ones until an operator empties the dead set.
        local keep = keep_failed_of(msg, keep_failed)
        if state == "failed" and keep then trim(queue, "failed", keep, 0) end
    end
    if deaths >= poison then
        event(job_id, queue, actor, "stalled", {deaths = deaths, shared_deaths = shared,
            worker = w, attempt = attempt})
        ended("dead", "killed its worker " .. deaths .. " times (poison pill)")
        event(job_id, queue, actor, "dead", {deaths = deaths, reason = "poison pill"})
    elseif sole and attempt >= (tonumber(policy.attempts) or 1) then
        event(job_id, queue, actor, "stalled", {deaths = deaths, shared_deaths = shared,
            worker = w, attempt = attempt})
        ended("failed", "stalled")
        redis.call("hset", key, "error", "stalled: its worker stopped on attempt " .. attempt)
        event(job_id, queue, actor, "failed", {attempt = attempt, reason = "stalled",
            error = "stalled"})
    else
        local run_at = now + backoff_ms(policy, attempt - 1, unit)
        local fields = {state = "delayed", run_at_ms = run_at, next_attempt = attempt + 1}
        if not sole then
            fields.next_attempt = attempt  -- a shared death charges nobody an attempt
            if shared >= ISOLATE_AFTER_SHARED_DEATHS then
                fields.isolate = "1"
                found.isolated = true
            end
        end
        record_fields(key, fields)
        add_delayed(queue, rid, run_at)
        found.outcome = "delayed"
        found.run_at_ms = run_at
        event(job_id, queue, actor, "stalled", {deaths = deaths, shared_deaths = shared,
            worker = w, attempt = attempt, run_at_ms = run_at})
    end
    return found
end

-- sweep(timeout_ms, poison_deaths, default policy JSON, unit random[, keep_failed])
--   -> JSON {requeued = n, stalled = [{job_id, queue, actor, deaths, outcome, ...}]}
-- Give back what dead workers had fetched; run again, or end, what they were running.
local function cmd_sweep(a)
    local timeout, poison = tonumber(a[1]), tonumber(a[2])
    local default_policy = decode(a[3] or "") or {attempts = 1}
    local unit = tonumber(a[4]) or 0.5
    local keep_failed = tonumber(a[5])
    local heartbeats = ns .. ":__heartbeats__"
    local dead_workers = redis.call("zrangebyscore", heartbeats, 0, now - timeout)
    local requeued = 0
    local stalled = {}
    for _, w in ipairs(dead_workers) do
        local running, fetched = held_by(w)
        for _, item in ipairs(running) do
            -- Spread the jitter of jobs found in one sweep (golden-ratio steps).
            unit = (unit + 0.6180339887) % 1
            table.insert(stalled, stall(item, w, #running == 1, poison, default_policy, unit,
                keep_failed))
        end
        for _, item in ipairs(fetched) do
            push_waiting(item.queue, item.rid, item.msg and message_priority(item.msg) or 0, true,
                place_of(item.msg))
            requeued = requeued + 1
        end
        redis.call("del", ns .. ":__queues__." .. w, ns .. ":__running__." .. w,
            ns .. ":__alone__." .. w)
        redis.call("zrem", heartbeats, w)
    end
    if #stalled == 0 then return cjson.encode({requeued = requeued}) end
    return cjson.encode({requeued = requeued, stalled = stalled})
end

-- requeue(queue, worker, rid...) -> count: a stopping worker hands back what it fetched
-- but did not start, at the head of its queue.
local function cmd_requeue(a)
    local queue, worker = a[1], a[2]
    local acks = ns .. ":__acks__." .. worker .. "." .. queue
    local msgs = qkey(queue, "msgs")
    local n = 0
    for i = #a, 3, -1 do
        local rid = a[i]
        if redis.call("srem", acks, rid) > 0 then
            local text = redis.call("hget", msgs, rid)
            if text then
                local msg = decode(text)
                push_waiting(queue, rid, msg and message_priority(msg) or 0, true, place_of(msg))
                n = n + 1
            end
        end
    end
    return n
end

-- A job a stopping worker still runs, handed back: it waits again at its old place under
-- the run id new_rid (body new_message, when the worker gave one), as the same attempt.
-- Neither a death nor an attempt is charged: the worker was not killed, it gave up on
-- the job. The record forgets the worker, and its run id changes, so whatever the
-- abandoned thread does later (finish, ack, progress) finds another run and changes nothing.
local function hand_back(item, w, new_rid, new_message, limit_keys)
    local queue, job_id, rid = item.queue, item.job_id, item.rid
    local key = job_key(job_id)
    local msgs = qkey(queue, "msgs")
    release_limits(limit_keys or {}, rid)
    if new_rid and new_message then
        redis.call("hdel", msgs, rid)
        redis.call("hset", msgs, new_rid, new_message)
    else
        -- Not known to the worker's threads (it had only just started): same id and body.
        new_rid = rid
    end
    redis.call("zrem", qkey(queue, "active"), job_id)
    local seq = push_waiting(queue, new_rid, item.msg and message_priority(item.msg) or 0, true,
        tonumber(redis.call("hget", key, "seq")))
    local fields = {state = "waiting", rid = new_rid, run_at_ms = now}
    if seq then fields.seq = seq end
    record_fields(key, fields)
    redis.call("hdel", key, "worker", "started_ms")
    stat(queue, "released")
    local attempt = tonumber(redis.call("hget", key, "attempt")) or 1
    event(job_id, queue, item.msg and item.msg.actor_name or "", "waiting",
        {released = true, worker = w, attempt = attempt})
    return job_id
end

-- release(worker, running JSON) -> JSON {released = [job ids], requeued = n}
-- The last call of a worker that stops gracefully: it hands back everything it holds and
-- leaves. running: [{queue, rid, new_rid, new_message, limit_keys}], the jobs its threads
-- still run (abandoned when the stop's time for them ran out), each with its next run's
-- id and body. Those, and any other job Redis lists as running there, go back to waiting
-- at their place without using an attempt and without a death (see hand_back); what it
-- had only fetched goes back to the head of its queue. Then the worker is forgotten (its
-- heartbeat, queues, running set, alone reservation): no stall sweep will judge it, and a
-- copy left in its memory is stale from now on (start refuses it, finish records nothing).
local function cmd_release(a)
    local w = a[1]
    local given = {}
    for _, entry in ipairs(decode(a[2] or "") or {}) do given[entry.rid] = entry end
    local running, fetched = held_by(w)
    local items = {}
    for _, item in ipairs(running) do
        -- A copy of an older run than the record's is only a fetched copy (start lets it go).
        item.running = redis.call("hget", job_key(item.job_id), "rid") == item.rid
        table.insert(items, item)
    end
    for _, item in ipairs(fetched) do table.insert(items, item) end
    -- Back to the head in their old order: the latest place first, so the earliest ends up
    -- in front.
    for _, item in ipairs(items) do item.place = place_of(item.msg) or 0 end
    table.sort(items, function(x, y) return x.place > y.place end)
    local released, requeued = {}, 0
    for _, item in ipairs(items) do
        if item.running then
            local entry = given[item.rid] or {}
            table.insert(released, hand_back(item, w, entry.new_rid, entry.new_message,
                entry.limit_keys))
        else
            push_waiting(item.queue, item.rid, item.msg and message_priority(item.msg) or 0, true,
                item.place)
            requeued = requeued + 1
        end
    end
    redis.call("del", ns .. ":__queues__." .. w, ns .. ":__running__." .. w,
        ns .. ":__alone__." .. w)
    redis.call("zrem", ns .. ":__heartbeats__", w)
    return cjson.encode({released = released, requeued = requeued})
end

-- cancel(job_id[, keep_failed]) -> {"cancelled" | "requested", queue, actor, state before}
--                               | {"finished", state} | {"missing"}
-- keep_failed: how many cancelled jobs the queue keeps (the message's own option wins).
local function cmd_cancel(a)
    local job_id, default_keep = a[1], a[2]
    local key = job_key(job_id)
    local state = redis.call("hget", key, "state")
    if not state then return {"missing"} end
    if not ACTIVE_STATES[state] then return {"finished", state} end
    local queue = redis.call("hget", key, "queue")
    local actor = redis.call("hget", key, "actor") or ""
    local rid = redis.call("hget", key, "rid") or ""
    local removed = 0
    if state == "waiting" then
        removed = remove_waiting(queue, rid)
    elseif state == "delayed" then
        removed = redis.call("zrem", qkey(queue, "delayed"), rid)
    end
    if removed > 0 then
        local message = redis.call("hget", qkey(queue, "msgs"), rid)
        redis.call("hdel", qkey(queue, "msgs"), rid)
        record_fields(key, {state = "cancelled", finished_ms = now, cancel_requested = 1})
        if message then redis.call("hset", key, "message", message) end
        redis.call("zadd", qkey(queue, "cancelled"), ended_score(queue), job_id)
        stat(queue, "cancelled")
        event(job_id, queue, actor, "cancelled", {while_state = state})
        local keep = keep_failed_of(message and decode(message), default_keep)
        if keep then trim(queue, "cancelled", keep, 0) end
        return {"cancelled", queue, actor, state}
    end
    -- Running, or already fetched by a worker: it sees the request when it starts or checks.
    redis.call("hset", key, "cancel_requested", 1)
    event(job_id, queue, actor, "cancel_requested", {while_state = state})
    return {"requested", queue, actor, state}
end

-- retry(job_id, new_rid, new_message) -> {"enqueued"} | {"not_retryable", state} | {"missing"}
local function cmd_retry(a)
    local job_id, new_rid, new_message = a[1], a[2], a[3]
    local key = job_key(job_id)
    local state = redis.call("hget", key, "state")
    if not state then return {"missing"} end
    if not RETRYABLE_STATES[state] then return {"not_retryable", state} end
    local queue = redis.call("hget", key, "queue")
    local actor = redis.call("hget", key, "actor") or ""
    redis.call("zrem", qkey(queue, index_of(state)), job_id)
    redis.call("hset", qkey(queue, "msgs"), new_rid, new_message)
    local msg = decode(new_message) or {}
    local seq = push_waiting(queue, new_rid, message_priority(msg), false)
    record_fields(key, {state = "waiting", rid = new_rid, attempt = 0, deaths = 0,
        shared_deaths = 0, cancel_requested = 0, enqueued_ms = now, run_at_ms = now, seq = seq})
    -- What the old run left is history now (its events stay in the job's history): the
    -- waiting job shows no error, result or progress it has not produced.
    redis.call("hdel", key, "message", "finished_ms", "next_attempt", "error", "reason",
        "result", "progress", "started_ms", "worker", "dedup_until_ms", "front", "isolate")
    stat(queue, "enqueued")
    event(job_id, queue, actor, "waiting", {retried_from = state})
    return {"enqueued"}
end

-- remove(job_id) -> {"removed", queue, actor, state before} | {"active"} | {"requested"}
--                 | {"missing"}
local function cmd_remove(a)
    local job_id = a[1]
    local key = job_key(job_id)
    local state = redis.call("hget", key, "state")
    if not state then return {"missing"} end
    local queue = redis.call("hget", key, "queue")
    local actor = redis.call("hget", key, "actor") or ""
    local rid = redis.call("hget", key, "rid") or ""
    if state == "active" then return {"active"} end
    if state == "waiting" or state == "delayed" then
        local removed = remove_waiting(queue, rid) + redis.call("zrem", qkey(queue, "delayed"), rid)
        if removed == 0 then
            redis.call("hset", key, "cancel_requested", 1)
            return {"requested"}
        end
        redis.call("hdel", qkey(queue, "msgs"), rid)
        -- Removed before it ran: that is how this job ends. An ended job's end is counted
        -- already; deleting its record (like trimming it) is no second end.
        stat(queue, "removed")
    else
        redis.call("zrem", qkey(queue, index_of(state)), job_id)
    end
    redis.call("del", key)
    event(job_id, queue, actor, "removed", {while_state = state})
    redis.call("del", hist_key(job_id))
    return {"removed", queue, actor, state}
end

-- progress(job_id, value JSON[, rid]) -> {"ok", queue, actor} | {"missing"} | {"stale", state}
-- rid: the run reporting it (a worker's job context always gives it). Its progress is
-- written only while the job is active with that run: a run the job has moved on from
-- (handed back, stalled and run again, retried, ended) may still be going in an actor
-- that outlived it, and must not write over the current run's progress or an ended
-- job's. Without rid (an operator, an outside producer) it is written whatever the state.
local function cmd_progress(a)
    local job_id, value, rid = a[1], a[2], a[3]
    local key = job_key(job_id)
    local state = redis.call("hget", key, "state")
    if not state then return {"missing"} end
    if rid and rid ~= "" and (state ~= "active" or redis.call("hget", key, "rid") ~= rid) then
        return {"stale", state}
    end
    redis.call("hset", key, "progress", value)
    local queue = redis.call("hget", key, "queue")
    local actor = redis.call("hget", key, "actor") or ""
    event(job_id, queue, actor, "progress", {progress = decode("[" .. value .. "]")[1]})
    return {"ok", queue, actor}
end

-- empty_dead(queue) -> number of jobs deleted
local function cmd_empty_dead(a)
    local queue = a[1]
    local idx = qkey(queue, "dead")
    local ids = redis.call("zrange", idx, 0, -1)
    for _, job_id in ipairs(ids) do
        redis.call("del", job_key(job_id), hist_key(job_id))
    end
    redis.call("del", idx)
    -- No total changes: each of these jobs was counted when it ended, as dead.
    return #ids
end

-- pause(queue, "1"|"0") -> 1 if the state changed
local function cmd_pause(a)
    local queue, on = a[1], a[2]
    local changed
    if on == "1" then
        changed = redis.call("sadd", ns .. ":paused", queue)
    else
        changed = redis.call("srem", ns .. ":paused", queue)
        wake(queue)
    end
    if changed == 1 then
        local kind = "resumed"
        if on == "1" then kind = "paused" end
        redis.call("xadd", events, "MAXLEN", "~", EVENTS_MAXLEN, "*", "id", "",
            "type", "queue." .. kind, "payload", cjson.encode({queue = queue, event = kind}),
            "correlation_id", "", "at", now_iso)
    end
    return changed
end

-- purge(queue) -> number of jobs dropped: every waiting and delayed job of a queue.
local function cmd_purge(a)
    local queue = a[1]
    local msgs = qkey(queue, "msgs")
    local rids = redis.call("lrange", qkey(queue, ""), 0, -1)
    for _, suffix in ipairs({"hi", "lo", "delayed"}) do
        for _, rid in ipairs(redis.call("zrange", qkey(queue, suffix), 0, -1)) do
            table.insert(rids, rid)
        end
    end
    -- Messages another producer pushed straight onto the list have no record yet: never
    -- counted as sent, so they are counted now, beside their removal (sent = ended holds).
    local unrecorded = 0
    for _, rid in ipairs(rids) do
        local text = redis.call("hget", msgs, rid)
        local msg = text and decode(text)
        local recorded = false
        if msg then
            local job_id = message_job_id(msg)
            recorded = redis.call("exists", job_key(job_id)) == 1
            redis.call("del", job_key(job_id), hist_key(job_id))
        end
        if not recorded then unrecorded = unrecorded + 1 end
        redis.call("hdel", msgs, rid)
    end
    redis.call("del", qkey(queue, ""), qkey(queue, "hi"), qkey(queue, "lo"),
        qkey(queue, "delayed"))
    if unrecorded > 0 then stat(queue, "enqueued", unrecorded) end
    if #rids > 0 then stat(queue, "removed", #rids) end
    return #rids
end

local COMMANDS = {
    enqueue = cmd_enqueue, fetch = cmd_fetch, park = cmd_park, start = cmd_start, finish = cmd_finish,
    sweep = cmd_sweep, requeue = cmd_requeue, release = cmd_release, cancel = cmd_cancel, retry = cmd_retry, remove = cmd_remove,
    progress = cmd_progress, empty_dead = cmd_empty_dead, pause = cmd_pause, purge = cmd_purge,
}

local args = {}
for i = 4, #ARGV do args[i - 3] = ARGV[i] end
local handler = COMMANDS[command]
if not handler then return redis.error_reply("unknown jobs command " .. tostring(command)) end
return handler(args)
