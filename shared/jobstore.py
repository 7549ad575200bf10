"""The job store: every Redis key of a job, its TTLs and its state machine, in one place.

Layout (DESIGN.md §3), every key with a TTL:
- `m2fp:job:{id}`  hash: status, token_hash, kid + wrapped_dek (the job's data key, wrapped),
                   result_pk (the token-derived public key the result is sealed to), attempts, error_code, error_message, created/started/finished, worker.
- `m2fp:in:{id}`   the encrypted input image (deleted when the result is stored).
- `m2fp:out:{id}`  the encrypted result (deleted, atomically, by the one fetch that served it:
                   the gateway peeks, decrypts and renders, then takes it only if it is still there).
- `m2fp:inflight:{client tag}`  sorted set of a client's admitted job ids (score: when the
                   entry lapses at the latest), for the per-client cap on jobs in flight.
- `m2fp:claimed:{worker}`  set of the jobs a worker process claimed and has not ended, and
                   `m2fp:claimers` the set of such workers: the reaper's view. A worker whose
                   heartbeat (`shared.heartbeat`) lapsed has its `running` jobs put back to
                   `queued` by `reap` (run by every live worker), and their messages re-sent, so
                   a dead worker host costs its jobs about a heartbeat TTL, not Redis's
                   visibility timeout. A claim on a job `running` under another live worker is
                   refused (`busy`), so a late redelivery never runs a job twice at once.
- `m2fp:pending`   sorted set of queued jobs, scored by when their current message was sent, and
                   `m2fp:sent_watermark` the latest such time among claimed jobs. The broker's
                   list is FIFO, so a queued job sent `margin` s before a job already claimed,
                   whose message is not unacked either, lost it: kombu's Redis transport pops a
                   message (BRPOP) and records it as unacked in a second round trip, and a
                   consumer killed in between takes it along. `vanished` lists those; the
                   reaper re-sends them.

State machine: queued -> running -> done | failed | expired. Transitions that must not race
(a worker storing a result while the client withdraws the job, two fetches at once, a poll
noticing an expired input) run as Lua scripts, so each is atomic in Redis. Job status lives
here, never in Celery's result backend (which reports unknown ids as PENDING).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

import redis
from redis.typing import EncodableT, FieldT

from shared.constants import (
    CLAIMED_KEY_PREFIX,
    CLAIMERS_KEY,
    JOB_KEY_PREFIX,
    PENDING_KEY,
    SENT_WATERMARK_KEY,
    WORKER_KEY_PREFIX,
    claimed_key,
    inflight_key,
    input_key,
    job_key,
    output_key,
)
from shared.redis_conn import make_client

REAP_GRACE_SECONDS = 10.0  # a claim younger than this is never reaped (the heartbeat may lag)

# KEYS: job, in, claimed set of this worker, claimers, pending, sent watermark. ARGV:
# max_attempts, now, worker, min_input_ttl, job id, worker key prefix, claimed key prefix,
# claimed set TTL (also the watermark's).
# Returns {"ok", kid, wrapped_dek, input} | {"gone"} | {"final", status} | {"expired"}
# | {"worker_lost"} | {"busy"} (running on another worker whose heartbeat is live).
_CLAIM = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
if status ~= 'queued' and status ~= 'running' then return {'final', status} end
local owner = redis.call('HGET', KEYS[1], 'worker')
if status == 'running' and owner and owner ~= ARGV[3]
   and redis.call('EXISTS', ARGV[6] .. owner) == 1 then
  return {'busy'}
end
local payload = redis.call('GET', KEYS[2])
if not payload then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'error_code', 'expired', 'finished', ARGV[2])
  redis.call('HDEL', KEYS[1], 'wrapped_dek')
  return {'expired'}
end
local attempts = redis.call('HINCRBY', KEYS[1], 'attempts', 1)
if attempts > tonumber(ARGV[1]) then
  redis.call('HSET', KEYS[1], 'status', 'failed', 'error_code', 'worker_lost', 'finished', ARGV[2])
  redis.call('HDEL', KEYS[1], 'wrapped_dek')
  redis.call('DEL', KEYS[2])
  return {'worker_lost'}
end
redis.call('HSET', KEYS[1], 'status', 'running', 'started', ARGV[2], 'worker', ARGV[3])
local sent = redis.call('ZSCORE', KEYS[5], ARGV[5])
if sent then
  redis.call('ZREM', KEYS[5], ARGV[5])
  if tonumber(sent) > tonumber(redis.call('GET', KEYS[6]) or '0') then
    redis.call('SET', KEYS[6], sent, 'EX', ARGV[8])
  end
end
if owner and owner ~= ARGV[3] then redis.call('SREM', ARGV[7] .. owner, ARGV[5]) end
redis.call('SADD', KEYS[3], ARGV[5])
redis.call('EXPIRE', KEYS[3], ARGV[8])
redis.call('SADD', KEYS[4], ARGV[3])
redis.call('EXPIRE', KEYS[4], ARGV[8])
if redis.call('TTL', KEYS[2]) < tonumber(ARGV[4]) then redis.call('EXPIRE', KEYS[2], ARGV[4]) end
local fields = redis.call('HMGET', KEYS[1], 'kid', 'wrapped_dek', 'result_pk')
return {'ok', fields[1], fields[2], payload, fields[3]}
"""

