-- The production watch places a vote by its feedback's first_vote_at (stored on every vote since
-- 20261219000100) instead of joining to the first vote's row: a deleted first vote no longer moves
-- a changed vote to the window of its latest change.
-- A run that publishes the next spec makes the running watch's final test first: the watch may
-- end superseded in the run's report (complete_learning_run takes that state only from a run
-- that publishes), where the publish used to end it untested.

create or replace function public.claim_production_watch(p_run_id uuid, p_lease_token uuid)
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

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261219000200'::text;
$$;
