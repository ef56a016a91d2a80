-- Section: the scheduler's poll follows the work due, not the number of twins (issue 15).
--
-- enqueue_due_learning_runs probed every twin on every poll (an EXISTS over its events, the
-- generation check, the watch's expiry, the runs queued or running): 5.5 ms at 1,000 twins and
-- 52 ms at 100,000 with nothing due. It now looks only at candidates; claim_learning_run records
-- the committed mark under the share lock it already takes. See the section below.

-- Section: what the scheduler looks at. enqueue_due_learning_runs does not probe every twin: it
-- looks only at twins that may be due, so an idle poll costs the same at 1,000 twins or 100,000:
-- - twins with events after private.event_marks 'scanned' (a range of the events' primary key);
-- - twins in private.learning_due (a run of theirs ended, or their cursor was moved back);
-- - twins whose evidence_generation differs from learned_generation (a partial index);
-- - twins with a production watch past its expiry (a partial index on the watching ones).
-- Ingest writes nothing for it. Event ids are taken before their insert commits, so the poll
-- moves 'scanned' only up to 'committed': an id below which every insert has committed or
-- rolled back, recorded under the share lock that waits for inserts in flight (taken by every
-- first claim of a run anyway, and by a poll when no insert is in flight). An event the poll
-- saw whose twin already had a run queued or running is not forgotten: that run's end puts the
-- twin in private.learning_due.

create table private.event_marks (
  name text primary key
    constraint name_scanned_or_committed check (name in ('scanned', 'committed')),
  event_id bigint not null
);

comment on table private.event_marks is
  'The scheduler''s two marks on persona_training_events ids. committed: every insert of an '
  'event with an id up to it has committed or rolled back (read under a share lock on the table, '
  'which waits for inserts in flight). scanned: every event up to it has been seen by a poll of '
  'enqueue_due_learning_runs (its twin queued, found not due, or left to a run queued or running, '
  'whose end puts the twin in private.learning_due); it never passes committed.';

create table private.learning_due (
  twin_id uuid primary key,
  mark bigint not null default 0
);

comment on table private.learning_due is
  'Twins the next poll of enqueue_due_learning_runs must look at although no new event names '
  'them: a run of theirs left queued or running (completed, failed or deleted: more may be due), '
  'or their cursor moved back. mark changes at every such change, so that a poll removes only the '
  'rows as it saw them. A deleted twin''s row is removed by the next poll.';

-- Both marks start at the newest event, read under the share lock that waits for inserts in
-- flight; the twins already due are put in private.learning_due, which the first poll reads.
-- (One statement, one transaction: the migration runner does not wrap the file in one.)
do $$
begin
  lock table public.persona_training_events in share mode;
  insert into private.event_marks (name, event_id)
  select n, coalesce((select max(e.id) from public.persona_training_events e), 0)
  from unnest(array['scanned', 'committed']) n;
  insert into private.learning_due (twin_id)
  select t.id from public.twins t
  where exists (select 1 from public.persona_training_events e
                where e.twin_id = t.id and e.id > t.learned_through_event_id);
end;
$$;

grant select, insert, update, delete on private.event_marks, private.learning_due to service_role;

-- The candidates' indexes: twins to rebuild, watches by age, the shortest expiry in force.
create index twins_to_rebuild_idx on public.twins (id)
  where evidence_generation <> learned_generation;
create index persona_spec_watches_watching_published_idx
  on public.persona_spec_watches (published_at) where state = 'watching';
create index persona_learning_settings_watch_expire_days_idx
  on public.persona_learning_settings (watch_expire_days) where watch_mode <> 'off';

create function private.mark_twin_due()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into private.learning_due as d (twin_id)
  values ((to_jsonb(old) ->> tg_argv[0])::uuid)
  on conflict (twin_id) do update set mark = d.mark + 1;
  return null;
end;
$$;

comment on function private.mark_twin_due() is
  'Trigger (after a row change; its argument names the column of the old row holding the twin''s '
  'id): puts the twin in private.learning_due, so that the next poll of '
  'enqueue_due_learning_runs looks at it again. Fired when a run queued or running ends or is '
  'deleted, and when a twin''s cursor moves back (an operator putting a twin back to be learned '
  'again). Security definer: whoever made the change. Raises nothing.';

create trigger persona_feedback_learning_runs_ended_mark_due
  after update of status on public.persona_feedback_learning_runs
  for each row
  when (old.status in ('queued', 'running') and new.status not in ('queued', 'running'))
  execute function private.mark_twin_due('twin_id');

create trigger persona_feedback_learning_runs_deleted_mark_due
  after delete on public.persona_feedback_learning_runs
  for each row when (old.status in ('queued', 'running'))
  execute function private.mark_twin_due('twin_id');

create trigger twins_cursor_moved_back_mark_due
  after update of learned_through_event_id on public.twins
  for each row when (new.learned_through_event_id < old.learned_through_event_id)
  execute function private.mark_twin_due('id');

revoke execute on function private.mark_twin_due() from public;

-- Queues a scheduled run for every twin with unprocessed evidence, or whose modules must be
-- rebuilt, or whose production watch is past its expiry, and no run queued or running. Without
-- a twin it looks only at the candidates the section above lists, not at every twin.
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
      exists (
        select 1 from public.persona_training_events e
        where e.twin_id = t.id and e.id > t.learned_through_event_id
      )
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

comment on function public.enqueue_due_learning_runs(uuid) is
  'Worker (scheduler; also the pg_cron job of schedule_learning_runs). In: a twin id, or null '
  'for every twin. Out: the runs it queued (trigger schedule, safe_mode = not the twin''s '
  'auto_publish, max_attempts from its settings): one per twin with an event after its cursor '
  '(learned_through_event_id), or whose evidence_generation differs from its learned_generation '
  '(modules to rebuild), or whose production watch is past watch_expire_days (watch_mode not '
  'off), and no run queued or running. Without a twin it looks only at candidates (events after '
  'private.event_marks scanned, private.learning_due, twins to rebuild, watches past the shortest '
  'expiry), so its cost follows the work due, not the number of twins; it then moves the '
  'scanned mark up to the committed one, and records a new committed mark when no event insert '
  'is in flight (share lock, nowait). Raises nothing; an unknown twin queues nothing.';

-- Find me a run to do: first runs whose worker's lease expired (taken over with the same batch),
-- then owners' requests, then the oldest. Returns no row when there is nothing to do.
create or replace function public.claim_learning_run(
  p_worker_id text,
  p_lease_seconds integer default 60,
  p_twin_id uuid default null
)
returns setof public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_after bigint;
  v_last bigint;
begin
  if p_worker_id is null or char_length(p_worker_id) not between 1 and 200 then
    raise exception using errcode = '22023', message = 'p_worker_id must be 1 to 200 characters';
  end if;
  if p_lease_seconds is null or p_lease_seconds not between 1 and 3600 then
    raise exception using errcode = '22023', message = 'p_lease_seconds must be 1 to 3600';
  end if;

  -- A run whose worker died on its last attempt fails; its events stay unprocessed.
  update public.persona_feedback_learning_runs r
  set status = 'failed', finished_at = now(), lease_token = null, lease_expires_at = null,
      error = coalesce(r.error || '; ', '') || format('lease expired after attempt %s of %s',
                                                     r.attempts, r.max_attempts)
  where r.status = 'running' and r.lease_expires_at < now() and r.attempts >= r.max_attempts;

  select r.* into v_run
  from public.persona_feedback_learning_runs r
  where (p_twin_id is null or r.twin_id = p_twin_id)
    and (
      (r.status = 'running' and r.lease_expires_at < now())
      or (r.status = 'queued' and not exists (
        select 1 from public.persona_feedback_learning_runs x
        where x.twin_id = r.twin_id and x.status = 'running'
      ))
    )
  order by r.status = 'running' desc, r.trigger = 'owner_request' desc, r.created_at
  limit 1
  for update of r skip locked;

  if v_run.id is null then
    return;
  end if;

  begin
    update public.persona_feedback_learning_runs r
    set status = 'running',
        attempts = r.attempts + 1,
        worker_id = p_worker_id,
        lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        started_at = coalesce(r.started_at, now())
    where r.id = v_run.id
    returning * into v_run;
  exception when unique_violation then
    -- Another worker started a run of the same twin since our snapshot: nothing for us.
    return;
  end;

  -- The first claim fixes the run's batch: the twin's events after its cursor, at most
  -- max_batch_events of them; a takeover keeps the batch and the time T.
  if v_run.batch_last_event_id is null then
    -- An insert takes its id before it commits. Waiting here for the inserts in flight (new ones
    -- wait for this short transaction) means no event can appear later inside the batch.
    perform set_config('lock_timeout', '5s', true);
    lock table public.persona_training_events in share mode;
    -- Every event id up to the newest has now committed or rolled back: the scheduler's mark.
    update private.event_marks m set event_id = e.newest
    from (select max(x.id) as newest from public.persona_training_events x) e
    where m.name = 'committed' and m.event_id < e.newest;
    select t.learned_through_event_id into strict v_after
    from public.twins t where t.id = v_run.twin_id;
    select max(b.id) into v_last
    from (
      select e.id from public.persona_training_events e
      where e.twin_id = v_run.twin_id and e.id > v_after
      order by e.id
      limit (select s.max_batch_events from public.persona_learning_settings s
             where s.twin_id = v_run.twin_id)
    ) b;
    update public.persona_feedback_learning_runs r
    set batch_after_event_id = v_after,
        batch_last_event_id = coalesce(v_last, v_after),
        -- After the lock: every event of the batch was cast before T.
        learning_time = clock_timestamp()
    where r.id = v_run.id
    returning * into v_run;
  end if;
  return next v_run;
end;
$$;

comment on function public.claim_learning_run(text, integer, uuid) is
  'Worker. In: the worker''s id (1-200 chars), a lease in seconds (1-3600), optionally one twin. '
  'First fails every running run whose lease expired on its last attempt. Out: no row when '
  'nothing is due, else one run now running under a new lease_token until now() + '
  'p_lease_seconds, attempts + 1: a run whose lease expired first (taken over with its batch and '
  'time), then owners'' requests, then the oldest queued run of a twin with nothing running. The '
  'first claim fixes the batch (batch_after_event_id = the twin''s cursor, batch_last_event_id: at '
  'most max_batch_events ids later) and learning_time, after a share lock on the events that '
  'waits for inserts in flight; under that lock it moves the scheduler''s committed mark '
  '(private.event_marks) to the newest event id. Raises 22023 for a bad p_worker_id or '
  'p_lease_seconds; 55P03 when that lock is not granted within 5 s.';

