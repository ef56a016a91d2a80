-- Training events: signed-in users send feedback on twins that accept it from them; the audit
-- pipeline (the service role) writes audits; the database sets everything but the vote. Four
-- actors: the owner of two twins, another signed-in user, anon and the service role.
-- Helpers: supabase/tests/000_helpers.sql.
begin;
select plan(19);

-- The owner has a twin that takes feedback from its owner only, with a published spec the audit
-- pipeline has audited once, and a twin open to feedback from any user.
select tests.create_user('owner'), tests.create_user('other');
select tests.create_twin('owner', 'Closed twin', 'owner'),
       tests.create_twin('owner', 'Open twin', 'any_user');
insert into public.persona_specs (twin_id, status, spec)
values (tests.twin_id('Closed twin'), 'published', '{"voice": "published"}');
insert into public.persona_training_events
  (twin_id, source, trace_id, passed, intent_label, persona_spec_id)
select s.twin_id, 'persona_audit', 'trace-audit', true, 'factual_with_evidence', s.id
from public.persona_specs s where s.twin_id = tests.twin_id('Closed twin');


-- Acting as the owner
select tests.act_as('owner');

select lives_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, intent_label)
     values (tests.twin_id('Closed twin'), 'trace-owner', 1, 'factual_with_evidence') $$,
  'the owner sends feedback on their own twin'
);
select results_eq(
  $$ select created_by, langfuse_status::text, persona_spec_id is not null
     from public.persona_training_events where trace_id = 'trace-owner' $$,
  $$ values (tests.user_id('owner'), 'pending', false) $$,
  'the database sets the voter and the outbox state; feedback names no spec'
);
select results_eq(
  $$ select source::text, trace_id from public.persona_training_events order by id $$,
  $$ values ('persona_audit', 'trace-audit'), ('user_feedback', 'trace-owner') $$,
  'the owner reads their twin''s evidence, audits included'
);
select throws_ok(
  $$ insert into public.persona_training_events
       (twin_id, trace_id, source, passed, intent_label)
     values (tests.twin_id('Closed twin'), 'trace-x', 'persona_audit', true,
             'factual_with_evidence') $$,
  '42501', 'permission denied for table persona_training_events',
  'the owner cannot write an audit'
);
select throws_ok(
  $$ select * from public.persona_langfuse_outbox $$,
  '42501', 'permission denied for view persona_langfuse_outbox',
  'the owner cannot read the Langfuse outbox'
);


-- Acting as another user
select tests.act_as('other');

select is_empty($$ select id from public.persona_training_events $$,
  'another user reads none of the owner''s evidence');
select lives_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, reason, intent_label)
     values (tests.twin_id('Open twin'), 'trace-other', -1, 'incorrect',
             'factual_with_evidence') $$,
  'another user sends feedback on a twin open to any user'
);
select results_eq(
  $$ select trace_id, created_by from public.persona_training_events $$,
  $$ values ('trace-other', tests.user_id('other')) $$,
  'another user reads their own feedback and nothing else'
);
select throws_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, intent_label)
     values (tests.twin_id('Closed twin'), 'trace-other', 1, 'factual_with_evidence') $$,
  '42501', format('twin_id: twin %s does not exist or does not accept feedback from this user',
                  tests.twin_id('Closed twin')),
  'another user cannot send feedback on a twin that takes only its owner''s'
);
select throws_ok(
  $$ insert into public.persona_training_events
       (twin_id, trace_id, score, intent_label, created_by)
     values (tests.twin_id('Open twin'), 'trace-forged', 1, 'factual_with_evidence',
             tests.user_id('owner')) $$,
  '42501', 'permission denied for table persona_training_events',
  'another user cannot send feedback in the owner''s name'
);
select throws_ok(
  $$ delete from public.persona_training_events where trace_id = 'trace-other' $$,
  '42501', 'permission denied for table persona_training_events',
  'another user cannot delete even their own feedback'
);


-- Acting as the owner, once another user has voted
select tests.act_as('owner');

select results_eq(
  $$ select trace_id, created_by from public.persona_training_events
     where source = 'user_feedback' order by id $$,
  $$ values ('trace-owner', tests.user_id('owner')), ('trace-other', tests.user_id('other')) $$,
  'the owner reads the feedback others sent on their twins'
);


-- Acting as anon
select tests.act_as_anon();

select throws_ok(
  $$ select id from public.persona_training_events $$,
  '42501', 'permission denied for table persona_training_events',
  'anon reads no event'
);
select throws_ok(
  $$ insert into public.persona_training_events (twin_id, trace_id, score, intent_label)
     values (tests.twin_id('Open twin'), 'trace-anon', 1, 'factual_with_evidence') $$,
  '42501', 'permission denied for table persona_training_events',
  'anon sends no feedback, not even on an open twin'
);
select throws_ok(
  $$ select * from public.persona_langfuse_outbox $$,
  '42501', 'permission denied for view persona_langfuse_outbox',
  'anon cannot read the Langfuse outbox'
);


-- Acting as the service role (the worker and the audit pipeline)
select tests.act_as_service_role();

select results_eq(
  $$ select trace_id from public.persona_training_events
     where twin_id in (tests.twin_id('Closed twin'), tests.twin_id('Open twin')) order by id $$,
  $$ values ('trace-audit'), ('trace-owner'), ('trace-other') $$,
  'the service role reads every event'
);
select lives_ok(
  $$ insert into public.persona_training_events
       (twin_id, source, trace_id, passed, reason, intent_label)
     values (tests.twin_id('Closed twin'), 'persona_audit', 'trace-audit-2', false,
             'off_persona', 'factual_with_evidence') $$,
  'the audit pipeline writes an audit'
);
select results_eq(
  $$ select source::text, passed, created_by, langfuse_status::text
     from public.persona_training_events
     where trace_id = 'trace-audit-2' $$,
  $$ values ('persona_audit', false, null::uuid, null::text) $$,
  'an audit names no voter and stays out of the Langfuse outbox'
);
select results_eq(
  $$ select trace_id, status::text from public.persona_langfuse_outbox
     where twin_id in (tests.twin_id('Closed twin'), tests.twin_id('Open twin'))
     order by event_id $$,
  $$ values ('trace-owner', 'pending'), ('trace-other', 'pending') $$,
  'the service role reads the Langfuse outbox: every vote, pending delivery'
);

select * from finish();
rollback;
