-- Section: the production watch (issue 14). Each newly published spec is watched by the runs
-- that follow: its live evidence against the replaced spec's, with Newcombe's interval and an
-- alpha-spending plan (worker/watch.py); per twin watch_mode off, alert (default) or auto (the
-- run that finds a regression rolls the spec back in its own transaction); owners roll back by
-- hand with rollback_persona_spec. The worker calls a new function (claim_production_watch) and
-- sends the watch in complete_learning_run's p_result, so the version it checks moves here.

-- New values are used by PL/pgSQL bodies only (at run time), never in this transaction.
alter type public.learning_run_trigger add value 'owner_rollback';
alter type public.learning_run_hold_reason add value 'rolled_back';
comment on type public.learning_run_trigger is
  'Who asked for a learning run: owner_request (request_learning_run), schedule (pending '
  'evidence), manual (operator CLI) or owner_rollback (rollback_persona_spec: a rollback by '
  'hand, recorded as a completed run).';
comment on type public.learning_run_hold_reason is
  'Why a completed run held: no draft to publish, a safe-mode run, the gate failed, or the run '
  'rolled the published spec back (production watch, auto mode).';

create type public.watch_mode as enum ('off', 'alert', 'auto');
comment on type public.watch_mode is
  'What the production watch does with a twin''s newly published spec: off (no watch), alert '
  '(record a regression; the default) or auto (roll the spec back in the run that finds it).';

alter table public.persona_learning_settings
  add column watch_mode public.watch_mode not null default 'alert',
  add column watch_margin double precision not null default 0.02
    constraint watch_margin_0_to_1 check (watch_margin between 0 and 1),
  add column watch_alpha double precision not null default 0.05
    constraint watch_alpha_above_0_to_0_5 check (watch_alpha > 0 and watch_alpha <= 0.5),
  add column watch_min_evidence integer not null default 30
    constraint watch_min_evidence_at_least_1 check (watch_min_evidence >= 1),
  add column watch_pass_evidence integer not null default 400
    constraint watch_pass_evidence_at_least_1 check (watch_pass_evidence >= 1),
  add column watch_looks integer not null default 10
    constraint watch_looks_1_to_100 check (watch_looks between 1 and 100),
  add column watch_expire_days double precision not null default 14
    constraint watch_expire_days_positive check (watch_expire_days > 0),
  add constraint watch_pass_evidence_at_least_watch_min_evidence
    check (watch_pass_evidence >= watch_min_evidence);

comment on column public.persona_learning_settings.watch_mode is
  'Production watch of each newly published spec: off, alert (record a regression; default) or '
  'auto (the run that finds a regression publishes the previous spec again).';
comment on column public.persona_learning_settings.watch_margin is
  'A regression is a drop of the pass rate (new spec - replaced spec) beyond this (default 0.02).';
comment on column public.persona_learning_settings.watch_alpha is
  'The chance of a false regression over a whole watch, all looks and comparisons (default 0.05).';
comment on column public.persona_learning_settings.watch_min_evidence is
  'Votes and audits each side of a comparison (twin-wide or per module) needs to be judged '
  '(default 30).';
comment on column public.persona_learning_settings.watch_pass_evidence is
  'The watch passes once the smaller side of the twin-wide comparison holds this much evidence '
  'with no regression found (default 400).';
comment on column public.persona_learning_settings.watch_looks is
  'Looks planned over watch_pass_evidence; runs between two looks test nothing (default 10).';
comment on column public.persona_learning_settings.watch_expire_days is
  'A watch that has not concluded this many days after the publish expires (default 14).';

grant update (
  watch_mode, watch_margin, watch_alpha, watch_min_evidence, watch_pass_evidence, watch_looks,
  watch_expire_days
) on public.persona_learning_settings to authenticated;

alter table public.persona_specs
  add column rolled_back_at timestamptz,
  add column rollback_reason text
    constraint rollback_reason_1_to_500_chars check (char_length(rollback_reason) between 1 and 500),
  add constraint rollback_reason_with_rolled_back_at
    check ((rolled_back_at is null) = (rollback_reason is null));

comment on column public.persona_specs.rolled_back_at is
  'When the spec was rolled back (archived, the spec before it published again); null otherwise.';
comment on column public.persona_specs.rollback_reason is
  'Why it was rolled back: the production watch''s finding or the owner''s reason.';

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
  'Planned looks done (a look is due at each watch_looks-th of watch_pass_evidence).';
