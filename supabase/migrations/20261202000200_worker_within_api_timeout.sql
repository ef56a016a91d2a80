-- Section: every worker RPC ends well inside the API's statement timeout.
--
-- Through the Data API a statement of service_role stops after 8 s (hosted: authenticator's
-- statement_timeout; service_role sets none of its own), and an owner's after 8 s too. A run's
-- costly calls grow with its batch: claim_learning_run_events reads every event of it (and the
-- vote each one replaced). Measured through the API on 2 shared cores (README.md, "Hosted
-- Supabase"): 1,000,000 events took 1.8 s on a quiet machine and 6 to 9.6 s under load (load
-- average 4 to 7), past the timeout; 200,000 take 0.95 to 1.7 s at load average 6 to 7.5 with
-- JIT off for the call (below). So a batch holds at most 200,000 events, at least 4.7 times
-- inside the timeout on a machine that busy; a twin with more pending evidence is learned over
-- several runs, each complete on its own (all or nothing).

update public.persona_learning_settings
set max_batch_events = 200000
where max_batch_events > 200000;
alter table public.persona_learning_settings
  drop constraint max_batch_events_1_to_10000000,
  add constraint max_batch_events_1_to_200000 check (max_batch_events between 1 and 200000);
comment on column public.persona_learning_settings.max_batch_events is
  'At most this many events (1 to 200,000) are claimed by one run; the rest wait for the next '
  'run. The bound keeps each worker call well inside the API''s 8 s statement timeout.';

-- The batch's evidence is summed per key before it meets the modules, so that the join takes one
-- row per key instead of one per vote: its cost no longer depends on the plan the statistics
-- lead to (the per-vote join took 26 s over 1,000,000 events when the modules' statistics were
-- stale), nor on how many modules the twin has. JIT is off for the call.
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
  select * into strict v_settings from public.persona_learning_settings s
  where s.twin_id = v_run.twin_id;
  -- Read before the evidence: a change committed after this read bumps the generation, and the
  -- completion then refuses (PT412) rather than learn from what this claim saw.
  select t.evidence_generation, t.evidence_generation <> t.learned_generation
  into strict v_generation, v_rebuild
  from public.twins t where t.id = v_run.twin_id;

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
    select 1.0::float8 as sign, e.source, e.module_key, e.intent_label, e.score, e.passed,
           e.reason, e.created_at, e.audit_of_draft
    from public.persona_training_events e
    where e.twin_id = v_run.twin_id
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
    union all
    select -1.0::float8, p.source, p.module_key, p.intent_label, p.score, p.passed,
           p.reason, p.created_at, p.audit_of_draft
    from public.persona_training_events e
    -- One primary-key lookup per vote change (offset 0 keeps the planner from hashing the
    -- whole table instead).
    cross join lateral (
      select r.* from public.persona_training_events r where r.id = e.supersedes_id offset 0
    ) p
    where e.twin_id = v_run.twin_id and e.supersedes_id is not null
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
  ),
  weighted as (
    select v.module_key is not null as by_key, coalesce(v.module_key, v.intent_label) as key,
           v.sign,
           coalesce(v.score > 0, v.passed) as success,
           v.sign
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
    -- The exact path: every module from scratch (private.rebuild_module_counts), the batch's
    -- evidence in it, so none is added on top.
    select jsonb_agg(jsonb_build_object(
        'module_id', m.id, 'module_key', m.module_key, 'intent_label', m.intent_label,
        'success', r.success, 'failure', r.failure, 'evidence_at', v_run.learning_time,
        'confidence', m.confidence, 'status', m.status) order by m.module_key)
    into v_modules
    from private.rebuild_module_counts(
      v_run.twin_id, v_run.batch_last_event_id, v_run.learning_time,
      v_settings.half_life_days, v_settings.feedback_weight, v_settings.audit_weight,
      v_settings.unsafe_multiplier
    ) r
    join public.persona_modules m on m.id = r.module_id;
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

-- Requeueing the outbox rewrote every skipped (or failed) row in one statement: a project that
-- kept a million votes while Langfuse was not configured would pass the timeout. It now moves
-- at most p_limit rows per call.
drop function public.requeue_langfuse_outbox(text);
-- Puts skipped (or failed) current votes back in the outbox, e.g. once Langfuse is configured,
-- at most p_limit per call so that a call stays well inside the API's statement timeout; the
-- worker calls it until it answers 0.
create function public.requeue_langfuse_outbox(p_status text default 'skipped',
                                               p_limit integer default 10000)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  if p_status is null or p_status not in ('skipped', 'failed') then
    raise exception using errcode = '22023', message = 'p_status must be skipped or failed';
  end if;
  if p_limit is null or p_limit not between 1 and 10000 then
    raise exception using errcode = '22023', message = 'p_limit must be 1 to 10000';
  end if;
  with due as (
    select e.id from public.persona_training_events e
    where e.langfuse_status = p_status::public.langfuse_status and e.source = 'user_feedback'
      and e.superseded_at is null
    limit p_limit
    for update skip locked
  )
  update public.persona_training_events e
  set langfuse_status = 'pending', langfuse_attempts = 0, langfuse_last_error = null,
      langfuse_next_attempt_at = now()
  from due
  where e.id = due.id;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;

comment on function public.requeue_langfuse_outbox(text, integer) is
  'Worker (outbox requeue). In: p_status, skipped (default) or failed; p_limit, at most this many '
  'rows (1-10000, default 10000). Out: how many current votes in that state it put back as '
  'pending, due now, attempts 0; 0 when none is left. Raises 22023 "p_status must be skipped or '
  'failed" or "p_limit must be 1 to 10000" otherwise.';

grant execute on function public.requeue_langfuse_outbox(text, integer) to service_role;
revoke execute on function public.requeue_langfuse_outbox(text, integer) from public;

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
  select '20261202000200'::text;
$$;

comment on function public.worker_schema_version() is
  'Worker (start-up check). In: nothing. Out: the version (a migration timestamp, text) of the '
  'newest migration that changed what the worker calls; the worker refuses to start when it is '
  'older than the one it was built for. Executable by service_role only, so an anon key is '
  'refused here too (42501). Raises nothing.';

grant execute on function public.worker_schema_version() to service_role;
revoke execute on function public.worker_schema_version() from public;
