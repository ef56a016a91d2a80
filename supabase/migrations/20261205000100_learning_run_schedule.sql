-- Section: the optional schedule of learning runs on pg_cron (hosted Supabase ships pg_cron;
-- the project owner enables it). The database then queues due runs on its own clock; a worker
-- (`pfl serve`, or `pfl run-once` from any scheduler) still executes them. The project creates no
-- extension: without pg_cron these functions exist and say so when called.

-- Schedules (or reschedules) the queueing of due runs: one pg_cron job of the caller's, named
-- pfl_enqueue_due_learning_runs. pg_cron is reached through dynamic SQL that names its schema
-- through a variable: the function is created, and checked by plpgsql_check (supabase db lint),
-- on databases without the schema cron, where a statement naming it outright fails the check.
create function public.schedule_learning_runs(p_schedule text default '* * * * *')
returns bigint
language plpgsql
set search_path = ''
as $$
declare
  v_cron constant text := 'cron';
  v_job_id bigint;
begin
  if not exists (select from pg_catalog.pg_extension x where x.extname = 'pg_cron') then
    raise exception using
      errcode = '55000',
      message = 'pg_cron is not enabled in this database',
      hint = 'enable it (dashboard: Integrations, Cron; or create extension pg_cron with schema '
             'pg_catalog), then call public.schedule_learning_runs again';
  end if;
  if p_schedule is null or btrim(p_schedule) = '' then
    raise exception using
      errcode = '22023',
      message = 'p_schedule: a pg_cron schedule is required, e.g. ''* * * * *'' (every minute) '
                'or ''30 seconds'' (pg_cron 1.5 and later)';
  end if;
  execute format('select %I.schedule($1, $2, $3)', v_cron)
    into v_job_id
    using 'pfl_enqueue_due_learning_runs', p_schedule,
          'select id from public.enqueue_due_learning_runs()';
  return v_job_id;
end;
$$;

comment on function public.schedule_learning_runs(text) is
  'Project owner (SQL, as postgres; no API role may execute it). In: p_schedule, a pg_cron '
  'schedule (default ''* * * * *'': every minute; ''N seconds'' with pg_cron 1.5 and later). '
  'Out: the id (bigint) of the caller''s pg_cron job pfl_enqueue_due_learning_runs, created or '
  'given the new schedule, whose command is select id from public.enqueue_due_learning_runs() '
  '(queues a run for every twin with unprocessed evidence and none queued or running; the job '
  'history, cron.job_run_details, reports SELECT n for n runs queued). Runs it queues wait for a '
  'worker (pfl serve or pfl run-once). Raises 55000 "pg_cron is not enabled in this database" '
  'without the extension, 22023 for a null or blank schedule, and pg_cron''s own error (22023 '
  '"invalid schedule: ...") for one it cannot read.';

-- Removes the schedule; true if the caller had one.
create function public.unschedule_learning_runs()
returns boolean
language plpgsql
set search_path = ''
as $$
declare
  v_cron constant text := 'cron';
  v_scheduled boolean;
begin
  if not exists (select from pg_catalog.pg_extension x where x.extname = 'pg_cron') then
    raise exception using
      errcode = '55000',
      message = 'pg_cron is not enabled in this database';
  end if;
  execute format('select exists (select from %I.job j where j.jobname = $1 '
                 'and j.username = current_user)', v_cron)
    into v_scheduled
    using 'pfl_enqueue_due_learning_runs';
  if v_scheduled then
    execute format('select %I.unschedule($1)', v_cron) using 'pfl_enqueue_due_learning_runs';
  end if;
  return v_scheduled;
end;
$$;

comment on function public.unschedule_learning_runs() is
  'Project owner (SQL, as postgres; no API role may execute it). In: nothing. Out: true when it '
  'removed the caller''s pg_cron job pfl_enqueue_due_learning_runs, false when there was none. '
  'Raises 55000 "pg_cron is not enabled in this database" without the extension.';

-- Only the owner of the functions (postgres, who enables pg_cron's rights) executes them.
revoke execute on function
  public.schedule_learning_runs(text),
  public.unschedule_learning_runs()
from public;
