-- The pgTAP tests' one support layer: schema `tests`, created here and used by every other file.
--
-- pg_prove runs the files of supabase/tests in name order, so this one runs first. It commits the
-- helpers (the test files themselves roll back), then checks that they act as documented.
-- scripts/test drops the schema after the run, with pgtap, so that `supabase db advisors` and
-- `supabase db lint` never see it; `supabase test db` runs the same files unchanged.
--
--   tests.create_user(name)          a user, created as the auth service does (it picks the id)
--   tests.user_id(name)              that user's id, from any role
--   tests.create_twin(owner, name[, feedback_from])
--   tests.twin_id(name)              a twin's id by its name, from any role
--   tests.act_as(name)               a signed-in user's request: role authenticated, JWT sub
--   tests.act_as_anon()              a request with the anon key
--   tests.act_as_service_role()      a request with the service-role key (worker, audit pipeline)
--   tests.act_as_platform()          back to the session's own role (postgres), no JWT
--   tests.table_privileges(role)     what a role may do to each table and view in public
--   tests.columns_granted(role, table, privilege)
--   tests.function_privileges(role)  whether a role may execute each function of public and private
--
-- Acting as someone is what PostgREST does for each request: `set local role` to the JWT's role
-- and the JWT's claims in request.jwt.claims, where auth.uid() and auth.role() read them. The
-- settings are transaction-local, so the rollback that ends each test file undoes them.
--
-- Conventions of the test files: one file per concern; a setup as the platform, then blocks
-- headed `-- Acting as ...`, each asserting what that actor may and may not do. Users and twins
-- are looked up by name. Closed sets and slugs (status, trigger, source, module_key ...) are read
-- as ::text, so that an assertion holds whether the column is text with a check, an enum or a
-- domain.

begin;
create extension if not exists pgtap with schema extensions;

-- A run that stopped halfway (or an earlier `supabase test db`) may have left the schema behind.
drop schema if exists tests cascade;
create schema tests;
comment on schema tests is 'pgTAP test helpers; exists only while the tests run.';

-- ------------------------------------------------------------------------------ users and twins

-- Test users are named; their email is <name>@pgtap.test. Like the auth service, the helper
-- chooses the id itself rather than relying on a column default.
create function tests.create_user(p_name text)
returns uuid
language sql
set search_path = ''
as $$
  insert into auth.users (id, email, raw_user_meta_data)
  values (gen_random_uuid(), p_name || '@pgtap.test', jsonb_build_object('name', p_name))
  returning id;
$$;

-- Security definer, so that a query run while acting as anyone can name a user.
create function tests.user_id(p_name text)
returns uuid
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  select u.id into v_id from auth.users u where u.email = p_name || '@pgtap.test';
  if v_id is null then
    raise exception 'tests.user_id: no test user named %', p_name;
  end if;
  return v_id;
end;
$$;

-- The values go through the table's row type, so that feedback_from may be text with a check,
-- an enum or a domain: a text argument would not be assigned to an enum.
create function tests.create_twin(p_owner text, p_name text, p_feedback_from text default 'owner')
returns uuid
language sql
set search_path = ''
as $$
  insert into public.twins (owner_id, name, feedback_from)
  select r.owner_id, r.name, r.feedback_from
  from jsonb_populate_record(null::public.twins, jsonb_build_object(
    'owner_id', tests.user_id(p_owner), 'name', p_name, 'feedback_from', p_feedback_from)) r
  returning id;
$$;

-- Security definer, so that a test can name a twin the acting user may not see.
create function tests.twin_id(p_name text)
returns uuid
language plpgsql
stable
security definer
set search_path = ''
as $$
declare
  v_id uuid;
begin
  select t.id into strict v_id from public.twins t where t.name = p_name;
  return v_id;
exception
  when no_data_found or too_many_rows then
    raise exception 'tests.twin_id: no single twin named %', p_name;
end;
$$;

-- ------------------------------------------------------------------------------ acting as

-- The role first, then the claims. The role may be switched from any role: SET ROLE is checked
-- against the session user (postgres), not the role acted as.
create function tests.act_as_role(p_role text, p_claims jsonb)
returns void
language plpgsql
set search_path = ''
as $$
begin
  perform set_config('role', p_role, true);
  perform set_config('request.jwt.claims', coalesce(p_claims::text, ''), true);
end;
$$;

create function tests.act_as(p_name text)
returns void
language sql
set search_path = ''
as $$
  select tests.act_as_role('authenticated',
    jsonb_build_object('sub', tests.user_id(p_name), 'role', 'authenticated',
                       'email', p_name || '@pgtap.test'));