# Both end a claim: the job leaves its worker's claimed set (ARGV: ..., job id, claimed prefix).
# Last, after the first write: a script's first write decides whether a full Redis (maxmemory,
# noeviction) refuses it, and that must be the result's SET, not this SREM, which would let it.
_UNCLAIM = """
local owner = redis.call('HGET', KEYS[1], 'worker')
if owner then redis.call('SREM', ARGV[5] .. owner, ARGV[4]) end
"""

# KEYS: job, in, out. ARGV: result blob, result_ttl, now, job id, claimed prefix.
# Returns 1 stored | 0 discarded.
_STORE = (
    """
if redis.call('HGET', KEYS[1], 'status') ~= 'running' then return 0 end
redis.call('SET', KEYS[3], ARGV[1], 'EX', ARGV[2])
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'status', 'done', 'finished', ARGV[3])
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]) + 300)
"""
    + _UNCLAIM
    + """
return 1
"""
)

# KEYS: job, in. ARGV: code, now, (unused), job id, claimed prefix.
# Returns 1 | 0 (job gone or already final).
_FAIL = (
    """
local status = redis.call('HGET', KEYS[1], 'status')
if status ~= 'queued' and status ~= 'running' then return 0 end
redis.call('HSET', KEYS[1], 'status', 'failed', 'error_code', ARGV[1], 'finished', ARGV[2])
redis.call('HDEL', KEYS[1], 'wrapped_dek')
redis.call('DEL', KEYS[2])
"""
    + _UNCLAIM
    + """
return 1
"""
)

# KEYS: claimers, pending. ARGV: now, grace, worker key prefix, claimed key prefix, job key
# prefix, pending TTL.
# For each claimer without a live heartbeat: its jobs still `running` under its name (and
# started more than `grace` seconds ago) go back to `queued`; returns their ids. Atomic, so
# when several reapers run at once each job is requeued once.
_REAP = """
local requeued = {}
local cutoff = tonumber(ARGV[1]) - tonumber(ARGV[2])
for _, name in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  if redis.call('EXISTS', ARGV[3] .. name) == 0 then
    local claimed = ARGV[4] .. name
    local kept = 0
    for _, id in ipairs(redis.call('SMEMBERS', claimed)) do
      local job = ARGV[5] .. id
      local fields = redis.call('HMGET', job, 'status', 'worker', 'started')
      if fields[1] == 'running' and fields[2] == name then
        if tonumber(fields[3] or '0') < cutoff then
          redis.call('HSET', job, 'status', 'queued', 'requeued', ARGV[1])
          redis.call('HDEL', job, 'worker')
          redis.call('ZADD', KEYS[2], ARGV[1], id)
          redis.call('EXPIRE', KEYS[2], ARGV[6])
          redis.call('SREM', claimed, id)
          table.insert(requeued, id)
        else
          kept = kept + 1
        end
      else
        redis.call('SREM', claimed, id)
      end
    end
    if kept == 0 then
      redis.call('DEL', claimed)
      redis.call('SREM', KEYS[1], name)
    end
  end
end
return requeued
"""

# KEYS: job, pending. ARGV: now, min interval, job id, pending TTL. Returns 1 when a
# still-queued job may be re-sent now (and notes when, in the job and in `pending`), 0 when it
# runs, ended, is gone, or was re-sent less than the interval ago.
_RESEND = """
if redis.call('HGET', KEYS[1], 'status') ~= 'queued' then return 0 end
local last = tonumber(redis.call('HGET', KEYS[1], 'resent') or '0')
if last > tonumber(ARGV[1]) - tonumber(ARGV[2]) then return 0 end
redis.call('HSET', KEYS[1], 'resent', ARGV[1])
redis.call('ZADD', KEYS[2], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[2], ARGV[4])
return 1
"""

