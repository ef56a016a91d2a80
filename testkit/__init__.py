"""The one test-support layer of tests, bench, soak and the demo.

- `env`: the stack environment (the variables `scripts/stack env` prints) and `rows`, the rows of a
  PostgREST answer
- `tokens`: JWTs minted with the stack's secret (users, anon, service role)
- `world`: users in auth.users, twins, modules and specs, as the postgres superuser
- `oracle`: module counts recomputed from scratch (the rule for which evidence counts)
- `standin`, `standin_process`: the Langfuse stand-in and its launcher as a process
- `wait`: waiting on a condition with a deadline
"""
