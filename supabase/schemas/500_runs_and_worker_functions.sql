-- Section: learning runs — requested by owners or the scheduler, executed by the worker — and
-- the worker's functions. Every state change of a run is one function call, one transaction.

create type public.learning_run_status as enum ('queued', 'running', 'completed', 'failed');
comment on type public.learning_run_status is
  'A learning run''s life: queued, running (claimed by one worker with a lease), completed or '
  'failed.';
create type public.learning_run_trigger as enum
  ('owner_request', 'schedule', 'manual', 'owner_rollback');
comment on type public.learning_run_trigger is
  'Who asked for a learning run: owner_request (request_learning_run), schedule (pending '
  'evidence), manual (operator CLI) or owner_rollback (rollback_persona_spec: a rollback by '
  'hand, recorded as a completed run).';
create type public.learning_run_publish_decision as enum ('published', 'held');
comment on type public.learning_run_publish_decision is
  'What a completed run did with the latest draft spec: published it, or held it (see hold_reason).';
create type public.learning_run_hold_reason as enum
  ('no_draft', 'safe_mode', 'gate_failed', 'rolled_back');
comment on type public.learning_run_hold_reason is
  'Why a completed run held: no draft to publish, a safe-mode run, the gate failed, or the run '
  'rolled the published spec back (production watch, auto mode).';

create table public.persona_feedback_learning_runs (
  id uuid primary key default gen_random_uuid(),
  twin_id uuid not null references public.twins (id) on delete cascade,
  status public.learning_run_status not null default 'queued',
  trigger public.learning_run_trigger not null,
  requested_by uuid references auth.users (id) on delete set null,
  safe_mode boolean not null default true,
  attempts integer not null default 0 constraint attempts_not_negative check (attempts >= 0),
  max_attempts integer not null default 3
    constraint max_attempts_at_least_1 check (max_attempts >= 1),
  worker_id text,
  lease_token uuid,
  lease_expires_at timestamptz,
  learning_time timestamptz,
  batch_after_event_id bigint,
  batch_last_event_id bigint,
  events_scanned integer constraint events_scanned_not_negative check (events_scanned >= 0),
  events_processed integer constraint events_processed_not_negative check (events_processed >= 0),
  events_unmatched integer constraint events_unmatched_not_negative check (events_unmatched >= 0),
  modules_updated integer constraint modules_updated_not_negative check (modules_updated >= 0),
  gate_passed boolean,
  gate_report jsonb,
  publish_decision public.learning_run_publish_decision,
  hold_reason public.learning_run_hold_reason,
  published_spec_id uuid references public.persona_specs (id) on delete set null,
  error text,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz,
  updated_at timestamptz not null default now(),
  evidence_generation bigint,
  rebuilt_modules boolean,
  retry_not_before timestamptz,
  constraint lease_while_running
    check ((status = 'running') = (lease_token is not null and lease_expires_at is not null)),
  -- A completed run has its figures; gate_passed only where a gate ran (a rollback by hand ran
  -- none, and its run says so with null rather than claiming a pass).
  constraint figures_when_completed check (
    status <> 'completed' or (
      events_scanned is not null and events_processed is not null and modules_updated is not null
      and (gate_passed is not null or trigger = 'owner_rollback')
      and gate_report is not null and publish_decision is not null
    )
  ),
  constraint gate_passed_null_on_owner_rollback
    check (trigger <> 'owner_rollback' or gate_passed is null),
  constraint hold_reason_when_held_and_spec_when_published check (
    publish_decision is null
    or (publish_decision = 'held') = (hold_reason is not null)
    and (publish_decision = 'published') = (published_spec_id is not null)
  ),
  constraint retry_not_before_only_when_failed
    check (retry_not_before is null or status = 'failed')
);

comment on table public.persona_feedback_learning_runs is
  'One execution of the learning pipeline for one twin: queued, running, completed or failed.';
comment on column public.persona_feedback_learning_runs.trigger is
  'owner_request (request_learning_run), schedule (pending evidence), manual (operator CLI) or '
  'owner_rollback (rollback_persona_spec: a rollback by hand, no gate).';
comment on column public.persona_feedback_learning_runs.safe_mode is
  'A safe-mode run learns and gates but never publishes.';
comment on column public.persona_feedback_learning_runs.lease_token is
  'Fencing token of the worker holding the run; a completion with another token has no effect.';
comment on column public.persona_feedback_learning_runs.lease_expires_at is
  'After this time another worker may take the run over (up to max_attempts).';
comment on column public.persona_feedback_learning_runs.learning_time is
  'The time T the run decays all evidence to.';
comment on column public.persona_feedback_learning_runs.batch_after_event_id is
  'The run''s batch: the twin''s events with an id after this one (the twin''s cursor) ...';
comment on column public.persona_feedback_learning_runs.batch_last_event_id is
  '... up to and including this one.';
comment on column public.persona_feedback_learning_runs.events_scanned is
  'Events in the run''s batch.';
comment on column public.persona_feedback_learning_runs.events_processed is
  'Events the run marked processed.';
comment on column public.persona_feedback_learning_runs.events_unmatched is
  'Events in the batch that matched no module of the twin.';
comment on column public.persona_feedback_learning_runs.modules_updated is
  'Modules whose confidence or status changed.';
comment on column public.persona_feedback_learning_runs.gate_passed is
  'Whether the regression gate passed (true also when there was no draft to judge); null until '
  'the run completes, and always for a rollback by hand (trigger owner_rollback), which runs no '
  'gate.';
comment on constraint figures_when_completed on public.persona_feedback_learning_runs is
  'A completed run has its figures: events scanned and processed, modules updated, gate report '
  'and publish decision, and gate_passed unless it is a rollback by hand (owner_rollback).';
comment on constraint gate_passed_null_on_owner_rollback on public.persona_feedback_learning_runs
  is 'A rollback by hand runs no gate, so its run claims no gate outcome: gate_passed is null.';
comment on column public.persona_feedback_learning_runs.gate_report is
  'Each regression-gate check with its value, threshold and verdict.';
comment on column public.persona_feedback_learning_runs.publish_decision is
  'published when the run published the latest draft; held otherwise (see hold_reason).';
comment on column public.persona_feedback_learning_runs.evidence_generation is
  'The twin''s evidence_generation when the run read its batch; it completes only if unchanged.';
comment on column public.persona_feedback_learning_runs.rebuilt_modules is
  'True when the run recomputed every module from all the twin''s evidence (something other than '
  'an append or a vote change happened since the last run), false when it learned incrementally.';
comment on column public.persona_feedback_learning_runs.retry_not_before is
  'For a run that failed (ended failed from queued or running): the scheduler '
  '(enqueue_due_learning_runs, serve, run-once, the pg_cron job) queues no new run of its twin '
  'before this time: finished_at + 10 s, doubled for each failed run of the twin since its last '
  'completed one, at most 1 hour (private.failed_run_retry_delay). An owner''s or operator''s '
  'request is not held back, and a completed run ends the backoff. Null for any other run.';
comment on constraint retry_not_before_only_when_failed on public.persona_feedback_learning_runs
  is 'Only a failed run holds its twin''s scheduling back (retry_not_before).';

-- The module change history names the run that made each change.
alter table public.persona_module_changes
  add constraint persona_module_changes_run_id_fkey foreign key (run_id)
  references public.persona_feedback_learning_runs (id) on delete cascade;

create unique index persona_feedback_learning_runs_one_running_idx
  on public.persona_feedback_learning_runs (twin_id) where status = 'running';
create unique index persona_feedback_learning_runs_one_queued_idx
  on public.persona_feedback_learning_runs (twin_id) where status = 'queued';
create index persona_feedback_learning_runs_twin_created_idx
  on public.persona_feedback_learning_runs (twin_id, created_at desc);
create index persona_feedback_learning_runs_queued_idx
  on public.persona_feedback_learning_runs (created_at) where status = 'queued';
create index persona_feedback_learning_runs_lease_idx
  on public.persona_feedback_learning_runs (lease_expires_at) where status = 'running';
create index persona_feedback_learning_runs_requested_by_idx
  on public.persona_feedback_learning_runs (requested_by);
create index persona_feedback_learning_runs_published_spec_idx
  on public.persona_feedback_learning_runs (published_spec_id);
-- Finds the run that processed an event: the completed run whose batch holds its id.
create index persona_feedback_learning_runs_batch_idx
  on public.persona_feedback_learning_runs (twin_id, batch_last_event_id)
  where status = 'completed';

create trigger persona_feedback_learning_runs_touch_updated_at
  before update on public.persona_feedback_learning_runs
  for each row execute function private.touch_updated_at();

alter table public.persona_feedback_learning_runs enable row level security;

create policy "Owners can read their twins' runs" on public.persona_feedback_learning_runs
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));

grant select, insert, update, delete on public.persona_feedback_learning_runs to service_role;
-- Owners read whole rows (select=* works); the lease token gives them nothing, as only
-- service_role may execute the functions that take it.
grant select on public.persona_feedback_learning_runs to authenticated;


-- Section: the production watch of each newly published spec. The run that publishes a spec
-- starts its watch (unless watch_mode is off); each later run looks at it, in its own
-- completion, until the watch concludes.

create type public.spec_watch_state as enum
  ('watching', 'passed', 'regressed', 'expired', 'rolled_back', 'superseded');
comment on type public.spec_watch_state is
  'A production watch''s state: watching; passed (enough evidence, no regression); regressed '
  '(found, recorded: watch_mode alert); expired (watch_expire_days passed first); rolled_back '
  '(by the watch in auto mode, or by the owner); superseded (another spec was published).';

create table public.persona_spec_watches (
  id uuid primary key default gen_random_uuid(),
  twin_id uuid not null references public.twins (id) on delete cascade,
  spec_id uuid not null references public.persona_specs (id) on delete cascade,
  previous_spec_id uuid references public.persona_specs (id) on delete set null,
  published_at timestamptz not null,
  previous_published_at timestamptz,
  published_by_run_id uuid references public.persona_feedback_learning_runs (id)
    on delete set null,
  state public.spec_watch_state not null default 'watching',
  looks_done integer not null default 0
    constraint looks_done_not_negative check (looks_done >= 0),
  alpha_spent double precision not null default 0
    constraint alpha_spent_0_to_1 check (alpha_spent between 0 and 1),
  last_run_id uuid references public.persona_feedback_learning_runs (id) on delete set null,
  last_report jsonb,
  concluded_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint concluded_at_once_concluded check ((state = 'watching') = (concluded_at is null))
);

comment on table public.persona_spec_watches is
  'The production watch of a published spec: its live evidence against the spec it replaced, '
  'looked at by every run until it concludes (README, "The production watch").';
comment on column public.persona_spec_watches.spec_id is 'The newly published spec.';
comment on column public.persona_spec_watches.previous_spec_id is
  'The spec it replaced: what it is compared with, and what a rollback publishes again.';
comment on column public.persona_spec_watches.published_at is
  'When spec_id was published: its evidence counts from here, the replaced spec''s in an equally '
  'long window before it.';
comment on column public.persona_spec_watches.previous_published_at is
  'When the replaced spec had been published: its window never reaches further back.';
comment on column public.persona_spec_watches.looks_done is
  'Planned looks done: the least of the kinds in play (each kind of evidence has its own plan, '
  'a look due at each watch_looks-th of watch_pass_evidence; last_report.clocks holds them).';
comment on column public.persona_spec_watches.alpha_spent is
  'The share of watch_alpha the looks done spent (O''Brien-Fleming-type spending, each kind of '
  'evidence on its own plan over half of the comparisons: the mean of last_report.clocks).';
comment on column public.persona_spec_watches.last_report is
  'The last run''s look: each comparison with its value, threshold, evidence and verdict.';
comment on column public.persona_spec_watches.concluded_at is
  'When the watch left the watching state; null while watching.';

create unique index persona_spec_watches_one_watching_idx
  on public.persona_spec_watches (twin_id) where state = 'watching';
create index persona_spec_watches_twin_created_idx
  on public.persona_spec_watches (twin_id, created_at desc);
create index persona_spec_watches_spec_idx on public.persona_spec_watches (spec_id);
create index persona_spec_watches_previous_spec_idx
  on public.persona_spec_watches (previous_spec_id);
create index persona_spec_watches_published_by_run_idx
  on public.persona_spec_watches (published_by_run_id);
create index persona_spec_watches_last_run_idx on public.persona_spec_watches (last_run_id);

create trigger persona_spec_watches_touch_updated_at
  before update on public.persona_spec_watches
  for each row execute function private.touch_updated_at();

alter table public.persona_spec_watches enable row level security;

create policy "Owners can read their twins' spec watches" on public.persona_spec_watches
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));

grant select, insert, update, delete on public.persona_spec_watches to service_role;
grant select on public.persona_spec_watches to authenticated;


-- Section: when and by which run an event was processed. Computed fields: PostgREST serves them
-- as columns (select=*,processed_at,processed_run_id) and SQL reads them as e.processed_at.
-- Processing writes no event row: a run's completion moves its twin's cursor over its batch.

create function private.event_processing(p_event_id bigint)
returns table (run_id uuid, finished_at timestamptz)
language sql
stable
security definer
set search_path = ''
as $$
  select r.id, r.finished_at
  from public.persona_training_events e
  join lateral (
    select r.id, r.finished_at
    from public.persona_feedback_learning_runs r
    where r.twin_id = e.twin_id and r.status = 'completed'
      and r.batch_last_event_id >= e.id and r.batch_after_event_id < e.id
    order by r.batch_last_event_id
    limit 1
  ) r on true
  where e.id = p_event_id;
$$;

comment on function private.event_processing(bigint) is
  'Computed fields'' helper. In: an event id. Out: one row (run_id, finished_at) of the completed '
  'run whose batch holds the event, or no row while it waits (or for an unknown id). Security '
  'definer: voters may not read runs; the public computed fields call it only for an event the '
  'caller''s own policies show. Raises nothing.';

