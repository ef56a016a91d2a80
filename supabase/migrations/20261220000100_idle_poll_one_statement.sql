-- The scheduler's idle poll costs the same at 1,000 twins as at 100,000 (issue 15, bench case 6).
--
-- A poll of enqueue_due_learning_runs with nothing due made five statements, two of them planned
-- at every call (the candidates and the insert, under force_custom_plan), and its CPU grew from
-- 0.46 to 0.55 ms between 1,000 and 100,000 twins although none of its reads follows the twins.
-- The growth was the candidates' union: its hash table is sized by the planner's estimate, and
-- the twins to rebuild (evidence_generation <> learned_generation, a comparison of two columns
-- it cannot estimate) were estimated at 99.5% of the twins: a table for 100,000 rows built at
-- every poll. Now, without a twin, one statement names no variable, so PL/pgSQL plans it once
-- per session: it reads the marks, the newest event and the candidates (union all, made distinct
-- by array_agg's sort, sized by the rows found); the insert runs only when there are candidates.
-- The events after the scanned mark are bounded above by the newest event of the same snapshot,
-- which excludes none but lets the generic plan estimate a range (0.5%), not a third of the
-- table. The newest event is read at the start of the poll instead of after the insert: an event
-- committed in between has its committed mark recorded by the next poll. Nothing else changes.

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
    seen as (
      select d.twin_id, d.mark from private.learning_due d
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
  'off), and no run queued or running. Without a twin it looks only at candidates (events after '
  'private.event_marks scanned, private.learning_due, twins to rebuild, watches past the shortest '
  'expiry), so its cost follows the work due, not the number of twins: with none it makes one '
  'statement, planned once per session (about 0.05 ms of CPU, bench case 6). It then moves the '
  'scanned mark up to the committed one, and records a new committed mark when the newest event '
  'it saw is past it and no event insert is in flight (share lock, nowait). Raises nothing; an '
  'unknown twin queues nothing.';

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261220000100'::text;
$$;
