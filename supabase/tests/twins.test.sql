-- Twins and their learning settings, as four actors see them: the owner of two twins, another
-- signed-in user, anon and the service role. Helpers: supabase/tests/000_helpers.sql.
begin;
select plan(23);

-- The auth service created two users; the owner has a twin that takes feedback from its owner
-- only and one open to any user. Each twin got its learning settings with it.
select tests.create_user('owner'), tests.create_user('other');
select tests.create_twin('owner', 'Closed twin', 'owner'),
       tests.create_twin('owner', 'Open twin', 'any_user');


-- Acting as the owner
select tests.act_as('owner');

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
  $$ select tests.user_id('owner') $$,
  'a new twin belongs to whoever created it'
);
select throws_ok(
  $$ insert into public.twins (name, owner_id)
     values ('For someone else', tests.user_id('other')) $$,
  '42501', 'permission denied for table twins',
  'the owner cannot create a twin in another user''s name'
);
select lives_ok(
  $$ update public.twins set name = 'Third twin, renamed', feedback_from = 'any_user'
     where id = tests.twin_id('Third twin') $$,
  'the owner renames a twin and opens it to any user'
);
select results_eq(
  $$ select name, feedback_from::text from public.twins order by name $$,
  $$ values ('Closed twin', 'owner'), ('Open twin', 'any_user'),
            ('Third twin, renamed', 'any_user') $$,
  'the rename and the new feedback setting are stored'
);
select throws_ok(
  $$ update public.twins set owner_id = tests.user_id('other')
     where id = tests.twin_id('Closed twin') $$,
  '42501', 'permission denied for table twins',
  'the owner cannot give a twin away'
);
select throws_ok(
  $$ delete from public.twins where id = tests.twin_id('Closed twin') $$,
  '42501', 'permission denied for table twins',
  'the owner cannot delete a twin'
);
select throws_ok(
  $$ update public.twins set learned_through_event_id = 1000000000 $$,
  '42501', 'permission denied for table twins',
  'the owner cannot mark evidence processed (move the twin''s cursor)'
);
select results_eq(
  $$ select t.name from public.persona_learning_settings s join public.twins t on t.id = s.twin_id
     order by 1 $$,
  $$ values ('Closed twin'), ('Open twin'), ('Third twin, renamed') $$,
  'the owner reads the settings of each of their twins'
);
select lives_ok(
  $$ update public.persona_learning_settings set half_life_days = 7
     where twin_id = tests.twin_id('Closed twin') $$,
  'the owner tunes a twin''s learning settings'
);


-- Acting as another user
select tests.act_as('other');

select is_empty($$ select id from public.twins $$, 'another user reads none of the owner''s twins');
select is_empty($$ select twin_id from public.persona_learning_settings $$,
  'another user reads no learning settings');
select is_empty(
  $$ update public.twins set name = 'Hijacked' where id = tests.twin_id('Closed twin')
     returning id $$,
  'another user''s update of the owner''s twin matches no row'
);
select is_empty(
  $$ update public.persona_learning_settings set half_life_days = 1 returning twin_id $$,
  'another user''s update of the owner''s learning settings matches no row'
);
select lives_ok(
  $$ insert into public.twins (name) values ('Other''s twin') $$,
  'another user creates a twin of their own'
);
select results_eq(
  $$ select name, owner_id from public.twins $$,
  $$ values ('Other''s twin', tests.user_id('other')) $$,
  'another user reads their own twin and nothing else'
);


-- Acting as anon
select tests.act_as_anon();

select throws_ok(
  $$ select id from public.twins $$,
  '42501', 'permission denied for table twins',
  'anon reads no twin'
);
select throws_ok(
  $$ select twin_id from public.persona_learning_settings $$,
  '42501', 'permission denied for table persona_learning_settings',
  'anon reads no learning settings'
);
select throws_ok(
  $$ insert into public.twins (name) values ('Anonymous twin') $$,
  '42501', 'permission denied for table twins',
  'anon creates no twin'
);


-- Acting as the service role
select tests.act_as_service_role();

select results_eq(
  $$ select name from public.twins
     where owner_id in (tests.user_id('owner'), tests.user_id('other')) order by name $$,
  $$ values ('Closed twin'), ('Open twin'), ('Other''s twin'), ('Third twin, renamed') $$,
  'the service role reads every user''s twins'
);


-- As the platform: nothing another user tried got through
select tests.act_as_platform();

select results_eq(
  $$ select name from public.twins where owner_id = tests.user_id('owner') order by name $$,
  $$ values ('Closed twin'), ('Open twin'), ('Third twin, renamed') $$,
  'the owner''s twins keep the owner''s names'
);
select results_eq(
  $$ select t.name, s.half_life_days from public.persona_learning_settings s
     join public.twins t on t.id = s.twin_id
     where t.owner_id = tests.user_id('owner') order by 1 $$,
  $$ values ('Closed twin', 7::float8), ('Open twin', 30), ('Third twin, renamed', 30) $$,
  'the owner''s learning settings keep the owner''s values'
);

select * from finish();
rollback;