grant execute on function private.event_processing(bigint) to authenticated, service_role;

create function public.processed_run_id(p_event public.persona_training_events)
returns uuid
language sql
stable
set search_path = ''
as $$
  select p.run_id
  from private.event_processing(p_event.id) p
  where exists (select 1 from public.persona_training_events e where e.id = p_event.id);
$$;

create function public.processed_at(p_event public.persona_training_events)
returns timestamptz
language sql
stable
set search_path = ''
as $$
  select p.finished_at
  from private.event_processing(p_event.id) p
  where exists (select 1 from public.persona_training_events e where e.id = p_event.id);
$$;

comment on function public.processed_run_id(public.persona_training_events) is
  'Computed field of persona_training_events. In: an event row. Out: the id of the completed '
  'learning run whose batch holds the event; null while it waits, and for an event the caller''s '
  'policies do not show (the voter and the twin''s owner both see it). Raises nothing.';
comment on function public.processed_at(public.persona_training_events) is
  'Computed field of persona_training_events. In: an event row. Out: when the learning run that '
  'processed the event finished (timestamptz); null while it waits, and for an event the '
  'caller''s policies do not show (the voter and the twin''s owner both see it). Raises nothing.';

grant execute on function
  public.processed_run_id(public.persona_training_events),
  public.processed_at(public.persona_training_events)
to authenticated, service_role;


-- Section: owner RPC.

-- Queues a run for the caller's own twin; a second request while one is queued returns that one.
create function private.request_learning_run(p_twin_id uuid, p_auto_publish boolean)
returns public.persona_feedback_learning_runs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
begin
  if p_twin_id is null or not private.is_twin_owner(p_twin_id) then
    raise exception using
      errcode = '42501',
      message = format('twin_id: twin %s does not exist or is not yours', p_twin_id);
  end if;

  insert into public.persona_feedback_learning_runs
    (twin_id, trigger, requested_by, safe_mode, max_attempts)
  select p_twin_id, 'owner_request', (select auth.uid()), not coalesce(p_auto_publish, false),
         s.max_attempts
  from public.persona_learning_settings s
  where s.twin_id = p_twin_id
  on conflict (twin_id) where status = 'queued' do nothing
  returning * into v_run;

  if v_run.id is null then
    select * into strict v_run from public.persona_feedback_learning_runs r
    where r.twin_id = p_twin_id and r.status = 'queued';
  end if;
  return v_run;
end;
$$;

comment on function private.request_learning_run(uuid, boolean) is
  'Owner RPC body (called by public.request_learning_run). In: a twin id and whether the run may '
  'publish (null: no). Out: the run queued for that twin (trigger owner_request, requested_by = '
  'the caller, safe_mode = not p_auto_publish, max_attempts from the twin''s settings), or the '
  'run already queued, unchanged. Raises 42501 (HTTP 403) "twin_id: twin <id> does not exist or '
  'is not yours" when the caller does not own the twin. Security definer: owners may not insert '
  'runs themselves.';

grant execute on function private.request_learning_run(uuid, boolean) to authenticated;

-- The API face of private.request_learning_run: POST /rest/v1/rpc/request_learning_run.
create function public.request_learning_run(p_twin_id uuid, p_auto_publish boolean default false)
returns public.persona_feedback_learning_runs
language sql
set search_path = ''
as $$
  select * from private.request_learning_run(p_twin_id, p_auto_publish);
$$;

comment on function public.request_learning_run(uuid, boolean) is
  'Owner RPC (POST /rest/v1/rpc/request_learning_run). In: p_twin_id, p_auto_publish (default '
  'false: a safe-mode run that never publishes). Out: the queued run (trigger owner_request), or '
  'the one already queued. Raises 42501 (HTTP 403) "twin_id: twin <id> does not exist or is not '
  'yours" when the caller does not own the twin.';

grant execute on function public.request_learning_run(uuid, boolean) to authenticated;

-- Rolls the caller's twin back to the spec published before the current one, by hand; the
-- rollback is recorded as a completed run (trigger owner_rollback) carrying the reason. Given
-- the spec the owner saw published, it rolls back only that one: a second click (or a second
-- tab) finds it rolled back already and changes nothing, instead of going back another step.
create function private.rollback_persona_spec(
  p_twin_id uuid, p_reason text, p_spec_id uuid default null
)
returns public.persona_feedback_learning_runs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_current public.persona_specs;
  v_previous public.persona_specs;
  v_run public.persona_feedback_learning_runs;
begin
  if p_twin_id is null or not private.is_twin_owner(p_twin_id) then
    raise exception using
      errcode = '42501',
      message = format('twin_id: twin %s does not exist or is not yours', p_twin_id);
  end if;
  if p_reason is null or char_length(btrim(p_reason)) not between 1 and 500 then
    raise exception using
      errcode = '22023',
      message = 'p_reason: say why the spec is rolled back (1 to 500 characters)';
  end if;
  -- The twin's row lock orders this rollback with a run completing (and maybe publishing).
  perform 1 from public.twins t where t.id = p_twin_id for update;

  select * into v_current from public.persona_specs s
  where s.twin_id = p_twin_id and s.status = 'published';
  if v_current.id is null then
    raise exception using
      errcode = 'PT409',
      message = format('twin %s has no published spec to roll back', p_twin_id);
  end if;
  if p_spec_id is not null and p_spec_id <> v_current.id then
    raise exception using
      errcode = 'PT409',
      message = format('p_spec_id: spec %s is not the published spec of twin %s (version %s '
                       'is); nothing was rolled back', p_spec_id, p_twin_id, v_current.version);
  end if;
  -- The spec published before it: the last one archived that had been published and was not
  -- itself rolled back.
  select * into v_previous from public.persona_specs s
  where s.twin_id = p_twin_id and s.status = 'archived' and s.published_at is not null
    and s.rolled_back_at is null
  order by s.archived_at desc, s.version desc
  limit 1;
  if v_previous.id is null then
    raise exception using
      errcode = 'PT409',
      message = format('twin %s: no spec was published before version %s that was not itself '
                       'rolled back; there is nothing to roll back to', p_twin_id,
                       v_current.version);
  end if;

  insert into public.persona_feedback_learning_runs (
    twin_id, status, trigger, requested_by, safe_mode, attempts, max_attempts, events_scanned,
    events_processed, events_unmatched, modules_updated, gate_report,
    publish_decision, published_spec_id, started_at, finished_at
  )
  values (
    -- No gate_passed: no gate ran (constraint gate_passed_null_on_owner_rollback).
    p_twin_id, 'completed', 'owner_rollback', (select auth.uid()), false, 1, 1, 0, 0, 0, 0,
    jsonb_build_object('rollback', jsonb_build_object(
      'reason', btrim(p_reason), 'from_spec_id', v_current.id, 'from_version', v_current.version,
      'to_spec_id', v_previous.id, 'to_version', v_previous.version)),
    'published', v_previous.id, now(), now()
  )
  returning * into v_run;

  perform private.roll_back_spec(p_twin_id, v_current.id, v_previous.id,
                                 format('owner: %s', btrim(p_reason)));
  update public.persona_spec_watches w
  set state = 'rolled_back', concluded_at = now(), last_run_id = v_run.id
  where w.twin_id = p_twin_id and w.spec_id = v_current.id
    and w.state in ('watching', 'regressed');
  return v_run;
end;
$$;

comment on function private.rollback_persona_spec(uuid, text, uuid) is
  'Owner RPC body (called by public.rollback_persona_spec). In: a twin id, the reason (1-500 '
  'characters, trimmed) and optionally the spec to roll back (null: whatever is published). '
  'Out: the completed run (trigger owner_rollback, requested_by = the '
  'caller, gate_passed null: no gate ran, gate_report {rollback {reason, from_spec_id, from_version, to_spec_id, to_version}}, '
  'publish_decision published, published_spec_id = the spec published again) that records the rollback: the published spec is '
  'archived with rollback_reason "owner: <reason>" and rolled_back_at, the spec published before '
  'it (the latest archived one that had been published and was not rolled back) is published '
  'again, and a watch of the rolled-back spec (watching, or regressed: an alert acted on) ends '
  'rolled_back. Raises 42501 (HTTP 403) '
  '"twin_id: twin <id> does not exist or is not yours" when the caller does not own the twin '
  '(the same for a missing twin), 22023 for a missing or over-long reason, PT409 (HTTP 409) '
  'when the twin has no published spec or no earlier one to go back to, or p_spec_id is given '
  'and is not the published spec ("p_spec_id: spec <id> is not the published spec of twin <id> '
  '(version <n> is); nothing was rolled back": a repeated click); nothing changes then. '
  'Security definer: owners may not write specs'' status or runs themselves.';

grant execute on function private.rollback_persona_spec(uuid, text, uuid) to authenticated;

-- The API face of private.rollback_persona_spec: POST /rest/v1/rpc/rollback_persona_spec.
create function public.rollback_persona_spec(
  p_twin_id uuid, p_reason text, p_spec_id uuid default null
)
returns public.persona_feedback_learning_runs
language sql
set search_path = ''
as $$
  select * from private.rollback_persona_spec(p_twin_id, p_reason, p_spec_id);
$$;

comment on function public.rollback_persona_spec(uuid, text, uuid) is
  'Owner RPC (POST /rest/v1/rpc/rollback_persona_spec). In: p_twin_id, p_reason (1-500 '
  'characters), p_spec_id (optional, default null: the spec the owner means to roll back; the '
  'call changes nothing unless it is the published one). Out: the completed run (trigger '
  'owner_rollback, gate_passed null: no gate ran) recording the rollback: the '
  'published spec archived with the reason and time, the spec published before it published '
  'again. Raises 42501 (HTTP 403) "twin_id: twin <id> does not exist or is not yours" when the '
  'caller does not own the twin, 22023 for a missing or over-long reason, PT409 (HTTP 409) '
  '"twin <id> has no published spec to roll back", "... there is nothing to roll back to" or '
  '"p_spec_id: spec <id> is not the published spec of twin <id> (version <n> is); nothing was '
  'rolled back"; nothing changes then.';

grant execute on function public.rollback_persona_spec(uuid, text, uuid) to authenticated;

revoke execute on function
  private.rollback_persona_spec(uuid, text, uuid),
  public.rollback_persona_spec(uuid, text, uuid)
from public;

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  private.event_processing(bigint),
  public.processed_run_id(public.persona_training_events),
  public.processed_at(public.persona_training_events),
  private.request_learning_run(uuid, boolean),
  public.request_learning_run(uuid, boolean)
from public;

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
-- A run that fails holds its twin back: its end puts the twin in private.learning_due with a
-- not-before time (the run's retry_not_before: 10 s doubled per consecutive failed run, at most
-- 1 hour), and the scheduler queues no run of the twin before it. The poll takes only the rows
-- that are due (an index on not_before), so the row waits there until then and brings the twin
-- back without a new event; events after the scanned mark meanwhile are covered by it.

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

insert into private.event_marks (name, event_id)
values ('scanned', 0), ('committed', 0);

create table private.learning_due (
  twin_id uuid primary key,
  mark bigint not null default 0,
  not_before timestamptz not null default '-infinity'
);

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

create trigger persona_feedback_learning_runs_ended_mark_due
  after update of status on public.persona_feedback_learning_runs
  for each row
  when (old.status in ('queued', 'running') and new.status not in ('queued', 'running'))
  execute function private.mark_run_twin_due();

create trigger persona_feedback_learning_runs_deleted_mark_due
  after delete on public.persona_feedback_learning_runs
  for each row when (old.status in ('queued', 'running'))
  execute function private.mark_twin_due('twin_id');

create trigger twins_cursor_moved_back_mark_due
  after update of learned_through_event_id on public.twins
  for each row when (new.learned_through_event_id < old.learned_through_event_id)
  execute function private.mark_twin_due('id');

revoke execute on function
  private.mark_twin_due(),
  private.failed_run_retry_delay(integer),
  private.set_retry_not_before(),
  private.mark_run_twin_due()
from public;

-- Section: the worker's functions. Executable by service_role only.

-- Queues a scheduled run for every twin with unprocessed evidence, or whose modules must be
-- rebuilt, or whose production watch is past its expiry, and no run queued or running. Without
-- a twin it looks only at the candidates the section above lists, not at every twin.
create function public.enqueue_due_learning_runs(p_twin_id uuid default null)
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

-- Queues an operator's run for one twin, in safe mode or not (null: the twin's auto_publish
-- setting decides). A run already queued for the twin is returned, taking the requested mode.
create function public.enqueue_learning_run(p_twin_id uuid, p_safe_mode boolean default null)
returns public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
begin
  insert into public.persona_feedback_learning_runs (twin_id, trigger, safe_mode, max_attempts)
  select t.id, 'manual', coalesce(p_safe_mode, not s.auto_publish), s.max_attempts
  from public.twins t join public.persona_learning_settings s on s.twin_id = t.id
  where t.id = p_twin_id
  on conflict (twin_id) where status = 'queued'
    do update set safe_mode = coalesce(p_safe_mode, persona_feedback_learning_runs.safe_mode)
  returning * into v_run;
  if v_run.id is null then
    raise exception using errcode = 'P0002', message = format('twin %s does not exist', p_twin_id);
  end if;
  return v_run;
end;
$$;

comment on function public.enqueue_learning_run(uuid, boolean) is
  'Worker (operator CLI). In: a twin id; safe mode true/false, or null for the twin''s '
  'auto_publish setting. Out: the twin''s queued run (trigger manual), or the run already queued, '
  'now in the requested mode. Raises P0002 (HTTP 404) "twin <id> does not exist".';

