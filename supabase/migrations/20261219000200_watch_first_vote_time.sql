-- The production watch places a vote by its feedback's first_vote_at (stored on every vote since
-- 20261219000100) instead of joining to the first vote's row: a deleted first vote no longer moves
-- a changed vote to the window of its latest change.

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

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261219000200'::text;
$$;
