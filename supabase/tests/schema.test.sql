-- The schema the API exposes, as the security model in DESIGN.md needs it: the tables and the view,
-- row-level security on every table, the policies by name, who holds which privilege, who may
-- execute which function, and the indexes the policies lean on.
begin;
create extension if not exists pgtap with schema extensions;
select plan(43);

-- Tables and views

select tables_are(
  'public',
  array[
    'twins', 'persona_learning_settings', 'persona_specs', 'persona_modules',
    'persona_module_changes', 'persona_training_events', 'persona_feedback_learning_runs'
  ],
  'public holds exactly the project''s tables'
);
select views_are('public', array['persona_langfuse_outbox'], 'public holds exactly the outbox view');
select has_table('public', 'twins', 'twins exists');
select has_table('public', 'persona_training_events', 'persona_training_events exists');
select has_table('public', 'persona_feedback_learning_runs', 'persona_feedback_learning_runs exists');
select has_table('public', 'persona_modules', 'persona_modules exists');

select is_empty(
  $$ select c.relname from pg_class c
     where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p')
       and not c.relrowsecurity $$,
  'row-level security is enabled on every public table'
);
select ok(
  (select 'security_invoker=true' = any(c.reloptions) from pg_class c
   where c.oid = 'public.persona_langfuse_outbox'::regclass),
  'the outbox view reads the events with the caller''s rights and policies'
);

-- Policies: each one by name, all of them for signed-in users only

select policies_are('public', 'twins', array[
  'Owners can read their twins', 'Users can create twins they own', 'Owners can update their twins'
]);
select policies_are('public', 'persona_learning_settings', array[
  'Owners can read their twins'' learning settings',
  'Owners can change their twins'' learning settings'
]);
select policies_are('public', 'persona_specs', array[
  'Owners can read their twins'' specs', 'Owners can create draft specs',
  'Owners can edit draft specs'
]);
select policies_are('public', 'persona_modules', array['Owners can read their twins'' modules']);
select policies_are('public', 'persona_module_changes',
  array['Owners can read their twins'' module changes']);
select policies_are('public', 'persona_training_events', array[
  'Voters and twin owners can read events', 'Users send their own feedback'
]);
select policies_are('public', 'persona_feedback_learning_runs',
  array['Owners can read their twins'' runs']);
select is_empty(
  $$ select tablename || ': ' || policyname from pg_policies
     where schemaname = 'public' and roles <> '{authenticated}'::name[] $$,
  'every policy applies to authenticated only'
);
select policy_cmd_is('public', 'persona_specs', 'Owners can edit draft specs', 'update',
  'owners edit drafts through an update policy');
select policy_cmd_is('public', 'persona_training_events',
  'Users send their own feedback', 'insert',
  'users send feedback through an insert policy');

-- Table privileges: anon holds none, authenticated reads (RLS filters), the service role all

select is_empty(
  $$ select c.relname || ': ' || p.priv
     from pg_class c
     cross join unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE', 'REFERENCES',
                             'TRIGGER']) p(priv)
     where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'v')
       and case when p.priv in ('SELECT', 'INSERT', 'UPDATE', 'REFERENCES')
                then has_any_column_privilege('anon', c.oid, p.priv)
                else has_table_privilege('anon', c.oid, p.priv) end $$,
  'anon holds no privilege on any table or view'
);
select is_empty(
  $$ select c.relname || ': ' || p.priv
     from pg_class c
     cross join unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE', 'TRUNCATE']) p(priv)
     where c.relnamespace = 'public'::regnamespace and c.relkind = 'r'
       and has_table_privilege('authenticated', c.oid, p.priv) <> (p.priv = 'SELECT') $$,
  'authenticated holds SELECT on every table and no table-wide write privilege'
);
select table_privs_are('public', 'persona_langfuse_outbox', 'authenticated', array[]::text[],
  'authenticated may not read the outbox view');
select is_empty(
  $$ select c.relname || ': ' || p.priv
     from pg_class c
     cross join unnest(array['SELECT', 'INSERT', 'UPDATE', 'DELETE']) p(priv)
     where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'v')
       and not has_table_privilege('service_role', c.oid, p.priv) $$,
  'the service role may select, insert, update and delete everywhere'
);

-- Column privileges: what a client may write

create function pg_temp.columns_granted(p_table regclass, p_privilege text)
returns setof text
language sql
as $$
  select a.attname::text from pg_attribute a
  where a.attrelid = p_table and a.attnum > 0 and not a.attisdropped
    and has_column_privilege('authenticated', p_table, a.attnum, p_privilege)
  order by 1;
$$;

