-- A sparse batch is read through the (twin_id, id) index whatever the twin's share of the table
-- (issue 15, bench case 2).
--
-- claim_learning_run_events bounds a batch by `twin_id = t and id > after and id <= last`. For a
-- twin holding most of the table the planner expected most of that id range to be the twin's and
-- read the primary key's range, filtering out every other twin's events in it: for a 50,000-event
-- batch among 200,000 of another twin (ids interleaved), 249,996 rows read for 50,000, so a run
-- of a twin with a 5,000,000-event history cost 1.24-1.37 times the same run of a twin with none.
-- A batch of more than 10,000 events whose first 10,001 span more than twice as many ids (other
-- twins write between them) now has its bounds also given as row comparisons on (twin_id, id),
-- which only that index takes: 12 ms instead of 37 ms for that read. A dense batch (a twin alone
-- in its range, bench case 1) keeps its plan: given to it, the row comparisons were estimated at
-- one row and the batch read through that index at 40-60 ms instead of a 20 ms bitmap of the
-- primary key. Nothing else changes.

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