-- The runs a claim may take, oldest first after expired leases and owners' requests, locked
-- (skip locked: two workers never get the same row), at most p_limit, of p_twin_id only if
-- given. First fails every running run whose lease expired on its last attempt.
create function private.claimable_learning_runs(p_twin_id uuid, p_limit integer)
returns setof public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
begin
  -- A run whose worker died on its last attempt fails; its events stay unprocessed.
  update public.persona_feedback_learning_runs r
  set status = 'failed', finished_at = now(), lease_token = null, lease_expires_at = null,
      error = coalesce(r.error || '; ', '') || format('lease expired after attempt %s of %s',
                                                     r.attempts, r.max_attempts)
  where r.status = 'running' and r.lease_expires_at < now() and r.attempts >= r.max_attempts;

  return query
  select r.*
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
  limit p_limit
  for update of r skip locked;
end;
$$;

comment on function private.claimable_learning_runs(uuid, integer) is
  'Claims'' helper. In: a twin (null: any) and how many runs at most. First fails every running '
  'run whose lease expired on its last attempt. Out: up to p_limit runs a worker may claim, '
  'locked for update (skipping rows another transaction holds): runs whose lease expired first, '
  'then owners'' requests, then the oldest queued run of a twin with nothing running. Raises '
  'nothing.';

-- Starts a claimable run for a worker: running under a new lease, attempts + 1; the first
-- claim fixes its batch and time T. Returns the run, or a row of nulls when another worker
-- started a run of the same twin since the caller's snapshot.
create function private.start_learning_run(
  p_run public.persona_feedback_learning_runs, p_worker_id text, p_lease_seconds integer
)
returns public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_after bigint;
  v_last bigint;
begin
  begin
    update public.persona_feedback_learning_runs r
    set status = 'running',
        attempts = r.attempts + 1,
        worker_id = p_worker_id,
        lease_token = gen_random_uuid(),
        lease_expires_at = now() + make_interval(secs => p_lease_seconds),
        started_at = coalesce(r.started_at, now())
    where r.id = p_run.id
    returning * into v_run;
  exception when unique_violation then
    -- Another worker started a run of the same twin since our snapshot: nothing for us.
    return null;
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
  return v_run;
end;
$$;

comment on function private.start_learning_run(
  public.persona_feedback_learning_runs, text, integer
) is
  'Claims'' helper. In: a run private.claimable_learning_runs returned, the worker''s id and a '
  'lease in seconds. Out: the run now running under a new lease_token until now() + '
  'p_lease_seconds, attempts + 1, started_at kept from its first claim; the first claim fixes '
  'the batch (batch_after_event_id = the twin''s cursor, batch_last_event_id: at most '
  'max_batch_events ids later) and learning_time, after a share lock on the events that waits '
  'for inserts in flight, under which it moves the scheduler''s committed mark to the newest '
  'event id. A row of nulls when another worker started a run of the same twin since the '
  'caller''s snapshot. Raises 55P03 when that lock is not granted within 5 s.';

grant execute on function
  private.claimable_learning_runs(uuid, integer),
  private.start_learning_run(public.persona_feedback_learning_runs, text, integer)
to service_role;
revoke execute on function
  private.claimable_learning_runs(uuid, integer),
  private.start_learning_run(public.persona_feedback_learning_runs, text, integer)
from public;

-- Find me a run to do: first runs whose worker's lease expired (taken over with the same batch),
-- then owners' requests, then the oldest. Returns no row when there is nothing to do.
create function public.claim_learning_run(
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
begin
  if p_worker_id is null or char_length(p_worker_id) not between 1 and 200 then
    raise exception using errcode = '22023', message = 'p_worker_id must be 1 to 200 characters';
  end if;
  if p_lease_seconds is null or p_lease_seconds not between 1 and 3600 then
    raise exception using errcode = '22023', message = 'p_lease_seconds must be 1 to 3600';
  end if;
  select * into v_run from private.claimable_learning_runs(p_twin_id, 1);
  if v_run.id is null then
    return;
  end if;
  v_run := private.start_learning_run(v_run, p_worker_id, p_lease_seconds);
  if v_run.id is not null then
    return next v_run;
  end if;
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

-- Locks a running run for its lease holder; raises PT409 (HTTP 409) when the lease is stale.
create function private.lock_leased_run(p_run_id uuid, p_lease_token uuid)
returns public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
begin
  select * into v_run from public.persona_feedback_learning_runs r where r.id = p_run_id for update;
  if v_run.id is null then
    raise exception using errcode = 'P0002', message = format('run %s does not exist', p_run_id);
  end if;
  if v_run.status <> 'running' or v_run.lease_token is distinct from p_lease_token
     or v_run.lease_expires_at < now() then
    raise exception using
      errcode = 'PT409',
      message = format('run %s: lease is stale (status %s); another worker owns it or it ended',
                       p_run_id, v_run.status);
  end if;
  return v_run;
end;
$$;

comment on function private.lock_leased_run(uuid, uuid) is
  'Worker functions'' helper. In: a run id and its lease token. Out: the run, locked for update '
  '(for the rest of the transaction). Raises P0002 (HTTP 404) "run <id> does not exist"; PT409 '
  '(HTTP 409) "run <id>: lease is stale ..." when the run is not running, the token is another '
  'worker''s, or the lease expired.';

grant execute on function private.lock_leased_run(uuid, uuid) to service_role;

-- Moves the lease of a run forward; the worker calls it while a long run is in hand.
create function public.extend_learning_run_lease(
  p_run_id uuid, p_lease_token uuid, p_lease_seconds integer default 60
)
returns timestamptz
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
begin
  if p_lease_seconds is null or p_lease_seconds not between 1 and 3600 then
    raise exception using errcode = '22023', message = 'p_lease_seconds must be 1 to 3600';
  end if;
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  update public.persona_feedback_learning_runs r
  set lease_expires_at = now() + make_interval(secs => p_lease_seconds)
  where r.id = v_run.id
  returning r.lease_expires_at into v_run.lease_expires_at;
  return v_run.lease_expires_at;
end;
$$;

comment on function public.extend_learning_run_lease(uuid, uuid, integer) is
  'Worker. In: a run id, its lease token, a lease in seconds (1-3600). Out: the new '
  'lease_expires_at, now() + p_lease_seconds. Raises 22023 for a bad p_lease_seconds; P0002 and '
  'PT409 (HTTP 409, stale lease) as private.lock_leased_run.';

-- The exact path's rebuild, in bounded steps: a run's scratch, then one step's sums.
create table private.learning_run_rebuilds (
  run_id uuid primary key
    references public.persona_feedback_learning_runs (id) on delete cascade,
  evidence_generation bigint not null,
  rebuilt_through_event_id bigint not null,
  steps integer not null default 0
);

comment on table private.learning_run_rebuilds is
  'A run''s rebuild in progress: the twin''s evidence_generation it started at, and the last event '
  'id its steps have summed (private.learning_run_rebuild_sums). Scratch of the worker''s; read by '
  'no API role.';

create table private.learning_run_rebuild_sums (
  run_id uuid not null references private.learning_run_rebuilds (run_id) on delete cascade,
  by_key boolean not null,
  key text not null,
  success double precision not null,
  failure double precision not null,
  primary key (run_id, by_key, key)
);

comment on table private.learning_run_rebuild_sums is
  'A rebuild''s decayed weights so far, per match key: by_key (the events named a module_key) and '
  'key (that module_key, else the intent_label), success and failure summed as '
  'private.rebuild_key_sums counts them.';

grant select, insert, update, delete on private.learning_run_rebuilds,
  private.learning_run_rebuild_sums to service_role;

-- One step's sums, in a function of its own: RETURN QUERY may run its query with parallel
-- workers, which a query inside the claim may not (PL/pgSQL fetches it with a row limit).
create function private.rebuild_key_sums(
  p_twin_id uuid, p_after_event_id bigint, p_through_event_id bigint, p_batch_last_event_id bigint,
  p_learning_time timestamptz, p_half_life_days double precision,
  p_feedback_weight double precision, p_audit_weight double precision,
  p_unsafe_multiplier double precision
)
returns table (by_key boolean, key text, success double precision, failure double precision)
language plpgsql
stable
set search_path = ''
as $$
#variable_conflict use_column
declare
  v_t_epoch float8 := date_part('epoch', p_learning_time);
  v_rate float8 := ln(2::float8) / (p_half_life_days * 86400);
begin
  -- Each weight's decay is exp(least(0, t - T) * ln 2 / H) with t and T in epoch seconds: the
  -- same 2^(-(T - t)/H) as a batch's, without an interval per row. The events current at the
  -- batch's end are those never replaced, plus those replaced only by a vote after it (found
  -- from that vote, through the index on (twin_id, supersedes_id)); a vote whose replacement
  -- was deleted stays out. Each part is summed per match key on its own, so PostgreSQL may run
  -- the large first part in parallel, as it runs a bare aggregate, with no join per row.
  return query
  select k.by_key, k.key, sum(k.success), sum(k.failure)
  from (
    select e.module_key is not null as by_key, coalesce(e.module_key, e.intent_label) as key,
           sum(w.weight) filter (where w.success) as success,
           sum(w.weight) filter (where not w.success) as failure
    from public.persona_training_events e
    cross join lateral (
      select coalesce(e.score > 0, e.passed) as success,
             case when e.source = 'user_feedback' then p_feedback_weight
                  else p_audit_weight end
             * case when e.reason = 'unsafe' and not coalesce(e.score > 0, e.passed)
                    then p_unsafe_multiplier else 1 end
             * exp(least(0, date_part('epoch', e.created_at) - v_t_epoch) * v_rate) as weight
    ) w
    where e.twin_id = p_twin_id
      and e.id > p_after_event_id and e.id <= p_through_event_id
      and e.superseded_at is null
      and not e.audit_of_draft and (e.source = 'persona_audit' or e.score <> 0)
    group by 1, 2
    union all
    select e.module_key is not null, coalesce(e.module_key, e.intent_label),
           sum(w.weight) filter (where w.success),
           sum(w.weight) filter (where not w.success)
    from public.persona_training_events e
    cross join lateral (
      select coalesce(e.score > 0, e.passed) as success,
             case when e.source = 'user_feedback' then p_feedback_weight
                  else p_audit_weight end
             * case when e.reason = 'unsafe' and not coalesce(e.score > 0, e.passed)
                    then p_unsafe_multiplier else 1 end
             * exp(least(0, date_part('epoch', e.created_at) - v_t_epoch) * v_rate) as weight
    ) w
    -- Each such vote once, however many votes name it, and only when marked superseded (one
    -- still current was counted above).
    where e.id in (
        select n.supersedes_id from public.persona_training_events n
        where n.twin_id = p_twin_id
          and n.supersedes_id > p_after_event_id and n.supersedes_id <= p_through_event_id
          and n.id > p_batch_last_event_id)
      and e.twin_id = p_twin_id
      and e.superseded_at is not null
      and not e.audit_of_draft and (e.source = 'persona_audit' or e.score <> 0)
    group by 1, 2
  ) k
  group by k.by_key, k.key;
end;
$$;

comment on function private.rebuild_key_sums(
  uuid, bigint, bigint, bigint, timestamptz, double precision, double precision,
  double precision, double precision
) is
  'One step of the exact learning path. In: a twin, an event-id range (p_after_event_id, '
  'p_through_event_id], the batch''s last event id, the time T, half_life_days H, '
  'feedback_weight, audit_weight, unsafe_multiplier. Out: one row per match key (by_key: the '
  'events named a module_key; key: that module_key, else the intent_label) with success and '
  'failure (null when none): the sum over the range''s events that are current at the batch''s '
  'end (superseded_at null, or marked superseded and named by a vote after '
  'p_batch_last_event_id, counted once; a vote whose '
  'replacement was deleted stays out), feedback with a score other than 0 and audits that did '
  'not audit a draft, each weighing w * 2^(-(T - t)/H) (DESIGN.md, Learning; '
  'age at least 0) with w the source''s weight, times unsafe_multiplier for an unsafe failure. '
  'Raises nothing.';

grant execute on function private.rebuild_key_sums(
  uuid, bigint, bigint, bigint, timestamptz, double precision, double precision,
  double precision, double precision
) to service_role;
revoke execute on function private.rebuild_key_sums(
  uuid, bigint, bigint, bigint, timestamptz, double precision, double precision,
  double precision, double precision
) from public;

-- Takes the next step of a run's rebuild; true once the rebuild has summed the whole batch.
create function private.advance_module_rebuild(
  p_run public.persona_feedback_learning_runs,
  p_settings public.persona_learning_settings,
  p_generation bigint
)
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  v_progress private.learning_run_rebuilds;
  v_through bigint;
