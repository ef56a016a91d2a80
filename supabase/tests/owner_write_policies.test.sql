-- The write policies of twins and specs on their own. Column grants keep clients from naming a
-- twin's owner_id or a spec's status; the policies ("Users can create twins they own", "Owners
-- can update their twins", "Owners can create draft specs") say the same again. The other files
-- show the grants refusing; here the platform widens them for this transaction only, so that the
-- policies alone must refuse. Actors: an owner, another signed-in user.
-- Helpers: supabase/tests/000_helpers.sql.
begin;
select plan(7);

select tests.create_user('owner'), tests.create_user('other');
select tests.create_twin('owner', 'Owner twin');

-- As the platform: the grants no longer guard these columns (undone by the final rollback).
grant insert (owner_id), update (owner_id) on public.twins to authenticated;
grant insert (status) on public.persona_specs to authenticated;


-- Acting as another user
select tests.act_as('other');

select throws_ok(
  $$ insert into public.twins (name, owner_id) values ('Forged twin', tests.user_id('owner')) $$,
  '42501', 'new row violates row-level security policy for table "twins"',
  'the policy alone refuses a twin created in the owner''s name'
);
select lives_ok(
  $$ insert into public.twins (name, owner_id) values ('Own twin', tests.user_id('other')) $$,
  'naming themselves as the owner, the user creates a twin'
);


-- Acting as the owner
select tests.act_as('owner');

select throws_ok(
  $$ update public.twins set owner_id = tests.user_id('other') $$,
  '42501', 'new row violates row-level security policy for table "twins"',
  'the policy alone refuses giving a twin away (an update with no filter, so no read policy applies to the new row)'
);
select throws_ok(
  $$ insert into public.persona_specs (twin_id, status, spec)
     values (tests.twin_id('Owner twin'), 'published', '{"voice": "forged"}') $$,
  '42501', 'new row violates row-level security policy for table "persona_specs"',
  'the policy alone refuses a spec created as published'
);
select lives_ok(
  $$ insert into public.persona_specs (twin_id, status, spec)
     values (tests.twin_id('Owner twin'), 'draft', '{"voice": "draft"}') $$,
  'the owner creates a draft spec'
);


-- As the platform: what the refused statements left behind
select tests.act_as_platform();

select results_eq(
  $$ select name, owner_id from public.twins
     where owner_id in (tests.user_id('owner'), tests.user_id('other')) or name = 'Forged twin'
     order by name $$,
  $$ values ('Own twin', tests.user_id('other')), ('Owner twin', tests.user_id('owner')) $$,
  'no forged twin, and the owner still owns their twin'
);
select results_eq(
  $$ select status::text from public.persona_specs where twin_id = tests.twin_id('Owner twin') $$,
  $$ values ('draft') $$,
  'only the draft spec is stored'
);

select * from finish();
rollback;
