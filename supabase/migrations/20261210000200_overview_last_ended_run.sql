-- Section: the twin overview shows the last run that ended, a run under way apart, and the watch.
--
-- A run queued or running hid the last completed run's gate outcome from the overview (its
-- "last run" was the newest of any status) until it ended; the owner checking in saw no gate.
-- The production watch's state was not there at all.

create or replace view public.persona_twin_overview
with (security_invoker = true)
as
select t.id as twin_id, t.name,
       coalesce(mods.modules, 0) as modules,
       coalesce(mods.active, 0) as modules_active,
       coalesce(mods.probation, 0) as modules_probation,
       coalesce(mods.disabled, 0) as modules_disabled,
       coalesce(mods.insufficient_data, 0) as modules_insufficient_data,
       pub.id as published_spec_id, pub.version as published_version,
       pub.published_at,
       dr.id as draft_spec_id, dr.version as draft_version, dr.updated_at as draft_updated_at,
       lr.id as last_run_id, lr.status as last_run_status, lr.trigger as last_run_trigger,
       lr.created_at as last_run_created_at, lr.finished_at as last_run_finished_at,
       lr.gate_passed as last_run_gate_passed,
       array(
         select c ->> 'name' from jsonb_array_elements(
           case when jsonb_typeof(lr.gate_report -> 'checks') = 'array'
                then lr.gate_report -> 'checks' else '[]' end) c
         where c ->> 'verdict' is distinct from 'pass'
       ) as last_run_failed_checks,
       lr.publish_decision as last_run_publish_decision,
       lr.hold_reason as last_run_hold_reason,
       lr.error as last_run_error,
       coalesce(pend.events, 0) as pending_events,
       pend.oldest as pending_since,
       nr.status as next_run_status,
       wa.state as watch_state,
       wa.spec_id as watch_spec_id
from public.twins t
left join lateral (
  select count(*)::integer as modules,
         (count(*) filter (where m.status = 'active'))::integer as active,
         (count(*) filter (where m.status = 'probation'))::integer as probation,
         (count(*) filter (where m.status = 'disabled'))::integer as disabled,
         (count(*) filter (where m.status = 'insufficient_data'))::integer as insufficient_data
  from public.persona_modules m where m.twin_id = t.id
) mods on true
left join lateral (
  select s.id, s.version, s.published_at from public.persona_specs s
  where s.twin_id = t.id and s.status = 'published'
) pub on true
left join lateral (
  select s.id, s.version, s.updated_at from public.persona_specs s
  where s.twin_id = t.id and s.status = 'draft'
  order by s.version desc limit 1
) dr on true
-- The last run that ended: a run queued or running since must not hide its gate outcome.
left join lateral (
  select r.* from public.persona_feedback_learning_runs r
  where r.twin_id = t.id and r.status in ('completed', 'failed')
  order by r.created_at desc limit 1
) lr on true
left join lateral (
  select r.status from public.persona_feedback_learning_runs r
  where r.twin_id = t.id and r.status in ('queued', 'running')
  order by r.status = 'running' desc limit 1
) nr on true
left join lateral (
  select w.state, w.spec_id from public.persona_spec_watches w
  where w.twin_id = t.id
  order by w.created_at desc limit 1
) wa on true
left join lateral (
  select count(*)::integer as events, min(e.created_at) as oldest
  from public.persona_training_events e
  where e.twin_id = t.id and e.id > t.learned_through_event_id
) pend on true;


comment on view public.persona_twin_overview is
  'A twin at a glance: its modules by status, its published spec and latest draft, its last run '
  'that ended with the gate''s outcome, a run under way, the evidence waiting for the next run, '
  'and its latest production watch. One row per twin.';
comment on column public.persona_twin_overview.last_run_id is
  'The twin''s latest run that ended (completed or failed); null before its first.';
comment on column public.persona_twin_overview.last_run_status is 'completed or failed.';
comment on column public.persona_twin_overview.last_run_finished_at is
  'When it completed or failed.';
comment on column public.persona_twin_overview.next_run_status is
  'running or queued when a run of the twin is under way or waiting; null otherwise.';
comment on column public.persona_twin_overview.watch_state is
  'The state of the twin''s latest production watch (watching, passed, regressed, expired, '
  'rolled_back, superseded); null when no spec was ever watched.';
comment on column public.persona_twin_overview.watch_spec_id is
  'The spec that watch is about.';
