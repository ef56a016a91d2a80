-- Section: the production watch, after a review (issue 14).

-- 1. Bounded watch and gate settings. watch_expire_days only had to be > 0, which NaN and
-- Infinity satisfy (NaN sorts above every number in PostgreSQL): one owner's NaN, Infinity or
-- 1e12 made the scheduler's make_interval fail (22008) for every twin, and that twin's runs
-- fail. Each float setting of the watch and gate now has an upper bound, which refuses NaN and
-- Infinity too (watch_margin, watch_alpha, gate_non_inferiority_margin and
-- gate_first_publish_min_lower_bound had one already; wilson_z, the gate's z, did not). The
-- watch's evidence counts are bounded by the 50,000 events a side claim_production_watch
-- counts: a larger watch_pass_evidence could never be reached. Rows over a new bound are
-- clamped to it first (NaN to the column's default), so the constraints can be added.
update public.persona_learning_settings s
set watch_expire_days = case when s.watch_expire_days = 'NaN' then 14
                             else least(s.watch_expire_days, 3650) end,
    watch_min_evidence = least(s.watch_min_evidence, 50000),
    watch_pass_evidence = least(s.watch_pass_evidence, 50000),
    wilson_z = case when s.wilson_z = 'NaN' then 1.96 else least(s.wilson_z, 10) end
where not (s.watch_expire_days <= 3650) or s.watch_min_evidence > 50000
   or s.watch_pass_evidence > 50000 or not (s.wilson_z <= 10);

alter table public.persona_learning_settings
  drop constraint watch_expire_days_positive,
  add constraint watch_expire_days_above_0_to_3650
    check (watch_expire_days > 0 and watch_expire_days <= 3650),
  drop constraint watch_min_evidence_at_least_1,
  add constraint watch_min_evidence_1_to_50000 check (watch_min_evidence between 1 and 50000),
  drop constraint watch_pass_evidence_at_least_1,
  add constraint watch_pass_evidence_1_to_50000 check (watch_pass_evidence between 1 and 50000),
  drop constraint wilson_z_positive,
  add constraint wilson_z_above_0_to_10 check (wilson_z > 0 and wilson_z <= 10);

comment on column public.persona_learning_settings.watch_expire_days is
  'A watch that has not concluded this many days after the publish expires (default 14; more '
  'than 0, at most 3650).';
comment on column public.persona_learning_settings.watch_min_evidence is
  'Votes and audits each side of a comparison (twin-wide or per module) needs to be judged '
  '(default 30; 1 to 50,000).';
comment on column public.persona_learning_settings.watch_pass_evidence is
  'The watch passes once the smaller side of the twin-wide comparison holds this much evidence '
  'with no regression found (default 400; 1 to 50,000: each side counts at most its latest '
  '50,000 events).';
comment on column public.persona_learning_settings.wilson_z is
  'z of the Wilson bounds (module status) and of the gate''s intervals (default 1.96; more than '
  '0, at most 10).';

-- 2. Votes and audits are never pooled, and the audit sides are symmetric. The watch pooled
-- votes and audits into one pass rate, and its old side counted every audit of the replaced
-- spec in the window, the gate's paired baseline audits made just before the publish included,
-- while the new side had no such audits: with no change at all (votes 180/300 before and
-- after, the gate's audits 190/200 of both specs), it read 370/500 against 180/300 and rolled
-- back. Now each kind is its own comparison (worker/watch.py splits the error over 2 kinds x
-- (twin + modules)), and an audit of a trace audited under both specs counts on neither side.
-- The answer's twin is a list (one per kind) and every comparison names its kind: the worker's
-- version moves here.
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
  -- the run's time within the run's batch, counted per kind and match key (module_key if given,
  -- else intent_label), then matched to the modules as learning matches them. An audit of a
  -- trace audited under both specs is the gate's pairing (an offline comparison, made just
  -- before the publish for the replaced spec), not production evidence: it counts on neither
  -- side (found through the audit index, one probe per audit).
  with evidence as (
    -- Each side through the index on (twin_id, created_at), newest first and at most 50,000 of
    -- its events (watch_pass_evidence is at most 50,000): the call's cost is bounded however
    -- long the twin's history and its window; a side with more evidence counts its latest.
    select * from (
      select true as is_new, e.source = 'user_feedback' as is_vote,
             e.module_key is not null as by_key, coalesce(e.module_key, e.intent_label) as key,
             coalesce(e.score > 0, e.passed) as passed
      from public.persona_training_events e
      where e.twin_id = v_run.twin_id
        and e.created_at >= v_watch.published_at and e.created_at <= v_run.learning_time
        and e.id <= v_run.batch_last_event_id
        and ((e.source = 'user_feedback' and e.score <> 0 and e.superseded_at is null)
             or (e.source = 'persona_audit' and e.persona_spec_id = v_watch.spec_id
                 and not exists (
                   select 1 from public.persona_training_events p
                   where p.persona_spec_id = v_watch.previous_spec_id
                     and p.trace_id = e.trace_id and p.source = 'persona_audit'
                     and p.id <= v_run.batch_last_event_id)))
      order by e.created_at desc
      limit 50000
    ) n
    union all
    select * from (
      select false, e.source = 'user_feedback', e.module_key is not null,
             coalesce(e.module_key, e.intent_label), coalesce(e.score > 0, e.passed)
      from public.persona_training_events e
      where e.twin_id = v_run.twin_id
        and e.created_at >= v_start and e.created_at < v_watch.published_at
        and e.id <= v_run.batch_last_event_id
        and ((e.source = 'user_feedback' and e.score <> 0 and e.superseded_at is null)
             or (e.source = 'persona_audit' and e.persona_spec_id = v_watch.previous_spec_id
                 and not exists (
                   select 1 from public.persona_training_events p
                   where p.persona_spec_id = v_watch.spec_id
                     and p.trace_id = e.trace_id and p.source = 'persona_audit'
                     and p.id <= v_run.batch_last_event_id)))
      order by e.created_at desc
      limit 50000
    ) o
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
  sums as (
    -- Twin-wide: every event once, matched to a module or not; both kinds, even without any.
    select d.kind, null::text as module_key,
           coalesce(sum(k.n) filter (where k.is_new), 0) as new_n,
           coalesce(sum(k.passed) filter (where k.is_new), 0) as new_passed,
           coalesce(sum(k.n) filter (where not k.is_new), 0) as old_n,
           coalesce(sum(k.passed) filter (where not k.is_new), 0) as old_passed
    from kinds d
    left join per_key k on k.is_vote = d.is_vote
    group by d.kind
    union all
    -- Per module with evidence (an event whose intent_label several modules share counts for
    -- each, as learning counts it).
    select d.kind, t.module_key,
           coalesce(sum(k.n) filter (where k.is_new), 0),
           coalesce(sum(k.passed) filter (where k.is_new), 0),
           coalesce(sum(k.n) filter (where not k.is_new), 0),
           coalesce(sum(k.passed) filter (where not k.is_new), 0)
    from kinds d
    join per_key k on k.is_vote = d.is_vote
    join targets t on t.by_key = k.by_key and t.key = k.key
    group by d.kind, t.module_key
  )
  select
    (select jsonb_agg(jsonb_build_object(
       'scope', 'twin', 'kind', c.kind, 'module_key', null, 'new_n', c.new_n,
       'new_passed', c.new_passed, 'old_n', c.old_n, 'old_passed', c.old_passed)
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
  'pass_evidence, looks, expire_days}, twin [{scope twin, kind, module_key null, new_n, '
  'new_passed, old_n, old_passed}: one per kind, audits then votes], modules [the same per '
  'module and kind with evidence, by module_key then kind]}}. Kinds are never pooled. votes: '
  'current votes with score +1 (passed) or -1 cast from published_at to T (new) against those '
  'cast from window_start = max(published_at - (T - published_at), previous_published_at) to '
  'published_at (old); audits: audits of spec_id from published_at to T (new) against audits of '
  'previous_spec_id from window_start to published_at (old), neither counting an audit of a '
  'trace audited under both specs (the gate''s pairing). Only events of the batch or before it; '
  'matched to modules by module_key, else intent_label. Counts, not weights; each side at most '
  'its latest 50,000 events (through the index on (twin_id, created_at)). Raises P0002 and PT409 '
  '(HTTP 409, stale lease) as private.lock_leased_run; 55000 when the run has no batch.';

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261214000100'::text;
$$;