begin
  select * into v_progress from private.learning_run_rebuilds b where b.run_id = p_run.id;
  if v_progress.run_id is null or v_progress.evidence_generation <> p_generation then
    -- First step, or evidence deleted or modules edited since the rebuild began: start over
    -- (and drop what earlier runs of the twin left: one run's scratch per twin at most).
    delete from private.learning_run_rebuilds b
    using public.persona_feedback_learning_runs r
    where b.run_id = r.id and r.twin_id = p_run.twin_id;
    insert into private.learning_run_rebuilds (run_id, evidence_generation, rebuilt_through_event_id)
    values (p_run.id, p_generation, 0)
    returning * into v_progress;
  end if;
  if v_progress.rebuilt_through_event_id >= p_run.batch_last_event_id then
    return true;
  end if;

  -- The step: rebuild_step_events ids on from the twin's next event, so at most that many
  -- events (ids are unique) without counting them first. A twin whose events interleave with
  -- other twins' takes more steps, each reading fewer of its events.
  select least(min(e.id) + p_settings.rebuild_step_events - 1, p_run.batch_last_event_id)
  into v_through
  from public.persona_training_events e
  where e.twin_id = p_run.twin_id
    and e.id > v_progress.rebuilt_through_event_id and e.id <= p_run.batch_last_event_id;
  v_through := coalesce(v_through, p_run.batch_last_event_id);

  insert into private.learning_run_rebuild_sums as s (run_id, by_key, key, success, failure)
  select p_run.id, k.by_key, k.key, coalesce(k.success, 0), coalesce(k.failure, 0)
  from private.rebuild_key_sums(
    p_run.twin_id, v_progress.rebuilt_through_event_id, v_through, p_run.batch_last_event_id,
    p_run.learning_time, p_settings.half_life_days, p_settings.feedback_weight,
    p_settings.audit_weight, p_settings.unsafe_multiplier
  ) k
  on conflict (run_id, by_key, key) do update
  set success = s.success + excluded.success, failure = s.failure + excluded.failure;

  update private.learning_run_rebuilds b
  set rebuilt_through_event_id = v_through, steps = b.steps + 1
  where b.run_id = p_run.id;
  return v_through >= p_run.batch_last_event_id;
end;
$$;

comment on function private.advance_module_rebuild(
  public.persona_feedback_learning_runs, public.persona_learning_settings, bigint
) is
  'claim_learning_run_events'' helper for a twin marked for a rebuild. In: the run (locked by its '
  'lease holder, batch fixed), the twin''s settings, the twin''s evidence_generation now. Sums the '
  'next at most rebuild_step_events of the twin''s events up to the batch''s end into '
  'private.learning_run_rebuild_sums (private.rebuild_key_sums), starting over when the '
  'generation differs from the one the rebuild began at. Out: true when the sums cover the whole '
  'batch (then nothing more is read), false when steps remain. Raises nothing of its own.';

grant execute on function private.advance_module_rebuild(
  public.persona_feedback_learning_runs, public.persona_learning_settings, bigint
) to service_role;
revoke execute on function private.advance_module_rebuild(
  public.persona_feedback_learning_runs, public.persona_learning_settings, bigint
) from public;

-- Returns everything the pure learning and gate need for the run's batch, aggregated here so
-- that no event row travels to the worker:
-- per-module decayed evidence of the batch (a vote that replaces an earlier one also retracts
-- that one), the modules, the settings, the draft and baseline specs and their paired audits.
create function public.claim_learning_run_events(p_run_id uuid, p_lease_token uuid)
returns jsonb
language plpgsql
set search_path = ''
-- Compiling the batch's query with JIT cost as much as running it (0.5-1 s of a 2 s call
-- under load): without it the call's time is the batch's alone.
set jit = off
-- The batch's groups take about 3 MB for 200,000 events; at the default 4 MB the planner,
-- estimating far more groups, sorts the batch on disk instead.
set work_mem = '32MB'
-- The batch's bounds are variables: a generic plan, which plpgsql may settle on after five
-- calls on one connection, cannot see that the batch is a small range of the twin's events
-- (it read the batch at 0.5 s where the custom plan takes 0.3 s).
set plan_cache_mode = force_custom_plan
-- The retractions' branch is estimated at a third of the batch (it is a twentieth or less), and
-- the planner then sorts the batch on its seven group columns instead of hashing it: 0.23 s
-- instead of 0.15 s for 100,000 events. A sort elsewhere in the call (the gate's audits) is
-- still made where nothing else can give the order.
set enable_sort = off
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_settings public.persona_learning_settings;
  v_draft public.persona_specs;
  v_baseline_id uuid;
  v_scanned integer;
  v_unmatched integer;
  v_evidence jsonb;
  v_audits jsonb;
  v_generation bigint;
  v_rebuild boolean;
  v_modules jsonb;
  v_head_events integer;
  v_head_last_id bigint;
  v_sparse_batch boolean;
begin
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  select * into v_settings from public.persona_learning_settings s
  where s.twin_id = v_run.twin_id;
  if v_settings.twin_id is null then
    raise exception using errcode = 'P0002',
      message = format('twin %s has no persona_learning_settings row', v_run.twin_id);
  end if;
  -- Read before the evidence: a change committed after this read bumps the generation, and the
  -- completion then refuses (PT412) rather than learn from what this claim saw.
  select t.evidence_generation, t.evidence_generation <> t.learned_generation
  into strict v_generation, v_rebuild
  from public.twins t where t.id = v_run.twin_id;

  -- The exact path, one bounded step per call: until the rebuild's sums cover the batch, the
  -- answer is the progress, and the worker calls again.
  if v_rebuild and not private.advance_module_rebuild(v_run, v_settings, v_generation) then
    return (
      select jsonb_build_object(
        'rebuild_pending', true, 'run_id', v_run.id,
        'rebuilt_through_event_id', b.rebuilt_through_event_id,
        'batch_last_event_id', v_run.batch_last_event_id, 'steps', b.steps)
      from private.learning_run_rebuilds b where b.run_id = v_run.id
    );
  end if;

  -- A batch of at most 10,000 events (every run the batched path reads, and most runs of a busy
  -- twin) is read with each statement's generic plan, made once per connection: planning the
  -- batch's statement anew cost 1.7 ms of the 2.3 ms a 5-event run took (case 6). A larger
  -- batch keeps its custom plan (above). The count stops at 10,001 index entries.
  select count(*), max(b.id) into v_head_events, v_head_last_id
  from (
    select e.id from public.persona_training_events e
    where e.twin_id = v_run.twin_id and e.id > v_run.batch_after_event_id
      and e.id <= v_run.batch_last_event_id
    limit 10001) b;
  -- A large batch whose twin holds under half the ids of its range (its first 10,001 events
  -- span more than twice as many ids: other twins write between them) is a sparse one. The
  -- planner cannot see that: for a twin holding most of the table it expects most of the
  -- range's events to be the twin's, and reads the primary key's range, filtering out the other
  -- twins' events in it (250,000 rows read for a 50,000-event batch among 200,000 others: 1.3
  -- times the same run of a twin with no history, bench case 2). A sparse batch's reads are
  -- also bounded by row comparisons on (twin_id, id), which only that index takes and which the
  -- planner estimates by the twin column alone: at most the share of the twins after this one,
  -- so the narrow read of that index wins. Not for a dense batch: for a twin alone in the table
  -- that estimate is one row, and a 100,000-event batch was read through that index at 40-60
  -- ms instead of a 20 ms bitmap of the primary key (case 1). A custom plan folds the condition
  -- away when it does not hold; in a generic plan (a small batch, never sparse by this rule) it
  -- is a filter.
  v_sparse_batch := v_head_events > 10000
    and v_head_last_id - v_run.batch_after_event_id > 2 * v_head_events;
  if v_head_events <= 10000 then
    -- Local to this call: the function's own setting is restored when it returns.
    perform set_config('plan_cache_mode', 'force_generic_plan', true);
  end if;

  -- One run's summaries at most per twin: what an earlier, unfinished run of the twin left goes.
  delete from private.learning_run_summaries s
  using public.persona_feedback_learning_runs r
  where s.run_id = r.id and r.twin_id = v_run.twin_id and r.id <> v_run.id;

  -- One streaming pass over the batch: each vote's decayed weight (a vote that replaced an earlier
  -- one also retracts that one), summed per key it matches by (its module_key if given, else its
  -- intent_label), and only then matched to the modules: the join takes one row per key, not per
  -- vote, so its cost does not depend on the plan or the twin's module count. A key no module
  -- serves lands in the null group (unmatched); an intent several modules serve counts for each.
  -- The same pass counts the owner views' two summaries of the batch, kept for the completion
  -- (private.learning_run_summaries): reading the batch again there cost 2-3 times this pass.
  with targets as (
    select true as by_key, m.module_key as key, m.id as module_id
    from public.persona_modules m where m.twin_id = v_run.twin_id
    union all
    select false, m.intent_label, m.id
    from public.persona_modules m where m.twin_id = v_run.twin_id
  ),
  votes as (
    -- The batch's events, read once. Each weighs only if current at the batch's end (never
    -- replaced, or replaced by a vote after the batch, which the next run retracts): a vote
    -- replaced inside the batch, or whose replacement was deleted, stays out, as the rebuild
    -- leaves it out.
    select 1.0::float8 as sign, e.source, e.module_key, e.intent_label, e.score, e.passed,
           e.reason, e.created_at, e.audit_of_draft, e.supersedes_id is not null as changes,
           -- One probe of the supersedes index per replaced vote. A scalar subquery, not
           -- EXISTS: the planner may turn an EXISTS into a hash of every event of the twin
           -- after the batch (800,000 rows read for a 200,000-event batch); and `n.id + 0`,
           -- so that it never walks the (twin_id, id) index through the events after the
           -- batch instead, which statistics older than the backlog make look empty.
           case when e.superseded_at is null then 1.0::float8
                when (
                  select n.id from public.persona_training_events n
                  where n.twin_id = v_run.twin_id and n.supersedes_id = e.id
                    and n.id + 0 > v_run.batch_last_event_id
                  limit 1
                ) is not null then 1.0::float8
                else 0.0::float8 end as current
    from public.persona_training_events e
    where e.twin_id = v_run.twin_id
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
      and (not v_sparse_batch
           or (e.twin_id, e.id) > (v_run.twin_id, v_run.batch_after_event_id)
              and (e.twin_id, e.id) <= (v_run.twin_id, v_run.batch_last_event_id))
    union all
    -- What an earlier run learned and a vote of the batch replaced: retracted, once however
    -- many votes name it, only when it is marked superseded (a vote a hand edit names while it
    -- is still current keeps counting, as the rebuild and the summaries count it), and only
    -- when no vote after the batch names it too.
    -- Kept apart from the first read: a lateral pair of rows for every event (the vote, and its
    -- retraction when there is one) cost a third of the whole call. The batch's vote changes
    -- come from their own index on (twin_id, id) (persona_training_events_vote_changes_idx), a
    -- range as narrow as the batch; each replaced vote is looked up by primary key (offset 0
    -- keeps the planner from hashing the whole table instead).
    select -1.0::float8, p.source, p.module_key, p.intent_label, p.score, p.passed, p.reason,
           p.created_at, p.audit_of_draft, false, 1.0::float8
    from (
      select distinct e.supersedes_id as id
      from public.persona_training_events e
      where e.twin_id = v_run.twin_id
        and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
        and (not v_sparse_batch
             or (e.twin_id, e.id) > (v_run.twin_id, v_run.batch_after_event_id)
                and (e.twin_id, e.id) <= (v_run.twin_id, v_run.batch_last_event_id))
        and e.supersedes_id is not null
    ) c
    cross join lateral (
      select r.source, r.module_key, r.intent_label, r.score, r.passed, r.reason, r.created_at,
             r.audit_of_draft
      from public.persona_training_events r
      where r.id = c.id and r.twin_id = v_run.twin_id
        and r.id <= v_run.batch_after_event_id
        and r.superseded_at is not null
        -- Still counted while a vote after the batch names it (the rule of the rebuild and
        -- the summaries): that vote's run retracts it, not this one.
        and (
          select n.id from public.persona_training_events n
          where n.twin_id = v_run.twin_id and n.supersedes_id = r.id
            and n.id + 0 > v_run.batch_last_event_id
          limit 1
        ) is null
      offset 0
    ) p
  ),
  weighted as (
    select v.sign, v.current, v.source, v.reason, v.changes, v.audit_of_draft, v.intent_label,
           v.module_key, v.score, v.passed,
           -- The UTC day as a number (days since 1970-01-01): no time zone conversion per row.
           floor(date_part('epoch', v.created_at) / 86400)::integer as day,
           coalesce(v.score > 0, v.passed) as success,
           v.sign * v.current
           * case
               when v.source = 'user_feedback' and v.score = 0 then 0
               when v.audit_of_draft then 0
               when v.source = 'user_feedback' then v_settings.feedback_weight
               else v_settings.audit_weight
             end
           * case
               when not coalesce(v.score > 0, v.passed) and v.reason = 'unsafe'
                 then v_settings.unsafe_multiplier
               else 1
             end
           * exp(-ln(2::float8)
                 * greatest(0, date_part('epoch', v_run.learning_time - v.created_at))
                 / (v_settings.half_life_days * 86400)) as weight
    from votes v
  ),
  -- The columns the three summaries group by, in one hash table (some 7,000 groups for
  -- 200,000 events: days x keys x reasons x scores); what derives from them (match key,
  -- outcome) is computed per group, not per event.
  fine as (
    select w.source, w.reason, w.day, w.intent_label, w.module_key, w.score, w.passed,
           coalesce(sum(w.weight) filter (where w.success), 0) as success,
           coalesce(sum(w.weight) filter (where not w.success), 0) as failure,
           count(*) filter (where w.sign > 0) as events,
           -- Run evidence: the batch's events as they came (audits of a draft moved no module).
           count(*) filter (where w.sign > 0 and not w.audit_of_draft) as arrived,
           count(*) filter (where w.sign > 0 and not w.audit_of_draft and w.changes) as changes,
           -- Daily feedback: +1 for a vote current at the batch's end, -1 for a retraction.
           coalesce(sum((w.sign * w.current)::integer)
                    filter (where w.source = 'user_feedback'), 0) as votes
    from weighted w
    group by w.source, w.reason, w.day, w.intent_label, w.module_key, w.score, w.passed
  ),
  keyed as (
    select f.*, f.module_key is not null as by_key,
           coalesce(f.module_key, f.intent_label) as key,
           case when coalesce(f.score > 0, f.passed) then 'success'
                when f.score = 0 then 'neutral'
                else 'failure' end::public.evidence_outcome as outcome
    from fine f
  ),
  grouped as (
    select case when grouping(f.day) = 0 then 'feedback'
                when grouping(f.source) = 0 then 'evidence'
                else 'learning' end as summary,
           f.by_key, f.key, f.source, f.reason, f.outcome, f.day, f.intent_label, f.module_key,
           f.score, sum(f.success) as success, sum(f.failure) as failure,
           sum(f.events) as events, sum(f.arrived) as arrived, sum(f.changes) as changes,
           sum(f.votes) as votes
    from keyed f
    group by grouping sets (
      (f.by_key, f.key),
      (f.by_key, f.key, f.source, f.reason, f.outcome),
      (f.day, f.intent_label, f.module_key, f.reason, f.score)
    )
  ),
  per_module as (
    select t.module_id, sum(k.success) as success, sum(k.failure) as failure,
           sum(k.events) as events
    from grouped k
    left join targets t on t.by_key = k.by_key and t.key = k.key
    where k.summary = 'learning'
    group by t.module_id
  ),
  summaries as (
    insert into private.learning_run_summaries (run_id, run_evidence, feedback_daily)
    -- Arrays of composite values: a sixth of the time jsonb takes to build for the 30,000
    -- day buckets of a batch that spans a month.
    select v_run.id,
           coalesce(array_agg(row(k.by_key, k.key, k.source, k.reason, k.outcome, k.arrived,
                                  k.changes)::private.run_evidence_count)
             filter (where k.summary = 'evidence' and k.arrived > 0), '{}'),
           coalesce(array_agg(row(k.day, k.intent_label, k.module_key, k.reason, k.score,
                                  k.votes)::private.feedback_day_count)
             filter (where k.summary = 'feedback' and k.votes <> 0), '{}')
    from grouped k
    on conflict (run_id) do update
      set run_evidence = excluded.run_evidence, feedback_daily = excluded.feedback_daily
    returning 1
  )
  select
    coalesce((select p.events from per_module p where p.module_id is null), 0),
    coalesce((select jsonb_agg(jsonb_build_object(
        'module_id', p.module_id, 'success', p.success, 'failure', p.failure))
      from per_module p where p.module_id is not null), '[]'),
    -- The batch's size: every event of it has one match key (before the join to modules,
    -- which counts an intent several modules serve once for each).
    coalesce((select sum(k.events) from grouped k where k.summary = 'learning'), 0)
  into v_unmatched, v_evidence, v_scanned;

  if v_rebuild then
    -- The exact path: every module from the rebuild's sums (the batch's evidence in them, so
    -- none is added on top); a module takes the sums of its key and of its intent label.
    select jsonb_agg(jsonb_build_object(
        'module_id', m.id, 'module_key', m.module_key, 'intent_label', m.intent_label,
        'success', coalesce(r.success, 0), 'failure', coalesce(r.failure, 0),
        'evidence_at', v_run.learning_time, 'confidence', m.confidence, 'status', m.status)
      order by m.module_key)
    into v_modules
    from public.persona_modules m
    cross join lateral (
      select sum(s.success) as success, sum(s.failure) as failure
      from private.learning_run_rebuild_sums s
      where s.run_id = v_run.id
        and ((s.by_key and s.key = m.module_key) or (not s.by_key and s.key = m.intent_label))
    ) r
    where m.twin_id = v_run.twin_id;
    v_evidence := '[]';
  else
    select jsonb_agg(jsonb_build_object(
        'module_id', m.id, 'module_key', m.module_key, 'intent_label', m.intent_label,
        'success', m.success_weight, 'failure', m.failure_weight, 'evidence_at', m.evidence_at,
        'confidence', m.confidence, 'status', m.status) order by m.module_key)
    into v_modules
    from public.persona_modules m where m.twin_id = v_run.twin_id;
  end if;

  update public.persona_feedback_learning_runs r
  set events_scanned = v_scanned, events_unmatched = v_unmatched,
      evidence_generation = v_generation, rebuilt_modules = v_rebuild
  where r.id = v_run.id;

  select * into v_draft from public.persona_specs s
  where s.twin_id = v_run.twin_id and s.status = 'draft'
  order by s.version desc
  limit 1;
  select s.id into v_baseline_id from public.persona_specs s
  where s.twin_id = v_run.twin_id and s.status = 'published';

  -- The gate's evidence: the latest audit of every trace audited under the candidate (the latest
  -- draft), paired with the baseline's (published spec's) latest audit of the same trace: all
  -- audits of both specs, not only this batch's. Driven by the candidate's audits, through the
  -- audit index, so it costs the same whatever the twin's history. No stored created_at is in
  -- the future (private.bound_event_created_at), so a skewed clock cannot make an audit latest.
  if v_draft.id is null then
    v_audits := jsonb_build_object(
      'pairs', 0, 'candidate_only_passed', 0, 'baseline_only_passed', 0,
      'candidate_audited', 0, 'candidate_passed', 0, 'candidate_unsafe_failures', 0);
  else
    with candidate as (
      select distinct on (e.trace_id) e.trace_id, e.passed
      from public.persona_training_events e
      where e.persona_spec_id = v_draft.id and e.source = 'persona_audit'
      order by e.trace_id, e.created_at desc, e.id desc
    ),
    paired as (
      select c.passed, b.passed as baseline_passed
      from candidate c
      left join lateral (
        select e.passed from public.persona_training_events e
        where e.persona_spec_id = v_baseline_id and e.trace_id = c.trace_id
          and e.source = 'persona_audit'
        order by e.created_at desc, e.id desc
        limit 1
      ) b on true
    )
    select jsonb_build_object(
      'pairs', count(p.baseline_passed),
      'candidate_only_passed', count(*) filter (where p.passed and not p.baseline_passed),
      'baseline_only_passed', count(*) filter (where not p.passed and p.baseline_passed),
      'candidate_audited', count(*),
      'candidate_passed', count(*) filter (where p.passed),
      'candidate_unsafe_failures', (
        select count(*) from public.persona_training_events e
        where e.persona_spec_id = v_draft.id and e.source = 'persona_audit'
          and not e.passed and e.reason = 'unsafe'
      )
    )
    into v_audits
    from paired p;
  end if;

  return jsonb_build_object(
    'run', to_jsonb(v_run) - 'lease_token',
    'learning_time', v_run.learning_time,
    'events_scanned', v_scanned,
    'events_unmatched', v_unmatched,
    'rebuilt_modules', v_rebuild,
    'settings', to_jsonb(v_settings),
    'modules', coalesce(v_modules, '[]'),
    'evidence', v_evidence,
    'draft_spec_id', v_draft.id,
    'draft_modules', coalesce(v_draft.spec -> 'modules', '[]'),
    'baseline_spec_id', v_baseline_id,
    'audits', v_audits
  );
