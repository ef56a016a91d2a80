-- Modules, their history and learning runs: owners read them and request runs through the RPC;
-- only the worker (the service role) writes them. Four actors: the owner, another signed-in user,
-- anon and the service role. Helpers: supabase/tests/000_helpers.sql.
begin;
select plan(24);

-- The owner has three twins: one with a module, a scheduled run and the change that run made;
-- one the owner will request a run for; one the worker will queue a run for.
select tests.create_user('owner'), tests.create_user('other');
select tests.create_twin('owner', 'Learning twin'),
       tests.create_twin('owner', 'Requested twin'),
       tests.create_twin('owner', 'Quiet twin');
insert into public.persona_modules (twin_id, module_key, intent_label)
values (tests.twin_id('Learning twin'), 'evidence_answers', 'factual_with_evidence');
insert into public.persona_feedback_learning_runs (twin_id, trigger)
values (tests.twin_id('Learning twin'), 'schedule');
insert into public.persona_module_changes (module_id, twin_id, run_id, confidence_before,
  confidence_after, status_before, status_after, success_weight, failure_weight)
select m.id, m.twin_id, r.id, 0.5, 0.6, 'insufficient_data', 'insufficient_data', 1, 0
from public.persona_modules m
join public.persona_feedback_learning_runs r on r.twin_id = m.twin_id
where m.twin_id = tests.twin_id('Learning twin');


-- Acting as the owner
select tests.act_as('owner');

select results_eq(
  $$ select module_key::text, status::text from public.persona_modules $$,
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
     values (tests.twin_id('Requested twin'), 'manual') $$,
  '42501', 'permission denied for table persona_feedback_learning_runs',
  'the owner cannot insert a run directly'
);
select throws_ok(
  $$ update public.persona_feedback_learning_runs set status = 'failed' $$,
  '42501', 'permission denied for table persona_feedback_learning_runs',
  'the owner cannot change a run directly'
);
-- Runs are requested through the RPC; a second request returns the queued run.
select results_eq(
  $$ select trigger::text, status::text, requested_by, safe_mode
     from public.request_learning_run(tests.twin_id('Requested twin')) $$,
  $$ values ('owner_request', 'queued', tests.user_id('owner'), true) $$,
  'the owner requests a run for their twin, in safe mode by default'
);
select results_eq(
  $$ select id from public.request_learning_run(tests.twin_id('Requested twin')) $$,
  $$ select id from public.persona_feedback_learning_runs
     where twin_id = tests.twin_id('Requested twin') $$,
  'a second request while one is queued returns the same run, the twin''s only one'
);
select throws_ok(
  $$ select public.claim_learning_run('owner-worker') $$,
  '42501', 'permission denied for function claim_learning_run',
  'the owner cannot execute a worker function'
);
select throws_ok(
  $$ select public.claim_learning_runs('owner-worker', 60, 4) $$,
  '42501', 'permission denied for function claim_learning_runs',
  'the owner cannot claim runs in a batch'
);
select throws_ok(
  $$ select public.read_learning_runs('[]') $$,
  '42501', 'permission denied for function read_learning_runs',
  'the owner cannot read runs in a batch'
);
select throws_ok(
  $$ select public.complete_learning_runs('[]') $$,
  '42501', 'permission denied for function complete_learning_runs',
  'the owner cannot complete runs in a batch'
);


-- Acting as another user
select tests.act_as('other');

select is_empty($$ select id from public.persona_modules $$, 'another user reads no module');
select is_empty($$ select id from public.persona_module_changes $$,
  'another user reads no module change');
select is_empty($$ select id from public.persona_feedback_learning_runs $$,
  'another user reads no run');
select throws_ok(
  $$ select public.request_learning_run(tests.twin_id('Learning twin')) $$,
  '42501',
  format('twin_id: twin %s does not exist or is not yours', tests.twin_id('Learning twin')),
  'another user cannot request a run for the owner''s twin'
);


-- Acting as anon
select tests.act_as_anon();

select throws_ok(
  $$ select id from public.persona_feedback_learning_runs $$,
  '42501', 'permission denied for table persona_feedback_learning_runs',
  'anon reads no run'
);
select throws_ok(
  $$ select public.request_learning_run(tests.twin_id('Requested twin')) $$,
  '42501', 'permission denied for function request_learning_run',
  'anon requests no run'
);


-- Acting as the service role (the worker)
select tests.act_as_service_role();

select results_eq(
  $$ select trigger::text, status::text
     from public.enqueue_learning_run(tests.twin_id('Quiet twin')) $$,
  $$ values ('manual', 'queued') $$,
  'the service role executes worker functions'
);
select results_eq(
  $$ select t.name, r.trigger::text from public.persona_feedback_learning_runs r
     join public.twins t on t.id = r.twin_id
     where t.owner_id = tests.user_id('owner') order by 1 $$,
  $$ values ('Learning twin', 'schedule'), ('Quiet twin', 'manual'),
            ('Requested twin', 'owner_request') $$,
  'the service role reads every run'
);
select results_eq(
  $$ select module_key::text from public.persona_modules
     where twin_id = tests.twin_id('Learning twin') $$,
  $$ values ('evidence_answers') $$,
  'the service role reads every module'
);
select throws_ok(
  $$ select public.schedule_learning_runs('* * * * *') $$,
  '42501', null,
  'the service role may not schedule learning runs on pg_cron'
);


-- Acting as the project owner (postgres, in the SQL editor) on a project without pg_cron

select tests.act_as_platform();

select throws_ok(
  $$ select public.schedule_learning_runs('* * * * *') $$,
  '55000', 'pg_cron is not enabled in this database',
  'without pg_cron, scheduling says so'
);
select throws_ok(
  $$ select public.unschedule_learning_runs() $$,
  '55000', 'pg_cron is not enabled in this database',
  'without pg_cron, unscheduling says so'
);

select * from finish();
rollback;
