-- Section: learning fixes after a newcomer's review (issue 11).

-- 1. Audits carry no vote-change link. A service-role audit could carry supersedes_id (the vote
-- recorder clears it only for feedback), and the claim retracted whatever vote it named, of any
-- twin: the module wrong for the same twin, a negative daily count (23514) and the twin stuck
-- for another. Links already on non-feedback rows are cleared first (the edit marks the twin for
-- a rebuild), then refused by a check constraint naming the column. The claim's retraction also
-- follows a link within the run's twin only (below).
update public.persona_training_events e
set supersedes_id = null, superseded_at = null
where e.source <> 'user_feedback' and (e.supersedes_id is not null or e.superseded_at is not null);

alter table public.persona_training_events
  add constraint supersedes_id_on_feedback_only
    check (source = 'user_feedback' or supersedes_id is null),
  add constraint superseded_at_on_feedback_only
    check (source = 'user_feedback' or superseded_at is null);

comment on constraint supersedes_id_on_feedback_only on public.persona_training_events is
  'Only a vote replaces an earlier vote (set by the database when a voter changes a vote); an '
  'audit carries no supersedes_id.';
comment on constraint superseded_at_on_feedback_only on public.persona_training_events is
  'Only a vote is replaced by a later vote; an audit carries no superseded_at.';


