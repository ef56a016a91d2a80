-- The scheduler's due probe stays an index probe (issue 15, bench case 2).
--
-- enqueue_due_learning_runs asked "has the twin an event after its cursor?" with EXISTS. The
-- planner estimated a third of the table after the cursor (a range bound it cannot see) and
-- chose a sequential scan from the table's start as the cheapest way to a first row: for a twin
-- whose new events are at the end of the heap, or which has none, that read the whole table
-- (113 ms at 300,000 events, about 1 s at 5,000,000), once per due twin per poll and per
-- `pfl run-once --twin`. The probe is now the twin's newest event id, max(id), which the
-- (twin_id, id) index answers in one descent whatever the table's size.

create or replace function public.enqueue_due_learning_runs(p_twin_id uuid default null)
returns setof public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
-- The range scan's bound is a variable: a generic plan would guess a third of the table.
set plan_cache_mode = force_custom_plan
as $$
declare
  v_scanned bigint;
  v_committed bigint;
  v_newest bigint;
  v_candidates uuid[];
begin
  -- committed is read first: this statement's snapshot, and the next one's, see every event up
  -- to it.
  select m.event_id into strict v_committed from private.event_marks m where m.name = 'committed';
  select m.event_id into strict v_scanned from private.event_marks m where m.name = 'scanned';
  -- One twin (p_twin_id) is looked at alone; the marks and private.learning_due stay as they are.

  with seen as (
    select d.twin_id, d.mark from private.learning_due d where p_twin_id is null
  ),
  -- Only the rows as this poll saw them: a run ending meanwhile changes its twin's mark.
  forgotten as (
    delete from private.learning_due d using seen
    where d.twin_id = seen.twin_id and d.mark = seen.mark
  ),
  candidates (twin_id) as (
    select p_twin_id where p_twin_id is not null
    union
    select e.twin_id from public.persona_training_events e
    where p_twin_id is null and e.id > v_scanned
    union
    select seen.twin_id from seen
    union
    select t.id from public.twins t
    where p_twin_id is null and t.evidence_generation <> t.learned_generation
    union
    -- Watches older than the shortest expiry in force; each twin's own is checked below.
    select w.twin_id from public.persona_spec_watches w
    where p_twin_id is null and w.state = 'watching'
      and w.published_at <= now() - make_interval(secs => 86400 * (
        select min(s.watch_expire_days) from public.persona_learning_settings s
        where s.watch_mode <> 'off'))
  )
  -- An array, not a join: the planner then knows how many there are (a handful when idle) and
  -- probes each twin by its key instead of hashing every twin.
  select coalesce(array_agg(c.twin_id), '{}') into v_candidates from candidates c;

  return query
  insert into public.persona_feedback_learning_runs (twin_id, trigger, safe_mode, max_attempts)
  select t.id, 'schedule', not s.auto_publish, s.max_attempts
  from unnest(v_candidates) c (twin_id)
  join public.twins t on t.id = c.twin_id
  join public.persona_learning_settings s on s.twin_id = t.id
  where (
      -- The twin's newest event, one descent of the (twin_id, id) index. Not EXISTS: for it the
      -- planner guessed a third of the table after the cursor and scanned the whole table from
      -- its start (1 s per due twin at 5,000,000 events; bench case 2).
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

  if p_twin_id is not null then
    return;
  end if;
  if v_committed > v_scanned then
    update private.event_marks m set event_id = v_committed
    where m.name = 'scanned' and m.event_id < v_committed;
  end if;
  -- Events after the committed mark: record a new one if no insert is in flight now (never
  -- waiting for one: ingest is not held up; the next claim of a run records one too).
  select max(e.id) into v_newest from public.persona_training_events e;
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
