-- Row-level security as a story of actors: an owner with two twins, another signed-in user, anon
-- and the service role, each shown what they may do and what they may not.
begin;
create extension if not exists pgtap with schema extensions;
select plan(57);

-- The platform (auth) creates the users; the owner's twins and their history exist already.
insert into auth.users (email) values ('owner@rls.test'), ('other@rls.test');
select set_config('test.owner', id::text, true) from auth.users where email = 'owner@rls.test';
select set_config('test.other', id::text, true) from auth.users where email = 'other@rls.test';

insert into public.twins (owner_id, name, feedback_from) values
  (current_setting('test.owner')::uuid, 'Closed twin', 'owner'),
  (current_setting('test.owner')::uuid, 'Open twin', 'any_user');
select set_config('test.closed_twin', id::text, true) from public.twins
where owner_id = current_setting('test.owner')::uuid and name = 'Closed twin';
select set_config('test.open_twin', id::text, true) from public.twins
where owner_id = current_setting('test.owner')::uuid and name = 'Open twin';

insert into public.persona_specs (twin_id, status, spec)
values (current_setting('test.closed_twin')::uuid, 'published', '{"voice": "published"}');
insert into public.persona_modules (twin_id, module_key, intent_label)
values (current_setting('test.closed_twin')::uuid, 'evidence_answers', 'factual_with_evidence');
insert into public.persona_feedback_learning_runs (twin_id, trigger)
values (current_setting('test.closed_twin')::uuid, 'schedule');
insert into public.persona_module_changes (module_id, twin_id, run_id, confidence_before,
  confidence_after, status_before, status_after, success_weight, failure_weight)
select m.id, m.twin_id, r.id, 0.5, 0.6, 'insufficient_data', 'insufficient_data', 1, 0
from public.persona_modules m
join public.persona_feedback_learning_runs r on r.twin_id = m.twin_id
where m.twin_id = current_setting('test.closed_twin')::uuid;
insert into public.persona_training_events
  (twin_id, source, trace_id, passed, intent_label, persona_spec_id)
select s.twin_id, 'persona_audit', 'trace-audit', true, 'factual_with_evidence', s.id
from public.persona_specs s where s.twin_id = current_setting('test.closed_twin')::uuid;


-- Acting as the owner
select set_config('request.jwt.claims',
  json_build_object('sub', current_setting('test.owner'), 'role', 'authenticated')::text, true);
set local role authenticated;

select results_eq(
  $$ select name from public.twins order by name $$,
  $$ values ('Closed twin'), ('Open twin') $$,
  'the owner reads their twins'
);
select lives_ok(
  $$ insert into public.twins (name) values ('Third twin') $$,
  'the owner creates a twin'
);
select results_eq(
  $$ select owner_id from public.twins where name = 'Third twin' $$,
  $$ select current_setting('test.owner')::uuid $$,
  'a new twin belongs to whoever created it'
);
select throws_ok(
  $$ insert into public.twins (name, owner_id) values ('For someone else',
       current_setting('test.other')::uuid) $$,
  '42501', 'permission denied for table twins',
  'the owner cannot create a twin in another user''s name'
);
select lives_ok(
  $$ update public.twins set name = 'Closed twin, renamed', feedback_from = 'owner'
     where id = current_setting('test.closed_twin')::uuid $$,
  'the owner renames a twin'
);
select results_eq(
  $$ select name from public.twins where id = current_setting('test.closed_twin')::uuid $$,
  $$ values ('Closed twin, renamed') $$,
  'the rename is stored'
);
select throws_ok(
  $$ update public.twins set owner_id = current_setting('test.other')::uuid
     where id = current_setting('test.closed_twin')::uuid $$,
  '42501', 'permission denied for table twins',
  'the owner cannot give a twin away'
);
select throws_ok(
  $$ delete from public.twins where id = current_setting('test.closed_twin')::uuid $$,
  '42501', 'permission denied for table twins',
  'the owner cannot delete a twin'
);
select results_eq(
  $$ select count(*)::int from public.persona_learning_settings $$,
  $$ values (3) $$,
  'the owner reads the settings of each of their twins'
);

