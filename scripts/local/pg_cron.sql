-- Enables pg_cron in the local stack's database the way hosted Supabase does when the owner
-- turns it on (Dashboard -> Integrations -> Cron, or Database -> Extensions -> pg_cron, or
-- `create extension pg_cron with schema pg_catalog` as postgres): the extension is created by
-- the platform's superuser, and postgres then gets what supautils' after-create step for
-- pg_cron gives it: use of the schema cron and its functions (cron.schedule, cron.unschedule),
-- the job history (cron.job_run_details), and read access only to cron.job (jobs change through
-- the functions). Run AS supabase_admin (PFL_ADMIN_DATABASE_URL), like platform.sql; the
-- server must preload pg_cron (scripts/stack does). Idempotent. Never a migration: the project
-- creates no extension (README.md, "Scheduling with pg_cron").

\set ON_ERROR_STOP on
set client_min_messages = warning;

create extension if not exists pg_cron with schema pg_catalog;

grant usage on schema cron to postgres with grant option;
grant all on all functions in schema cron to postgres with grant option;
grant all on all tables in schema cron to postgres with grant option;
grant all on all sequences in schema cron to postgres with grant option;
revoke all on table cron.job from postgres;
grant select on table cron.job to postgres with grant option;
