-- Section: no MAINTAIN for the API roles (PostgreSQL 17).
--
-- PostgreSQL 17 added the table privilege MAINTAIN (VACUUM, ANALYZE, REINDEX, CLUSTER,
-- REFRESH MATERIALIZED VIEW, LOCK TABLE), and `grant all` on a table includes it. Hosted
-- projects run PostgreSQL 17, and those made before 2026-05-30 granted all on every new table
-- and view in public to anon, authenticated and service_role: there the tables the migrations
-- created before 20261202000100_explicit_grants hold MAINTAIN for service_role (the first
-- migration took the defaults of anon and authenticated away). That migration revoked what
-- PostgreSQL 15 can name (truncate, references, trigger), not MAINTAIN. No API role needs it:
-- PostgREST never runs maintenance, and LOCK TABLE by the service role could stall the worker.
--
-- `revoke maintain` is a syntax error on PostgreSQL 15 (the keyword does not exist there, and
-- neither does the privilege, so there is nothing to revoke): the statements are run only on 17
-- and later, through EXECUTE so that 15 never parses them. On 15 this migration changes nothing.
-- `all tables` covers views, materialized views and partitioned tables too. The default
-- privileges part keeps tables created by later migrations (as postgres, as `supabase db push`
-- runs them) from getting MAINTAIN back; 20261202000100 already revoked all there, this says it
-- by name.
do $$
begin
  if current_setting('server_version_num')::int >= 170000 then
    execute 'revoke maintain on all tables in schema public '
            'from anon, authenticated, service_role';
    execute 'alter default privileges in schema public revoke maintain on tables '
            'from anon, authenticated, service_role';
  end if;
end
$$;