-- specs: drafts are the owner's to create and edit; publishing is the worker's
select results_eq(
  $$ select version, status::text from public.persona_specs order by version $$,
  $$ values (1, 'published') $$,
  'the owner reads their twin''s specs'
);
select lives_ok(
  $$ insert into public.persona_specs (twin_id, spec)
     values (current_setting('test.closed_twin')::uuid, '{"voice": "draft"}') $$,
  'the owner creates a draft spec'
);
select results_eq(
  $$ select version, status::text, created_by from public.persona_specs where spec ->> 'voice' = 'draft' $$,
  $$ values (2, 'draft', current_setting('test.owner')::uuid) $$,
  'the draft is numbered after the published spec and records its author'
);
select throws_ok(
  $$ insert into public.persona_specs (twin_id, spec, status)
     values (current_setting('test.closed_twin')::uuid, '{}', 'published') $$,
  '42501', 'permission denied for table persona_specs',
  'the owner cannot create a published spec'
);
select lives_ok(
  $$ update public.persona_specs set spec = '{"voice": "draft, edited"}' where version = 2 $$,
  'the owner edits a draft'
);
select results_eq(
  $$ select spec ->> 'voice' from public.persona_specs where version = 2 $$,
  $$ values ('draft, edited') $$,
  'the edit of the draft is stored'
);
select is_empty(
  $$ update public.persona_specs set spec = '{"voice": "rewritten"}' where version = 1
     returning id $$,
  'the owner''s update of the published spec matches no row'
);
select throws_ok(
  $$ update public.persona_specs set status = 'published' where version = 2 $$,
  '42501', 'permission denied for table persona_specs',
  'the owner cannot publish a draft by hand'
);
select throws_ok(
  $$ delete from public.persona_specs where version = 2 $$,
  '42501', 'permission denied for table persona_specs',
  'the owner cannot delete a spec'
);

-- modules, their changes and runs: read-only for the owner
select results_eq(
  $$ select module_key, status::text from public.persona_modules $$,
  $$ values ('evidence_answers', 'insufficient_data') $$,
  'the owner reads their twin''s modules'
);
select results_eq(
  $$ select confidence_before, confidence_after from public.persona_module_changes $$,
  $$ values (0.5::float8, 0.6::float8) $$,
  'the owner reads how their modules moved'
);
select results_eq(
  $$ select trigger::text, status::text from public.persona_feedback_learning_runs $$,
  $$ values ('schedule', 'queued') $$,
  'the owner reads their twin''s runs'
);
select throws_ok(
  $$ update public.persona_modules set confidence = 1 $$,
  '42501', 'permission denied for table persona_modules',
  'the owner cannot set a module''s confidence'
);
select throws_ok(
  $$ insert into public.persona_feedback_learning_runs (twin_id, trigger)
     values (current_setting('test.open_twin')::uuid, 'manual') $$,
  '42501', 'permission denied for table persona_feedback_learning_runs',
  'the owner cannot insert a run directly'
);
select throws_ok(
  $$ update public.persona_feedback_learning_runs set status = 'failed' $$,
  '42501', 'permission denied for table persona_feedback_learning_runs',
  'the owner cannot change a run directly'
);

-- runs are requested through the RPC; a second request returns the queued run
select set_config('test.requested_run', (
  select id::text from public.request_learning_run(current_setting('test.open_twin')::uuid)
), true);
select results_eq(
  $$ select trigger::text, status::text, requested_by, safe_mode from public.persona_feedback_learning_runs
     where id = current_setting('test.requested_run')::uuid $$,
  $$ values ('owner_request', 'queued', current_setting('test.owner')::uuid, true) $$,
  'the owner requests a run for their twin, in safe mode by default'
);
select is(
  (select id::text from public.request_learning_run(current_setting('test.open_twin')::uuid)),
  current_setting('test.requested_run'),
  'a second request while one is queued returns the same run'
);
select throws_ok(
  $$ select public.claim_learning_run('owner-worker') $$,
  '42501', 'permission denied for function claim_learning_run',
  'the owner cannot execute a worker function'
);

-- events: the owner sends feedback, reads all of their twins' evidence, and writes no audit
select lives_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, intent_label)
     values (current_setting('test.closed_twin')::uuid, 'trace-owner', 1,
             'factual_with_evidence') $$,
  'the owner sends feedback on their own twin'
);
select results_eq(
  $$ select created_by, langfuse_status::text, persona_spec_id is not null
     from public.persona_training_events where trace_id = 'trace-owner' $$,
  $$ values (current_setting('test.owner')::uuid, 'pending', false) $$,
  'the database sets the voter and the outbox state; feedback names no spec'
);
select throws_ok(
  $$ insert into public.persona_training_events
       (twin_id, trace_id, source, passed, intent_label)
     values (current_setting('test.closed_twin')::uuid, 'trace-x', 'persona_audit', true,
             'factual_with_evidence') $$,
  '42501', 'permission denied for table persona_training_events',
  'the owner cannot write an audit'
);
select throws_ok(
  $$ update public.twins set learned_through_event_id = 1000000000 $$,
  '42501', 'permission denied for table twins',
  'the owner cannot mark evidence processed (move the twin''s cursor)'
);
select throws_ok(
  $$ select * from public.persona_langfuse_outbox $$,
  '42501', 'permission denied for view persona_langfuse_outbox',
  'the owner cannot read the Langfuse outbox'
);


-- Acting as another user
select set_config('request.jwt.claims',
  json_build_object('sub', current_setting('test.other'), 'role', 'authenticated')::text, true);

select is_empty($$ select id from public.twins $$, 'another user reads none of the owner''s twins');
select is_empty($$ select twin_id from public.persona_learning_settings $$,
  'another user reads no learning settings');
select is_empty($$ select id from public.persona_specs $$, 'another user reads no spec');
select is_empty($$ select id from public.persona_modules $$, 'another user reads no module');
select is_empty($$ select id from public.persona_module_changes $$,
  'another user reads no module change');
