-- Section: the owner views' batch summaries counted in the run's one pass over its batch.
--
-- The completion's trigger read the batch twice more (per module, source, reason and outcome for
-- persona_run_evidence; per day and bucket for persona_feedback_daily): with the read itself,
-- three passes over every batch, about 0.5 s more per 200,000 events, inside the completion.
-- claim_learning_run_events now counts both in the pass that sums the learning's evidence
-- (grouping sets: one scan, three groupings) into scratch rows of the run, and the completion
-- applies them. The counts are those the read saw; the completion happens only if nothing the
-- counts depend on changed since (deletions and module edits answer PT412, later votes do not
-- change what was current at the batch's end).

-- The batch's summaries as the run's read counted them (claim_learning_run_events, in the same
-- pass as the learning's sums), until the completion applies them; scratch of the worker's.
create table private.learning_run_batch_evidence (
  run_id uuid not null references public.persona_feedback_learning_runs (id) on delete cascade,
  by_key boolean not null,
  key text not null,
  source public.training_event_source not null,
  reason public.training_event_reason,
  outcome public.evidence_outcome not null,
  events bigint not null,
  vote_changes bigint not null
);
create index learning_run_batch_evidence_run_idx on private.learning_run_batch_evidence (run_id);

comment on table private.learning_run_batch_evidence is
  'A read batch''s events per match key (by_key: named a module_key; key: that module_key, else '
  'the intent_label), source, reason and outcome, with how many replaced an earlier vote; audits '
  'of a draft left out. Written by claim_learning_run_events, applied to persona_run_evidence by '
  'the completion. Read by no API role.';

create table private.learning_run_batch_votes (
  run_id uuid not null references public.persona_feedback_learning_runs (id) on delete cascade,
  day date not null,
  intent_label text not null,
  module_key text,
  reason public.training_event_reason,
  score smallint not null,
  votes bigint not null
);
create index learning_run_batch_votes_run_idx on private.learning_run_batch_votes (run_id);

comment on table private.learning_run_batch_votes is
  'A read batch''s net change of persona_feedback_daily per bucket (the UTC day a vote was cast, '
  'intent_label, module_key, reason, score): +1 for each feedback vote current at the batch''s '
  'end, -1 for each earlier vote one of them replaced that an earlier run learned. Written by '
  'claim_learning_run_events, applied by the completion. Read by no API role.';

grant select, insert, delete on private.learning_run_batch_evidence,
  private.learning_run_batch_votes to service_role;


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

  -- The batch's summaries for the owner views, written by this pass (below) and applied by the
  -- completion; a read before this one (a takeover, a read again) leaves nothing behind, nor
  -- does a run of the twin that ended without completing.
  delete from private.learning_run_batch_evidence x
  using public.persona_feedback_learning_runs r
  where x.run_id = r.id and r.twin_id = v_run.twin_id and (r.id = v_run.id or r.status <> 'running');
  delete from private.learning_run_batch_votes x
  using public.persona_feedback_learning_runs r
  where x.run_id = r.id and r.twin_id = v_run.twin_id and (r.id = v_run.id or r.status <> 'running');

  -- One streaming pass over the batch: each vote's decayed weight (a vote that replaced an earlier
  -- one also retracts that one), summed per key it matches by (its module_key if given, else its
  -- intent_label), and only then matched to the modules: the join takes one row per key, not per
  -- vote, so its cost does not depend on the plan or the twin's module count. A key no module
  -- serves lands in the null group (unmatched); an intent several modules serve counts for each.
  -- The same pass counts the batch for the owner views (grouping sets: one scan, three sums).
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
           e.reason, e.created_at, e.audit_of_draft, e.supersedes_id is not null as changed,
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
           p.reason, p.created_at, p.audit_of_draft, false, 1.0::float8
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
           v.sign, v.source, v.reason, v.module_key, v.intent_label, v.score, v.audit_of_draft,
           v.changed, v.current,
           case when coalesce(v.score > 0, v.passed) then 'success'
                when v.score = 0 then 'neutral'
                else 'failure' end::public.evidence_outcome as outcome,
           (v.created_at at time zone 'UTC')::date as day,
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
  -- grouping(w.source, w.day): 3 for the learning's keys, 1 for the run's evidence per key,
  -- source, reason and outcome (events of the batch; audits of a draft left out), 2 for the
  -- daily feedback votes (+1 for each vote current at the batch's end, -1 for each retracted).
  sums as materialized (
    select grouping(w.source, w.day) as set, w.by_key, w.key, w.source, w.reason, w.outcome,
           w.day, w.intent_label, w.module_key, w.score,
           coalesce(sum(w.weight) filter (where w.success), 0) as success,
           coalesce(sum(w.weight) filter (where not w.success), 0) as failure,
           count(*) filter (where w.sign > 0) as events,
           count(*) filter (where w.sign > 0 and not w.audit_of_draft) as evidence,
           count(*) filter (where w.sign > 0 and not w.audit_of_draft and w.changed) as changes,
           coalesce(sum(w.sign * w.current) filter (where w.source = 'user_feedback'), 0)
             as votes
    from weighted w
    group by grouping sets ((w.by_key, w.key),
                            (w.by_key, w.key, w.source, w.reason, w.outcome),
                            (w.day, w.intent_label, w.module_key, w.reason, w.score))
  ),
  saved_evidence as (
    insert into private.learning_run_batch_evidence
      (run_id, by_key, key, source, reason, outcome, events, vote_changes)
    select v_run.id, x.by_key, x.key, x.source, x.reason, x.outcome, x.evidence, x.changes
    from sums x where x.set = 1 and x.evidence > 0
  ),
  saved_votes as (
    insert into private.learning_run_batch_votes
      (run_id, day, intent_label, module_key, reason, score, votes)
    select v_run.id, x.day, x.intent_label, x.module_key, x.reason, x.score, x.votes
    from sums x where x.set = 2 and x.votes <> 0
  ),
  per_module as (
    select t.module_id, sum(k.success) as success, sum(k.failure) as failure,
           sum(k.events) as events
    from sums k
    left join targets t on t.by_key = k.by_key and t.key = k.key
    where k.set = 3
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
  'events_unmatched, evidence_generation and rebuilt_modules on the run, and the batch''s '
  'summaries for the owner views (private.learning_run_batch_evidence and _votes, which the '
  'completion applies). Out: jsonb {run (without '
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

-- Writes a completed run's batch into the two summary tables, in the completion's transaction,
-- from what the run's read counted (no second pass over the batch).
create or replace function private.summarize_completed_run()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if new.batch_last_event_id is null or new.batch_last_event_id <= new.batch_after_event_id then
    return null;
  end if;

  -- The read's counts per key, matched to the modules now: the same as at the read, since a
  -- module edit since then would have refused the completion (PT412).
  insert into public.persona_run_evidence
    (run_id, twin_id, module_id, source, reason, outcome, events, vote_changes)
  with targets as (
    select true as by_key, m.module_key as key, m.id as module_id
    from public.persona_modules m where m.twin_id = new.twin_id
    union all
    select false, m.intent_label, m.id
    from public.persona_modules m where m.twin_id = new.twin_id
  )
  select new.id, new.twin_id, t.module_id, k.source, k.reason, k.outcome,
         sum(k.events), sum(k.vote_changes)
  from private.learning_run_batch_evidence k
  left join targets t on t.by_key = k.by_key and t.key = k.key
  where k.run_id = new.id
  group by 3, 4, 5, 6;

  -- Existing buckets take their delta (a retraction is negative); new buckets are inserted. An
  -- insert checks votes_not_negative before any ON CONFLICT, hence the two steps.
  with delta as (
    select x.day, x.intent_label, x.module_key, x.reason, x.score, x.votes
    from private.learning_run_batch_votes x where x.run_id = new.id
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
  delete from private.learning_run_batch_evidence x where x.run_id = new.id;
  delete from private.learning_run_batch_votes x where x.run_id = new.id;
  return null;
end;
$$;

comment on function private.summarize_completed_run() is
  'Trigger (after update of status on persona_feedback_learning_runs, when a run becomes '
  'completed): adds the run''s batch to persona_run_evidence (events per module, source, reason '
  'and outcome; audits of a draft left out) and its net feedback votes to persona_feedback_daily, '
  'from what the run''s read counted (private.learning_run_batch_evidence and _votes, then '
  'emptied). Security definer: the summaries are written by no API role. Raises nothing of its '
  'own (a vote count below 0 would be 23514 votes_not_negative, and roll the completion back).';


-- A run that read its batch before this migration has no scratch rows: it reads again (the
-- completion refuses a run whose batch was not read, 55000, and the worker retries the attempt).
update public.persona_feedback_learning_runs r
set events_scanned = null
where r.status = 'running' and r.events_scanned is not null;