$$;

create function tests.act_as_anon()
returns void
language sql
set search_path = ''
as $$
  select tests.act_as_role('anon', '{"role": "anon"}');
$$;

create function tests.act_as_service_role()
returns void
language sql
set search_path = ''
as $$
  select tests.act_as_role('service_role', '{"role": "service_role"}');
$$;

-- 'none' is SET ROLE NONE: the session user again.
create function tests.act_as_platform()
returns void
language sql
set search_path = ''
as $$
  select tests.act_as_role('none', null);
$$;

-- ------------------------------------------------------------------------------ privileges

-- Each privilege p_role holds on each table and view in public: on the whole relation
-- (on_table), and on the relation or any one of its columns (on_a_column).
create function tests.table_privileges(p_role text)
returns table (relation text, kind "char", privilege text, on_table boolean, on_a_column boolean)
language sql
stable
set search_path = ''
as $$
  select c.relname::text, c.relkind, p.priv,
         has_table_privilege(p_role, c.oid, p.priv),
         case when p.priv in ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES')
              then has_any_column_privilege(p_role, c.oid, p.priv)
              else has_table_privilege(p_role, c.oid, p.priv) end
  from pg_catalog.pg_class c
  cross join unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                          'TRIGGER']) p(priv)
  where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'v')
  order by 1, 3;
$$;

-- The columns of p_table on which p_role holds p_privilege, in name order.
create function tests.columns_granted(p_role text, p_table regclass, p_privilege text)
returns setof text
language sql
stable
set search_path = ''
as $$
  select a.attname::text from pg_catalog.pg_attribute a
  where a.attrelid = p_table and a.attnum > 0 and not a.attisdropped
    and has_column_privilege(p_role, p_table, a.attnum, p_privilege)
  order by 1;
$$;

-- Each function of public and private, and whether p_role may execute it.
create function tests.function_privileges(p_role text)
returns table (schema_name text, function_name text, signature text, executable boolean)
language sql
stable
set search_path = ''
as $$
  select p.pronamespace::regnamespace::text, p.proname::text, p.oid::regprocedure::text,
         has_function_privilege(p_role, p.oid, 'execute')
  from pg_catalog.pg_proc p
  where p.pronamespace in ('public'::regnamespace, 'private'::regnamespace)
  order by 1, 2, 3;
$$;

-- Every role a test acts as reaches the helpers; nothing else does.
revoke all on all functions in schema tests from public;
grant usage on schema tests to anon, authenticated, service_role;
grant execute on all functions in schema tests to anon, authenticated, service_role;

commit;


-- The helpers do what the header says.
begin;
select plan(8);

select tests.create_user('helper');

select is(
  (select email from auth.users where id = tests.user_id('helper')),
  'helper@pgtap.test',
  'tests.user_id finds a user tests.create_user made, by name'
);
select throws_ok(
  $$ select tests.user_id('nobody') $$,
  'P0001', 'tests.user_id: no test user named nobody',
  'tests.user_id refuses a name no user has'
);

select tests.create_twin('helper', 'Helper twin');
select is(
  (select owner_id from public.twins where id = tests.twin_id('Helper twin')),
  tests.user_id('helper'),
  'tests.twin_id finds a twin tests.create_twin made, by name'
);

select tests.act_as('helper');
select results_eq(
  $$ select current_user, auth.uid(), auth.role() $$,
  $$ values ('authenticated'::name, tests.user_id('helper'), 'authenticated') $$,
  'tests.act_as signs in as the named user'
);
select results_eq(
  $$ select name from public.twins $$,
  $$ values ('Helper twin') $$,
  'acting as a user, the policies apply'
);

select tests.act_as_anon();
select results_eq(
  $$ select current_user, auth.uid(), auth.role() $$,
  $$ values ('anon'::name, null::uuid, 'anon') $$,
  'tests.act_as_anon requests as anon, with no user'
);

select tests.act_as_service_role();
select results_eq(
  $$ select current_user, auth.uid(), auth.role() $$,
  $$ values ('service_role'::name, null::uuid, 'service_role') $$,
  'tests.act_as_service_role requests as the service role, with no user'
);

select tests.act_as_platform();
select results_eq(
  $$ select current_user, auth.uid(), auth.role() $$,
  $$ values (session_user, null::uuid, null::text) $$,
  'tests.act_as_platform is the session''s own role again, with no JWT'
);

select * from finish();
rollback;