end;
$$;

comment on function public.claim_learning_run_events(uuid, uuid) is
  'Worker. In: a run id and its lease token. Reads the run''s batch once: records '
  'events_scanned, events_unmatched, evidence_generation and rebuilt_modules on the run, and the '
  'batch''s run evidence and daily feedback counts in private.learning_run_summaries for the '
  'completion (dropping what an unfinished earlier run of the twin left there). Out: jsonb {run (without '
  'lease_token), learning_time T, events_scanned, events_unmatched, rebuilt_modules, settings, '
  'modules [{module_id, module_key, intent_label, success, failure, evidence_at, confidence, '
  'status}], evidence [{module_id, success, failure}] (the batch''s decayed weight per module), '
  'draft_spec_id, draft_modules, baseline_spec_id, audits {pairs, candidate_only_passed, '
  'baseline_only_passed, candidate_audited, candidate_passed, candidate_unsafe_failures} (latest '
  'audit per trace of the latest draft, paired with the published spec''s)}. Incremental when the '
  'twin''s evidence_generation equals its learned_generation; otherwise (rebuilt_modules) every '
  'module''s success/failure is recomputed from the twin''s evidence up to the batch''s end, '
  'evidence_at = T, and evidence is empty. That rebuild reads at most rebuild_step_events '
  'events per call (private.advance_module_rebuild): until its last step the answer is jsonb '
  '{rebuild_pending: true, run_id, rebuilt_through_event_id, batch_last_event_id, steps}, and '
  'the caller calls again (a deletion or module edit meanwhile starts the rebuild over). Each vote weighs w * 2^(-(T - t)/H) (DESIGN.md, '
  'Learning), computed as exp(-ln 2 * age / (half_life_days * 86400)) with the age T - t in '
  'seconds (at least 0): w = feedback_weight or audit_weight (0 for a neutral vote and for an '
  'audit of a draft), times unsafe_multiplier for an unsafe failure; a vote that supersedes '
  'another also retracts that one with the same formula if an earlier run learned it and it is '
  'marked superseded and named by no vote after the batch (once, however many votes name it); a vote of the '
  'batch counts only if current at the batch''s end (not replaced inside the batch, and not '
  'replaced by a vote since deleted). Raises P0002 and PT409 (HTTP 409, stale '
  'lease) as private.lock_leased_run; P0002 "twin <id> has no persona_learning_settings row".';

-- Rolls a twin's published spec back: it is archived with the reason and time, and the spec
-- given is published again. The caller holds the twin's row lock (a completion or the owner's
-- RPC), so no publish runs between the two updates.
create function private.roll_back_spec(
  p_twin_id uuid, p_spec_id uuid, p_to_spec_id uuid, p_reason text
)
returns void
language plpgsql
set search_path = ''
as $$
begin
  if p_to_spec_id is null then
    raise exception using errcode = '55000',
      message = format('twin %s: no earlier spec to roll spec %s back to', p_twin_id, p_spec_id);
  end if;
  update public.persona_specs s
  set status = 'archived', rolled_back_at = now(), rollback_reason = p_reason
  where s.id = p_spec_id and s.twin_id = p_twin_id and s.status = 'published';
  if not found then
    raise exception using errcode = '55000',
      message = format('twin %s: spec %s is not its published spec', p_twin_id, p_spec_id);
  end if;
  update public.persona_specs s
  set status = 'published', published_at = now(), archived_at = null
  where s.id = p_to_spec_id and s.twin_id = p_twin_id and s.status = 'archived';
  if not found then
    raise exception using errcode = '55000',
      message = format('twin %s: spec %s is not an archived spec of the twin; it cannot be '
                       'published again', p_twin_id, p_to_spec_id);
  end if;
end;
$$;

comment on function private.roll_back_spec(uuid, uuid, uuid, text) is
  'Rollback helper (complete_learning_run in watch_mode auto, private.rollback_persona_spec). '
  'In: a twin, its published spec, the archived spec to publish again, the reason (text). Out: '
  'nothing; the published spec is archived with rolled_back_at = now() and rollback_reason, the '
  'other published again (published_at = now(), archived_at cleared). Raises 55000 when there is '
  'no spec to go back to, the first is not the twin''s published spec or the second not one of '
  'its archived specs; nothing changes then.';

grant execute on function private.roll_back_spec(uuid, uuid, uuid, text) to service_role;
revoke execute on function private.roll_back_spec(uuid, uuid, uuid, text) from public;

-- The production watch's evidence for a run, aggregated here so that no event row travels to
-- the worker: pass counts of the watched spec since its publish and of the spec it replaced in
-- an equally long window before the switch, per kind (votes, audits), twin-wide and per module.
create function public.claim_production_watch(p_run_id uuid, p_lease_token uuid)
returns jsonb
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_settings public.persona_learning_settings;
  v_watch public.persona_spec_watches;
  v_start timestamptz;
  v_twin jsonb;
  v_modules jsonb;
