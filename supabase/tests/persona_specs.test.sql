-- Persona specs: drafts are the owner's to create and edit; publishing is the worker's. Four
-- actors: the owner, another signed-in user, anon and the service role.
-- Helpers: supabase/tests/000_helpers.sql.
begin;
select plan(15);

-- The owner's twin has a published spec (version 1), which the worker published earlier.
select tests.create_user('owner'), tests.create_user('other');
select tests.create_twin('owner', 'Spec twin');
insert into public.persona_specs (twin_id, status, spec)
values (tests.twin_id('Spec twin'), 'published', '{"voice": "published"}');


-- Acting as the owner
select tests.act_as('owner');

select results_eq(
  $$ select version, status::text from public.persona_specs order by version $$,
  $$ values (1, 'published') $$,
  'the owner reads their twin''s specs'
);
select lives_ok(
  $$ insert into public.persona_specs (twin_id, spec)
     values (tests.twin_id('Spec twin'), '{"voice": "draft"}') $$,
  'the owner creates a draft spec'
);
select results_eq(
  $$ select version, status::text, created_by from public.persona_specs
     where spec ->> 'voice' = 'draft' $$,
  $$ values (2, 'draft', tests.user_id('owner')) $$,
  'the draft is numbered after the published spec and records its author'
);
select throws_ok(
  $$ insert into public.persona_specs (twin_id, spec, status)
     values (tests.twin_id('Spec twin'), '{}', 'published') $$,
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


-- Acting as another user
select tests.act_as('other');

select is_empty($$ select id from public.persona_specs $$, 'another user reads no spec');
select is_empty(
  $$ update public.persona_specs set spec = '{"voice": "hijacked"}' returning id $$,
  'another user''s update of the owner''s draft matches no row'
);
select throws_ok(
  $$ insert into public.persona_specs (twin_id, spec) values (tests.twin_id('Spec twin'), '{}') $$,
  '42501', 'new row violates row-level security policy for table "persona_specs"',
  'another user cannot create a draft for the owner''s twin'
);


-- Acting as anon
select tests.act_as_anon();

select throws_ok(
  $$ select id from public.persona_specs $$,
  '42501', 'permission denied for table persona_specs',
  'anon reads no spec'
);


-- Acting as the service role
select tests.act_as_service_role();

select results_eq(
  $$ select version, status::text from public.persona_specs
     where twin_id = tests.twin_id('Spec twin') order by version $$,
  $$ values (1, 'published'), (2, 'draft') $$,
  'the service role reads every spec, drafts included'
);


-- As the platform: nothing another user tried got through
select tests.act_as_platform();

select results_eq(
  $$ select version, spec ->> 'voice' from public.persona_specs
     where twin_id = tests.twin_id('Spec twin') order by version $$,
  $$ values (1, 'published'), (2, 'draft, edited') $$,
  'the specs keep the owner''s documents'
);

select * from finish();
rollback;