select is_empty($$ select id from public.persona_feedback_learning_runs $$,
  'another user reads no run');
select is_empty($$ select id from public.persona_training_events $$,
  'another user reads none of the owner''s evidence');
select is_empty(
  $$ update public.twins set name = 'Hijacked' where id = current_setting('test.closed_twin')::uuid
     returning id $$,
  'another user''s update of the owner''s twin matches no row'
);
select is_empty(
  $$ update public.persona_specs set spec = '{"voice": "hijacked"}' returning id $$,
  'another user''s update of the owner''s draft matches no row'
);
select throws_ok(
  $$ insert into public.persona_specs (twin_id, spec)
     values (current_setting('test.closed_twin')::uuid, '{}') $$,
  '42501', 'new row violates row-level security policy for table "persona_specs"',
  'another user cannot create a draft for the owner''s twin'
);
select throws_ok(
  $$ select public.request_learning_run(current_setting('test.closed_twin')::uuid) $$,
  '42501', format('twin_id: twin %s does not exist or is not yours',
                  current_setting('test.closed_twin')),
  'another user cannot request a run for the owner''s twin'
);
select lives_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, reason, intent_label)
     values (current_setting('test.open_twin')::uuid, 'trace-other', -1, 'incorrect',
             'factual_with_evidence') $$,
  'another user sends feedback on a twin open to any user'
);
select results_eq(
  $$ select trace_id, created_by from public.persona_training_events $$,
  $$ values ('trace-other', current_setting('test.other')::uuid) $$,
  'another user reads their own feedback and nothing else'
);
select throws_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, intent_label)
     values (current_setting('test.closed_twin')::uuid, 'trace-other', 1,
             'factual_with_evidence') $$,
  '42501', format('twin_id: twin %s does not exist or does not accept feedback from this user',
                  current_setting('test.closed_twin')),
  'another user cannot send feedback on a twin that takes only its owner''s'
);
select throws_ok(
  $$ insert into public.persona_training_events
       (twin_id, trace_id, score, intent_label, created_by)
     values (current_setting('test.open_twin')::uuid, 'trace-forged', 1, 'factual_with_evidence',
             current_setting('test.owner')::uuid) $$,
  '42501', 'permission denied for table persona_training_events',
  'another user cannot send feedback in the owner''s name'
);
select throws_ok(
  $$ delete from public.persona_training_events where trace_id = 'trace-other' $$,
  '42501', 'permission denied for table persona_training_events',
  'another user cannot delete even their own feedback'
);


-- Acting as anon
select set_config('request.jwt.claims', json_build_object('role', 'anon')::text, true);
reset role;
set local role anon;

select throws_ok(
  $$ select id from public.twins $$,
  '42501', 'permission denied for table twins',
  'anon reads no twin'
);
select throws_ok(
  $$ select id from public.persona_training_events $$,
  '42501', 'permission denied for table persona_training_events',
  'anon reads no event'
);
select throws_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, intent_label)
     values (current_setting('test.open_twin')::uuid, 'trace-anon', 1, 'factual_with_evidence') $$,
  '42501', 'permission denied for table persona_training_events',
  'anon sends no feedback, not even on an open twin'
);
select throws_ok(
  $$ select public.request_learning_run(current_setting('test.open_twin')::uuid) $$,
  '42501', 'permission denied for function request_learning_run',
  'anon requests no run'
);


-- Acting as the service role (the worker and the audit pipeline)
select set_config('request.jwt.claims', json_build_object('role', 'service_role')::text, true);
reset role;
set local role service_role;

select results_eq(
  $$ select count(*)::int from public.persona_training_events
     where twin_id in (current_setting('test.closed_twin')::uuid,
                       current_setting('test.open_twin')::uuid) $$,
  $$ values (3) $$,
  'the service role reads every event'
);
select lives_ok(
  $$ insert into public.persona_training_events
       (twin_id, source, trace_id, passed, reason, intent_label)
     values (current_setting('test.closed_twin')::uuid, 'persona_audit', 'trace-audit-2', false,
             'off_persona', 'factual_with_evidence') $$,
  'the audit pipeline writes an audit'
);
select results_eq(
  $$ select trigger::text, status::text from public.enqueue_learning_run(
       (select id from public.twins
        where owner_id = current_setting('test.owner')::uuid and name = 'Third twin')) $$,
  $$ values ('manual', 'queued') $$,
  'the service role executes worker functions'
);


-- As the platform: nothing another user tried got through
reset role;

select results_eq(
  $$ select name from public.twins where id = current_setting('test.closed_twin')::uuid $$,
  $$ values ('Closed twin, renamed') $$,
  'the owner''s twin keeps the owner''s name'
);
select results_eq(
  $$ select version, spec ->> 'voice' from public.persona_specs
     where twin_id = current_setting('test.closed_twin')::uuid order by version $$,
  $$ values (1, 'published'), (2, 'draft, edited') $$,
  'the specs keep the owner''s documents'
);

select * from finish();
rollback;