begin
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  if v_run.learning_time is null then
    raise exception using errcode = '55000',
      message = format('run %s has no batch (claim_learning_run fixes it)', p_run_id);
  end if;
  select * into strict v_settings from public.persona_learning_settings s
  where s.twin_id = v_run.twin_id;
  select * into v_watch from public.persona_spec_watches w
  where w.twin_id = v_run.twin_id and w.state = 'watching';
  if v_watch.id is null or v_settings.watch_mode = 'off' then
    return jsonb_build_object('watch', null);
  end if;
  -- As long before the switch as the new spec has been live since, and not before the replaced
  -- spec itself was published.
  v_start := greatest(
    v_watch.published_at - greatest(v_run.learning_time - v_watch.published_at, interval '0'),
    coalesce(v_watch.previous_published_at, '-infinity'));

  -- Current votes (+1 passes, -1 fails, 0 is no evidence) and the two specs' production audits,
  -- cast up to the run's time within the run's batch, counted per kind and match key
  -- (module_key if given, else intent_label), then matched to the modules as learning matches
  -- them. An audit counts by the origin the audit pipeline recorded (audit_origin): a replay (a
  -- gate's pairing, a hard set) counts on neither side, a production audit on its spec's side
  -- whether or not its trace was audited again under another spec.
  with scanned as (
    -- Each window through the index on (twin_id, created_at), newest first and at most 50,000
    -- of its events (watch_pass_evidence is at most 50,000): the call's cost is bounded however
    -- long the twin's history and its window; a side with more evidence counts its latest.
    -- A vote is placed by when its feedback's first vote was cast (first_vote_at, kept when
    -- that vote is deleted), not when it was last changed: it judges the answer of the spec
    -- live then. A vote cast before the
    -- publish and changed after it stays on the old side (counted at its latest value), and
    -- one whose first vote lies before the old window counts on neither side.
    select * from (
      select coalesce(e.first_vote_at, e.created_at) as placed_at,
             e.source = 'user_feedback' as is_vote,
             e.module_key is not null as by_key, coalesce(e.module_key, e.intent_label) as key,
             coalesce(e.score > 0, e.passed) as passed
      from public.persona_training_events e
      where e.twin_id = v_run.twin_id
        and e.created_at >= v_watch.published_at and e.created_at <= v_run.learning_time
        and e.id <= v_run.batch_last_event_id
        and ((e.source = 'user_feedback' and e.score <> 0 and e.superseded_at is null)
             or (e.source = 'persona_audit' and e.persona_spec_id = v_watch.spec_id
                 and e.audit_origin = 'production'))
      order by e.created_at desc
      limit 50000
    ) n
    union all
    select * from (
      select coalesce(e.first_vote_at, e.created_at), e.source = 'user_feedback',
             e.module_key is not null, coalesce(e.module_key, e.intent_label),
             coalesce(e.score > 0, e.passed)
      from public.persona_training_events e
      where e.twin_id = v_run.twin_id
        and e.created_at >= v_start and e.created_at < v_watch.published_at
        and e.id <= v_run.batch_last_event_id
        and ((e.source = 'user_feedback' and e.score <> 0 and e.superseded_at is null)
             or (e.source = 'persona_audit' and e.persona_spec_id = v_watch.previous_spec_id
                 and e.audit_origin = 'production'))
      order by e.created_at desc
      limit 50000
    ) o
  ),
  evidence as (
    select k.placed_at >= v_watch.published_at as is_new, k.is_vote, k.by_key, k.key, k.passed
    from scanned k
    where k.placed_at >= v_start
  ),
  per_key as (
    select k.is_new, k.is_vote, k.by_key, k.key, count(*) as n,
           count(*) filter (where k.passed) as passed
    from evidence k
    group by k.is_new, k.is_vote, k.by_key, k.key
  ),
  kinds (kind, is_vote) as (values ('audits', false), ('votes', true)),
  targets as (
    select true as by_key, m.module_key as key, m.module_key
    from public.persona_modules m where m.twin_id = v_run.twin_id
    union all
    select false, m.intent_label, m.module_key
    from public.persona_modules m where m.twin_id = v_run.twin_id
  ),
  -- The twin-wide comparison's strata: each event in exactly one, the module it is matched to
  -- (the first by module_key when several share its intent_label), or none (null).
  stratum_sums as (
    select d.kind, s.module_key,
           coalesce(sum(k.n) filter (where k.is_new), 0) as new_n,
           coalesce(sum(k.passed) filter (where k.is_new), 0) as new_passed,
           coalesce(sum(k.n) filter (where not k.is_new), 0) as old_n,
           coalesce(sum(k.passed) filter (where not k.is_new), 0) as old_passed
    from kinds d
    join per_key k on k.is_vote = d.is_vote
    left join lateral (
      select min(t.module_key) as module_key from targets t
      where t.by_key = k.by_key and t.key = k.key
    ) s on true
    group by d.kind, s.module_key
  ),
  sums as (
    -- Twin-wide: every event once, matched to a module or not; both kinds, even without any.
    select d.kind, null::text as module_key,
           coalesce(sum(k.new_n), 0) as new_n, coalesce(sum(k.new_passed), 0) as new_passed,
           coalesce(sum(k.old_n), 0) as old_n, coalesce(sum(k.old_passed), 0) as old_passed,
           coalesce(jsonb_agg(jsonb_build_object(
             'module_key', k.module_key, 'new_n', k.new_n, 'new_passed', k.new_passed,
             'old_n', k.old_n, 'old_passed', k.old_passed)
             order by k.module_key nulls last) filter (where k.kind is not null), '[]')
             as strata
    from kinds d
    left join stratum_sums k on k.kind = d.kind
    group by d.kind
    union all
    -- Per module with evidence (an event whose intent_label several modules share counts for
    -- each, as learning counts it).
    select d.kind, t.module_key,
           coalesce(sum(k.n) filter (where k.is_new), 0),
           coalesce(sum(k.passed) filter (where k.is_new), 0),
           coalesce(sum(k.n) filter (where not k.is_new), 0),
           coalesce(sum(k.passed) filter (where not k.is_new), 0),
           null
    from kinds d
    join per_key k on k.is_vote = d.is_vote
    join targets t on t.by_key = k.by_key and t.key = k.key
    group by d.kind, t.module_key
  )
  select
    (select jsonb_agg(jsonb_build_object(
       'scope', 'twin', 'kind', c.kind, 'module_key', null, 'new_n', c.new_n,
       'new_passed', c.new_passed, 'old_n', c.old_n, 'old_passed', c.old_passed,
       'strata', c.strata)
       order by c.kind)
     from sums c where c.module_key is null),
    (select coalesce(jsonb_agg(jsonb_build_object(
       'scope', 'module', 'kind', c.kind, 'module_key', c.module_key, 'new_n', c.new_n,
       'new_passed', c.new_passed, 'old_n', c.old_n, 'old_passed', c.old_passed)
       order by c.module_key, c.kind), '[]')
     from sums c where c.module_key is not null)
  into v_twin, v_modules;

  return jsonb_build_object('watch', jsonb_build_object(
    'watch_id', v_watch.id,
    'spec_id', v_watch.spec_id,
    'previous_spec_id', v_watch.previous_spec_id,
    'published_at', v_watch.published_at,
    'window_start', v_start,
    'learning_time', v_run.learning_time,
    'alpha_spent', v_watch.alpha_spent,
    'looks_done', v_watch.looks_done,
    -- Each kind's own plan of looks, as the watch's last run left it (its report's clocks);
    -- empty before any run wrote them (the worker then starts both from looks_done and
    -- alpha_spent).
    'clocks', case when jsonb_typeof(v_watch.last_report -> 'clocks') = 'array'
                   then v_watch.last_report -> 'clocks' else '[]'::jsonb end,
    'modules_total', (select count(*) from public.persona_modules m
                      where m.twin_id = v_run.twin_id),
    'settings', jsonb_build_object(
      'mode', v_settings.watch_mode, 'margin', v_settings.watch_margin,
      'alpha', v_settings.watch_alpha, 'min_evidence', v_settings.watch_min_evidence,
      'pass_evidence', v_settings.watch_pass_evidence, 'looks', v_settings.watch_looks,
      'expire_days', v_settings.watch_expire_days),
    'twin', v_twin,
    'modules', v_modules
  ));
end;
$$;

comment on function public.claim_production_watch(uuid, uuid) is
  'Worker. In: a run id and its lease token (the run''s batch fixed by claim_learning_run). Out: '
  'jsonb {watch: null} when the twin has no watch in state watching or its watch_mode is off; '
  'else {watch: {watch_id, spec_id, previous_spec_id, published_at, window_start, learning_time '
  'T, alpha_spent, looks_done, clocks [each kind''s plan as the last run''s report left it: '
  '{kind, look, alpha_spent, passed, ...}; [] before any], modules_total, settings {mode, '
  'margin, alpha, min_evidence, '
  'pass_evidence, looks, expire_days}, twin [{scope twin, kind, module_key null, new_n, '
  'new_passed, old_n, old_passed, strata [{module_key (null: matched to no module), new_n, '
  'new_passed, old_n, old_passed}: a partition of the twin-wide counts, each event under the '
  'module it is matched to (the first by module_key when several match), by module_key, nulls '
  'last]}: one per kind, audits then votes], modules [{scope module, kind, module_key, new_n, '
  'new_passed, old_n, old_passed} per module and kind with evidence, by module_key then kind]}}. '
  'Kinds are never pooled. votes: current votes with score +1 (passed) or -1 placed from '
  'published_at to T (new) against those placed from window_start = max(published_at - (T - '
  'published_at), previous_published_at) to published_at (old), a vote placed by when its '
  'feedback''s first vote was cast (first_vote_at), at its latest value; audits: audits of spec_id from '
  'published_at to T (new) against audits of previous_spec_id from window_start to published_at '
  '(old), production audits only (audit_origin production; a replay counts on neither side). '
  'Only events of the batch or before it; matched '
  'to modules by module_key, else intent_label. Counts, not weights; each side at most its '
  'latest 50,000 events (through the index on (twin_id, created_at)). Raises P0002 and PT409 '
  '(HTTP 409, stale lease) as private.lock_leased_run; 55000 when the run has no batch.';

-- Completes a run in one transaction: marks exactly the batch processed (the twin's cursor moves
-- over it), applies the module updates (recording each change), publishes the latest draft when
-- allowed, and writes the run's figures. Nothing happens when the lease is stale.
--
-- p_result: {"module_updates": [{"module_id", "success", "failure", "confidence", "status"}],
--            "gate_passed": bool, "gate_report": {...}, "publish_spec_id": uuid|null,
--            "hold_reason": "no_draft"|"safe_mode"|"gate_failed"|null}
create function public.complete_learning_run(
  p_run_id uuid, p_lease_token uuid, p_result jsonb
)
returns public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_publish_spec_id uuid;
  v_gate_passed boolean;
  v_given integer;
  v_applied integer;
  v_changed integer;
  v_twin public.twins;
  v_mode public.watch_mode;
  v_watch_doc jsonb;
  v_watch public.persona_spec_watches;
  v_watch_state public.spec_watch_state;
  v_previous public.persona_specs;
begin
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  if v_run.events_scanned is null then
    raise exception using errcode = '55000',
      message = format('run %s has not read its batch (claim_learning_run_events)', p_run_id);
  end if;
  if p_result is null or jsonb_typeof(p_result -> 'module_updates') is distinct from 'array'
     or jsonb_typeof(p_result -> 'gate_passed') is distinct from 'boolean'
     or jsonb_typeof(p_result -> 'gate_report') is distinct from 'object' then
    raise exception using errcode = '22023',
      message = 'p_result needs module_updates (array), gate_passed (boolean), gate_report (object)';
  end if;
  v_gate_passed := (p_result ->> 'gate_passed')::boolean;
  v_publish_spec_id := (p_result ->> 'publish_spec_id')::uuid;

  -- Processing the batch is moving the twin's cursor over it, at the evidence generation the
  -- claim read: a deletion or a module edit committed since (it waits for this row lock, or
  -- this update re-reads the row it committed) makes the run read its batch again (PT412).
  update public.twins t
  set learned_through_event_id = v_run.batch_last_event_id,
      learned_generation = v_run.evidence_generation
  where t.id = v_run.twin_id and t.learned_through_event_id = v_run.batch_after_event_id
    and t.evidence_generation = v_run.evidence_generation
  returning * into v_twin;
  if v_twin.id is null then
    select * into v_twin from public.twins t where t.id = v_run.twin_id;
    -- Not 40001: PostgREST retries a serialization failure itself until the client gives up.
    -- The batch can never complete (its start is not the cursor): the run fails, and the next
    -- run reads from where the cursor is.
    if v_twin.learned_through_event_id is distinct from v_run.batch_after_event_id then
      raise exception using errcode = 'PT422',
        message = format('run %s: the twin''s cursor moved since the batch was claimed', p_run_id);
    end if;
    -- PT412 (HTTP 412): the worker reads the batch again at once.
    raise exception using errcode = 'PT412',
      message = format('run %s: the twin''s evidence or modules changed since the batch was read '
                       '(generation %s, now %s); read the batch again', p_run_id,
                       v_run.evidence_generation, v_twin.evidence_generation);
  end if;

  with updates as (
    select u.*
    from jsonb_to_recordset(p_result -> 'module_updates')
      as u(module_id uuid, success float8, failure float8, confidence float8,
            status public.persona_module_status)
  ),
  history as (
    insert into public.persona_module_changes (
      module_id, twin_id, run_id, confidence_before, confidence_after, status_before, status_after,
      success_weight, failure_weight
    )
    select m.id, m.twin_id, v_run.id, m.confidence, u.confidence, m.status, u.status,
           u.success, u.failure
    from updates u
    join public.persona_modules m on m.id = u.module_id and m.twin_id = v_run.twin_id
    where abs(m.confidence - u.confidence) > 1e-12 or m.status <> u.status
    returning 1
  ),
  applied as (
    update public.persona_modules m
    set success_weight = u.success, failure_weight = u.failure, confidence = u.confidence,
        status = u.status, evidence_at = v_run.learning_time
    from updates u
    where m.id = u.module_id and m.twin_id = v_run.twin_id
    returning 1
  )
  select (select count(*) from updates), (select count(*) from applied), (select count(*) from history)
  into v_given, v_applied, v_changed;
  if v_given <> v_applied then
    raise exception using errcode = '22023',
      message = format('run %s: %s of %s module updates name no module of twin %s',
                       p_run_id, v_given - v_applied, v_given, v_run.twin_id);
  end if;
  select s.watch_mode into strict v_mode from public.persona_learning_settings s
  where s.twin_id = v_run.twin_id;

  -- The production watch's decision (worker/watch.py), applied in this transaction: the watch's
  -- state, and with watch_mode auto a regression rolls the published spec back.
  v_watch_doc := p_result -> 'watch';
  if v_watch_doc is not null and jsonb_typeof(v_watch_doc) <> 'null' then
    if jsonb_typeof(v_watch_doc) <> 'object'
       or coalesce(v_watch_doc ->> 'action', '') not in ('none', 'alert', 'roll_back')
       or coalesce(v_watch_doc ->> 'state', '') not in ('watching', 'passed', 'regressed', 'expired',
                                                         'superseded')
       or jsonb_typeof(v_watch_doc -> 'look') is distinct from 'number'
       or jsonb_typeof(v_watch_doc -> 'alpha_spent') is distinct from 'number' then
      raise exception using errcode = '22023',
        message = 'p_result.watch needs watch_id, mode, state (watching, passed, regressed, '
                  'expired or superseded), action (none, alert or roll_back), look and '
                  'alpha_spent';
    end if;
    -- superseded: the final test of a run that publishes the next spec found no regression.
    if v_watch_doc ->> 'state' = 'superseded' and v_publish_spec_id is null then
      raise exception using errcode = '55000',
        message = format('run %s: a watch ends superseded only in a run that publishes a spec',
                         p_run_id);
    end if;
    select * into v_watch from public.persona_spec_watches w
    where w.id = (v_watch_doc ->> 'watch_id')::uuid and w.twin_id = v_run.twin_id
    for update;
    if v_watch.id is null then
      raise exception using errcode = '22023',
        message = format('run %s: watch %s is not a watch of twin %s', p_run_id,
                         v_watch_doc ->> 'watch_id', v_run.twin_id);
    end if;
    -- Concluded since it was read (an owner's rollback, a publish) or the mode changed: PT412
    -- makes the worker read its batch and the watch again.
    if v_watch.state <> 'watching' or v_mode::text is distinct from v_watch_doc ->> 'mode' then
      raise exception using errcode = 'PT412',
        message = format('run %s: watch %s (now %s, mode %s) changed since it was read; read '
                         'the batch again', p_run_id, v_watch.id, v_watch.state, v_mode);
    end if;
    v_watch_state := (v_watch_doc ->> 'state')::public.spec_watch_state;
    if v_watch_doc ->> 'action' = 'roll_back' then
      if v_watch_state <> 'regressed' or v_mode <> 'auto' then
        raise exception using errcode = '55000',
          message = format('run %s: only a regression with watch_mode auto rolls back', p_run_id);
      end if;
      if v_publish_spec_id is not null then
        raise exception using errcode = '55000',
          message = format('run %s may not publish spec %s and roll back in one run', p_run_id,
                           v_publish_spec_id);
      end if;
      perform private.roll_back_spec(
        v_run.twin_id, v_watch.spec_id, v_watch.previous_spec_id,
        format('production watch: regression found by run %s', v_run.id));
      v_watch_state := 'rolled_back';
    end if;
    update public.persona_spec_watches w
    set state = v_watch_state, looks_done = (v_watch_doc ->> 'look')::integer,
        alpha_spent = (v_watch_doc ->> 'alpha_spent')::float8, last_run_id = v_run.id,
        last_report = v_watch_doc,
        concluded_at = case when v_watch_state <> 'watching' then now() end
    where w.id = v_watch.id;
  end if;

  if v_publish_spec_id is not null then
    if v_run.safe_mode then
      raise exception using errcode = '55000',
        message = format('run %s is in safe mode and may not publish', p_run_id);
    end if;
    if not v_gate_passed then
      raise exception using errcode = '55000',
        message = format('run %s: the gate did not pass; spec %s may not be published',
                         p_run_id, v_publish_spec_id);
    end if;
    if v_publish_spec_id is distinct from (
      select s.id from public.persona_specs s
      where s.twin_id = v_run.twin_id and s.status = 'draft'
      order by s.version desc limit 1
    ) then
      raise exception using errcode = '55000',
        message = format('run %s: spec %s is not the latest draft of twin %s',
                         p_run_id, v_publish_spec_id, v_run.twin_id);
    end if;
    select * into v_previous from public.persona_specs s
    where s.twin_id = v_run.twin_id and s.status = 'published';
    -- The gate compared the draft with the spec published when the batch was read; a rollback
    -- committed since makes that comparison stale: read the batch again (PT412).
    if p_result -> 'gate_report' ? 'baseline_spec_id'
       and (p_result -> 'gate_report' ->> 'baseline_spec_id')::uuid is distinct from v_previous.id
    then
      raise exception using errcode = 'PT412',
        message = format('run %s: the published spec of twin %s changed since the batch was '
                         'read (now %s); read the batch again', p_run_id, v_run.twin_id,
                         coalesce(v_previous.id::text, 'none'));
    end if;
    -- A publish ends the running watch: the run must have made its final test (its report
    -- concludes the watch). A report without the watch read it with watch_mode off, and the mode
    -- has changed since: read again (PT412); one that leaves it watching skipped the test.
    if v_mode <> 'off' and exists (
      select 1 from public.persona_spec_watches w
      where w.twin_id = v_run.twin_id and w.state = 'watching'
    ) then
      if v_watch_doc is null or jsonb_typeof(v_watch_doc) = 'null' then
        raise exception using errcode = 'PT412',
          message = format('run %s: twin %s has a running watch (watch_mode %s) that the run '
                           'did not read; read the batch again', p_run_id, v_run.twin_id, v_mode);
      end if;
      raise exception using errcode = '55000',
        message = format('run %s publishes spec %s but leaves watch %s watching: a publish '
                         'makes the running watch''s final test first', p_run_id,
                         v_publish_spec_id, v_watch_doc ->> 'watch_id');
    end if;
    update public.persona_specs s set status = 'archived'
    where s.twin_id = v_run.twin_id and s.status = 'published';
    update public.persona_specs s set status = 'published'
    where s.id = v_publish_spec_id;
    -- The spec it replaces is no longer watched; the new one is, against it.
    update public.persona_spec_watches w
    set state = 'superseded', concluded_at = now(), last_run_id = v_run.id
    where w.twin_id = v_run.twin_id and w.state = 'watching';
    if v_previous.id is not null and v_mode <> 'off' then
      insert into public.persona_spec_watches
        (twin_id, spec_id, previous_spec_id, published_at, previous_published_at,
         published_by_run_id)
      select v_run.twin_id, s.id, v_previous.id, s.published_at, v_previous.published_at, v_run.id
      from public.persona_specs s where s.id = v_publish_spec_id;
    end if;
  end if;

  update public.persona_feedback_learning_runs r
  set status = 'completed', finished_at = now(), lease_token = null, lease_expires_at = null,
      events_processed = v_run.events_scanned, modules_updated = v_changed,
      gate_passed = v_gate_passed, gate_report = p_result -> 'gate_report',
      publish_decision = case when v_publish_spec_id is null then 'held'
                              else 'published' end::public.learning_run_publish_decision,
      hold_reason = case when v_publish_spec_id is null
                         then coalesce(p_result ->> 'hold_reason', 'gate_failed')
                         end::public.learning_run_hold_reason,
      published_spec_id = v_publish_spec_id, error = null
  where r.id = v_run.id
  returning * into v_run;
  return v_run;
end;
$$;

comment on function public.complete_learning_run(uuid, uuid, jsonb) is
  'Worker. In: a run id, its lease token and p_result {module_updates [{module_id, success, '
  'failure, confidence, status}], gate_passed, gate_report, '
  'publish_spec_id (uuid or null), hold_reason, watch (null, or the production watch''s '
  'decision {watch_id, mode, state, action, look, alpha_spent, ...})}. In one transaction: '
  'moves the twin''s cursor '
  'over the batch and sets its learned_generation to the run''s evidence_generation, applies the '
  'module updates (recording each change of confidence or status in persona_module_changes), '
  'records the watch''s look (state, looks_done, alpha_spent, last_report; superseded, the '
  'final test of a run that publishes, only with publish_spec_id; a run that publishes while '
  'a watch is running, watch_mode not off, must conclude it: 55000 when its report leaves it '
  'watching, PT412 when it read no watch) and, for action '
  'roll_back (watch_mode auto, state regressed), archives the watched spec with its rollback '
  'reason and time and publishes the spec it replaced again, '
  'publishes the draft (the published spec archived, its watch superseded, a watch of the new '
  'spec started unless watch_mode is off) when publish_spec_id is set, and completes '
  'the run with its figures (events_processed = the batch''s events, all still there). Out: the '
  'completed run. Raises P0002 and PT409 (HTTP 409, stale lease) as private.lock_leased_run; '
  '55000 when the batch was not read yet, or publishing in safe mode, after a failed gate, or a '
  'spec that is not the latest draft, or publishing and rolling back at once, or a roll_back '
  'without a regression in auto mode or without a spec to go back to; 22023 when p_result lacks '
  'module_updates (array), '
  'gate_passed (boolean) or gate_report (object), or an update names no module of the twin, or '
  'the watch is malformed or not the twin''s; '
  '22P02 for a status or hold_reason outside its enum; PT422 (HTTP 422) "run <id>: the '
  'twin''s cursor moved since the batch was claimed" when the cursor moved since the claim; PT412 (HTTP 412) "run <id>: the twin''s evidence or modules changed '
  'since the batch was read ..." when its evidence_generation changed (events deleted or '
  'edited, modules added, edited or deleted) since the claim read the batch, and "... read the '
  'batch again" when the watch concluded or its mode changed, or the published spec is not the '
  'gate report''s baseline_spec_id any more (a rollback committed since). Nothing changes '
  'when it raises.';

-- Records a failed attempt. A retryable error releases the run for another attempt with the same
-- batch while attempts remain; otherwise the run fails and its events stay unprocessed.
create function public.fail_learning_run(
  p_run_id uuid, p_lease_token uuid, p_error text, p_retryable boolean default true
)
returns public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
begin
  if p_error is null or char_length(p_error) = 0 then
    raise exception using errcode = '22023', message = 'p_error must say what went wrong';
  end if;
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  if coalesce(p_retryable, true) and v_run.attempts < v_run.max_attempts then
    update public.persona_feedback_learning_runs r
    set error = left(p_error, 4000), lease_expires_at = now()
    where r.id = v_run.id
    returning * into v_run;
  else
    update public.persona_feedback_learning_runs r
    set status = 'failed', error = left(p_error, 4000), finished_at = now(),
        lease_token = null, lease_expires_at = null
    where r.id = v_run.id
    returning * into v_run;
  end if;
  return v_run;
end;
$$;

comment on function public.fail_learning_run(uuid, uuid, text, boolean) is
  'Worker. In: a run id, its lease token, what went wrong (kept up to 4000 chars), whether '
  'another attempt may help (default true). Out: the run: released for another attempt with the '
  'same batch (lease expired now) while attempts remain and the error is retryable, otherwise '
  'failed (its events wait for the next run). Raises 22023 for an empty p_error; P0002 and PT409 '
  '(HTTP 409, stale lease) as private.lock_leased_run.';

-- Gives a run back without counting the attempt (a worker stopping gracefully).
create function public.release_learning_run(p_run_id uuid, p_lease_token uuid)
returns public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
begin
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  update public.persona_feedback_learning_runs r
  set attempts = greatest(r.attempts - 1, 0), lease_expires_at = now()
  where r.id = v_run.id
  returning * into v_run;
  return v_run;
end;
$$;

comment on function public.release_learning_run(uuid, uuid) is
  'Worker (graceful stop). In: a run id and its lease token. Out: the run, its lease expired now '
  'and the attempt not counted, for another worker to take over with the same batch. Raises '
  'P0002 and PT409 (HTTP 409, stale lease) as private.lock_leased_run.';

-- Section: several runs per round trip (issue 15). A busy worker claims up to p_max_runs runs
-- in one call (claim_learning_runs), reads their batches and watches in a second
-- (read_learning_runs) and completes them in a third (complete_learning_runs). Each reuses the
-- one-run function (claim_learning_run, claim_learning_run_events, claim_production_watch,
-- complete_learning_run) per run, so every rule of those holds for each run. The claim is a
-- call of its own because its first claim takes the share lock on the events that holds
-- inserts up until the transaction ends: reading batches in that transaction would hold ingest
-- up for the whole read.

-- Whether a claimed run is small enough to be read with others: its twin needs no rebuild and
-- its batch holds at most 10,000 events (counted with a limit: the count costs at most that).
create function private.learning_run_batchable(p_run public.persona_feedback_learning_runs)
returns boolean
-- plpgsql, not sql: its statements' plans are kept per connection (a sql function called from
-- plpgsql is planned at every call).
language plpgsql
stable
set search_path = ''
as $$
begin
  return not exists (
           select 1 from public.twins t
           where t.id = p_run.twin_id and t.evidence_generation <> t.learned_generation)
     and (select count(*) from (
            select 1 from public.persona_training_events e
            where e.twin_id = p_run.twin_id and e.id > p_run.batch_after_event_id
              and e.id <= p_run.batch_last_event_id
            limit 10001) b) <= 10000;
end;
$$;

comment on function private.learning_run_batchable(public.persona_feedback_learning_runs) is
  'Batched runs'' helper. In: a claimed run (its batch fixed). Out: true when its twin needs no '
  'rebuild (evidence_generation = learned_generation) and its batch holds at most 10,000 events '
  '(counted with a limit, so the answer costs at most that many index entries); such a run is '
  'read by read_learning_runs, any other through the one-run path (claim_learning_run_events). '
  'Raises nothing.';

grant execute on function private.learning_run_batchable(public.persona_feedback_learning_runs)
  to service_role;
revoke execute on function private.learning_run_batchable(public.persona_feedback_learning_runs)
  from public;

-- Claims up to p_max_runs runs in one transaction, each as claim_learning_run claims one (same
-- order, same leases, the same batch fixed), the candidates read in one ordered statement. It stops early when nothing more is due, after a
-- run that is not batchable (a rebuild, a large batch: the worker takes it through the one-run
-- path, last), and once the batches claimed hold 50,000 events.
create function public.claim_learning_runs(
  p_worker_id text,
  p_lease_seconds integer default 60,
  p_max_runs integer default 16
)
returns setof public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_candidate public.persona_feedback_learning_runs;
  v_run public.persona_feedback_learning_runs;
  v_events bigint := 0;
begin
  if p_max_runs is null or p_max_runs not between 1 and 100 then
    raise exception using errcode = '22023', message = 'p_max_runs must be 1 to 100';
  end if;
  if p_worker_id is null or char_length(p_worker_id) not between 1 and 200 then
    raise exception using errcode = '22023', message = 'p_worker_id must be 1 to 200 characters';
  end if;
  if p_lease_seconds is null or p_lease_seconds not between 1 and 3600 then
    raise exception using errcode = '22023', message = 'p_lease_seconds must be 1 to 3600';
  end if;
  -- The candidates in one ordered read (claim_learning_run's order), each started as
  -- claim_learning_run starts one.
  for v_candidate in select * from private.claimable_learning_runs(null, p_max_runs) loop
    v_run := private.start_learning_run(v_candidate, p_worker_id, p_lease_seconds);
    continue when v_run.id is null;
    return next v_run;
    exit when not private.learning_run_batchable(v_run);
    -- At most 10,000 index entries: the run is batchable.
    v_events := v_events + (
      select count(*) from public.persona_training_events e
      where e.twin_id = v_run.twin_id and e.id > v_run.batch_after_event_id
        and e.id <= v_run.batch_last_event_id);
    exit when v_events >= 50000;
  end loop;
end;
$$;

comment on function public.claim_learning_runs(text, integer, integer) is
  'Worker (batched). In: the worker''s id (1-200 chars), a lease in seconds (1-3600), the most '
  'runs to claim (1-100, default 16). Out: 0 to p_max_runs runs, each claimed exactly as '
  'public.claim_learning_run claims one (the same order: expired leases first, then owners'' '
  'requests, then the oldest; a new lease_token each, until now() + p_lease_seconds; the first '
  'claim fixes the batch and learning_time under the share lock on the events), in claim order. '
  'Stops early when nothing more is due, right after a run that is not batchable '
  '(private.learning_run_batchable: its twin needs a rebuild or its batch holds more than '
  '10,000 events; the caller takes it through the one-run path), and once the claimed batches '
  'hold 50,000 events in all, so that read_learning_runs stays far inside the API''s statement '
  'timeout. One transaction: all the runs or none. Raises 22023 for a bad p_max_runs, '
  'p_worker_id or p_lease_seconds (nothing claimed); 55P03 when the lock on the events is not '
  'granted within 5 s.';

-- Reads the batches and production watches of several claimed runs in one call: per run
-- exactly what claim_learning_run_events and claim_production_watch answer, each run in a
-- subtransaction of its own, so one run's refusal (a stale lease) leaves the others read.
create function public.read_learning_runs(p_runs jsonb)
returns jsonb
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_item jsonb;
  v_ids uuid[] := '{}'::uuid[];
  v_tokens uuid[] := '{}'::uuid[];
  v_id uuid;
  v_token uuid;
  v_run public.persona_feedback_learning_runs;
  v_batch jsonb;
  v_watch jsonb;
  v_out jsonb := '[]'::jsonb;
  v_events bigint := 0;
  v_state text;
  v_message text;
begin
  if jsonb_typeof(p_runs) is distinct from 'array'
     or jsonb_array_length(p_runs) not between 1 and 100 then
    raise exception using errcode = '22023',
      message = 'p_runs must be a JSON array of 1 to 100 {run_id, lease_token}';
  end if;
  for v_item in select * from jsonb_array_elements(p_runs) loop
    begin
      v_id := (v_item ->> 'run_id')::uuid;
      v_token := (v_item ->> 'lease_token')::uuid;
    exception when invalid_text_representation then
      v_id := null;
    end;
    if jsonb_typeof(v_item) is distinct from 'object' or v_id is null or v_token is null then
      raise exception using errcode = '22023',
        message = format('p_runs[%s] needs run_id and lease_token (uuids)', cardinality(v_ids));
    end if;
    v_ids := v_ids || v_id;
    v_tokens := v_tokens || v_token;
  end loop;

  for i in 1 .. cardinality(v_ids) loop
    begin
      v_run := private.lock_leased_run(v_ids[i], v_tokens[i]);
      -- Not read here (batch null): a run that is not batchable, and every run after the
      -- batches read reach 50,000 events or the call 2 s; the worker reads those one by one.
      if v_events >= 50000 or clock_timestamp() - statement_timestamp() > interval '2 seconds'
         or not private.learning_run_batchable(v_run) then
        v_out := v_out || jsonb_build_array(jsonb_build_object(
          'run_id', v_ids[i], 'batch', null, 'watch', null));
        continue;
      end if;
      v_batch := public.claim_learning_run_events(v_ids[i], v_tokens[i]);
      v_watch := null;
      if not coalesce((v_batch ->> 'rebuild_pending')::boolean, false) then
        v_watch := public.claim_production_watch(v_ids[i], v_tokens[i]);
        v_events := v_events + coalesce((v_batch ->> 'events_scanned')::bigint, 0)
          + coalesce((select sum((t ->> 'new_n')::bigint + (t ->> 'old_n')::bigint)
                      from jsonb_array_elements(
                        case jsonb_typeof(v_watch -> 'watch' -> 'twin')
                          when 'array' then v_watch -> 'watch' -> 'twin' else '[]' end) t), 0);
      end if;
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_ids[i], 'batch', v_batch, 'watch', v_watch));
    exception when others then
      get stacked diagnostics v_state = returned_sqlstate, v_message = message_text;
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_ids[i], 'error', jsonb_build_object('code', v_state, 'message', v_message)));
    end;
  end loop;
  return v_out;
