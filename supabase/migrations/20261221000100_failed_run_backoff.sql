-- Delta: a twin whose runs fail is not queued again at once (issue 15, operations for serve).
--
-- A run's end put its twin in private.learning_due, and the next poll queued it again while its
-- events were after its cursor: a twin whose run the database refuses for good was queued and
-- failed again at every poll (serve polls again at once after a run: about 80 failed runs a
-- second for one twin, for ever). Now a run that fails holds its twin back:
-- * the run's new column retry_not_before is set when it fails (a before trigger): 10 s after
--   the first failure in a row, doubled for each further failed run of the twin since its last
--   completed one, at most 1 hour (private.failed_run_retry_delay holds the two constants);
-- * its end puts the twin in private.learning_due with that not_before (a completed run's end
--   sets -infinity: the backoff ends); a poll takes only the rows that are due, so the row stays
--   until then and brings the twin back without a new event, and the scheduler
--   (enqueue_due_learning_runs, with or without a twin, and so the pg_cron job) queues no run of
--   a twin whose row is not due: new events do not bypass the backoff, and the scanned mark may
--   pass them since the row stays;
-- * operators' and owners' requests (enqueue_learning_run, request_learning_run) are not held
--   back;
-- * owners see the time: persona_twin_overview.last_run_retry_not_before, and the failed run's
--   own row.
-- An idle poll still makes one statement; the due rows are read through an index on not_before.

alter table public.persona_feedback_learning_runs
  add column retry_not_before timestamptz,
  add constraint retry_not_before_only_when_failed
    check (retry_not_before is null or status = 'failed');

comment on column public.persona_feedback_learning_runs.retry_not_before is
  'For a run that failed (ended failed from queued or running): the scheduler '
  '(enqueue_due_learning_runs, serve, run-once, the pg_cron job) queues no new run of its twin '
  'before this time: finished_at + 10 s, doubled for each failed run of the twin since its last '
  'completed one, at most 1 hour (private.failed_run_retry_delay). An owner''s or operator''s '
  'request is not held back, and a completed run ends the backoff. Null for any other run.';
comment on constraint retry_not_before_only_when_failed on public.persona_feedback_learning_runs
  is 'Only a failed run holds its twin''s scheduling back (retry_not_before).';

alter table private.learning_due
  add column not_before timestamptz not null default '-infinity';

comment on table private.learning_due is
  'Twins a poll of enqueue_due_learning_runs must look at although no new event names them: a '
  'run of theirs left queued or running (completed, failed or deleted: more may be due), or '
  'their cursor moved back. mark changes at every such change, so that a poll removes only the '
  'rows as it saw them. not_before: the first poll at or after it takes the row (-infinity: the '
  'next); until then the scheduler queues no run of the twin (a failed run''s backoff). A '
  'deleted twin''s row is removed by the first poll that takes it.';
comment on column private.learning_due.not_before is
  'No scheduled run of the twin before this time: the retry_not_before of its last run that '
  'failed, -infinity when none holds it back (a completed run sets it so). A poll takes the row '
  'only once it has passed.';

-- The poll reads only the rows that are due: twins held back after failed runs cost it nothing.
create index learning_due_not_before_idx on private.learning_due (not_before);

comment on function private.mark_twin_due() is
  'Trigger (after a row change; its argument names the column of the old row holding the twin''s '
  'id): puts the twin in private.learning_due, so that a poll of enqueue_due_learning_runs looks '
  'at it again: the next one, or, when a failed run holds the twin back, the first after its '
  'not_before (kept). Fired when a run queued or running is deleted, and when a twin''s cursor '
  'moves back (an operator putting a twin back to be learned again); a run''s end is '
  'private.mark_run_twin_due''s. Security definer: whoever made the change. Raises nothing.';

-- The backoff after failed runs: how long the scheduler waits before it queues the twin again.
create function private.failed_run_retry_delay(p_failures integer)
returns interval
language sql
immutable
set search_path = ''
as $$
  -- 10 s, doubled for each failure after the first, at most 1 hour (the exponent is bounded
  -- first, so that no count overflows).
  select make_interval(
    secs => least(10 * power(2, least(greatest(p_failures, 1) - 1, 20)), 3600));
$$;

comment on function private.failed_run_retry_delay(integer) is
  'The scheduler''s backoff after failed runs. In: how many runs of a twin failed in a row since '
  'its last completed one, this one included (below 1 counts as 1). Out: how long the scheduler '
  'waits before it queues the twin again: 10 s for the first, doubled for each further one, at '
  'most 1 hour (10, 20, 40 s ... 42 min 40 s, then 1 hour from the tenth). The two constants '
  'live here. Raises nothing.';

