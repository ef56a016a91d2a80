-- A learning run's two heavy statements, cheaper (issue 11, bench case 1). What each call
-- returns, records and counts is unchanged.
--
-- claim_learning_run_events read each event of the batch through a lateral pair of rows: the
-- vote itself, and the retraction of the vote it replaced when an earlier run had learned that
-- one. Measured on 200,000 events of one twin (the statement alone, best of 5, quiet machine):
-- 404 ms, of which the pair of rows took about 140 ms. The retractions are now a second branch
-- of the union that reads only the batch's vote changes: 261 ms as a second pass over the
-- batch's pages, 225 ms through an index of the vote changes in arrival order
-- (persona_training_events_vote_changes_idx: one more index entry per vote change, none for
-- other events). And the call now always plans for its own batch: plpgsql's generic plan,
-- which it may settle on after five calls on one connection, read the batch in 0.5 s.
-- With the retractions in a branch of their own, estimated at a third of the batch (a twentieth
-- or less in fact), the planner sorted the batch on its seven group columns instead of hashing
-- it (0.23 s instead of 0.15 s for 100,000 events): the call runs with enable_sort off.
--
-- The completion's daily feedback summary (private.summarize_completed_run) updated existing
-- buckets through a merge join that sorted every bucket of the twin, then inserted the rest: 81
-- ms for 5,500 buckets against a twin's 10,000. Additions are now one upsert on the bucket's key
-- (43 ms); retractions, which cannot go through an insert (votes_not_negative is checked before
-- ON CONFLICT), update their buckets apart. A retraction that finds no bucket, or one holding
-- fewer votes (the summary edited by hand), no longer fails every run of the twin: the twin's
-- summary is counted again from its votes.
--
-- And the three readers of a vote change agree on a hand-edited link (a review found them
-- apart): a vote named by another vote's supersedes_id counts as replaced only when it is
-- marked superseded (superseded_at), and once however many votes name it. The claim's
-- retraction and the rebuild (private.rebuild_key_sums) checked neither, while the summaries
-- and the rebuild's first part went by superseded_at: a pending vote pointed at a current
-- learned one by hand took that vote out of the daily summary for good, or counted it twice in
-- a module until the next run.

create index persona_training_events_vote_changes_idx
  on public.persona_training_events (twin_id, id) where supersedes_id is not null;

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

create or replace function private.count_feedback_daily_again(p_twin_ids uuid[])
returns void
language sql
security definer
set search_path = ''
as $$
  delete from public.persona_feedback_daily d where d.twin_id = any (p_twin_ids);
  insert into public.persona_feedback_daily
    (twin_id, day, intent_label, module_key, reason, score, votes)
  select e.twin_id, (e.created_at at time zone 'UTC')::date, e.intent_label, e.module_key,
         e.reason, e.score, count(*)
  from public.twins t
  join public.persona_training_events e on e.twin_id = t.id
  where t.id = any (p_twin_ids) and e.source = 'user_feedback'
    and e.id <= t.learned_through_event_id
    and (e.superseded_at is null
         or exists (select 1 from public.persona_training_events x
                    where x.twin_id = e.twin_id and x.supersedes_id = e.id
                      and x.id > t.learned_through_event_id))
  group by 1, 2, 3, 4, 5, 6;
$$;

comment on function private.count_feedback_daily_again(uuid[]) is
  'In: twin ids. Replaces each twin''s rows of persona_feedback_daily by a count of its learned '
  'feedback votes (id <= learned_through_event_id) current at the cursor (never replaced, or '
  'replaced by a vote after the cursor), per UTC day, intent label, module key, reason and score. '
  'Costs a read of the twins'' learned votes. Out: nothing. Raises nothing of its own.';

revoke execute on function private.count_feedback_daily_again(uuid[]) from public;

create or replace function private.summarize_completed_run()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_summary private.learning_run_summaries;
  v_retracted bigint;
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

  -- A retraction (a negative delta) meets a bucket an earlier run filled: updated in place, and
  -- a bucket left at 0 goes.
  update public.persona_feedback_daily d
  set votes = d.votes + x.votes
  from unnest(v_summary.feedback_daily) x
  -- Equalities on coalesced keys, not IS NOT DISTINCT FROM: those can be hashed, so the cost
  -- follows the batch, not the twin's history of buckets.
  where x.votes < 0 and d.twin_id = new.twin_id and d.day = date '1970-01-01' + x.day
    and d.intent_label = x.intent_label
    and coalesce(d.module_key, '') = coalesce(x.module_key, '')
    and coalesce(d.reason::text, '') = coalesce(x.reason::text, '') and d.score = x.score
    and d.votes + x.votes >= 0;
  get diagnostics v_retracted = row_count;
  if v_retracted < (select count(*) from unnest(v_summary.feedback_daily) x where x.votes < 0)
  then
    -- The summary holds less than this run retracts (a bucket missing or short: an edit of the
    -- summary by hand): it is counted again from the twin's learned votes, this batch included
    -- (the cursor has moved), rather than fail every run of the twin on votes_not_negative.
    perform private.count_feedback_daily_again(array[new.twin_id]);
    return null;
  end if;
  if v_retracted > 0 then
    delete from public.persona_feedback_daily d where d.twin_id = new.twin_id and d.votes = 0;
  end if;
  -- Everything else adds: one upsert on the bucket's key (NULLS NOT DISTINCT). Only positive
  -- deltas go through it: an insert checks votes_not_negative before ON CONFLICT is considered.
  -- It costs half the update-then-insert it replaces (which sorted the twin's every bucket).
  insert into public.persona_feedback_daily as d
    (twin_id, day, intent_label, module_key, reason, score, votes)
  select new.twin_id, date '1970-01-01' + x.day, x.intent_label, x.module_key, x.reason, x.score,
         x.votes
  from unnest(v_summary.feedback_daily) x
  where x.votes > 0
  on conflict on constraint persona_feedback_daily_key
  do update set votes = d.votes + excluded.votes;
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
  'back. A retraction whose bucket is missing or holds fewer votes (the summary edited by hand) '
  'counts the twin''s summary again from its learned votes (private.count_feedback_daily_again).';

create or replace function private.rebuild_key_sums(
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