# KEYS: pending, sent watermark. ARGV: margin, limit, job key prefix. The queued jobs sent more
# than `margin` s before the watermark (at most `limit`); entries of jobs that are no longer
# queued (claimed elsewhere, ended, withdrawn, expired) are dropped on the way.
_VANISHED = """
local mark = tonumber(redis.call('GET', KEYS[2]) or '0')
if mark == 0 then return {} end
local cutoff = string.format('(%.3f', mark - tonumber(ARGV[1]))
local found = {}
for _, id in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', cutoff, 'LIMIT', 0, ARGV[2])) do
  if redis.call('HGET', ARGV[3] .. id, 'status') == 'queued' then
    table.insert(found, id)
  else
    redis.call('ZREM', KEYS[1], id)
  end
end
return found
"""

# KEYS: job, in, out. ARGV: now. Marks lost data as expired, then returns the record as a flat list.
_STATUS = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {} end
if (status == 'queued' or status == 'running') and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'error_code', 'expired', 'finished', ARGV[1])
  redis.call('HDEL', KEYS[1], 'wrapped_dek')
elseif status == 'done' and not redis.call('HGET', KEYS[1], 'fetched')
       and redis.call('EXISTS', KEYS[3]) == 0 then
  redis.call('HSET', KEYS[1], 'status', 'expired', 'error_code', 'expired')
  redis.call('HDEL', KEYS[1], 'wrapped_dek')
end
return redis.call('HGETALL', KEYS[1])
"""

# KEYS: job, out. Returns {"ok", blob, kid, wrapped} | {"gone"} | {"not_ready", status} | {"fetched"}.
# Reads the sealed result without taking it: the gateway decrypts and renders it first.
_PEEK = """
local status = redis.call('HGET', KEYS[1], 'status')
if not status then return {'gone'} end
if status ~= 'done' then return {'not_ready', status} end
local blob = redis.call('GET', KEYS[2])
if not blob then return {'fetched'} end
return {'ok', blob, redis.call('HGET', KEYS[1], 'kid'), redis.call('HGET', KEYS[1], 'wrapped_dek')}
"""

# KEYS: job, out. ARGV: sha1 of the blob the caller peeked, now. Returns 1 taken | 0 not (any more).
# Deletes the result and shreds the data key only if the result is still the one peeked, so of
# concurrent fetches exactly one wins, and a fetch that failed before this point took nothing.
_TAKE = """
local blob = redis.call('GET', KEYS[2])
if not blob or redis.sha1hex(blob) ~= ARGV[1] then return 0 end
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[1], 'wrapped_dek')
redis.call('HSET', KEYS[1], 'fetched', ARGV[2])
return 1
"""

# KEYS: the client's in-flight set. ARGV: job id, cap, now, lapse_at, key ttl, job key prefix.
# Counts the client's jobs still queued or running (dropping the others), then admits the new
# job only below the cap. Returns 1 admitted | 0 refused. Atomic: two submits never both pass.
_ADMIT_CLIENT = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', ARGV[3])
local live = 0
for _, id in ipairs(redis.call('ZRANGE', KEYS[1], 0, -1)) do
  local status = redis.call('HGET', ARGV[6] .. id, 'status')
  if status == 'queued' or status == 'running' then live = live + 1 else redis.call('ZREM', KEYS[1], id) end
end
if live >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[4], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[5])
return 1
"""


@dataclass(frozen=True)
class Claim:
    """What a worker gets when it claims a job: the wrapped data key and the sealed input."""

    outcome: str  # "ok", "gone", "final", "expired", "worker_lost", "busy"
    key_id: str = ""
    wrapped_key: bytes = b""
    sealed_input: bytes = b""
    attempts: int = 0
    result_key: bytes = b""  # the token-derived public key the result is sealed to


@dataclass(frozen=True)
class Fetch:
    """Outcome of the one-time result fetch."""

    outcome: str  # "ok", "gone", "not_ready", "fetched"
    status: str = ""
    sealed_result: bytes = b""
    key_id: str = ""
    wrapped_key: bytes = b""


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else (value or "")


