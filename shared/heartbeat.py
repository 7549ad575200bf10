"""Worker heartbeats: the one place that owns their Redis keys, their fields and their parsing.

Each model-serving pool process refreshes, every `HEARTBEAT_SECONDS`:
- `m2fp:worker:{name}`: a hash with `Heartbeat`'s fields, expiring after `HEARTBEAT_TTL`;
- `m2fp:workers`: a sorted set indexing the live names, scored by when each beat lapses.

Readers (the gateway's `/readyz`) take the index and read at most `limit` hashes: no SCAN of
the keyspace, so readiness costs the same with 10 keys or 10 million. A name whose hash expired
(a worker that died without saying goodbye) is dropped from the index by the next reader.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import redis
from redis.typing import EncodableT, FieldT

from shared.constants import KEY_PREFIX, worker_key

HEARTBEAT_SECONDS, HEARTBEAT_TTL = 10, 30
INDEX_KEY = f"{KEY_PREFIX}:workers"


@dataclass(frozen=True)
class Heartbeat:
    """What a live worker process says about itself."""

    name: str
    variant: str = ""
    device: str = ""
    untrained: bool = False
    pid: int = 0
    deform_op: str = ""
    precision: str = (
        ""  # the arithmetic it runs: fp32, bf16x3, bf16 or int8 (worker/m2fp/precision.py)
    )
    started: float = 0.0
    batch: int = 1  # most jobs per forward: 1 = per job, more = batching mode (worker/batching.py)
    batch_wait_ms: int = 0  # how long a batch waits for more jobs after its first

    def fields(self) -> dict[FieldT, EncodableT]:
        """The hash fields as Redis stores them."""
        values = asdict(self)
        values.pop("name")
        values["untrained"] = "1" if self.untrained else "0"
        return {key: str(value) for key, value in values.items()}

    @classmethod
    def parse(cls, name: str, raw: dict) -> Heartbeat:
        """A heartbeat from its hash (bytes or str keys and values)."""
        text = {
            (k.decode() if isinstance(k, bytes) else k): (v.decode() if isinstance(v, bytes) else v)
            for k, v in raw.items()
        }
        return cls(
            name=name,
            variant=text.get("variant", ""),
            device=text.get("device", ""),
            untrained=text.get("untrained") == "1",
            pid=int(text.get("pid") or 0),
            deform_op=text.get("deform_op", ""),
            precision=text.get("precision", ""),
            started=float(text.get("started") or 0),
            batch=int(text.get("batch") or 1),
            batch_wait_ms=int(text.get("batch_wait_ms") or 0),
        )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def beat(client: redis.Redis, heartbeat: Heartbeat, ttl: int = HEARTBEAT_TTL) -> None:
    """Refresh a worker's heartbeat and its place in the index."""
    key = worker_key(heartbeat.name)
    with client.pipeline(transaction=True) as pipe:
        pipe.hset(key, mapping=heartbeat.fields())
        pipe.expire(key, ttl)
        pipe.zadd(INDEX_KEY, {heartbeat.name: time.time() + ttl})
        pipe.expire(INDEX_KEY, ttl * 4)
        pipe.execute()


def remove(client: redis.Redis, name: str) -> None:
    """A worker stopping cleanly: its heartbeat is gone at once."""
    with client.pipeline(transaction=True) as pipe:
        pipe.delete(worker_key(name))
        pipe.zrem(INDEX_KEY, name)
        pipe.execute()


def live(client: redis.Redis, limit: int = 1000) -> list[Heartbeat]:
    """The heartbeats of live workers (at most `limit`), read through the index."""
    client.zremrangebyscore(INDEX_KEY, "-inf", time.time())
    names = [_text(n) for n in client.zrange(INDEX_KEY, 0, limit - 1)]
    if not names:
        return []
    with client.pipeline(transaction=False) as pipe:
        for name in names:
            pipe.hgetall(worker_key(name))
        raws = pipe.execute()
    # A hash that expired (a worker that died) is not a live worker: drop it from the index.
    gone = [name for name, raw in zip(names, raws, strict=True) if not raw]
    if gone:
        client.zrem(INDEX_KEY, *gone)
    return [Heartbeat.parse(name, raw) for name, raw in zip(names, raws, strict=True) if raw]