end;
$$;

comment on function public.read_learning_runs(jsonb) is
  'Worker (batched). In: p_runs, a JSON array of 1 to 100 {run_id, lease_token} (uuids) of '
  'runs the caller holds. Out: a JSON array, one element per run in the same order: {run_id, '
  'batch, watch} where batch is exactly claim_learning_run_events'' answer and watch exactly '
  'claim_production_watch''s ({watch: null} when nothing is watched; null when the batch is '
  'rebuild_pending); {run_id, batch: null, watch: null} for a run not read here (its twin '
  'needs a rebuild or its batch holds more than 10,000 events, or the runs read before it '
  'reached 50,000 events, batches and watch evidence counted, or 2 s): the caller reads it '
  'through the one-run path; or {run_id, error: {code, message}} when that run''s read raised '
  '(e.g. PT409, stale lease; P0002): each run is read in a subtransaction of its own, so a '
  'refusal leaves the other runs read. Raises 22023 (nothing read) when p_runs is not such an '
  'array.';

-- Completes several runs in one call, each exactly as complete_learning_run completes one, in
-- a subtransaction of its own: one run's refusal (PT412, a stale lease, a bad payload) undoes
-- that run only.
create function public.complete_learning_runs(p_completions jsonb)
returns jsonb
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_item jsonb;
  v_id uuid;
  v_token uuid;
  v_run public.persona_feedback_learning_runs;
  v_out jsonb := '[]'::jsonb;
  v_state text;
  v_message text;
  v_index integer := 0;
