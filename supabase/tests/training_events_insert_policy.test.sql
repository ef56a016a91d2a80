-- The insert policy of training events on its own. Two layers stop a forged vote: the column
-- grant (authenticated may not name created_by or source) and the policy "Users send their own
-- feedback" (source = user_feedback and created_by = auth.uid()). training_events.test.sql shows
-- the grant refusing; here the platform widens the grant for this transaction only, so that the
-- policy alone must refuse. Actors: the owner of an open twin, another signed-in user.
-- Helpers: supabase/tests/000_helpers.sql.
begin;
select plan(6);

select tests.create_user('owner'), tests.create_user('other');
select tests.create_twin('owner', 'Open twin', 'any_user');
insert into public.persona_specs (twin_id, status, spec)
values (tests.twin_id('Open twin'), 'published', '{"voice": "published"}');

-- As the platform: the grant no longer guards these columns (undone by the final rollback).
grant insert (created_by, source, passed, persona_spec_id)
  on public.persona_training_events to authenticated;


-- Acting as another user
select tests.act_as('other');

select throws_ok(
  $$ insert into public.persona_training_events
       (twin_id, trace_id, score, intent_label, created_by)
     values (tests.twin_id('Open twin'), 'trace-forged', 1, 'factual_with_evidence',
             tests.user_id('owner')) $$,
  '42501', 'new row violates row-level security policy for table "persona_training_events"',
  'the policy alone refuses feedback in the owner''s name'
);
select throws_ok(
  $$ insert into public.persona_training_events
       (twin_id, trace_id, source, passed, intent_label, created_by)
     values (tests.twin_id('Open twin'), 'trace-audit', 'persona_audit', true,
             'factual_with_evidence', tests.user_id('other')) $$,
  '42501', 'new row violates row-level security policy for table "persona_training_events"',
  'the policy alone refuses an audit written by a user'
);
select lives_ok(
  $$ insert into public.persona_training_events
       (twin_id, trace_id, score, intent_label, created_by)
     values (tests.twin_id('Open twin'), 'trace-own', 1, 'factual_with_evidence',
             tests.user_id('other')) $$,
  'naming themselves as the voter, the user''s feedback passes the policy'
);


-- As the platform: what the refused inserts left behind
select tests.act_as_platform();

select is_empty(
  $$ select id from public.persona_training_events
     where trace_id in ('trace-forged', 'trace-audit') $$,
  'the refused inserts wrote nothing'
);
select results_eq(
  $$ select created_by, source::text from public.persona_training_events
     where twin_id = tests.twin_id('Open twin') $$,
  $$ values (tests.user_id('other'), 'user_feedback') $$,
  'only the user''s own vote is stored'
);
select is(
  has_column_privilege('authenticated', 'public.persona_training_events', 'created_by', 'INSERT'),
  true,
  'the grant was widened for this file (the policy was tested alone)'
);

select * from finish();
rollback;
