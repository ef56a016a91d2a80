-- What the hosted Supabase platform provides before any migration runs, as a hosted project has
-- it today. Applied by `scripts/stack up` before every `supabase db reset`, AS supabase_admin
-- (the cluster's bootstrap superuser, as in Supabase's image); it never goes into
-- supabase/migrations (on a hosted project these objects already exist).
--
-- Read from the platform's own sources and written here for what the project touches:
--   supabase/postgres  migrations/db/init-scripts (roles, default privileges, the auth schema)
--                      and migrations/db/migrations (postgres demoted: NOSUPERUSER, BYPASSRLS,
--                      member of the API roles; API roles INHERIT; authenticator's timeouts)
--   supabase/auth      migrations (auth.users' columns, indexes, RLS on, no id default;
--                      auth.uid()/role()/email()/jwt())
--   the Data API's "Default privileges for new entities" turned off, the hosted default for
--                      new projects since 2026-05-30 and for every project since 2026-10-30:
--                      the same revoke the dashboard and the CLI run (below).
-- Each difference that remains is listed in README.md, "Hosted Supabase".
--
-- Idempotent: it runs again before every reset. `supabase db reset --db-url` (as postgres) drops
-- every schema not owned by supabase_admin except public, extensions and its own, drops the
-- objects of public and truncates the tables of auth; the public schema itself, its default
-- privileges and the roles survive.

\set ON_ERROR_STOP on
set client_min_messages = warning;

-- ---------------------------------------------------------------- roles
do $$
declare
  v_role text;
begin
  foreach v_role in array array['postgres', 'anon', 'authenticated', 'service_role',
                                'authenticator', 'supabase_auth_admin']
  loop
    if not exists (select from pg_roles where rolname = v_role) then
      execute format('create role %I', v_role);
    end if;
  end loop;
end
$$;

-- supabase_admin is the cluster's bootstrap superuser (initdb -U supabase_admin). It logs in
-- locally for the platform's own work only: this file, and what hosted Supabase lets postgres do
-- through supautils (creating pgtap or plpgsql_check), done here as supabase_admin instead.
alter role supabase_admin superuser createdb createrole replication bypassrls login
  password 'postgres';
alter role supabase_admin set search_path = "$user", public, auth, extensions;

-- The developer's role: no superuser (10000000000000_demote-postgres), member of the API roles
-- (20230201083204) and of the auth service's role (20220609081115), the predefined roles of
-- 20230306081037 and 20240606060239. It owns the database, so it creates in public (PG15's
-- public schema belongs to the database owner), as on hosted.
alter role postgres nosuperuser createdb createrole login replication bypassrls
  password 'postgres';
alter role postgres set search_path = "$user", public, extensions;
do $$
begin
  execute format('alter database %I owner to postgres', current_database());
end
$$;
grant anon, authenticated, service_role to postgres;
grant supabase_auth_admin to postgres;
grant pg_monitor, pg_read_all_data, pg_signal_backend to postgres;
-- supautils' privileged_role_allowed_configs lets postgres set session_replication_role (bulk
-- loads without triggers); PostgreSQL 15 grants the same right natively.
grant set on parameter session_replication_role to postgres;

-- The API roles: INHERIT since 20230529180330; service_role bypasses RLS.
alter role anon nologin inherit nobypassrls;
alter role authenticated nologin inherit nobypassrls;
alter role service_role nologin inherit bypassrls;
-- PostgREST connects as authenticator and switches to the JWT's role (not to supabase_admin:
-- 20221103090837 revoked that).
alter role authenticator login noinherit password 'postgres';
grant anon, authenticated, service_role to authenticator;
-- The auth service's own role (GoTrue connects as it on hosted; nothing does here).
alter role supabase_auth_admin nologin noinherit createrole;

-- Timeouts (00000000000000-initial-schema, 20221028101028, 20231130133139): statements of anon
-- stop after 3 s, of authenticated after 8 s; service_role has none of its own and so keeps
-- authenticator's session settings, 8 s for statements and for lock waits. PostgREST applies the
-- impersonated role's settings in each request's transaction.
alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';
alter role authenticator set statement_timeout = '8s';
alter role authenticator set lock_timeout = '8s';
-- Hosted also sets `session_preload_libraries = supautils, safeupdate` for authenticator
-- (20220118070449, 20220224211803). Neither library is packaged for Debian: README.md,
-- "Hosted Supabase", says how the rule safeupdate enforces is proved instead.

-- ---------------------------------------------------------------- extensions
create schema if not exists extensions authorization supabase_admin;
alter schema extensions owner to supabase_admin;
grant all on schema extensions to postgres;
grant usage on schema extensions to anon, authenticated, service_role;
create extension if not exists pgcrypto with schema extensions;
create extension if not exists "uuid-ossp" with schema extensions;
grant all on all tables in schema extensions to postgres with grant option;
grant all on all routines in schema extensions to postgres with grant option;
grant all on all sequences in schema extensions to postgres with grant option;

-- ---------------------------------------------------------------- auth
create schema if not exists auth authorization supabase_admin;
alter schema auth owner to supabase_admin;
grant usage on schema auth to anon, authenticated, service_role;
grant all on schema auth to supabase_auth_admin, postgres;