comment on column public.persona_spec_watches.alpha_spent is
  'The error spent by the looks done (O''Brien-Fleming-type spending of watch_alpha).';
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

-- The scheduler also queues a run for a watch past its time (it concludes it as expired).
create or replace function public.enqueue_due_learning_runs(p_twin_id uuid default null)
returns setof public.persona_feedback_learning_runs
language sql
set search_path = ''
as $$
  insert into public.persona_feedback_learning_runs (twin_id, trigger, safe_mode, max_attempts)
  select t.id, 'schedule', not s.auto_publish, s.max_attempts
  from public.twins t
  join public.persona_learning_settings s on s.twin_id = t.id
  where (p_twin_id is null or t.id = p_twin_id)
    and (
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
$$;

comment on function public.enqueue_due_learning_runs(uuid) is
  'Worker (scheduler). In: a twin id, or null for every twin. Out: the runs it queued (trigger '
  'schedule, safe_mode = not the twin''s auto_publish, max_attempts from its settings): one per '
  'twin with an event after its cursor (learned_through_event_id), or whose evidence_generation '
  'differs from its learned_generation (modules to rebuild), or whose production watch is past '
  'watch_expire_days (watch_mode not off), and no run queued or running. '
  'Raises nothing; an unknown twin queues nothing.';

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
-- an equally long window before the switch, twin-wide and per module.
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

  -- Current votes (+1 passes, -1 fails, 0 is no evidence) and the two specs' audits, cast up to
  -- the run's time within the run's batch, counted per match key (module_key if given, else
  -- intent_label), then matched to the modules as learning matches them.
  with evidence as (
    select e.created_at >= v_watch.published_at as is_new, e.module_key is not null as by_key,
           coalesce(e.module_key, e.intent_label) as key, coalesce(e.score > 0, e.passed) as passed
    from public.persona_training_events e
    where e.twin_id = v_run.twin_id and e.id <= v_run.batch_last_event_id
      and e.created_at >= v_start and e.created_at <= v_run.learning_time
      and (
        (e.source = 'user_feedback' and e.score <> 0 and e.superseded_at is null)
        or (e.source = 'persona_audit' and e.created_at >= v_watch.published_at
            and e.persona_spec_id = v_watch.spec_id)
        or (e.source = 'persona_audit' and e.created_at < v_watch.published_at
            and e.persona_spec_id = v_watch.previous_spec_id)
      )
  ),
  per_key as (
    select k.is_new, k.by_key, k.key, count(*) as n, count(*) filter (where k.passed) as passed
    from evidence k
    group by k.is_new, k.by_key, k.key
  ),
  targets as (
    select true as by_key, m.module_key as key, m.module_key
    from public.persona_modules m where m.twin_id = v_run.twin_id
    union all
    select false, m.intent_label, m.module_key
    from public.persona_modules m where m.twin_id = v_run.twin_id
  ),
  per_module as (
    select t.module_key,
           coalesce(sum(k.n) filter (where k.is_new), 0) as new_n,
           coalesce(sum(k.passed) filter (where k.is_new), 0) as new_passed,
           coalesce(sum(k.n) filter (where not k.is_new), 0) as old_n,
           coalesce(sum(k.passed) filter (where not k.is_new), 0) as old_passed
    from per_key k
    join targets t on t.by_key = k.by_key and t.key = k.key
    group by t.module_key
  )
  select
    (select jsonb_build_object(
       'scope', 'twin', 'module_key', null,
       'new_n', coalesce(sum(k.n) filter (where k.is_new), 0),
       'new_passed', coalesce(sum(k.passed) filter (where k.is_new), 0),
       'old_n', coalesce(sum(k.n) filter (where not k.is_new), 0),
       'old_passed', coalesce(sum(k.passed) filter (where not k.is_new), 0))
     from per_key k),
    (select coalesce(jsonb_agg(jsonb_build_object(
       'scope', 'module', 'module_key', p.module_key, 'new_n', p.new_n,
       'new_passed', p.new_passed, 'old_n', p.old_n, 'old_passed', p.old_passed)
       order by p.module_key), '[]')
     from per_module p)
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
  'T, alpha_spent, looks_done, modules_total, settings {mode, margin, alpha, min_evidence, '
  'pass_evidence, looks, expire_days}, twin {scope, module_key, new_n, new_passed, old_n, '
  'old_passed}, modules [the same per module with evidence, by module_key]}}. new: votes cast '
  'and audits of spec_id from published_at to T; old: votes and audits of previous_spec_id from '
  'window_start = max(published_at - (T - published_at), previous_published_at) to '
  'published_at; only events of the batch or before it; current votes with score +1 (passed) '
  'or -1, audits passed or not; matched to modules by module_key, else intent_label. Counts, '
  'not weights. Raises P0002 and PT409 (HTTP 409, stale lease) as private.lock_leased_run; '
  '55000 when the run has no batch.';

-- The completion applies the watch's decision; the rest of its body is unchanged.
create or replace function public.complete_learning_run(
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
       or coalesce(v_watch_doc ->> 'state', '') not in ('watching', 'passed', 'regressed', 'expired')
       or jsonb_typeof(v_watch_doc -> 'look') is distinct from 'number'
       or jsonb_typeof(v_watch_doc -> 'alpha_spent') is distinct from 'number' then
      raise exception using errcode = '22023',
        message = 'p_result.watch needs watch_id, mode, state (watching, passed, regressed or '
                  'expired), action (none, alert or roll_back), look and alpha_spent';
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
  'records the watch''s look (state, looks_done, alpha_spent, last_report) and, for action '
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

-- Rolls the caller's twin back to the spec published before the current one, by hand; the
-- rollback is recorded as a completed run (trigger owner_rollback) carrying the reason.
create function private.rollback_persona_spec(p_twin_id uuid, p_reason text)
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
      message = format('twin %s: spec version %s is the only spec published; there is nothing '
                       'to roll back to', p_twin_id, v_current.version);
  end if;

  insert into public.persona_feedback_learning_runs (
    twin_id, status, trigger, requested_by, safe_mode, attempts, max_attempts, events_scanned,
    events_processed, events_unmatched, modules_updated, gate_passed, gate_report,
    publish_decision, published_spec_id, started_at, finished_at
  )
  values (
    p_twin_id, 'completed', 'owner_rollback', (select auth.uid()), false, 1, 1, 0, 0, 0, 0, true,
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

comment on function private.rollback_persona_spec(uuid, text) is
  'Owner RPC body (called by public.rollback_persona_spec). In: a twin id and the reason (1-500 '
  'characters, trimmed). Out: the completed run (trigger owner_rollback, requested_by = the '
  'caller, gate_report {rollback {reason, from_spec_id, from_version, to_spec_id, to_version}}, '
  'publish_decision published, published_spec_id = the spec published again) that records the rollback: the published spec is '
  'archived with rollback_reason "owner: <reason>" and rolled_back_at, the spec published before '
  'it (the latest archived one that had been published and was not rolled back) is published '
  'again, and a watch of the rolled-back spec (watching, or regressed: an alert acted on) ends '
  'rolled_back. Raises 42501 (HTTP 403) '
  '"twin_id: twin <id> does not exist or is not yours" when the caller does not own the twin '
  '(the same for a missing twin), 22023 for a missing or over-long reason, PT409 (HTTP 409) '
  'when the twin has no published spec or no earlier one to go back to; nothing changes then. '
  'Security definer: owners may not write specs'' status or runs themselves.';

grant execute on function private.rollback_persona_spec(uuid, text) to authenticated;

-- The API face of private.rollback_persona_spec: POST /rest/v1/rpc/rollback_persona_spec.
create function public.rollback_persona_spec(p_twin_id uuid, p_reason text)
returns public.persona_feedback_learning_runs
language sql
set search_path = ''
as $$
  select * from private.rollback_persona_spec(p_twin_id, p_reason);
$$;

comment on function public.rollback_persona_spec(uuid, text) is
  'Owner RPC (POST /rest/v1/rpc/rollback_persona_spec). In: p_twin_id, p_reason (1-500 '
  'characters). Out: the completed run (trigger owner_rollback) recording the rollback: the '
  'published spec archived with the reason and time, the spec published before it published '
  'again. Raises 42501 (HTTP 403) "twin_id: twin <id> does not exist or is not yours" when the '
  'caller does not own the twin, 22023 for a missing or over-long reason, PT409 (HTTP 409) '
  '"twin <id> has no published spec to roll back" or "... there is nothing to roll back to"; '
  'nothing changes then.';

grant execute on function public.rollback_persona_spec(uuid, text) to authenticated;

revoke execute on function
  private.rollback_persona_spec(uuid, text),
  public.rollback_persona_spec(uuid, text)
from public;

grant execute on function public.claim_production_watch(uuid, uuid) to service_role;
revoke execute on function public.claim_production_watch(uuid, uuid) from public;

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261207000100'::text;
$$;
