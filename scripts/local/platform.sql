-- What the hosted Supabase platform provides before any migration runs. Applied by
-- `scripts/stack up` to the private cluster before every `supabase db reset`; it must never go
-- into supabase/migrations (on a hosted project these objects already exist).
--
-- Idempotent: roles, schemas and tables may already exist. It survives
-- `supabase db reset --db-url`, which drops every schema not owned by `supabase_admin` (except
-- public, extensions, supabase_migrations and a few more), drops all objects and policies in
-- public and every extension but pgcrypto, uuid-ossp and a few Supabase ones, and truncates the
-- tables in auth. It keeps the public schema itself, so its grants and default privileges stay.
-- Modelled on supabase/postgres' init scripts and GoTrue's auth.uid()/role()/jwt().

\set ON_ERROR_STOP on
set client_min_messages = warning;

-- ---------------------------------------------------------------- roles
do $$
begin
  if not exists (select from pg_roles where rolname = 'supabase_admin') then
    create role supabase_admin;
  end if;
  if not exists (select from pg_roles where rolname = 'anon') then
    create role anon;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticated') then
    create role authenticated;
  end if;
  if not exists (select from pg_roles where rolname = 'service_role') then
    create role service_role;
  end if;
  if not exists (select from pg_roles where rolname = 'authenticator') then
    create role authenticator;
  end if;
end
$$;

-- The platform's superuser; owning the platform schemas is what shields them from `db reset`.
-- No login: nothing local connects as it.
alter role supabase_admin nologin superuser createdb createrole replication bypassrls;
alter role anon nologin noinherit;
alter role authenticated nologin noinherit;
alter role service_role nologin noinherit bypassrls;
-- PostgREST connects as authenticator and switches to the JWT's role.
alter role authenticator login noinherit password 'postgres';
grant anon, authenticated, service_role to authenticator;
alter role postgres password 'postgres';

-- Hosted defaults: short statement timeouts for the API roles, extensions on the search path.
alter role anon set statement_timeout = '3s';
alter role authenticated set statement_timeout = '8s';
alter role postgres set search_path = "$user", public, extensions;

-- ---------------------------------------------------------------- extensions
create schema if not exists extensions authorization supabase_admin;
alter schema extensions owner to supabase_admin;
grant usage on schema extensions to postgres, anon, authenticated, service_role;
create extension if not exists pgcrypto with schema extensions;
create extension if not exists "uuid-ossp" with schema extensions;

-- ---------------------------------------------------------------- auth
create schema if not exists auth authorization supabase_admin;
alter schema auth owner to supabase_admin;

-- Only what foreign keys, policies and tests need from GoTrue's users table.
create table if not exists auth.users (
  id uuid primary key default gen_random_uuid(),
  email text unique,
  raw_app_meta_data jsonb not null default '{}'::jsonb,
  raw_user_meta_data jsonb not null default '{}'::jsonb,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now()
);
alter table auth.users owner to supabase_admin;
comment on table auth.users is 'Auth: Stores user login data within a secure schema.';

-- As GoTrue defines them: PostgREST 12 puts the JWT claims in request.jwt.claims; the
-- request.jwt.claim.* form is what PostgREST < 9 set.
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

create or replace function auth.jwt() returns jsonb
language sql stable
as $$
  select coalesce(
    nullif(current_setting('request.jwt.claim', true), ''),
    nullif(current_setting('request.jwt.claims', true), '')
  )::jsonb
$$;

alter function auth.uid() owner to supabase_admin;
alter function auth.role() owner to supabase_admin;
alter function auth.jwt() owner to supabase_admin;
grant usage on schema auth to anon, authenticated, service_role;
grant execute on function auth.uid(), auth.role(), auth.jwt() to anon, authenticated, service_role;

-- ---------------------------------------------------------------- public
-- Hosted Supabase exposes everything new in public to the API roles by default; that is why
-- migrations must revoke explicitly what those roles may not do.
grant usage on schema public to postgres, anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on tables to anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on sequences to anon, authenticated, service_role;
alter default privileges for role postgres in schema public
  grant all on functions to anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on tables to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on sequences to postgres, anon, authenticated, service_role;
alter default privileges for role supabase_admin in schema public
  grant all on functions to postgres, anon, authenticated, service_role;
