-- Section: the production watch, after a third review (issue 14).

-- 1. An audit's origin is recorded, not inferred. The watch took an audit of a trace also
-- audited under any other spec for a gate's replay and counted it on neither side. That was
-- wrong both ways: production failures of the live spec that an owner re-audits under the next
-- draft left the old side (80% production on both sides read 160/160 against 160/200 and v2 was
-- rolled back), and a 30-point drop hid when the next draft was gated on the live spec's failed
-- production traces (they left the new side). Now the audit pipeline says where the audited
-- answer came from: production (a user got it from the live spec) or replay (regenerated
-- offline). Left out, an audit of a draft is a replay (a draft never answered a user) and any
-- other one production. The watch counts production audits only; the gate pairs any audit.
create type public.audit_origin as enum ('production', 'replay');
comment on type public.audit_origin is
  'Where an audited answer came from: production (an answer the spec gave a user while it was '
  'live) or replay (an answer regenerated offline: a gate''s pairing, a hard set, a draft).';

alter table public.persona_training_events add column audit_origin public.audit_origin;

-- The audits recorded before this migration keep the origin the watch gave them until now (a
-- running watch's evidence does not change under it): a replay when it audited a draft or its
-- trace was audited under another spec of the twin, else production.
update public.persona_training_events e
set audit_origin = case
  when e.audit_of_draft or exists (
    select 1 from public.persona_training_events p
    where p.twin_id = e.twin_id and p.trace_id = e.trace_id and p.source = 'persona_audit'
      and p.persona_spec_id is distinct from e.persona_spec_id)
  then 'replay' else 'production' end::public.audit_origin
where e.source = 'persona_audit';

alter table public.persona_training_events
  -- Every audit has an origin (the database fills in a default: mark_audit_of_draft), feedback
  -- none; a draft never answered a user, so its audits are replays.
  add constraint audit_origin_on_audits_only
    check ((source = 'persona_audit') = (audit_origin is not null)),
  add constraint audit_origin_replay_for_drafts
    check (not audit_of_draft or audit_origin = 'replay');

comment on column public.persona_training_events.audit_origin is
  'Audits: production (the audited answer was given to a user by the audited spec while it was '
  'live: the production watch''s evidence) or replay (regenerated offline for a comparison: a '
  'gate''s pairing, a hard set; the gate pairs any audit, the watch counts none). The audit '
  'pipeline sends it; left out, an audit of a draft is a replay and any other a production '
  'audit. Null on feedback.';
comment on constraint audit_origin_on_audits_only on public.persona_training_events is
  'Every audit has an origin (production or replay; the database fills in a default), feedback '
  'none.';
comment on constraint audit_origin_replay_for_drafts on public.persona_training_events is
  'An audit of a draft is a replay: a draft never answered a user, so it has no production.';

-- The probe of the inference is gone, and the index that served it.
drop index public.persona_training_events_audit_traces_idx;

create or replace function private.mark_audit_of_draft()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if tg_op = 'UPDATE' and new.persona_spec_id is null then
    -- The spec was deleted (the foreign key sets null) or detached: what it was stays.
    new.audit_of_draft := old.audit_of_draft;
  else
    new.audit_of_draft := exists (
      select 1 from public.persona_specs s
      where s.id = new.persona_spec_id and s.status = 'draft'
    );
  end if;
  -- A draft never answered a user: its audits are replays. Any other spec's audit is taken for
  -- production unless the pipeline says replay (audit_origin_replay_for_drafts refuses a
  -- draft's audit sent as production).
  if tg_op = 'INSERT' and new.audit_origin is null then
    new.audit_origin := case when new.audit_of_draft then 'replay' else 'production'
                        end::public.audit_origin;
  end if;
  return new;
end;
$$;

comment on function private.mark_audit_of_draft() is
  'Trigger (before insert, or update of persona_spec_id, of audits on persona_training_events): '
  'sets audit_of_draft to whether the audited spec is a draft now, whatever the writer said; '
  'when persona_spec_id becomes null (the spec deleted), keeps the value it had. On insert, an '
  'audit sent without audit_origin gets replay when it audits a draft, else production; one '
  'sent with it keeps it. Security definer: it reads specs whoever writes. Raises nothing of '
  'its own (the check constraints on audit_origin refuse what does not fit).';

-- The watch counts production audits only (the shape of its answer is unchanged; what it counts
-- is not, and the worker's decision rule changed with it: the worker's version moves here).
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
                 and e.audit_origin = 'production'))
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
                 and e.audit_origin = 'production'))
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
  'new_passed, old_n, old_passed, strata [{module_key (null: matched to no module), new_n, '
  'new_passed, old_n, old_passed}: a partition of the twin-wide counts, each event under the '
  'module it is matched to (the first by module_key when several match), by module_key, nulls '
  'last]}: one per kind, audits then votes], modules [{scope module, kind, module_key, new_n, '
  'new_passed, old_n, old_passed} per module and kind with evidence, by module_key then kind]}}. '
  'Kinds are never pooled. votes: current votes with score +1 (passed) or -1 cast from '
  'published_at to T (new) against those cast from window_start = max(published_at - (T - '
  'published_at), previous_published_at) to published_at (old); audits: audits of spec_id from '
  'published_at to T (new) against audits of previous_spec_id from window_start to published_at '
  '(old), production audits only (audit_origin production; a replay counts on neither side). '
  'Only events of the batch or before it; matched '
  'to modules by module_key, else intent_label. Counts, not weights; each side at most its '
  'latest 50,000 events (through the index on (twin_id, created_at)). Raises P0002 and PT409 '
  '(HTTP 409, stale lease) as private.lock_leased_run; 55000 when the run has no batch.';

