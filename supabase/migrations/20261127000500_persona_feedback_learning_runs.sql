-- Section: learning runs — requested by owners or the scheduler, executed by the worker.
-- Every state change of a run is one function call, one transaction.

create table public.persona_feedback_learning_runs (
  id uuid primary key default gen_random_uuid(),
  twin_id uuid not null references public.twins (id) on delete cascade,
  status text not null default 'queued'
    check (status in ('queued', 'running', 'completed', 'failed')),
  trigger text not null check (trigger in ('owner_request', 'schedule', 'manual')),
  requested_by uuid references auth.users (id) on delete set null,
  safe_mode boolean not null default true,
  attempts integer not null default 0 check (attempts >= 0),
  max_attempts integer not null default 3 check (max_attempts >= 1),
  worker_id text,
  lease_token uuid,
  lease_expires_at timestamptz,
  learning_time timestamptz,
  batch_after_event_id bigint,
  batch_last_event_id bigint,
  events_scanned integer check (events_scanned >= 0),
  events_processed integer check (events_processed >= 0),
  events_unmatched integer check (events_unmatched >= 0),
  modules_updated integer check (modules_updated >= 0),
  gate_passed boolean,
  gate_report jsonb,
  publish_decision text check (publish_decision in ('published', 'held')),
  hold_reason text check (hold_reason in ('no_draft', 'safe_mode', 'gate_failed')),
  published_spec_id uuid references public.persona_specs (id) on delete set null,
  error text,
  created_at timestamptz not null default now(),
  started_at timestamptz,
  finished_at timestamptz,
  updated_at timestamptz not null default now(),
  constraint persona_feedback_learning_runs_lease_check
    check ((status = 'running') = (lease_token is not null and lease_expires_at is not null)),
  constraint persona_feedback_learning_runs_completed_check check (
    status <> 'completed' or (
      events_scanned is not null and events_processed is not null and modules_updated is not null
      and gate_passed is not null and gate_report is not null and publish_decision is not null
    )
  ),
  constraint persona_feedback_learning_runs_decision_check check (
    publish_decision is null
    or (publish_decision = 'held') = (hold_reason is not null)
    and (publish_decision = 'published') = (published_spec_id is not null)
  )
);

comment on table public.persona_feedback_learning_runs is
  'One execution of the learning pipeline for one twin: queued, running, completed or failed.';
comment on column public.persona_feedback_learning_runs.trigger is
  'owner_request (request_learning_run), schedule (pending evidence) or manual (operator CLI).';
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
comment on column public.persona_feedback_learning_runs.gate_report is
  'Each regression-gate check with its value, threshold and verdict.';
comment on column public.persona_feedback_learning_runs.publish_decision is
  'published when the run published the latest draft; held otherwise (see hold_reason).';

-- The module change history names the run that made each change (that table is older).
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
  for select to authenticated using (private.is_twin_owner(twin_id));

grant select, insert, update, delete on public.persona_feedback_learning_runs to service_role;
-- Owners read whole rows (select=* works); the lease token gives them nothing, as only
-- service_role may execute the functions that take it.
grant select on public.persona_feedback_learning_runs to authenticated;


-- Section: when and by which run an event was processed. Computed fields: PostgREST serves them
-- as columns (select=*,processed_at,processed_run_id) and SQL reads them as e.processed_at.
-- Processing writes no event row: a run's completion moves its twin's cursor over its batch.

create function public.processed_run_id(p_event public.persona_training_events)
returns uuid
language sql
stable
set search_path = ''
as $$
  select r.id
  from public.persona_feedback_learning_runs r
  where r.twin_id = p_event.twin_id and r.status = 'completed'
    and r.batch_last_event_id >= p_event.id and r.batch_after_event_id < p_event.id
  order by r.batch_last_event_id
  limit 1;
$$;

create function public.processed_at(p_event public.persona_training_events)
returns timestamptz
language sql
stable
set search_path = ''
as $$
  select r.finished_at
  from public.persona_feedback_learning_runs r
  where r.id = public.processed_run_id(p_event);
$$;

comment on function public.processed_run_id(public.persona_training_events) is
  'The completed learning run that processed the event; null while it waits.';
comment on function public.processed_at(public.persona_training_events) is
  'When a learning run processed the event; null while it waits.';

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
  'Owners: queue a learning run for your twin (auto-publish off by default). Returns the queued run.';

grant execute on function public.request_learning_run(uuid, boolean) to authenticated;

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  public.processed_run_id(public.persona_training_events),
  public.processed_at(public.persona_training_events),
  private.request_learning_run(uuid, boolean),
  public.request_learning_run(uuid, boolean)
from public;