-- 2. Bounded learning settings. half_life_days, the weights, unsafe_multiplier and min_evidence
-- had only a lower bound, which NaN and Infinity satisfy (NaN sorts above every number):
-- half_life_days 1e-6 underflowed every weight to 0, an Infinity weight made confidences NaN.
-- Each now has an upper bound too (documented on its column); the gate's two counts are bounded
-- at 100,000. Rows outside a new bound are clamped to it first (NaN to the column's default).
update public.persona_learning_settings s
set half_life_days = case when s.half_life_days = 'NaN' then 30
                          else greatest(0.01, least(s.half_life_days, 3650)) end,
    feedback_weight = case when s.feedback_weight = 'NaN' then 1
                           else least(s.feedback_weight, 1000) end,
    audit_weight = case when s.audit_weight = 'NaN' then 2 else least(s.audit_weight, 1000) end,
    unsafe_multiplier = case when s.unsafe_multiplier = 'NaN' then 3
                             else least(s.unsafe_multiplier, 1000) end,
    min_evidence = case when s.min_evidence = 'NaN' then 10
                        else least(s.min_evidence, 1000000) end,
    gate_min_pairs = least(s.gate_min_pairs, 100000),
    gate_min_audited_traces = least(s.gate_min_audited_traces, 100000)
where not (s.half_life_days between 0.01 and 3650) or not (s.feedback_weight <= 1000)
   or not (s.audit_weight <= 1000) or not (s.unsafe_multiplier <= 1000)
   or not (s.min_evidence <= 1000000) or s.gate_min_pairs > 100000
   or s.gate_min_audited_traces > 100000;

alter table public.persona_learning_settings
  drop constraint half_life_days_positive,
  add constraint half_life_days_0_01_to_3650 check (half_life_days between 0.01 and 3650),
  drop constraint feedback_weight_not_negative,
  add constraint feedback_weight_0_to_1000 check (feedback_weight between 0 and 1000),
  drop constraint audit_weight_not_negative,
  add constraint audit_weight_0_to_1000 check (audit_weight between 0 and 1000),
  drop constraint unsafe_multiplier_at_least_1,
  add constraint unsafe_multiplier_1_to_1000 check (unsafe_multiplier between 1 and 1000),
  drop constraint min_evidence_not_negative,
  add constraint min_evidence_0_to_1000000 check (min_evidence between 0 and 1000000),
  drop constraint gate_min_pairs_at_least_1,
  add constraint gate_min_pairs_1_to_100000 check (gate_min_pairs between 1 and 100000),
  drop constraint gate_min_audited_traces_at_least_1,
  add constraint gate_min_audited_traces_1_to_100000
    check (gate_min_audited_traces between 1 and 100000);

comment on column public.persona_learning_settings.half_life_days is
  'Evidence loses half its weight every this many days (default 30; 0.01 to 3650: shorter '
  'underflows every weight older than a few hours to 0).';
comment on column public.persona_learning_settings.feedback_weight is
  'Weight of one feedback vote (default 1; 0 to 1000).';
comment on column public.persona_learning_settings.audit_weight is
  'Weight of one persona audit (default 2; 0 to 1000).';
comment on column public.persona_learning_settings.unsafe_multiplier is
  'Extra weight of a failure whose reason is unsafe (default 3; 1 to 1000).';
comment on column public.persona_learning_settings.min_evidence is
  'Weighted evidence a module needs before its status moves (default 10; 0 to 1,000,000).';
comment on column public.persona_learning_settings.gate_min_pairs is
  'Paired audited traces the gate needs to compare a draft with the published spec (default 20; '
  '1 to 100,000).';
comment on column public.persona_learning_settings.gate_min_audited_traces is
  'Audited traces a first publish needs (default 20; 1 to 100,000).';


-- 3. A module or weighting edit is never missed by a run. The two triggers bumped the twin's
-- evidence_generation only when it had learned evidence or a running run they could see: an edit
-- in a transaction open across the twin's first claim saw neither, and the run completed with the
-- modules (or weighting) as they were before it. They now always bump it, so such a run is
-- refused at its completion (PT412) and reads again; a twin with nothing learned has its
-- learned_generation bumped along, as its modules are exact at zero, so its next run still learns
-- incrementally (no rebuild, and no run made due by the edit alone).

create or replace function private.bump_evidence_generation_on_module_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- Always a new generation, so that a run whose claim read the modules before this edit
  -- committed is refused at its completion (PT412) and reads them again, even when this
  -- transaction began before the run (it could not see it). A twin with nothing learned is
  -- exact at zero whatever its modules: its learned_generation moves along, so its next run
  -- learns incrementally rather than rebuilding.
  update public.twins t
  set evidence_generation = t.evidence_generation + 1,
      learned_generation = t.learned_generation
        + case when t.learned_through_event_id = 0
                    and t.learned_generation = t.evidence_generation then 1 else 0 end
  where t.id in (old.twin_id, new.twin_id);
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_module_edit() is
  'Trigger (after insert, update of key, intent or twin, or delete on persona_modules): bumps '
  'evidence_generation of the twin(s) of the old and new row, so that a running run reads its '
  'batch again (PT412 at its completion) and a twin with learned evidence has its modules '
  'rebuilt by its next run; a twin with nothing learned (learned_through_event_id 0, not '
  'already marked) has its learned_generation bumped too, as its modules are exact at zero. '
  'Security definer: whoever edits, the twin is marked. Raises nothing.';

create or replace function private.bump_evidence_generation_on_weighting_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- As private.bump_evidence_generation_on_module_edit: always a new generation (a run that
  -- read the old weighting is refused at its completion), and learned_generation along with it
  -- for a twin with nothing learned.
  update public.twins t
  set evidence_generation = t.evidence_generation + 1,
      learned_generation = t.learned_generation
        + case when t.learned_through_event_id = 0
                    and t.learned_generation = t.evidence_generation then 1 else 0 end
  where t.id = new.twin_id;
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_weighting_edit() is
  'Trigger (after update of half_life_days, feedback_weight, audit_weight or unsafe_multiplier '
  'on persona_learning_settings, when one changes): bumps the twin''s evidence_generation, so '
  'that a running run reads its batch again (PT412 at its completion) and a twin with learned '
  'evidence has every module rebuilt with the new weighting by its next run; a twin with nothing '
  'learned (learned_through_event_id 0, not already marked) has its learned_generation bumped '
  'too. Security definer: the owner may tune the settings but not write the twin''s generation. '
  'Raises nothing.';


-- 4. The claim retracts a replaced vote of the run's own twin only (see 1).

create or replace function public.claim_learning_run_events(p_run_id uuid, p_lease_token uuid)
returns jsonb
language plpgsql
set search_path = ''
-- Compiling the batch's query with JIT cost as much as running it (0.5-1 s of a 2 s call
-- under load): without it the call's time is the batch's alone.
set jit = off
-- The batch's groups take about 3 MB for 200,000 events; at the default 4 MB the planner,
-- estimating far more groups, sorts the batch on disk instead.
set work_mem = '32MB'
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
    -- leaves it out. A vote that replaced one an earlier run learned also retracts that one.
    select x.*
    from public.persona_training_events e
    -- The replaced vote, if an earlier run learned it: one primary-key lookup per vote change
    -- (offset 0 keeps the planner from hashing the whole table instead). Driven by the batch's
    -- rows, not by the twin's index of vote changes, whose size grows with its history.
    left join lateral (
      select r.source, r.module_key, r.intent_label, r.score, r.passed, r.reason, r.created_at,
             r.audit_of_draft
      from public.persona_training_events r
      where r.id = e.supersedes_id and r.twin_id = v_run.twin_id
        and r.id <= v_run.batch_after_event_id
      offset 0
    ) p on e.supersedes_id is not null
    cross join lateral (
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
      union all
      -- What an earlier run learned and this vote replaced: retracted.
      select -1.0::float8, p.source, p.module_key, p.intent_label, p.score, p.passed,
             p.reason, p.created_at, p.audit_of_draft, false, 1.0::float8
      where p.source is not null
    ) x
    where e.twin_id = v_run.twin_id
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
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


