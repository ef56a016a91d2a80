-- Delta: several learning runs per round trip (issue 15, case 6's drain). A busy worker claims
-- up to p_max_runs runs in one call (claim_learning_runs), reads their batches and production
-- watches in a second (read_learning_runs) and completes them in a third
-- (complete_learning_runs), each run through the one-run functions, which are unchanged.
-- Runs that need a rebuild or hold a large batch go through the one-run path as before.

-- claim_learning_run_events: a batch of at most 10,000 events is read with generic plans.
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

  -- A batch of at most 10,000 events (every run the batched path reads, and most runs of a busy
  -- twin) is read with each statement's generic plan, made once per connection: planning the
  -- batch's statement anew cost 1.7 ms of the 2.3 ms a 5-event run took (case 6). A larger
  -- batch keeps its custom plan (above). The count stops at 10,001 index entries.
  if (select count(*) from (
        select 1 from public.persona_training_events e
        where e.twin_id = v_run.twin_id and e.id > v_run.batch_after_event_id
          and e.id <= v_run.batch_last_event_id
        limit 10001) b) <= 10000 then
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

-- Section: several runs per round trip (issue 15). A busy worker claims up to p_max_runs runs
-- in one call (claim_learning_runs), reads their batches and watches in a second
-- (read_learning_runs) and completes them in a third (complete_learning_runs). Each reuses the
-- one-run function (claim_learning_run, claim_learning_run_events, claim_production_watch,
-- complete_learning_run) per run, so every rule of those holds for each run. The claim is a
-- call of its own because its first claim takes the share lock on the events that holds
-- inserts up until the transaction ends: reading batches in that transaction would hold ingest
-- up for the whole read.

-- claim_learning_run in two parts that claim_learning_runs shares: the candidates, and the
-- start of one run.
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

grant execute on function
  public.claim_learning_runs(text, integer, integer),
  public.read_learning_runs(jsonb),
  public.complete_learning_runs(jsonb)
to service_role;
revoke execute on function
  public.claim_learning_runs(text, integer, integer),
  public.read_learning_runs(jsonb),
  public.complete_learning_runs(jsonb)
from public;

-- The worker calls the batched functions: its version moves here.
create or replace function public.worker_schema_version()
returns text
language sql
-- stable, not immutable: PostgreSQL folds an immutable call into the plan, and PostgREST
-- reuses a connection's prepared plans across roles, so an anon request could read the
-- value a service-role request planned without its EXECUTE being checked.
stable
set search_path = ''
as $$
  select '20261218000100'::text;
$$;
