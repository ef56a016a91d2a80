"""The soak: apps, workers and Langfuse under faults for a bounded time, then proof that nothing
was lost and nothing was counted twice.

Run it through `scripts/soak [--seconds N] [--short] [--seed S]`, which brings up a stack of its
own (ports 603xx) and stops it afterwards. For N seconds:

- app clients (one thread per user, a minted JWT each, httpx against SUPABASE_URL) write feedback
  on a few twins and change their votes; an audit pipeline (service-role key) writes audits; the
  owner now and then requests a run. Every request is recorded with its outcome: `acked` (2xx),
  `failed` (never reached the API, or refused with a 4xx: nothing stored) or `unknown` (no answer,
  or a 5xx: it may or may not be stored). A client that got no acknowledgement backs off and
  sends the vote again;
- worker processes (`pfl serve`) learn and mirror feedback to a Langfuse stand-in process;
- faults at seeded random moments: workers killed with SIGKILL (preferably one holding a run) and
  replaced, a worker stopped (SIGSTOP) while it holds a run until another takes the run over,
  then continued, PostgREST restarted, PostgreSQL restarted once, the Langfuse stand-in stopped and
  started again on its port, and periods of HTTP 500s and of hanging requests from it.

Then the clients stop, everything comes back up, the soak waits (with a deadline) until every
event is learned, no run is queued or running and no outbox row is open, stops the workers with
SIGTERM and checks six properties, and that the soak itself ran as planned (PASS/FAIL
each).
The summary goes to stdout and to soak-results/soak-<timestamp>.json; the exit status is 1 when
a check fails.

The stand-in runs as `python -m testkit.standin --port P --generation G --state-file F`
(launched by testkit.standin_process) in a process of its own which, when stopped (SIGTERM),
first stops serving (joining every request handler) and then writes the scores it received, so
that no receipt is lost across its restarts. Each start runs the next Langfuse server generation
(v3, cloud, v4, v4.59): the planned "Langfuse down" brings it back as another, so every soak runs
against at least two.

Modules: config (sizes, timings), world (users, twins), clients (apps, audit pipeline),
processes (workers), faults (plan, injector), drain, checks, __main__ (the run and its summary).
"""