-- 5. The daily feedback summary follows edits. Editing a learned vote's bucket columns (the
-- service role relabelling its reason, intent, module key, score or day) left it counted in its
-- old bucket, while the voter's later change of that vote retracted it from the new one: 23514
-- votes_not_negative, and every later run of the twin failed. An after-update trigger (per
-- statement, transition tables) now moves each counted vote (learned, current at the cursor) from
-- its old bucket to its new one. subtract_deleted_feedback follows a vote-change link within its
-- twin only. A completed run's scratch row is taken even when its batch was empty (it was left).

create or replace function private.summarize_completed_run()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_summary private.learning_run_summaries;
begin
  -- Counted by the claim in its one pass over the batch (claim_learning_run_events). Anything
  -- that changes those counts since (a deletion, a module edit) moved the twin's
  -- evidence_generation, and the completion refused before this trigger. Taken first, so that
  -- an empty batch leaves no scratch row either.
  delete from private.learning_run_summaries s where s.run_id = new.id
  returning * into v_summary;
  if new.batch_last_event_id is null or new.batch_last_event_id <= new.batch_after_event_id then
    return null;
  end if;
  if v_summary.run_id is null then
    -- A run that read its batch before the summaries were kept (a worker of an older schema).
    raise exception using errcode = 'PT412',
      message = format('run %s has no batch summary: read the batch again', new.id);
  end if;

  insert into public.persona_run_evidence
    (run_id, twin_id, module_id, source, reason, outcome, events, vote_changes)
  -- Counted per key an event matches by (its module_key, else its intent_label), matched to the
  -- modules here: one row per key, not per event.
  with per_key as (
    select * from unnest(v_summary.run_evidence)
  ),
  targets as (
    select true as by_key, m.module_key as key, m.id as module_id
    from public.persona_modules m where m.twin_id = new.twin_id
    union all
    select false, m.intent_label, m.id
    from public.persona_modules m where m.twin_id = new.twin_id
  )
  select new.id, new.twin_id, t.module_id, k.source, k.reason, k.outcome,
         sum(k.events), sum(k.changes)
  from per_key k
  left join targets t on t.by_key = k.by_key and t.key = k.key
  group by 3, 4, 5, 6;

  -- Existing buckets take their delta (a retraction is negative); new buckets are inserted. An
  -- insert checks votes_not_negative before any ON CONFLICT, hence the two steps.
  with delta as (
    select date '1970-01-01' + x.day as day, x.intent_label, x.module_key, x.reason, x.score,
           x.votes
    from unnest(v_summary.feedback_daily) x
  ),
  updated as (
    update public.persona_feedback_daily d
    set votes = d.votes + x.votes
    from delta x
    -- Equalities on coalesced keys, not IS NOT DISTINCT FROM: those can be hashed, so the
    -- cost follows the batch, not the twin's history of buckets.
    where d.twin_id = new.twin_id and d.day = x.day and d.intent_label = x.intent_label
      and coalesce(d.module_key, '') = coalesce(x.module_key, '')
      and coalesce(d.reason::text, '') = coalesce(x.reason::text, '') and d.score = x.score
    returning d.day, d.intent_label, d.module_key, d.reason, d.score
  )
  insert into public.persona_feedback_daily
    (twin_id, day, intent_label, module_key, reason, score, votes)
  select new.twin_id, x.day, x.intent_label, x.module_key, x.reason, x.score, x.votes
  from delta x
  where not exists (
    select 1 from updated u
    where u.day = x.day and u.intent_label = x.intent_label
      and coalesce(u.module_key, '') = coalesce(x.module_key, '')
      and coalesce(u.reason::text, '') = coalesce(x.reason::text, '') and u.score = x.score
  );
  delete from public.persona_feedback_daily d where d.twin_id = new.twin_id and d.votes = 0;
  return null;
