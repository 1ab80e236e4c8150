"""Label Studio training triggers -> an RQ queue, with per-project coalescing.

Split the way rq itself is split, one module per concern:

- ``connection``: the Redis client for request handlers, the JSON serializer, the RQ queue, and
  bounded WATCH/MULTI transactions;
- ``state``: the per-project state hash and job history in Redis (the keys, the fields);
- ``triggers`` (web process): webhook actions -> enqueue, merge or follow-up (coalescing);
- ``jobs`` (worker): a job's options and the bookkeeping it does itself (started, finished,
  failed), and reading its metadata;
- ``status`` (web process): queued/running job, progress, last run and last failure;
- ``access``: the Label Studio URL + token ``/setup`` shares with the jobs, and the origin pin.

Label Studio sends ``START_TRAINING`` and annotation events with a 1 s timeout and no retry
(DESIGN §3), often several back to back. The web process therefore only records the trigger
in Redis and returns; the worker (``training.worker``) runs ``training.jobs.train_project``.

Jobs are stored as JSON (``connection.SERIALIZER``, RQ's ``JSONSerializer``), never as pickles:
the web process reads job metadata and results, and unpickling a value written into Redis runs
code. A stored value that is not valid JSON is logged and read as empty; it never fails a
webhook or ``/status``.
"""
