-- Section: the exact path's rebuild in bounded steps.
--
-- A twin marked for a rebuild (evidence deleted, modules edited) had every module recomputed
-- from its whole history inside one claim_learning_run_events call: 2.1 s at 3,000,000 events
-- here, so a large enough twin would pass the API's 8 s statement timeout on hosted Supabase and
-- never finish. The rebuild now advances over the twin's history in steps of at most
-- rebuild_step_events events, one step per call, summing each step's weights per match key into
-- a table of the run's; the call that takes the last step returns the batch with the modules
-- matched to those sums, as before. Each step's sums are the same whenever it is taken: an event
-- counts when it is current at the batch's end (never replaced, or replaced by a vote after it),
-- which a later vote cannot change (only a deletion can, and that moves evidence_generation,
-- which starts the rebuild over). The completion stays all-or-nothing: the steps write only the
-- run's own scratch rows.
--
-- The incremental path now counts a vote of its batch only if it is current at the batch's end,
-- and retracts only what an earlier run learned. It used to add every vote of the batch and let
-- the vote that replaced it retract it: a vote whose replacement was deleted before a run
-- learned either then counted, though the rebuild leaves it out (found by the property test:
-- a run claimed before the votes, its worker killed, the middle of three votes deleted).
--
-- A change of the weighting (half-life, source weights, unsafe multiplier) marks the twin too:
-- the modules are then rebuilt with the new weighting instead of mixing old and new.

-- The worker calls claim_learning_run_events until it answers with the batch.
create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261206000100'::text;
$$;

alter table public.persona_learning_settings
  add column rebuild_step_events integer not null default 500000,
  add constraint rebuild_step_events_1_to_500000 check (rebuild_step_events between 1 and 500000);

comment on column public.persona_learning_settings.rebuild_step_events is
  'A rebuild of the twin''s modules (after evidence was deleted or modules edited) reads at most '
  'this many events (1 to 500,000) per worker call, so that each call stays well inside the '
  'API''s 8 s statement timeout however long the twin''s history.';

-- The exact learning path's marker for the weighting: a twin whose half-life, source weights or
-- unsafe multiplier change has its modules rebuilt with the new ones by its next run.
create function private.bump_evidence_generation_on_weighting_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  update public.twins t
  set evidence_generation = t.evidence_generation + 1
  where t.id = new.twin_id
    and (t.learned_through_event_id > 0
         or exists (select 1 from public.persona_feedback_learning_runs r
                    where r.twin_id = t.id and r.status = 'running'));
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_weighting_edit() is
  'Trigger (after update of half_life_days, feedback_weight, audit_weight or unsafe_multiplier '
  'on persona_learning_settings, when one changes): bumps the twin''s evidence_generation when it '
  'has learned evidence or a running run, so that its next run rebuilds every module with the '
  'new weighting and a running one reads its batch again. Security definer: the owner may tune '
  'the settings but not write the twin''s generation. Raises nothing.';

create trigger persona_learning_settings_bump_generation
  after update of half_life_days, feedback_weight, audit_weight, unsafe_multiplier
  on public.persona_learning_settings
  for each row
  when (old.half_life_days is distinct from new.half_life_days
        or old.feedback_weight is distinct from new.feedback_weight
        or old.audit_weight is distinct from new.audit_weight
        or old.unsafe_multiplier is distinct from new.unsafe_multiplier)
  execute function private.bump_evidence_generation_on_weighting_edit();

revoke execute on function private.bump_evidence_generation_on_weighting_edit() from public;

-- A twin's settings row lives and dies with the twin: every run reads it.
revoke delete on public.persona_learning_settings from service_role;

-- A twin's vote changes by the vote each replaced: a rebuild step reads those of its range.
create index persona_training_events_supersedes_idx
  on public.persona_training_events (twin_id, supersedes_id) where supersedes_id is not null;

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

