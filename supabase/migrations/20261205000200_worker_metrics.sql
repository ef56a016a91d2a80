-- Section: what the worker's metrics read (pfl serve with PFL_METRICS_PORT). The worker calls a
-- new function, so the version it checks at start moves to this migration.

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261205000200'::text;
$$;

-- Section: the outbox's backlog, for the worker's metrics (pfl serve with PFL_METRICS_PORT).
-- One indexed read (the due index holds exactly the undelivered rows); its cost follows the
-- backlog, not the table.
create function public.langfuse_outbox_backlog()
returns jsonb
language sql
stable
set search_path = ''
as $$
  select jsonb_build_object(
    'rows', count(*),
    'oldest_seconds',
      date_part('epoch', statement_timestamp() - min(e.created_at))
  )
  from public.persona_training_events e
  where e.langfuse_status in ('pending', 'retrying');
$$;

comment on function public.langfuse_outbox_backlog() is
  'Worker (metrics). In: nothing. Out: jsonb {rows: the feedback votes waiting for Langfuse '
  '(status pending or retrying; bigint), oldest_seconds: the age in seconds (float8) of the '
  'oldest of them, from its created_at to now, null when none waits}. Raises nothing.';

grant execute on function public.langfuse_outbox_backlog() to service_role;
revoke execute on function public.langfuse_outbox_backlog() from public;