-- Sets a failing run's retry_not_before (before the row is written, so that the run's end
-- carries it to private.learning_due).
create function private.set_retry_not_before()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_failures integer := 1;
  v_status public.learning_run_status;
begin
  -- The twin's runs that ended before this one, newest first, up to its last completed one
  -- (a rollback by hand is no learning run): the failures in a row. Eleven are enough to
  -- reach the cap; the (twin_id, created_at) index reads no more than that.
  for v_status in
    select r.status from public.persona_feedback_learning_runs r
    where r.twin_id = new.twin_id and r.id <> new.id and r.status in ('completed', 'failed')
      and r.trigger <> 'owner_rollback'
    order by r.created_at desc
    limit 11
  loop
    exit when v_status = 'completed';
    v_failures := v_failures + 1;
  end loop;
  new.retry_not_before := now() + private.failed_run_retry_delay(v_failures);
  return new;
end;
$$;

comment on function private.set_retry_not_before() is
  'Trigger (before update of status on persona_feedback_learning_runs, when a run queued or '
  'running becomes failed). Sets the run''s retry_not_before: now() + '
  'private.failed_run_retry_delay(n), n the failed runs of its twin in a row since its last '
  'completed one (owner_rollback runs skipped), this one included, counted up to 12. Security '
  'definer: whoever fails the run, every run of the twin is counted. Raises nothing.';

create trigger persona_feedback_learning_runs_failed_retry_not_before
  before update of status on public.persona_feedback_learning_runs
  for each row
  when (old.status in ('queued', 'running') and new.status = 'failed')
  execute function private.set_retry_not_before();

-- A run's end: the twin is looked at again, at once after a completed run (which ends any
-- backoff), not before the run's retry_not_before after a failed one.
create function private.mark_run_twin_due()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into private.learning_due as d (twin_id, not_before)
  values (new.twin_id, coalesce(new.retry_not_before, '-infinity'))
  on conflict (twin_id) do update set mark = d.mark + 1, not_before = excluded.not_before;
  return null;
end;
$$;

comment on function private.mark_run_twin_due() is
  'Trigger (after update of status on persona_feedback_learning_runs, when a run queued or '
  'running ends): puts the twin in private.learning_due, so that a poll of '
  'enqueue_due_learning_runs looks at it again: with not_before = the run''s retry_not_before '
  'when it failed (the scheduler queues no run of the twin before then), -infinity when it '
  'completed (the next poll; a backoff ends). Security definer: whoever ended the run. Raises '
  'nothing.';

drop trigger persona_feedback_learning_runs_ended_mark_due
  on public.persona_feedback_learning_runs;
create trigger persona_feedback_learning_runs_ended_mark_due
  after update of status on public.persona_feedback_learning_runs
  for each row
  when (old.status in ('queued', 'running') and new.status not in ('queued', 'running'))
  execute function private.mark_run_twin_due();

revoke execute on function
  private.failed_run_retry_delay(integer),
  private.set_retry_not_before(),
  private.mark_run_twin_due()
from public;

create or replace function public.enqueue_due_learning_runs(p_twin_id uuid default null)
returns setof public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
-- The insert's candidates are a variable: a custom plan sees how many there are.
set plan_cache_mode = force_custom_plan
as $$
declare
  v_scanned bigint;
  v_committed bigint;
  v_newest bigint;
  v_candidates uuid[];
