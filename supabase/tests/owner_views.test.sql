-- What owners look at: the owner views and the summaries a completed run writes. Two owners,
-- each with a twin that learned from votes; a voter changes a vote. Each owner sees their own
-- twin only, anon nothing, and nobody writes the summaries. Helpers: 000_helpers.sql.
begin;
select plan(12);

select tests.create_user('ada'), tests.create_user('bob'), tests.create_user('voter');
select tests.create_twin('ada', 'Ada twin', 'any_user'), tests.create_twin('bob', 'Bob twin');
insert into public.persona_modules (twin_id, module_key, intent_label)
values (tests.twin_id('Ada twin'), 'evidence_answers', 'factual_with_evidence'),
       (tests.twin_id('Bob twin'), 'bobs_module', 'factual_with_evidence');

-- The voter votes on Ada's twin and then changes one vote; Bob votes on his own.
select tests.act_as('voter');
insert into public.persona_training_events (twin_id, trace_id, score, reason, intent_label)
values (tests.twin_id('Ada twin'), 't1', -1, 'incorrect', 'factual_with_evidence'),
       (tests.twin_id('Ada twin'), 't2', -1, 'outdated', 'factual_with_evidence');
insert into public.persona_training_events (twin_id, trace_id, score, reason, intent_label)
values (tests.twin_id('Ada twin'), 't2', 1, 'helpful', 'factual_with_evidence');
select tests.act_as('bob');
insert into public.persona_training_events (twin_id, trace_id, score, reason, intent_label)
values (tests.twin_id('Bob twin'), 'b1', -1, 'unsafe', 'factual_with_evidence');

-- As the worker leaves it: a run per twin over all its events, read (which counts the batch for
-- the summaries) and completed (which writes them), through the worker's functions.
select tests.act_as_platform();
create temporary table claimed on commit drop as
select r.id, r.lease_token
from public.twins t
cross join lateral public.enqueue_due_learning_runs(t.id) q
cross join lateral public.claim_learning_run('pgtap', 60, t.id) r
where t.id in (tests.twin_id('Ada twin'), tests.twin_id('Bob twin'));
select public.claim_learning_run_events(c.id, c.lease_token) from claimed c;
select public.complete_learning_run(c.id, c.lease_token, '{"module_updates": [],
  "gate_passed": true, "gate_report": {"checks": []}, "publish_spec_id": null,
  "hold_reason": "no_draft"}') from claimed c;


-- Acting as Ada
select tests.act_as('ada');

select results_eq(
  $$ select module_key, reason::text, votes_7d, down_7d from public.persona_module_feedback_reasons
     order by reason $$,
  $$ values ('evidence_answers', 'helpful', 1, 0), ('evidence_answers', 'incorrect', 1, 1) $$,
  'Ada sees her module''s votes by reason; the changed vote counts once, under its new reason'
);
select results_eq(
  $$ select module_key, votes_30d, up_30d, down_30d, approval_rate_30d
     from public.persona_module_feedback $$,
  $$ values ('evidence_answers', 2, 1, 1, 0.5::float8) $$,
  'Ada sees her module''s approval; Bob''s module is not there'
);
select results_eq(
  $$ select name, modules, last_run_status::text, pending_events from public.persona_twin_overview $$,
  $$ values ('Ada twin', 1, 'completed', 0) $$,
  'Ada''s overview lists her twin only'
);
select results_eq(
  $$ select bool_and(processed), count(*)::int, count(distinct processed_run_id)::int
     from public.persona_training_events_state $$,
  $$ values (true, 3, 1) $$,
  'Ada sees her twin''s three events processed by one run'
);
select is_empty(
  $$ select 1 from public.persona_run_evidence r join public.persona_modules m on m.id = r.module_id
     where m.module_key = 'bobs_module' $$,
  'Ada sees nothing of what Bob''s run learned from'
);
select throws_ok(
  $$ insert into public.persona_feedback_daily (twin_id, day, intent_label, score, votes)
     values (tests.twin_id('Ada twin'), current_date, 'factual_with_evidence', 1, 100) $$,
  '42501', 'permission denied for table persona_feedback_daily',
  'Ada cannot pad her own feedback summary'
);


-- Acting as Bob
select tests.act_as('bob');

select results_eq(
  $$ select module_key, reason::text, down_30d from public.persona_module_feedback_reasons $$,
  $$ values ('bobs_module', 'unsafe', 1) $$,
  'Bob sees his own module''s reasons only'
);
select results_eq(
  $$ select source::text, reason::text, outcome::text, events from public.persona_run_evidence $$,
  $$ values ('user_feedback', 'unsafe', 'failure', 1) $$,
  'Bob sees what his run learned from'
);


-- Acting as anon
select tests.act_as_anon();

select throws_ok($$ select * from public.persona_twin_overview $$, '42501',
                 'permission denied for view persona_twin_overview', 'anon reads no overview');
select throws_ok($$ select * from public.persona_module_trend $$, '42501',
                 'permission denied for view persona_module_trend', 'anon reads no trend');


-- Acting as the service role
select tests.act_as_service_role();

select results_eq(
  $$ select count(distinct twin_id)::int from public.persona_module_feedback_reasons
     where twin_id in (tests.twin_id('Ada twin'), tests.twin_id('Bob twin')) $$,
  $$ values (2) $$,
  'the service role reads every twin''s feedback'
);
select throws_ok(
  $$ delete from public.persona_run_evidence $$,
  '42501', 'permission denied for table persona_run_evidence',
  'even the service role only reads the summaries; the completion trigger writes them'
);

select * from finish();
rollback;