drop function private.rebuild_module_counts(
  uuid, bigint, timestamptz, double precision, double precision, double precision,
  double precision
);

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
    from public.persona_training_events n
    join public.persona_training_events e on e.id = n.supersedes_id
    cross join lateral (
      select coalesce(e.score > 0, e.passed) as success,
             case when e.source = 'user_feedback' then p_feedback_weight
                  else p_audit_weight end
             * case when e.reason = 'unsafe' and not coalesce(e.score > 0, e.passed)
                    then p_unsafe_multiplier else 1 end
             * exp(least(0, date_part('epoch', e.created_at) - v_t_epoch) * v_rate) as weight
    ) w
    where n.twin_id = p_twin_id
      and n.supersedes_id > p_after_event_id and n.supersedes_id <= p_through_event_id
      and n.id > p_batch_last_event_id
      and e.twin_id = p_twin_id
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
  'end (never replaced, or replaced by a vote after p_batch_last_event_id; a vote whose '
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

-- The claim: one bounded rebuild step per call; a twin without its settings row is named.
-- Returns everything the pure learning and gate need for the run's batch, aggregated here so
-- that no event row travels to the worker:
-- per-module decayed evidence of the batch (a vote that replaces an earlier one also retracts
-- that one), the modules, the settings, the draft and baseline specs and their paired audits.
create or replace function public.claim_learning_run_events(p_run_id uuid, p_lease_token uuid)
returns jsonb
language plpgsql
set search_path = ''
-- Compiling the batch's query with JIT cost as much as running it (0.5-1 s of a 2 s call
-- under load): without it the call's time is the batch's alone.
set jit = off
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

  -- One streaming pass over the batch: each vote's decayed weight (a vote that replaced an earlier
  -- one also retracts that one), summed per key it matches by (its module_key if given, else its
  -- intent_label), and only then matched to the modules: the join takes one row per key, not per
  -- vote, so its cost does not depend on the plan or the twin's module count. A key no module
  -- serves lands in the null group (unmatched); an intent several modules serve counts for each.
  with targets as (
    select true as by_key, m.module_key as key, m.id as module_id
    from public.persona_modules m where m.twin_id = v_run.twin_id
    union all
    select false, m.intent_label, m.id
    from public.persona_modules m where m.twin_id = v_run.twin_id
  ),
  votes as (
    -- The batch's events; each weighs only if current at the batch's end (never replaced, or
    -- replaced by a vote after the batch, which the next run retracts): a vote replaced inside
    -- the batch, or whose replacement was deleted, stays out, as the rebuild leaves it out.
    select 1.0::float8 as sign, e.source, e.module_key, e.intent_label, e.score, e.passed,
           e.reason, e.created_at, e.audit_of_draft,
           case when e.superseded_at is null then 1.0::float8
                when exists (
                  select 1 from public.persona_training_events n
                  where n.twin_id = v_run.twin_id and n.supersedes_id = e.id
                    and n.id > v_run.batch_last_event_id
                ) then 1.0::float8
                else 0.0::float8 end as current
    from public.persona_training_events e
    where e.twin_id = v_run.twin_id
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
    union all
    -- What an earlier run learned and a vote of the batch replaced: retracted.
    select -1.0::float8, p.source, p.module_key, p.intent_label, p.score, p.passed,
           p.reason, p.created_at, p.audit_of_draft, 1.0::float8
    from public.persona_training_events e
    -- One primary-key lookup per vote change (offset 0 keeps the planner from hashing the
    -- whole table instead).
    cross join lateral (
      select r.* from public.persona_training_events r where r.id = e.supersedes_id offset 0
    ) p
    where e.twin_id = v_run.twin_id and e.supersedes_id is not null
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
      and p.id <= v_run.batch_after_event_id
  ),
  weighted as (
    select v.module_key is not null as by_key, coalesce(v.module_key, v.intent_label) as key,
           v.sign,
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
  per_key as (
    select w.by_key, w.key,
           coalesce(sum(w.weight) filter (where w.success), 0) as success,
           coalesce(sum(w.weight) filter (where not w.success), 0) as failure,
           count(*) filter (where w.sign > 0) as events
    from weighted w
    group by w.by_key, w.key
  ),
  per_module as (
    select t.module_id, sum(k.success) as success, sum(k.failure) as failure,
           sum(k.events) as events
    from per_key k
    left join targets t on t.by_key = k.by_key and t.key = k.key
    group by t.module_id
  )
  select
    coalesce((select p.events from per_module p where p.module_id is null), 0),
    coalesce((select jsonb_agg(jsonb_build_object(
        'module_id', p.module_id, 'success', p.success, 'failure', p.failure))
      from per_module p where p.module_id is not null), '[]')
  into v_unmatched, v_evidence;

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

  -- The batch's size, from the index alone.
  select count(*) into v_scanned
  from public.persona_training_events e
  where e.twin_id = v_run.twin_id
    and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id;

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
  'Worker. In: a run id and its lease token. Reads the run''s batch and records events_scanned, '
  'events_unmatched, evidence_generation and rebuilt_modules on the run. Out: jsonb {run (without '
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
  'another also retracts that one with the same formula if an earlier run learned it; a vote of the '
  'batch counts only if current at the batch''s end (not replaced inside the batch, and not '
  'replaced by a vote since deleted). Raises P0002 and PT409 (HTTP 409, stale '
  'lease) as private.lock_leased_run; P0002 "twin <id> has no persona_learning_settings row".';

-- The owner views' daily summary counts the same votes learning counts: a vote whose
-- replacement was deleted stays out there too.
create or replace function private.feedback_daily_delta(p_twin_id uuid, p_after bigint, p_last bigint)
returns table (
  day date, intent_label text, module_key text, reason public.training_event_reason,
  score smallint, votes bigint
)
language sql
stable
set search_path = ''
as $$
  with votes as (
    select 1 as sign, e.created_at, e.intent_label, e.module_key, e.reason, e.score
    from public.persona_training_events e
    where e.twin_id = p_twin_id and e.id > p_after and e.id <= p_last
      and e.source = 'user_feedback'
      -- Current at p_last: never replaced, or replaced by a vote after it (a vote whose
      -- replacement was deleted stays out, as learning leaves it out).
      and (e.superseded_at is null or exists (
        select 1 from public.persona_training_events n
        where n.twin_id = p_twin_id and n.supersedes_id = e.id and n.id > p_last
      ))
    union all
    select -1, p.created_at, p.intent_label, p.module_key, p.reason, p.score
    from public.persona_training_events e
    cross join lateral (
      select r.* from public.persona_training_events r where r.id = e.supersedes_id offset 0
    ) p
    where e.twin_id = p_twin_id and e.id > p_after and e.id <= p_last
      and e.supersedes_id is not null
      and p.id <= p_after
  )
  -- Grouped by the UTC day as a number (days since 1970-01-01): an integer per row, not a time
  -- zone conversion, made a date once per bucket.
  select date '1970-01-01' + g.day, g.intent_label, g.module_key, g.reason, g.score, g.votes
  from (
    select floor(date_part('epoch', v.created_at) / 86400)::integer as day, v.intent_label,
           v.module_key, v.reason, v.score, sum(v.sign) as votes
    from votes v
    group by 1, 2, 3, 4, 5
    having sum(v.sign) <> 0
  ) g;
$$;

comment on function private.feedback_daily_delta(uuid, bigint, bigint) is
  'Summary helper. In: a twin id and an event-id range (p_after, p_last]. Out: rows (day = the '
  'UTC day a vote was cast, intent_label, module_key, reason, score, votes) with the net change '
  'of persona_feedback_daily the range makes: +1 for each feedback vote in it that is current at '
  'p_last (never replaced, or replaced by a vote after p_last), -1 for each vote up to p_after '
  'that one of them replaced (supersedes_id); buckets netting 0 left out. Raises nothing.';
