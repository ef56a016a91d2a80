-- Section: lock down defaults, then grant by name.
-- Older hosted projects grant every new table, sequence and function in `public` to anon,
-- authenticated and service_role; newer ones grant none of the Data API's privileges but leave
-- truncate, references and trigger (and a sequence's update). Neither applies here: no API role
-- gets anything by default, and each privilege is granted by name where the object is created.

-- PostgreSQL's own default lets PUBLIC execute every function, and a per-schema default cannot
-- take that away: each file revokes it from the functions it creates.
-- On PostgreSQL 17 `all` on tables includes MAINTAIN, so no table of this schema ever gets it:
-- the migrations' 20261208000100_pg17_maintain (for tables an old project's defaults gave it to
-- before these revokes) has nothing to do here.
alter default privileges in schema public revoke all on functions from anon, authenticated, service_role;
alter default privileges in schema public revoke all on tables from anon, authenticated, service_role;
alter default privileges in schema public revoke all on sequences from anon, authenticated, service_role;

-- Helpers that policies and triggers call live in `private`, which PostgREST does not expose.
create schema if not exists private;
revoke all on schema private from public;
grant usage on schema private to authenticated, service_role;

comment on schema private is 'Helpers for policies and triggers; not exposed through the API.';

create function private.touch_updated_at()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  new.updated_at := now();
  return new;
end;
$$;

comment on function private.touch_updated_at() is
  'Trigger (before update): sets the row''s updated_at to now(), the transaction''s start time. '
  'Raises nothing.';

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  private.touch_updated_at()
from public;
