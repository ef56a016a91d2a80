-- Section: the production watch within the API's statement timeout.
--
-- claim_production_watch read the twin's whole history to find the events of its two time
-- windows (0.44-1.8 s at 1,000,000 events here, so past the 8 s timeout on a long enough twin).
-- The windows are now read through an index on (twin_id, created_at), newest first and at most
-- 50,000 events a side: the call's cost follows neither the history nor the window's length.
-- The index costs one more entry per insert.

-- A twin's events by time: the production watch's windows (claim_production_watch).
create index persona_training_events_twin_created_idx
  on public.persona_training_events (twin_id, created_at);

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

  -- Current votes (+1 passes, -1 fails, 0 is no evidence) and the two specs' audits, cast up to
  -- the run's time within the run's batch, counted per match key (module_key if given, else
  -- intent_label), then matched to the modules as learning matches them.
  with evidence as (
    -- Each side through the index on (twin_id, created_at), newest first and at most 50,000 of
    -- its events (125 times the default watch_pass_evidence): the call's cost is bounded however
    -- long the twin's history and its window; a side with more evidence counts its latest.
    select * from (
      select true as is_new, e.module_key is not null as by_key,
             coalesce(e.module_key, e.intent_label) as key,
             coalesce(e.score > 0, e.passed) as passed
      from public.persona_training_events e
      where e.twin_id = v_run.twin_id
        and e.created_at >= v_watch.published_at and e.created_at <= v_run.learning_time
        and e.id <= v_run.batch_last_event_id
        and ((e.source = 'user_feedback' and e.score <> 0 and e.superseded_at is null)
             or (e.source = 'persona_audit' and e.persona_spec_id = v_watch.spec_id))
      order by e.created_at desc
      limit 50000
    ) n
    union all
    select * from (
      select false, e.module_key is not null, coalesce(e.module_key, e.intent_label),
             coalesce(e.score > 0, e.passed)
      from public.persona_training_events e
      where e.twin_id = v_run.twin_id
        and e.created_at >= v_start and e.created_at < v_watch.published_at
        and e.id <= v_run.batch_last_event_id
        and ((e.source = 'user_feedback' and e.score <> 0 and e.superseded_at is null)
             or (e.source = 'persona_audit' and e.persona_spec_id = v_watch.previous_spec_id))
      order by e.created_at desc
      limit 50000
    ) o
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
  'not weights; each side at most its latest 50,000 events (through the index on (twin_id, '
  'created_at)). Raises P0002 and PT409 (HTTP 409, stale lease) as private.lock_leased_run; '
  '55000 when the run has no batch.';
