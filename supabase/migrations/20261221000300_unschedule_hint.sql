-- unschedule_learning_runs without pg_cron: the error says what it means (issue 15). It raised
-- 55000 "pg_cron is not enabled in this database" with no hint, as if something had to be done;
-- schedule_learning_runs' same error says how to enable pg_cron. Now a hint says that without
-- pg_cron no schedule exists, so there is nothing to remove. Nothing else changes.

create or replace function public.unschedule_learning_runs()
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
      message = 'pg_cron is not enabled in this database',
      hint = 'without pg_cron no schedule of learning runs exists: nothing to remove; runs are '
             'queued by pfl serve or pfl run-once';
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
  'Raises 55000 "pg_cron is not enabled in this database" without the extension (its hint: no '
  'schedule exists then, nothing to remove).';