begin
  if jsonb_typeof(p_completions) is distinct from 'array'
     or jsonb_array_length(p_completions) not between 1 and 100 then
    raise exception using errcode = '22023',
      message = 'p_completions must be a JSON array of 1 to 100 {run_id, lease_token, result}';
  end if;
  for v_item in select * from jsonb_array_elements(p_completions) loop
    begin
      v_id := (v_item ->> 'run_id')::uuid;
      v_token := (v_item ->> 'lease_token')::uuid;
    exception when invalid_text_representation then
      v_id := null;
    end;
    if jsonb_typeof(v_item) is distinct from 'object' or v_id is null or v_token is null
       or jsonb_typeof(v_item -> 'result') is distinct from 'object' then
      raise exception using errcode = '22023',
        message = format('p_completions[%s] needs run_id and lease_token (uuids) and result '
                         '(an object)', v_index);
    end if;
    v_index := v_index + 1;
  end loop;

  for v_item in select * from jsonb_array_elements(p_completions) loop
    v_id := (v_item ->> 'run_id')::uuid;
    begin
      v_run := public.complete_learning_run(
        v_id, (v_item ->> 'lease_token')::uuid, v_item -> 'result');
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_id, 'run', to_jsonb(v_run) - 'lease_token'));
    exception when others then
      get stacked diagnostics v_state = returned_sqlstate, v_message = message_text;
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_id, 'error', jsonb_build_object('code', v_state, 'message', v_message)));
    end;
  end loop;
  return v_out;
end;
$$;

comment on function public.complete_learning_runs(jsonb) is
  'Worker (batched). In: p_completions, a JSON array of 1 to 100 {run_id, lease_token, result} '
  '(uuids; result: complete_learning_run''s p_result). Each run is completed exactly as '
  'public.complete_learning_run completes it, in a subtransaction of its own, in the order '
  'given. Out: a JSON array, one element per run in that order: {run_id, run} (the completed '
  'run''s row, without lease_token) or {run_id, error: {code, message}} with the SQLSTATE and '
  'message complete_learning_run raised for that run (PT409 stale lease, PT412 the evidence '
  'changed, PT422 the cursor moved, 22023 or 55000 a refused payload...), which leaves that run '
  'as it was and the other runs completed. Raises 22023 (nothing completed) when p_completions '
  'is not such an array.';

-- The version of the database the worker needs: it asks at start and refuses to run against an
-- older one.
create function public.worker_schema_version()
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

comment on function public.worker_schema_version() is
  'Worker (start-up check). In: nothing. Out: the version (a migration timestamp, text) of the '
  'newest migration that changed what the worker calls; the worker refuses to start when it is '
  'older than the one it was built for. Executable by service_role only, so an anon key is '
  'refused here too (42501). Raises nothing.';

grant execute on function
  public.worker_schema_version(),
  public.enqueue_due_learning_runs(uuid),
  public.enqueue_learning_run(uuid, boolean),
  public.claim_learning_run(text, integer, uuid),
  public.extend_learning_run_lease(uuid, uuid, integer),
  public.claim_learning_run_events(uuid, uuid),
  public.complete_learning_run(uuid, uuid, jsonb),
  public.fail_learning_run(uuid, uuid, text, boolean),
  public.release_learning_run(uuid, uuid),
  public.claim_learning_runs(text, integer, integer),
  public.read_learning_runs(jsonb),
  public.complete_learning_runs(jsonb)
to service_role;

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  public.worker_schema_version(),
  public.enqueue_due_learning_runs(uuid),
  public.enqueue_learning_run(uuid, boolean),
  public.claim_learning_run(text, integer, uuid),
  private.lock_leased_run(uuid, uuid),
  public.extend_learning_run_lease(uuid, uuid, integer),
  public.claim_learning_run_events(uuid, uuid),
  public.complete_learning_run(uuid, uuid, jsonb),
  public.fail_learning_run(uuid, uuid, text, boolean),
  public.release_learning_run(uuid, uuid),
  public.claim_learning_runs(text, integer, integer),
  public.read_learning_runs(jsonb),
  public.complete_learning_runs(jsonb)
from public;

grant execute on function public.claim_production_watch(uuid, uuid) to service_role;
revoke execute on function public.claim_production_watch(uuid, uuid) from public;

-- Section: the optional schedule of learning runs on pg_cron (hosted Supabase ships pg_cron;
-- the project owner enables it). The database then queues due runs on its own clock; a worker
-- (`pfl serve`, or `pfl run-once` from any scheduler) still executes them. The project creates no
-- extension: without pg_cron these functions exist and say so when called.

-- Schedules (or reschedules) the queueing of due runs: one pg_cron job of the caller's, named
-- pfl_enqueue_due_learning_runs. pg_cron is reached through dynamic SQL that names its schema
-- through a variable: the function is created, and checked by plpgsql_check (supabase db lint),
-- on databases without the schema cron, where a statement naming it outright fails the check.
create function public.schedule_learning_runs(p_schedule text default '* * * * *')
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_cron constant text := 'cron';
  v_job_id bigint;
begin
  if not exists (select from pg_catalog.pg_extension x where x.extname = 'pg_cron') then
    raise exception using
      errcode = '55000',
      message = 'pg_cron is not enabled in this database',
      hint = 'enable it (dashboard: Integrations, Cron; or create extension pg_cron with schema '
             'pg_catalog), then call public.schedule_learning_runs again';
  end if;
  if p_schedule is null or btrim(p_schedule) = '' then
    raise exception using
      errcode = '22023',
      message = 'p_schedule: a pg_cron schedule is required, e.g. ''* * * * *'' (every minute) '
                'or ''30 seconds'' (pg_cron 1.5 and later)';
  end if;
  execute format('select %I.schedule($1, $2, $3)', v_cron)
    into v_job_id
    using 'pfl_enqueue_due_learning_runs', p_schedule,
          'select id from public.enqueue_due_learning_runs()';
  return v_job_id;
end;
$$;

comment on function public.schedule_learning_runs(text) is
  'Project owner (SQL, as postgres; no API role may execute it). In: p_schedule, a pg_cron '
  'schedule (default ''* * * * *'': every minute; ''N seconds'' with pg_cron 1.5 and later). '
  'Out: the id (bigint) of the caller''s pg_cron job pfl_enqueue_due_learning_runs, created or '
  'given the new schedule, whose command is select id from public.enqueue_due_learning_runs() '
  '(queues a run for every twin with unprocessed evidence and none queued or running; the job '
  'history, cron.job_run_details, reports SELECT n for n runs queued). Runs it queues wait for a '
  'worker (pfl serve or pfl run-once). Raises 55000 "pg_cron is not enabled in this database" '
  'without the extension, 22023 for a null or blank schedule, and pg_cron''s own error (22023 '
  '"invalid schedule: ...") for one it cannot read.';

-- Removes the schedule; true if the caller had one.
create function public.unschedule_learning_runs()
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  v_cron constant text := 'cron';
  v_scheduled boolean;
begin
  if not exists (select from pg_catalog.pg_extension x where x.extname = 'pg_cron') then
    raise exception using
      errcode = '55000',
      message = 'pg_cron is not enabled in this database',
      hint = 'without pg_cron no schedule of learning runs exists: nothing to remove; runs are '
             'queued by pfl serve or pfl run-once';
  end if;
  execute format('select exists (select from %I.job j where j.jobname = $1 '
                 'and j.username = current_user)', v_cron)
    into v_scheduled
    using 'pfl_enqueue_due_learning_runs';
  if v_scheduled then
    execute format('select %I.unschedule($1)', v_cron) using 'pfl_enqueue_due_learning_runs';
  end if;
  return v_scheduled;
end;
$$;

comment on function public.unschedule_learning_runs() is
  'Project owner (SQL, as postgres; no API role may execute it). In: nothing. Out: true when it '
  'removed the caller''s pg_cron job pfl_enqueue_due_learning_runs, false when there was none. '
  'Raises 55000 "pg_cron is not enabled in this database" without the extension (its hint: no '
  'schedule exists then, nothing to remove).';

-- Only the owner of the functions (postgres, who enables pg_cron's rights) executes them.
revoke execute on function
  public.schedule_learning_runs(text),
  public.unschedule_learning_runs()
from public;
