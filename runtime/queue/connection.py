"""The Redis client, serializer and RQ queue every part of the training queue uses, and
WATCH/MULTI transactions with a bounded number of attempts."""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.client import Pipeline
from redis.exceptions import WatchError
from redis.retry import Retry as RedisRetry
from rq import Queue
from rq.serializers import JSONSerializer

# How every job of this project is stored in Redis (Queue, Job.fetch*, the worker).
SERIALIZER = JSONSerializer
# What reading a malformed stored value (not JSON, not base64/zlib, missing fields) raises.
MALFORMED = (ValueError, TypeError, KeyError, RecursionError, zlib.error)
# A transaction interrupted this many times in a row by concurrent writes gives up
# (``ContentionError``) instead of spinning: each attempt costs a few Redis round trips.
MAX_TRANSACTION_ATTEMPTS = 50

T = TypeVar("T")


class ContentionError(RuntimeError):
    """A transaction was interrupted ``MAX_TRANSACTION_ATTEMPTS`` times in a row."""


def redis_connection(
    url: str, connect_timeout_s: float = 0.25, socket_timeout_s: float = 1.0
) -> redis.Redis:
    """A Redis client with short timeouts and no retries, for request handlers.

    A webhook must answer within Label Studio's 1 s timeout even when Redis is down, so a
    refused or hanging connection fails fast (``redis.ConnectionError`` / ``TimeoutError``).
    """
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=connect_timeout_s,
        socket_timeout=socket_timeout_s,
        retry=RedisRetry(NoBackoff(), 0),
    )


def training_queue(connection: redis.Redis, name: str) -> Queue:
    """The RQ queue ``name`` (TRAINING_QUEUE) with the project's JSON serializer."""
    return Queue(name, connection=connection, serializer=SERIALIZER)


def transaction(
    connection: redis.Redis,
    watch: Sequence[str],
    body: Callable[[Pipeline], T],
    what: str,
) -> tuple[T, list[Any]]:
    """Run ``body`` in a WATCH/MULTI transaction on the keys ``watch``; return what ``body``
    returned and the results of the queued commands.

    ``body`` reads through the pipeline (immediate mode; it may WATCH more keys), then calls
    ``pipe.multi()`` and queues its writes. When a watched key changed meanwhile, the whole
    transaction runs again, at most ``MAX_TRANSACTION_ATTEMPTS`` times; then
    ``ContentionError`` names ``what``.
    """
    with connection.pipeline() as pipe:
        for _ in range(MAX_TRANSACTION_ATTEMPTS):
            try:
                pipe.watch(*watch)
                result = body(pipe)
                return result, pipe.execute()
            except WatchError:
                continue
    raise ContentionError(
        f"{what}: {MAX_TRANSACTION_ATTEMPTS} attempts in a row were interrupted by concurrent "
        "writes"
    )