-- auth.users as the auth service's migrations leave it (supabase/auth, 00_init_auth_schema and
-- the alterations after it, in the order they add columns). No default on id: the auth service
-- picks every user's id, so must anything else that creates a user.
create table if not exists auth.users (
  instance_id uuid null,
  id uuid not null unique,
  aud varchar(255) null,
  "role" varchar(255) null,
  email varchar(255) null,
  encrypted_password varchar(255) null,
  email_confirmed_at timestamptz null,
  invited_at timestamptz null,
  confirmation_token varchar(255) null,
  confirmation_sent_at timestamptz null,
  recovery_token varchar(255) null,
  recovery_sent_at timestamptz null,
  email_change_token_new varchar(255) null,
  email_change varchar(255) null,
  email_change_sent_at timestamptz null,
  last_sign_in_at timestamptz null,
  raw_app_meta_data jsonb null,
  raw_user_meta_data jsonb null,
  is_super_admin bool null,
  created_at timestamptz null,
  updated_at timestamptz null,
  phone text null unique default null,
  phone_confirmed_at timestamptz null default null,
  phone_change text null default '',
  phone_change_token varchar(255) null default '',
  phone_change_sent_at timestamptz null default null,
  confirmed_at timestamptz generated always as (least(email_confirmed_at, phone_confirmed_at)) stored,
  email_change_token_current varchar(255) null default '',
  email_change_confirm_status smallint default 0
    check (email_change_confirm_status >= 0 and email_change_confirm_status <= 2),
  banned_until timestamptz null,
  reauthentication_token varchar(255) null default '',
  reauthentication_sent_at timestamptz null default null,
  is_sso_user boolean not null default false,
  deleted_at timestamptz null,
  is_anonymous boolean not null default false,
  constraint users_pkey primary key (id)
);
create index if not exists users_instance_id_email_idx on auth.users (instance_id, email);
create index if not exists users_instance_id_idx on auth.users (instance_id);
create unique index if not exists confirmation_token_idx on auth.users (confirmation_token)
  where confirmation_token !~ '^[0-9 ]*$';
create unique index if not exists recovery_token_idx on auth.users (recovery_token)
  where recovery_token !~ '^[0-9 ]*$';
create unique index if not exists email_change_token_current_idx
  on auth.users (email_change_token_current) where email_change_token_current !~ '^[0-9 ]*$';
create unique index if not exists email_change_token_new_idx
  on auth.users (email_change_token_new) where email_change_token_new !~ '^[0-9 ]*$';
create unique index if not exists reauthentication_token_idx on auth.users (reauthentication_token)
  where reauthentication_token !~ '^[0-9 ]*$';
create unique index if not exists users_email_partial_key on auth.users (email)
  where (is_sso_user = false);
create index if not exists users_is_anonymous_idx on auth.users (is_anonymous);
comment on table auth.users is 'Auth: Stores user login data within a secure schema.';
comment on column auth.users.is_sso_user is
  'Auth: Set this column to true when the account comes from SSO. These accounts can have duplicate emails.';
alter table auth.users owner to supabase_auth_admin;
-- RLS on, no policy (20240612123726): only roles that bypass RLS (postgres, service_role) or own
-- the table see its rows.
alter table auth.users enable row level security;
grant all on auth.users to postgres;
grant select on auth.users to postgres with grant option;

-- The JWT helpers as the auth service defines them today (20220224000811,
-- 20220531120530): PostgREST 12 puts the claims in request.jwt.claims; the request.jwt.claim.*
-- form is what PostgREST < 9 set.
create or replace function auth.uid() returns uuid
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.sub', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub')
  )::uuid
$$;

create or replace function auth.role() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.role', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role')
  )::text
$$;

create or replace function auth.email() returns text
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim.email', true), ''),
    (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'email')
  )::text
$$;

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

comment on function auth.uid() is 'Deprecated. Use auth.jwt() -> ''sub'' instead.';
comment on function auth.role() is 'Deprecated. Use auth.jwt() -> ''role'' instead.';
comment on function auth.email() is 'Deprecated. Use auth.jwt() -> ''email'' instead.';

alter function auth.uid() owner to supabase_auth_admin;
alter function auth.role() owner to supabase_auth_admin;
alter function auth.email() owner to supabase_auth_admin;
alter function auth.jwt() owner to supabase_auth_admin;
grant all on all routines in schema auth to postgres;

-- ---------------------------------------------------------------- public
-- The image's default privileges (00000000000000-initial-schema, run as postgres, and for
-- supabase_admin's objects) ...
grant usage on schema public to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on functions to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on sequences to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on functions to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on sequences to postgres, anon, authenticated, service_role;
-- ... then "Default privileges for new entities" off: exactly the revoke the dashboard runs at
-- project creation and the CLI runs for `[api] auto_expose_new_tables = false`. It takes away
-- the Data API's privileges (tables: select, insert, update, delete; sequences: usage, select;
-- functions: execute) and leaves the rest (truncate, references, trigger; a sequence's update),
-- which the project's migrations revoke themselves.
alter default privileges for role postgres in schema public
  revoke select, insert, update, delete on tables from anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  revoke usage, select on sequences from anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  revoke execute on functions from anon, authenticated, service_role;