-- 2. A rollback by hand runs no gate: its run no longer claims that a gate passed. Completed
-- runs keep their figures, gate_passed excepted for trigger owner_rollback, where it is null.
update public.persona_feedback_learning_runs set gate_passed = null
where trigger = 'owner_rollback';

alter table public.persona_feedback_learning_runs
  drop constraint figures_when_completed,
  -- A completed run has its figures; gate_passed only where a gate ran (a rollback by hand ran
  -- none, and its run says so with null rather than claiming a pass).
  add constraint figures_when_completed check (
    status <> 'completed' or (
      events_scanned is not null and events_processed is not null and modules_updated is not null
      and (gate_passed is not null or trigger = 'owner_rollback')
      and gate_report is not null and publish_decision is not null
    )
  ),
  add constraint gate_passed_null_on_owner_rollback
    check (trigger <> 'owner_rollback' or gate_passed is null);

comment on column public.persona_feedback_learning_runs.gate_passed is
  'Whether the regression gate passed (true also when there was no draft to judge); null until '
  'the run completes, and always for a rollback by hand (trigger owner_rollback), which runs no '
  'gate.';
comment on constraint figures_when_completed on public.persona_feedback_learning_runs is
  'A completed run has its figures: events scanned and processed, modules updated, gate report '
  'and publish decision, and gate_passed unless it is a rollback by hand (owner_rollback).';
comment on constraint gate_passed_null_on_owner_rollback on public.persona_feedback_learning_runs
  is 'A rollback by hand runs no gate, so its run claims no gate outcome: gate_passed is null.';
comment on column public.persona_feedback_learning_runs.trigger is
  'owner_request (request_learning_run), schedule (pending evidence), manual (operator CLI) or '
  'owner_rollback (rollback_persona_spec: a rollback by hand, no gate).';
comment on column public.persona_twin_overview.last_run_trigger is
  'owner_request, schedule, manual or owner_rollback (a rollback by hand).';
comment on column public.persona_twin_overview.last_run_gate_passed is
  'Whether the regression gate passed; null unless completed, and for a rollback by hand '
  '(owner_rollback: no gate ran).';
comment on column public.persona_twin_overview.last_run_hold_reason is
  'Why it held: no_draft, safe_mode, gate_failed or rolled_back (its production watch rolled '
  'the spec back).';

create or replace function private.rollback_persona_spec(
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
      message = format('twin %s: no spec was published before version %s that was not itself '
                       'rolled back; there is nothing to roll back to', p_twin_id,
                       v_current.version);
  end if;

  insert into public.persona_feedback_learning_runs (
    twin_id, status, trigger, requested_by, safe_mode, attempts, max_attempts, events_scanned,
    events_processed, events_unmatched, modules_updated, gate_report,
    publish_decision, published_spec_id, started_at, finished_at
  )
  values (
    -- No gate_passed: no gate ran (constraint gate_passed_null_on_owner_rollback).
    p_twin_id, 'completed', 'owner_rollback', (select auth.uid()), false, 1, 1, 0, 0, 0, 0,
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
  'caller, gate_passed null: no gate ran, gate_report {rollback {reason, from_spec_id, from_version, to_spec_id, to_version}}, '
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

comment on function public.rollback_persona_spec(uuid, text, uuid) is
  'Owner RPC (POST /rest/v1/rpc/rollback_persona_spec). In: p_twin_id, p_reason (1-500 '
  'characters), p_spec_id (optional, default null: the spec the owner means to roll back; the '
  'call changes nothing unless it is the published one). Out: the completed run (trigger '
  'owner_rollback, gate_passed null: no gate ran) recording the rollback: the '
  'published spec archived with the reason and time, the spec published before it published '
  'again. Raises 42501 (HTTP 403) "twin_id: twin <id> does not exist or is not yours" when the '
  'caller does not own the twin, 22023 for a missing or over-long reason, PT409 (HTTP 409) '
  '"twin <id> has no published spec to roll back", "... there is nothing to roll back to" or '
  '"p_spec_id: spec <id> is not the published spec of twin <id> (version <n> is); nothing was '
  'rolled back"; nothing changes then.';

create or replace function public.worker_schema_version()
returns text
language sql
-- stable, not immutable: PostgreSQL folds an immutable call into the plan, and PostgREST
-- reuses a connection's prepared plans across roles, so an anon request could read the
-- value a service-role request planned without its EXECUTE being checked.
stable
set search_path = ''
as $$
  select '20261217000100'::text;
$$;