end;
$$;

comment on function private.summarize_completed_run() is
  'Trigger (after update of status on persona_feedback_learning_runs, when a run becomes '
  'completed): adds the run''s batch to persona_run_evidence (events per module, source, reason '
  'and outcome; audits of a draft left out) and its net feedback votes to persona_feedback_daily '
  '(+1 per vote current at the batch''s end, -1 per earlier vote one of them replaced), both as '
  'claim_learning_run_events counted them into private.learning_run_summaries, whose row it '
  'takes (also for an empty batch, which adds nothing). Security definer: the summaries are '
  'written by no API role. Raises PT412 (HTTP 412) '
  '"run <id> has no batch summary: read the batch again" when the run''s batch was read without '
  'one; a vote count below 0 would be 23514 votes_not_negative. Either rolls the completion '
  'back.';

create or replace function private.subtract_deleted_feedback()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  with gone_votes as (
    select g.*, t.learned_through_event_id as cursor
    from gone g join public.twins t on t.id = g.twin_id
    where g.source = 'user_feedback'
  ),
  uncounted as (
    -- A deleted vote the summary counted: learned, and current at the cursor (never replaced,
    -- or replaced by a vote after the cursor, which may be gone too). The same rule as
    -- move_edited_feedback's, spelt out in each: a shared SQL helper would not be inlined (every
    -- function pins its search_path) and would cost a call per deleted vote.
    select v.twin_id, v.created_at, v.intent_label, v.module_key, v.reason, v.score
    from gone_votes v
    where v.id <= v.cursor
      and (v.superseded_at is null
           or exists (select 1 from public.persona_training_events n
                      where n.twin_id = v.twin_id and n.supersedes_id = v.id and n.id > v.cursor)
           or exists (select 1 from gone n
                      where n.supersedes_id = v.id and n.id > v.cursor))
    union all
    -- A learned vote that remains, whose replacement after the cursor was deleted: it stays
    -- retracted, as learning leaves it out.
    select e.twin_id, e.created_at, e.intent_label, e.module_key, e.reason, e.score
    from gone_votes n
    join public.persona_training_events e on e.id = n.supersedes_id and e.twin_id = n.twin_id
    where n.id > n.cursor and e.id <= n.cursor
  ),
  delta as (
    select u.twin_id, (u.created_at at time zone 'UTC')::date as day, u.intent_label,
           u.module_key, u.reason, u.score, count(*) as votes
    from uncounted u
    group by 1, 2, 3, 4, 5, 6
  )
  update public.persona_feedback_daily d
  set votes = d.votes - x.votes
  from delta x
  where d.twin_id = x.twin_id and d.day = x.day and d.intent_label = x.intent_label
    and coalesce(d.module_key, '') = coalesce(x.module_key, '')
    and coalesce(d.reason::text, '') = coalesce(x.reason::text, '') and d.score = x.score;
  delete from public.persona_feedback_daily d
  where d.votes = 0 and d.twin_id in (select g.twin_id from gone g);
  return null;
end;
$$;