select results_eq(
  $$ select * from pg_temp.columns_granted('public.persona_training_events', 'INSERT') $$,
  $$ values ('comment'), ('intent_label'), ('metadata'), ('module_key'), ('reason'),
            ('score'), ('trace_id'), ('twin_id') $$,
  'a client inserts the vote only; the database sets every other event column'
);
select is_empty(
  $$ select * from pg_temp.columns_granted('public.persona_training_events', 'UPDATE') $$,
  'no client updates an event'
);
select results_eq(
  $$ select * from pg_temp.columns_granted('public.twins', 'INSERT') $$,
  $$ values ('feedback_from'), ('name') $$,
  'a client creates a twin by name and feedback setting; owner_id comes from the JWT'
);
select results_eq(
  $$ select * from pg_temp.columns_granted('public.twins', 'UPDATE') $$,
  $$ values ('feedback_from'), ('name') $$,
  'an owner renames a twin or changes who may send feedback, never its owner'
);
select results_eq(
  $$ select * from pg_temp.columns_granted('public.persona_specs', 'INSERT') $$,
  $$ values ('spec'), ('twin_id') $$,
  'an owner creates a spec by twin and document; status and version are the database''s'
);
select results_eq(
  $$ select * from pg_temp.columns_granted('public.persona_specs', 'UPDATE') $$,
  $$ values ('spec') $$,
  'an owner edits a spec''s document only'
);
select is_empty(
  $$ select c.relname || '.' || a.attname
     from pg_class c join pg_attribute a on a.attrelid = c.oid and a.attnum > 0
     cross join unnest(array['INSERT', 'UPDATE']) p(priv)
     where c.oid in ('public.persona_modules'::regclass, 'public.persona_module_changes'::regclass,
                     'public.persona_feedback_learning_runs'::regclass)
       and has_column_privilege('authenticated', c.oid, a.attnum, p.priv) $$,
  'no client writes modules, their changes or runs'
);
select results_eq(
  $$ select count(*)::int
     from pg_temp.columns_granted('public.persona_learning_settings', 'UPDATE') c
     where c in ('twin_id', 'updated_at') $$,
  $$ values (0) $$,
  'an owner tunes learning settings but never moves them to another twin'
);

-- Functions: the owner's RPC and the worker's, executable by exactly the right roles

select functions_are('public', array[
  'request_learning_run', 'enqueue_due_learning_runs', 'enqueue_learning_run',
  'claim_learning_run', 'extend_learning_run_lease', 'claim_learning_run_events',
  'complete_learning_run', 'fail_learning_run', 'release_learning_run', 'claim_langfuse_outbox',
  'record_langfuse_deliveries', 'skip_langfuse_outbox', 'requeue_langfuse_outbox',
  -- computed fields of persona_training_events, read as columns
  'processed_at', 'processed_run_id'
]);
select is_empty(
  $$ select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace = 'public'::regnamespace
       and p.proname not in ('request_learning_run', 'processed_at', 'processed_run_id')
       and (has_function_privilege('anon', p.oid, 'execute')
            or has_function_privilege('authenticated', p.oid, 'execute')) $$,
  'anon and authenticated may execute no worker function'
);
select is_empty(
  $$ select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace = 'public'::regnamespace and p.proname <> 'request_learning_run'
       and not has_function_privilege('service_role', p.oid, 'execute') $$,
  'the service role may execute every worker function'
);
select function_privs_are('public', 'request_learning_run', array['uuid', 'boolean'],
  'authenticated', array['EXECUTE'], 'signed-in users may request runs');
select function_privs_are('public', 'request_learning_run', array['uuid', 'boolean'],
  'anon', array[]::text[], 'anon may not request runs');
select is_empty(
  $$ select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace in ('public'::regnamespace, 'private'::regnamespace)
       and has_function_privilege('anon', p.oid, 'execute') $$,
  'anon may execute nothing of the project''s'
);
select is_empty(
  $$ select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace = 'public'::regnamespace and p.prosecdef $$,
  'no function the API exposes runs with its owner''s rights'
);
select is_empty(
  $$ select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace in ('public'::regnamespace, 'private'::regnamespace)
       and not exists (select 1 from unnest(p.proconfig) c where c = 'search_path=""') $$,
  'every function of the project pins an empty search_path'
);
select schema_privs_are('private', 'anon', array[]::text[], 'anon may not use the private schema');

-- Indexes: every column a policy filters on leads an index

select is_empty(
  $$ select f.tbl || '.' || f.col
     from (values ('twins', 'owner_id'), ('persona_learning_settings', 'twin_id'),
                  ('persona_specs', 'twin_id'), ('persona_modules', 'twin_id'),
                  ('persona_module_changes', 'twin_id'), ('persona_training_events', 'twin_id'),
                  ('persona_training_events', 'created_by'),
                  ('persona_feedback_learning_runs', 'twin_id')) f(tbl, col)
     where not exists (
       select 1 from pg_index i
       join pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
       where i.indrelid = ('public.' || f.tbl)::regclass and a.attname = f.col) $$,
  'every column a policy filters on leads an index'
);
select is_empty(
  $$ select tablename || ': ' || policyname from pg_policies
     where schemaname = 'public'
       and (coalesce(qual, '') || coalesce(with_check, '')) like '%auth.uid()%'
       and (coalesce(qual, '') || coalesce(with_check, '')) not like '%SELECT auth.uid()%' $$,
  'policies evaluate auth.uid() once per statement: (select auth.uid())'
);
select is_empty(
  $$ select p.oid::regprocedure::text from pg_proc p
     where p.pronamespace = 'private'::regnamespace
       and p.proname in ('is_twin_owner', 'check_feedback_consent', 'record_feedback_vote')
       and not p.prosecdef $$,
  'the helpers policies and the insert triggers call are security definer'
);

-- The outbox claim orders by due time, then id: an index in that order serves it without a sort.
select has_index(
  'public', 'persona_training_events', 'persona_training_events_langfuse_due_idx',
  array['langfuse_next_attempt_at', 'id'],
  'the outbox claim''s index holds the due time, then the id'
);

select * from finish();
rollback;