class JobStore:
    """Atomic operations on one Redis for the gateway and the workers."""

    def __init__(
        self,
        client: redis.Redis,
        *,
        input_ttl: int,
        result_ttl: int,
        job_ttl: int,
        max_attempts: int,
        claim_input_ttl: int,
    ):
        self.redis = client
        self.input_ttl, self.result_ttl, self.job_ttl = input_ttl, result_ttl, job_ttl
        self.max_attempts, self.claim_input_ttl = max_attempts, claim_input_ttl
        self._claim = client.register_script(_CLAIM)
        self._reap = client.register_script(_REAP)
        self._resend = client.register_script(_RESEND)
        self._vanished = client.register_script(_VANISHED)
        self._store = client.register_script(_STORE)
        self._fail = client.register_script(_FAIL)
        self._status = client.register_script(_STATUS)
        self._peek = client.register_script(_PEEK)
        self._take = client.register_script(_TAKE)
        self._admit_client = client.register_script(_ADMIT_CLIENT)

    @classmethod
    def from_settings(cls, settings, client: redis.Redis | None = None) -> JobStore:
        """Build from `shared.config.Settings` (and a client, or one from `shared.redis_conn`)."""
        client = client or make_client(settings)
        return cls(
            client,
            input_ttl=settings.input_ttl,
            result_ttl=settings.result_ttl,
            job_ttl=settings.job_ttl,
            max_attempts=settings.max_attempts,
            claim_input_ttl=settings.hard_time_limit + 60,
        )

    # --- gateway ---------------------------------------------------------------------------
    def create(
        self,
        job_id: str,
        *,
        token_hash: str,
        key_id: str,
        wrapped_key: bytes,
        sealed_input: bytes,
        result_key: bytes = b"",
    ) -> None:
        """Record a new queued job and store its sealed input, atomically, with TTLs."""
        now = round(time.time(), 3)
        record: dict[FieldT, EncodableT] = {
            "status": "queued",
            "token_hash": token_hash,
            "kid": key_id,
            "wrapped_dek": wrapped_key,
            "result_pk": result_key,
            "attempts": 0,
            "created": f"{now:.3f}",
        }
        with self.redis.pipeline(transaction=True) as pipe:
            pipe.hset(job_key(job_id), mapping=record)
            pipe.expire(job_key(job_id), self.job_ttl)
            pipe.set(input_key(job_id), sealed_input, ex=self.input_ttl)
            pipe.zadd(PENDING_KEY, {job_id: now})  # sent next, by the caller
            pipe.expire(PENDING_KEY, self.job_ttl)
            pipe.execute()

    def load_scripts(self) -> None:
        """Load every Lua script into Redis now (else each loads on its first call)."""
        for script in (
            self._claim,
            self._store,
            self._fail,
            self._status,
            self._peek,
            self._take,
            self._admit_client,
        ):
            script.sha = self.redis.script_load(script.script)

    def admit_for_client(self, client_tag: str, job_id: str, cap: int) -> bool:
        """Count `job_id` (already created) among the client's jobs in flight if fewer than `cap`."""
        now = time.time()
        return bool(
            self._admit_client(
                keys=[inflight_key(client_tag)],
                args=[
                    job_id,
                    cap,
                    f"{now:.3f}",
                    f"{now + self.job_ttl:.3f}",
                    self.job_ttl,
                    JOB_KEY_PREFIX,
                ],
            )
        )

    def status(self, job_id: str) -> dict[str, str] | None:
        """The job record (after marking lost inputs/results expired), or None if unknown."""
        flat = self._status(
            keys=[job_key(job_id), input_key(job_id), output_key(job_id)],
            args=[f"{time.time():.3f}"],
        )
        if not flat:
            return None
        record = {_text(k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}
        binary = ("wrapped_dek", "result_pk")
        return {k: (v if k in binary else _text(v)) for k, v in record.items()}

    def peek_result(self, job_id: str) -> Fetch:
        """Read the sealed result (and the data key) without taking it; `take_result` takes it."""
        reply = self._peek(keys=[job_key(job_id), output_key(job_id)])
        outcome = _text(reply[0])
        if outcome == "ok":
            return Fetch("ok", "done", reply[1], _text(reply[2]), reply[3])
        if outcome == "not_ready":
            return Fetch("not_ready", _text(reply[1]))
        return Fetch(outcome)

    def take_result(self, job_id: str, sealed_result: bytes) -> bool:
        """Delete the peeked result and shred its data key, atomically; False if already taken."""
        digest = hashlib.sha1(sealed_result, usedforsecurity=False).hexdigest()
        return bool(
            self._take(
                keys=[job_key(job_id), output_key(job_id)], args=[digest, f"{time.time():.3f}"]
            )
        )

    def fetch_result(self, job_id: str) -> Fetch:
        """Peek and take at once (for callers with nothing to do in between): the result, once."""
        fetch = self.peek_result(job_id)
        if fetch.outcome == "ok" and not self.take_result(job_id, fetch.sealed_result):
            return Fetch("fetched")
        return fetch

    def delete(self, job_id: str) -> bool:
        """Withdraw a job: delete its record, input and result now (a running worker discards)."""
        return bool(self.redis.delete(job_key(job_id), input_key(job_id), output_key(job_id)))

    # --- worker ----------------------------------------------------------------------------
    def claim(self, job_id: str, worker: str) -> Claim:
        """Start (or restart) a job: count the attempt, give up past max_attempts, return input."""
        reply = self._claim(
            keys=[
                job_key(job_id),
                input_key(job_id),
                claimed_key(worker),
                CLAIMERS_KEY,
                PENDING_KEY,
                SENT_WATERMARK_KEY,
            ],
            args=[
                self.max_attempts,
                f"{time.time():.3f}",
                worker,
                self.claim_input_ttl,
                job_id,
                WORKER_KEY_PREFIX,
                CLAIMED_KEY_PREFIX,
                self.job_ttl,
            ],
        )
        outcome = _text(reply[0])
        if outcome != "ok":
            return Claim(outcome)
        attempts = int(_text(self.redis.hget(job_key(job_id), "attempts")) or 0)
        result_key = reply[4] if len(reply) > 4 and reply[4] else b""  # a nil ends Lua's list
        return Claim("ok", _text(reply[1]), reply[2], reply[3], attempts, result_key)

    def store_result(self, job_id: str, sealed_result: bytes) -> bool:
        """Publish the sealed result and delete the input; False if the job was withdrawn."""
        return bool(
            self._store(
                keys=[job_key(job_id), input_key(job_id), output_key(job_id)],
                args=[
                    sealed_result,
                    self.result_ttl,
                    f"{time.time():.3f}",
                    job_id,
                    CLAIMED_KEY_PREFIX,
                ],
            )
        )

    def fail(self, job_id: str, code: str) -> bool:
        """End a job as failed with a public error code; deletes its input."""
        return bool(
            self._fail(
                keys=[job_key(job_id), input_key(job_id)],
                args=[code, f"{time.time():.3f}", "", job_id, CLAIMED_KEY_PREFIX],
            )
        )

    def may_resend(self, job_id: str, min_interval: float) -> bool:
        """Whether a still-queued job's message may be sent again now (at most once an interval)."""
        return bool(
            self._resend(
                keys=[job_key(job_id), PENDING_KEY],
                args=[f"{time.time():.3f}", min_interval, job_id, self.job_ttl],
            )
        )

    def vanished(self, margin: float, limit: int = 100) -> list[str]:
        """Queued jobs whose message was sent `margin` s or more before the latest claimed one's.

        The broker's list is FIFO, so such a job's message was taken from it: if the caller does
        not find it unacked either (`shared.queue.unacked_job_ids`), the consumer that took it
        died before recording it, and the job waits for a message that no longer exists.
        """
        reply = self._vanished(
            keys=[PENDING_KEY, SENT_WATERMARK_KEY], args=[margin, limit, JOB_KEY_PREFIX]
        )
        return [_text(job_id) for job_id in reply]

    def reap(self, grace: float = REAP_GRACE_SECONDS) -> list[str]:
        """Requeue (status `queued`) the running jobs of workers whose heartbeat lapsed.

        Returns the job ids; the caller re-sends their messages (`shared.queue.enqueue_parse`).
        A job a worker claimed less than `grace` seconds ago is left for the next pass.
        """
        reply = self._reap(
            keys=[CLAIMERS_KEY, PENDING_KEY],
            args=[
                f"{time.time():.3f}",
                grace,
                WORKER_KEY_PREFIX,
                CLAIMED_KEY_PREFIX,
                JOB_KEY_PREFIX,
                self.job_ttl,
            ],
        )
        return [_text(job_id) for job_id in reply]

    def queue_depth(self, queue: str) -> int:
        """Messages waiting in the Celery queue (the broker's Redis list)."""
        return int(self.redis.llen(queue))