begin
  if p_twin_id is not null then
    -- One twin is looked at alone; the marks and private.learning_due stay as they are.
    v_candidates := array[p_twin_id];
  else
    -- One statement, which names no variable: PL/pgSQL plans it once per session (a generic
    -- plan), and a poll that finds no candidate makes no other (bench case 6). Its snapshot
    -- sees every event up to the committed mark it reads.
    with marks as (
      select c.event_id as committed, s.event_id as scanned,
             (select max(e.id) from public.persona_training_events e) as newest
      from private.event_marks c, private.event_marks s
      where c.name = 'committed' and s.name = 'scanned'
    ),
    -- The rows that are due; a twin held back after a failed run stays until its not_before.
    seen as (
      select d.twin_id, d.mark from private.learning_due d where d.not_before <= now()
    ),
    -- Only the rows as this poll saw them: a run ending meanwhile changes its twin's mark.
    forgotten as (
      delete from private.learning_due d using seen
      where d.twin_id = seen.twin_id and d.mark = seen.mark
    ),
    -- Union all, made distinct by the sort of array_agg: a union's hash table is sized by the
    -- planner's estimate, which for the twins to rebuild is nearly every twin (it cannot
    -- estimate one column unequal to another), and was built at every poll.
    candidates (twin_id) as (
      -- Events after the scanned mark. The upper bound, the newest event in the same snapshot,
      -- excludes none: it makes the clause a range, which a generic plan estimates at 0.5% of
      -- the table (one bound alone: a third, and a sequential scan), so the plan reads the
      -- primary key's range.
      select e.twin_id from public.persona_training_events e
      where e.id > (select m.scanned from marks m) and e.id <= (select m.newest from marks m)
      union all
      select seen.twin_id from seen
      union all
      select t.id from public.twins t
      where t.evidence_generation <> t.learned_generation
      union all
      -- Watches older than the shortest expiry in force; each twin's own is checked below.
      select w.twin_id from public.persona_spec_watches w
      where w.state = 'watching'
        and w.published_at <= now() - make_interval(secs => 86400 * (
          select min(s.watch_expire_days) from public.persona_learning_settings s
          where s.watch_mode <> 'off'))
    )
    -- An array, not a join: the insert's planner then knows how many there are (a handful when
    -- idle) and probes each twin by its key instead of hashing every twin.
    select m.committed, m.scanned, m.newest,
           (select coalesce(array_agg(distinct c.twin_id), '{}') from candidates c)
    into strict v_committed, v_scanned, v_newest, v_candidates
    from marks m;
  end if;

  if cardinality(v_candidates) > 0 then
    return query
    insert into public.persona_feedback_learning_runs (twin_id, trigger, safe_mode, max_attempts)
    select t.id, 'schedule', not s.auto_publish, s.max_attempts
    from unnest(v_candidates) c (twin_id)
    join public.twins t on t.id = c.twin_id
    join public.persona_learning_settings s on s.twin_id = t.id
    where (
        -- The twin's newest event, one descent of the (twin_id, id) index. Not EXISTS: for it
        -- the planner guessed a third of the table after the cursor and scanned the whole table
        -- from its start (1 s per due twin at 5,000,000 events; bench case 2).
        (select max(e.id) from public.persona_training_events e where e.twin_id = t.id)
          > t.learned_through_event_id
        -- Evidence deleted or edited, or modules edited, since the last run: rebuild them.
        or t.evidence_generation <> t.learned_generation
        -- A production watch past its time: a run concludes it (expired) even without evidence.
        or exists (
          select 1 from public.persona_spec_watches w
          where w.twin_id = t.id and w.state = 'watching' and s.watch_mode <> 'off'
            and w.published_at + make_interval(secs => s.watch_expire_days * 86400) <= now()
        )
      )
      and not exists (
        select 1 from public.persona_feedback_learning_runs r
        where r.twin_id = t.id and r.status in ('queued', 'running')
      )
      -- Not before the not-before time of a run that failed (its row stays until then, and
      -- brings the twin back): new events do not bypass the backoff.
      and not exists (
        select 1 from private.learning_due d where d.twin_id = t.id and d.not_before > now()
      )
    on conflict do nothing
    returning *;
  end if;

  if p_twin_id is not null then
    return;
  end if;
  if v_committed > v_scanned then
    update private.event_marks m set event_id = v_committed
    where m.name = 'scanned' and m.event_id < v_committed;
  end if;
  -- Events after the committed mark (the newest as this poll's statement saw it; one committed
  -- since is the next poll's): record a new mark if no insert is in flight now (never waiting
  -- for one: ingest is not held up; the next claim of a run records one too).
  if v_newest > v_committed then
    begin
      lock table public.persona_training_events in share mode nowait;
      update private.event_marks m set event_id = e.newest
      from (select max(x.id) as newest from public.persona_training_events x) e
      where m.name = 'committed' and m.event_id < e.newest;
    exception when lock_not_available then
      null;
    end;
  end if;
end;
$$;

comment on function public.enqueue_due_learning_runs(uuid) is
  'Worker (scheduler; also the pg_cron job of schedule_learning_runs). In: a twin id, or null '
  'for every twin. Out: the runs it queued (trigger schedule, safe_mode = not the twin''s '
  'auto_publish, max_attempts from its settings): one per twin with an event after its cursor '
  '(learned_through_event_id), or whose evidence_generation differs from its learned_generation '
  '(modules to rebuild), or whose production watch is past watch_expire_days (watch_mode not '
  'off), and no run queued or running, and not held back by a failed run: none before the '
  'twin''s not-before time (the retry_not_before of its last failed run, 10 s doubled per '
  'failure in a row, at most 1 hour; a completed run ends it; operators'' and owners'' requests '
  'are not held back). Without a twin it looks only at candidates (events after '
  'private.event_marks scanned, the rows of private.learning_due that are due, which it removes, '
  'twins to rebuild, watches past the shortest expiry), so its cost follows the work due, not '
  'the number of twins: with none it makes one '
  'statement, planned once per session (about 0.05 ms of CPU, bench case 6). It then moves the '
  'scanned mark up to the committed one, and records a new committed mark when the newest event '
  'it saw is past it and no event insert is in flight (share lock, nowait). Raises nothing; an '
  'unknown twin queues nothing.';

