"""The benchmark harness; run it through `scripts/bench [--quick] [--out FILE]`
(`python -m bench` on a stack that scripts/with-stack brought up).

Builds its own data on the bench stack (the environment `scripts/stack env` prints), measures
each case against a floor measured side by side in the same run, prints a table and writes the
figures as JSON. Cases at full size (--quick shrinks them and fails only on clear misses):

1. Learning throughput: 1,000,000 pending events of one twin with 50 modules, learned end to end
   by `pfl run-once --twin` (a subprocess, through PostgREST) with the batch at 200,000 (the
   schema's ceiling, which keeps every RPC inside the API's statement timeout) and at 100,000;
   floor: a bare `UPDATE … SET processed_at = now()` over a copy of the same rows.
   Target: worker ≤ 1.5 × floor. Afterwards the twin's cursor must be its last event id and
   every module's weights must equal a from-scratch recomputation. Then the twin is learned
   again at batch 200,000 with the worker's RPCs made by the bench through worker.store.Store
   in the worker's order, each timed through PostgREST; target: the longest single RPC ≤ 4 s,
   half the API's 8 s statement timeout (bench.config says why half).
2. Cost follows new work: the run over 50,000 new events (among other twins' events) of a twin
   with 5,000,000 processed events versus a twin with none, and the twin with none after versus
   before those 5,000,000 rows were loaded; without a draft spec and with one under audit (the
   gate then has work). The API's CPU per `pfl run-once` (PostgREST and its backends), 15
   rounds: twin against twin the median of paired ratios, before against after the ratio of
   medians in units of a fixed reference statement. Target: ratio ≤ 1.2.
3. Worker memory: peak RSS of the worker process in the case 1 runs ≤ 150 MB at both batch sizes.
4. Feedback ingest, in 8 short rounds (the order of the targets alternating), each target with
   wrk -t2 -c16 and 8 users' JWTs: new votes through nginx → PostgREST into
   persona_training_events against the endpoint a user would otherwise build
   (bench/fastapi_baseline.py: FastAPI under uvicorn, 2 workers, pydantic then supabase-py as the
   user, through the same gateway). Target: the median of the paired rate ratios ≥ 3 at the same
   connections, with our p99 no higher than its. Reported: the rate at equal p99, each path's
   best rate at 1, 2, 4, 8 or 16 connections (short runs) with its p99 within ours at 16
   (bench.ingest.rate_at_equal_p99). Beside it: batch ingest, 100 votes a request
   (a JSON array, return=minimal), in votes per second; a bare table as a reference; the CPU
   time PostgreSQL, PostgREST, nginx and uvicorn spend per request. Every answer 2xx, every
   2xx its votes' rows, and over every vote sent one current vote per feedback, the last. wrk
   against an nginx no-op location shows the load generator is not the bottleneck.
5. Langfuse drain, once per server generation the stand-in models (v3, v4, v4.59, cloud):
   10,000 pending outbox rows (quick: 2,000) drained by `pfl outbox drain` to the Langfuse
   stand-in; floor: the same scores sent by the worker's LangfuseSender alone. Target: requests
   ≤ rows / 50; every score received exactly once, no score on two days of the score table.
6. Many twins (quick: 20,000 instead of 100,000; 500 drained twins instead of 10,000): one
   poll of enqueue_due_learning_runs with nothing due at 100,000 twins against the same at 1,000
   (median of 40, on one backend; the old design's probe of every twin reported beside it;
   target ≤ 1.2); 10,000 twins × 5 new events drained by 1, 2 and 4 `pfl serve` processes:
   runs per second (the database's clock, first run started to last finished), RPC requests per
   run (nginx's access log) and CPU per run of PostgreSQL, PostgREST, nginx and the workers
   (/proc); target ≥ 200 runs/s for one worker (several runs per round trip); freshness:
   votes through the API at half of one worker's drain rate over 1,000 twins for 60 s (quick:
   15 s) with one `pfl serve` at default settings, each vote's commit to the finish of the run
   that learned it, p50 and p99; target p99 ≤ 5 s.
7. Exact learning: a twin with 1,000,000 learned events (quick: 200,000; case 1's mix) marked
   for a rebuild, as a deletion or a module edit marks it. The rebuild (every
   claim_learning_run_events call of one run, rebuild_step_events at a time) against the bare
   aggregate a rebuild needs over the same rows (the decayed sum grouped by match key, as the
   modules are matched by key), alternated 5 times on one backend, medians. Target: ≤ 1.5 × that
   floor; the ratio to the ungrouped count and decayed sum is reported beside it. Each rebuild
   call through PostgREST: target ≤ 4 s, as case 1's RPCs. A worker run then rebuilds the
   modules, checked against the from-scratch recomputation. And the delete of a user with 10,000
   learned votes (one statement; the votes cascade) with and without the triggers on deleted
   events, alternated, rolled back each time: reported.


Bulk data is written as the postgres superuser with `session_replication_role = replica` (no
triggers, no foreign-key checks), so the generator fills in what the insert trigger would.
"""
