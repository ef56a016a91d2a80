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

-- 3. A rollback of the spec the owner saw. rollback_persona_spec rolled back whatever was
-- published: a double click went back two steps. p_spec_id (optional) names the spec meant;
-- another spec published is PT409 and nothing changes. The two-argument call still works (the
-- new argument defaults to null); the old signatures are replaced, not overloaded, so that
-- PostgREST finds one function for both calls.
drop function public.rollback_persona_spec(uuid, text);
drop function private.rollback_persona_spec(uuid, text);

-- Rolls the caller's twin back to the spec published before the current one, by hand; the
-- rollback is recorded as a completed run (trigger owner_rollback) carrying the reason. Given
-- the spec the owner saw published, it rolls back only that one: a second click (or a second
-- tab) finds it rolled back already and changes nothing, instead of going back another step.
create function private.rollback_persona_spec(
  p_twin_id uuid, p_reason text, p_spec_id uuid default null
)
returns public.persona_feedback_learning_runs
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_current public.persona_specs;
  v_previous public.persona_specs;
  v_run public.persona_feedback_learning_runs;
begin
  if p_twin_id is null or not private.is_twin_owner(p_twin_id) then
    raise exception using
      errcode = '42501',
      message = format('twin_id: twin %s does not exist or is not yours', p_twin_id);
  end if;
  if p_reason is null or char_length(btrim(p_reason)) not between 1 and 500 then
    raise exception using
      errcode = '22023',
      message = 'p_reason: say why the spec is rolled back (1 to 500 characters)';
  end if;
  -- The twin's row lock orders this rollback with a run completing (and maybe publishing).
  perform 1 from public.twins t where t.id = p_twin_id for update;

  select * into v_current from public.persona_specs s
  where s.twin_id = p_twin_id and s.status = 'published';
  if v_current.id is null then
    raise exception using
      errcode = 'PT409',
      message = format('twin %s has no published spec to roll back', p_twin_id);
  end if;
  if p_spec_id is not null and p_spec_id <> v_current.id then
    raise exception using
      errcode = 'PT409',
      message = format('p_spec_id: spec %s is not the published spec of twin %s (version %s '
                       'is); nothing was rolled back', p_spec_id, p_twin_id, v_current.version);
  end if;
  -- The spec published before it: the last one archived that had been published and was not
  -- itself rolled back.
  select * into v_previous from public.persona_specs s
  where s.twin_id = p_twin_id and s.status = 'archived' and s.published_at is not null
    and s.rolled_back_at is null
  order by s.archived_at desc, s.version desc
  limit 1;
  if v_previous.id is null then
    raise exception using
      errcode = 'PT409',
      message = format('twin %s: spec version %s is the only spec published; there is nothing '
                       'to roll back to', p_twin_id, v_current.version);
  end if;

  insert into public.persona_feedback_learning_runs (
    twin_id, status, trigger, requested_by, safe_mode, attempts, max_attempts, events_scanned,
    events_processed, events_unmatched, modules_updated, gate_passed, gate_report,
    publish_decision, published_spec_id, started_at, finished_at
  )
  values (
    p_twin_id, 'completed', 'owner_rollback', (select auth.uid()), false, 1, 1, 0, 0, 0, 0, true,
    jsonb_build_object('rollback', jsonb_build_object(
      'reason', btrim(p_reason), 'from_spec_id', v_current.id, 'from_version', v_current.version,
      'to_spec_id', v_previous.id, 'to_version', v_previous.version)),
    'published', v_previous.id, now(), now()
  )
  returning * into v_run;

  perform private.roll_back_spec(p_twin_id, v_current.id, v_previous.id,
                                 format('owner: %s', btrim(p_reason)));
  update public.persona_spec_watches w
  set state = 'rolled_back', concluded_at = now(), last_run_id = v_run.id
  where w.twin_id = p_twin_id and w.spec_id = v_current.id
    and w.state in ('watching', 'regressed');
  return v_run;
end;
$$;

comment on function private.rollback_persona_spec(uuid, text, uuid) is
  'Owner RPC body (called by public.rollback_persona_spec). In: a twin id, the reason (1-500 '
  'characters, trimmed) and optionally the spec to roll back (null: whatever is published). '
  'Out: the completed run (trigger owner_rollback, requested_by = the '
  'caller, gate_report {rollback {reason, from_spec_id, from_version, to_spec_id, to_version}}, '
  'publish_decision published, published_spec_id = the spec published again) that records the rollback: the published spec is '
  'archived with rollback_reason "owner: <reason>" and rolled_back_at, the spec published before '
  'it (the latest archived one that had been published and was not rolled back) is published '
  'again, and a watch of the rolled-back spec (watching, or regressed: an alert acted on) ends '
  'rolled_back. Raises 42501 (HTTP 403) '
  '"twin_id: twin <id> does not exist or is not yours" when the caller does not own the twin '
  '(the same for a missing twin), 22023 for a missing or over-long reason, PT409 (HTTP 409) '
  'when the twin has no published spec or no earlier one to go back to, or p_spec_id is given '
  'and is not the published spec ("p_spec_id: spec <id> is not the published spec of twin <id> '
  '(version <n> is); nothing was rolled back": a repeated click); nothing changes then. '
  'Security definer: owners may not write specs'' status or runs themselves.';

grant execute on function private.rollback_persona_spec(uuid, text, uuid) to authenticated;

-- The API face of private.rollback_persona_spec: POST /rest/v1/rpc/rollback_persona_spec.
create function public.rollback_persona_spec(
  p_twin_id uuid, p_reason text, p_spec_id uuid default null
)
returns public.persona_feedback_learning_runs
language sql
set search_path = ''
as $$
  select * from private.rollback_persona_spec(p_twin_id, p_reason, p_spec_id);
$$;

comment on function public.rollback_persona_spec(uuid, text, uuid) is
  'Owner RPC (POST /rest/v1/rpc/rollback_persona_spec). In: p_twin_id, p_reason (1-500 '
  'characters), p_spec_id (optional, default null: the spec the owner means to roll back; the '
  'call changes nothing unless it is the published one). Out: the completed run (trigger owner_rollback) recording the rollback: the '
  'published spec archived with the reason and time, the spec published before it published '
  'again. Raises 42501 (HTTP 403) "twin_id: twin <id> does not exist or is not yours" when the '
  'caller does not own the twin, 22023 for a missing or over-long reason, PT409 (HTTP 409) '
  '"twin <id> has no published spec to roll back", "... there is nothing to roll back to" or '
  '"p_spec_id: spec <id> is not the published spec of twin <id> (version <n> is); nothing was '
  'rolled back"; nothing changes then.';

grant execute on function public.rollback_persona_spec(uuid, text, uuid) to authenticated;

revoke execute on function
  private.rollback_persona_spec(uuid, text, uuid),
  public.rollback_persona_spec(uuid, text, uuid)
from public;