create function private.move_edited_feedback()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- Most updates (outbox states, vote changes) change no bucket column: they stop here.
  if not exists (
    select 1 from before_rows o join after_rows n on n.id = o.id
    where (o.twin_id, o.source, o.created_at, o.intent_label, o.module_key, o.reason, o.score)
          is distinct from
          (n.twin_id, n.source, n.created_at, n.intent_label, n.module_key, n.reason, n.score)
  ) then
    return null;
  end if;
  with moved as (
    -- Each edited row as it was (-1) and as it is (+1), when a column the summary buckets by
    -- changed. A vote change (superseded_at set by the vote recorder) changes none of them.
    select -1 as sign, o.*
    from before_rows o join after_rows n on n.id = o.id
    where (o.twin_id, o.source, o.created_at, o.intent_label, o.module_key, o.reason, o.score)
          is distinct from
          (n.twin_id, n.source, n.created_at, n.intent_label, n.module_key, n.reason, n.score)
    union all
    select 1, n.*
    from after_rows n join before_rows o on o.id = n.id
    where (o.twin_id, o.source, o.created_at, o.intent_label, o.module_key, o.reason, o.score)
          is distinct from
          (n.twin_id, n.source, n.created_at, n.intent_label, n.module_key, n.reason, n.score)
  ),
  counted as (
    -- A vote the summary counts: learned, and current at its twin's cursor (never replaced, or
    -- replaced by a vote after the cursor), as in subtract_deleted_feedback.
    select m.*
    from moved m join public.twins t on t.id = m.twin_id
    where m.source = 'user_feedback' and m.id <= t.learned_through_event_id
      and (m.superseded_at is null
           or exists (select 1 from public.persona_training_events x
                      where x.twin_id = m.twin_id and x.supersedes_id = m.id
                        and x.id > t.learned_through_event_id))
  ),
  delta as (
    select c.twin_id, (c.created_at at time zone 'UTC')::date as day, c.intent_label,
           c.module_key, c.reason, c.score, sum(c.sign)::integer as votes
    from counted c
    group by 1, 2, 3, 4, 5, 6
    having sum(c.sign) <> 0
  ),
  taken as (
    update public.persona_feedback_daily d
    set votes = d.votes + x.votes
    from delta x
    where x.votes < 0 and d.twin_id = x.twin_id and d.day = x.day
      and d.intent_label = x.intent_label
      and coalesce(d.module_key, '') = coalesce(x.module_key, '')
      and coalesce(d.reason::text, '') = coalesce(x.reason::text, '') and d.score = x.score
    returning 1
  )
  insert into public.persona_feedback_daily as d
    (twin_id, day, intent_label, module_key, reason, score, votes)
  select x.twin_id, x.day, x.intent_label, x.module_key, x.reason, x.score, x.votes
  from delta x
  where x.votes > 0
  on conflict (twin_id, day, intent_label, module_key, reason, score)
  do update set votes = d.votes + excluded.votes;
  delete from public.persona_feedback_daily d
  where d.votes = 0
    and d.twin_id in (select o.twin_id from before_rows o union select n.twin_id from after_rows n);
  return null;
end;
$$;

comment on function private.move_edited_feedback() is
  'Trigger (after update on persona_training_events, per statement, the rows as before_rows and '
  'after_rows): for each row whose twin_id, source, created_at, intent_label, module_key, reason '
  'or score changed, takes it out of persona_feedback_daily as it was when the summary counted it '
  '(a learned vote current at its twin''s cursor) and puts it in as it is now when counted, then '
  'drops buckets left at 0. Costs a join of the updated rows; a row whose bucket columns did not '
  'change costs nothing more. Security definer: the summary is written by no API role. Raises '
  'nothing of its own (a count below 0 would be 23514 votes_not_negative).';

create trigger persona_training_events_move_edited_feedback
  after update on public.persona_training_events
  referencing old table as before_rows new table as after_rows
  for each statement execute function private.move_edited_feedback();

revoke execute on function private.move_edited_feedback() from public;


delete from private.learning_run_summaries s
using public.persona_feedback_learning_runs r
where r.id = s.run_id and r.status = 'completed';