create or replace view public.persona_twin_overview
with (security_invoker = true)
as
select t.id as twin_id, t.name,
       coalesce(mods.modules, 0) as modules,
       coalesce(mods.active, 0) as modules_active,
       coalesce(mods.probation, 0) as modules_probation,
       coalesce(mods.disabled, 0) as modules_disabled,
       coalesce(mods.insufficient_data, 0) as modules_insufficient_data,
       pub.id as published_spec_id, pub.version as published_version,
       pub.published_at,
       dr.id as draft_spec_id, dr.version as draft_version, dr.updated_at as draft_updated_at,
       lr.id as last_run_id, lr.status as last_run_status, lr.trigger as last_run_trigger,
       lr.created_at as last_run_created_at, lr.finished_at as last_run_finished_at,
       lr.gate_passed as last_run_gate_passed,
       array(
         select c ->> 'name' from jsonb_array_elements(
           case when jsonb_typeof(lr.gate_report -> 'checks') = 'array'
                then lr.gate_report -> 'checks' else '[]' end) c
         where c ->> 'verdict' is distinct from 'pass'
       ) as last_run_failed_checks,
       lr.publish_decision as last_run_publish_decision,
       lr.hold_reason as last_run_hold_reason,
       lr.error as last_run_error,
       coalesce(pend.events, 0) as pending_events,
       pend.oldest as pending_since,
       nr.status as next_run_status,
       wa.state as watch_state,
       wa.spec_id as watch_spec_id,
       lr.retry_not_before as last_run_retry_not_before
from public.twins t
left join lateral (
  select count(*)::integer as modules,
         (count(*) filter (where m.status = 'active'))::integer as active,
         (count(*) filter (where m.status = 'probation'))::integer as probation,
         (count(*) filter (where m.status = 'disabled'))::integer as disabled,
         (count(*) filter (where m.status = 'insufficient_data'))::integer as insufficient_data
  from public.persona_modules m where m.twin_id = t.id
) mods on true
left join lateral (
  select s.id, s.version, s.published_at from public.persona_specs s
  where s.twin_id = t.id and s.status = 'published'
) pub on true
left join lateral (
  select s.id, s.version, s.updated_at from public.persona_specs s
  where s.twin_id = t.id and s.status = 'draft'
  order by s.version desc limit 1
) dr on true
-- The last run that ended: a run queued or running since must not hide its gate outcome.
left join lateral (
  select r.* from public.persona_feedback_learning_runs r
  where r.twin_id = t.id and r.status in ('completed', 'failed')
  order by r.created_at desc limit 1
) lr on true
left join lateral (
  select r.status from public.persona_feedback_learning_runs r
  where r.twin_id = t.id and r.status in ('queued', 'running')
  order by r.status = 'running' desc limit 1
) nr on true
left join lateral (
  select w.state, w.spec_id from public.persona_spec_watches w
  where w.twin_id = t.id
  order by w.created_at desc limit 1
) wa on true
left join lateral (
  select count(*)::integer as events, min(e.created_at) as oldest
  from public.persona_training_events e
  where e.twin_id = t.id and e.id > t.learned_through_event_id
) pend on true;

comment on view public.persona_twin_overview is
  'A twin at a glance: its modules by status, its published spec and latest draft, its last run '
  'that ended with the gate''s outcome, a run under way, the evidence waiting for the next run, '
  'its latest production watch, and until when a failed run holds the scheduler back. One row '
  'per twin.';
comment on column public.persona_twin_overview.last_run_retry_not_before is
  'When the last run that ended failed: the scheduler queues no new run of the twin before this '
  'time (10 s after the first failure in a row, doubled for each further one, at most 1 hour; '
  'an owner''s request is not held back). Null when it completed.';

create or replace function public.worker_schema_version()
returns text
language sql
-- stable, not immutable: PostgreSQL folds an immutable call into the plan, and PostgREST
-- reuses a connection's prepared plans across roles, so an anon request could read the
-- value a service-role request planned without its EXECUTE being checked.
stable
set search_path = ''
as $$
  select '20261221000100'::text;
$$;
