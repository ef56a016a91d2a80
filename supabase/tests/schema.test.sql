-- The schema the API exposes, as the security model in DESIGN.md needs it: the tables and the view,
-- row-level security on every table, the policies by name, then what each role may touch (anon,
-- a signed-in user, the service role), the functions' rights, and the indexes the policies and
-- the worker lean on. What each role may do with actual rows is in the other files.
--
-- Names another change may rename are in the last block, "Names that may change", and nowhere
-- else in this file.
begin;
select plan(58);


-- Tables, views and row-level security

select tables_are(
  'public',
  array[
    'twins', 'persona_learning_settings', 'persona_specs', 'persona_modules',
    'persona_module_changes', 'persona_training_events', 'persona_feedback_learning_runs',
    'persona_feedback_daily', 'persona_run_evidence', 'persona_spec_watches'
  ],
  'public holds exactly the project''s tables'
);
select views_are('public', array[
  'persona_langfuse_outbox', 'persona_module_trend', 'persona_module_feedback',
  'persona_module_feedback_reasons', 'persona_twin_overview', 'persona_training_events_state'
], 'public holds exactly the outbox view and the owner views');
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
select policies_are('public', 'persona_spec_watches',
  array['Owners can read their twins'' spec watches']);
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
select is_empty(
  $$ select tablename || ': ' || policyname from pg_policies
     where schemaname = 'public'
       and (coalesce(qual, '') || coalesce(with_check, '')) like '%auth.uid()%'
       and (coalesce(qual, '') || coalesce(with_check, '')) not like '%SELECT auth.uid()%' $$,
  'policies evaluate auth.uid() once per statement: (select auth.uid())'
);


-- What anon may touch: nothing

select is_empty(
  $$ select relation || ': ' || privilege from tests.table_privileges('anon') where on_a_column $$,
  'anon holds no privilege on any table or view, nor on any column'
);
select is_empty(
  $$ select signature from tests.function_privileges('anon') where executable $$,
  'anon may execute nothing of the project''s'
);
select function_privs_are('public', 'request_learning_run', array['uuid', 'boolean'],
  'anon', array[]::text[], 'anon may not request runs');
select schema_privs_are('private', 'anon', array[]::text[], 'anon may not use the private schema');


-- What a signed-in user may touch: reads (RLS filters the rows), a few columns, one RPC

select is_empty(
  $$ select relation || ': ' || privilege from tests.table_privileges('authenticated')
     where kind in ('r', 'p') and on_table <> (privilege = 'SELECT') $$,
  'authenticated holds SELECT on every table and no other table-wide privilege'
);
select table_privs_are('public', 'persona_langfuse_outbox', 'authenticated', array[]::text[],
  'authenticated may not read the outbox view');
select results_eq(
  $$ select * from tests.columns_granted('authenticated', 'public.persona_training_events',
                                         'INSERT') $$,
  $$ values ('comment'), ('intent_label'), ('metadata'), ('module_key'), ('reason'),
            ('score'), ('trace_id'), ('twin_id') $$,
  'a client inserts the vote only; the database sets every other event column'
);
select is_empty(
  $$ select * from tests.columns_granted('authenticated', 'public.persona_training_events',
                                         'UPDATE') $$,
  'no client updates an event'
);
select results_eq(
  $$ select * from tests.columns_granted('authenticated', 'public.twins', 'INSERT') $$,
  $$ values ('feedback_from'), ('name') $$,
  'a client creates a twin by name and feedback setting; owner_id comes from the JWT'
);
select results_eq(
  $$ select * from tests.columns_granted('authenticated', 'public.twins', 'UPDATE') $$,
  $$ values ('feedback_from'), ('name') $$,
  'an owner renames a twin or changes who may send feedback, never its owner'
);
select results_eq(
  $$ select * from tests.columns_granted('authenticated', 'public.persona_specs', 'INSERT') $$,
  $$ values ('spec'), ('twin_id') $$,
  'an owner creates a spec by twin and document; status and version are the database''s'
);
select results_eq(
  $$ select * from tests.columns_granted('authenticated', 'public.persona_specs', 'UPDATE') $$,
  $$ values ('spec') $$,
  'an owner edits a spec''s document only'
);
select is_empty(
  $$ select relation || ': ' || privilege from tests.table_privileges('authenticated')
     where relation in ('persona_modules', 'persona_module_changes',
                        'persona_feedback_learning_runs')
       and privilege in ('INSERT', 'UPDATE') and on_a_column $$,
  'no client writes modules, their changes or runs, not even one column'
);
select is_empty(
  $$ select c from tests.columns_granted('authenticated', 'public.persona_learning_settings',
                                         'UPDATE') c
     where c in ('twin_id', 'updated_at') $$,
  'an owner tunes learning settings but never moves them to another twin'
);
select results_eq(
  $$ select function_name from tests.function_privileges('authenticated')
     where schema_name = 'public' and executable $$,
  $$ values ('processed_at'), ('processed_run_id'), ('request_learning_run'),
            ('rollback_persona_spec') $$,
  'of the API''s functions, a signed-in user executes the run request, the rollback and the '
  'computed fields only'
);
select function_privs_are('public', 'request_learning_run', array['uuid', 'boolean'],
  'authenticated', array['EXECUTE'], 'signed-in users may request runs');
select function_privs_are('public', 'rollback_persona_spec', array['uuid', 'text', 'uuid'],
  'authenticated', array['EXECUTE'], 'signed-in users may roll back (their own twins'' specs)');


-- What the service role may touch: every row of every table, every worker function

select is_empty(
  $$ select relation || ': ' || privilege from tests.table_privileges('service_role')
     where privilege in ('SELECT', 'INSERT', 'UPDATE', 'DELETE') and not on_table
       and not (relation in ('persona_feedback_daily', 'persona_run_evidence',
                             'persona_module_trend', 'persona_module_feedback',
                             'persona_module_feedback_reasons', 'persona_twin_overview',
                             'persona_training_events_state')
                and privilege <> 'SELECT')
       and (relation, privilege) <> ('persona_learning_settings', 'DELETE') $$,
  'the service role may select, insert, update and delete everywhere but the owner views and '
  'their summaries, which it reads (the completion trigger writes the summaries), and a twin''s '
  'settings row, which lives and dies with the twin'
);
select table_privs_are('public', 'persona_learning_settings', 'service_role',
  array['SELECT', 'INSERT', 'UPDATE'],
  'the service role cannot delete a twin''s settings row (every run reads it)');
select is_empty(
  $$ select signature from tests.function_privileges('service_role')
     where schema_name = 'public' and not executable
       and function_name not in ('request_learning_run', 'rollback_persona_spec',
                                 'schedule_learning_runs', 'unschedule_learning_runs') $$,
  'the service role may execute every worker function'
);
select is_empty(
  $$ select r.rolname || ': ' || f.fn
     from (values ('anon'), ('authenticated'), ('service_role')) r(rolname)
     cross join (values ('public.schedule_learning_runs(text)'),
                        ('public.unschedule_learning_runs()')) f(fn)
     where has_function_privilege(r.rolname, f.fn, 'EXECUTE') $$,
  'only the project owner schedules learning runs on pg_cron: no API role may'
);


select function_privs_are('public', 'request_learning_run', array['uuid', 'boolean'],
  'service_role', array[]::text[],
  'the service role does not request runs as an owner (it queues them with enqueue_learning_run)');
select is_empty(
  $$ select c.relname || ': ' || r.rolname || ' ' || p.priv
     from pg_class c
     cross join (values ('anon'), ('authenticated'), ('service_role')) r(rolname)
     cross join unnest(array['TRUNCATE', 'REFERENCES', 'TRIGGER']) p(priv)
     where c.relnamespace = 'public'::regnamespace and c.relkind in ('r', 'p', 'v')
       and has_table_privilege(r.rolname, c.oid, p.priv) $$,
  'no API role may empty, reference or add triggers to a table or view'
);
select is_empty(
  $$ select c.relname || ': ' || r.rolname
     from pg_class c
     cross join (values ('anon'), ('authenticated'), ('service_role')) r(rolname)
     where c.relnamespace = 'public'::regnamespace and c.relkind = 'S'
       and (has_sequence_privilege(r.rolname, c.oid, 'USAGE')
            or has_sequence_privilege(r.rolname, c.oid, 'SELECT')
            or has_sequence_privilege(r.rolname, c.oid, 'UPDATE')) $$,
  'no API role holds a privilege on a sequence: identity columns need none'
);
select is_empty(
  $$ select d.defaclobjtype::text || ': ' || a.grantee::regrole::text
     from pg_default_acl d cross join aclexplode(d.defaclacl) a
     where d.defaclrole = 'postgres'::regrole and d.defaclnamespace = 'public'::regnamespace
       and a.grantee in ('anon'::regrole, 'authenticated'::regrole, 'service_role'::regrole) $$,
  'what postgres creates in public next gets no privilege for an API role by default'
);


-- Functions: the API's, the worker's, and how they run

select functions_are('public', array[
  'request_learning_run', 'enqueue_due_learning_runs', 'enqueue_learning_run',
  'claim_learning_run', 'extend_learning_run_lease', 'claim_learning_run_events',
  'complete_learning_run', 'fail_learning_run', 'release_learning_run', 'claim_langfuse_outbox',
  'record_langfuse_deliveries', 'skip_langfuse_outbox', 'requeue_langfuse_outbox',
  'langfuse_outbox_backlog', 'end_langfuse_hold', 'claim_langfuse_check', 'record_langfuse_check',
  'worker_schema_version', 'claim_production_watch',
  'rollback_persona_spec', 'claim_learning_runs', 'read_learning_runs', 'complete_learning_runs',
  -- the project owner's, for the optional pg_cron schedule; no API role executes them
  'schedule_learning_runs', 'unschedule_learning_runs',
  -- computed fields of persona_training_events, read as columns
  'processed_at', 'processed_run_id'
]);
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


-- Indexes: every column a policy filters on leads an index; the outbox claim needs no sort

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
-- The outbox claim orders by due time, then id: an index in that order serves it without a sort.
select has_index(
  'public', 'persona_training_events', 'persona_training_events_langfuse_due_idx',
  array['langfuse_next_attempt_at', 'id'],
  'the outbox claim''s index holds the due time, then the id'
);


-- The functions the policies and the feedback insert triggers call; nothing else in the tests
-- names them.

select is_empty(
  $$ select p.proname from pg_proc p
     where p.pronamespace = 'private'::regnamespace
       and p.proname in ('is_twin_owner', 'record_feedback_vote')
       and not p.prosecdef $$,
  'the helpers policies and the insert triggers call are security definer'
);
select is(
  (select count(*)::int from pg_proc p
   where p.pronamespace = 'private'::regnamespace
     and p.proname in ('is_twin_owner', 'record_feedback_vote')),
  2,
  'the helpers named above exist, so the check above is not vacuous'
);


-- The exact path's rebuild: each worker call reads a bounded step; its scratch is the worker's.

select throws_ok(
  $$ update public.persona_learning_settings set rebuild_step_events = 500001 $$,
  '23514', null, 'a rebuild step is at most 500,000 events (each call inside the API timeout)'
);
select is_empty(
  $$ select r.role || ': ' || t.name
     from unnest(array['anon', 'authenticated']) r(role),
          unnest(array['private.learning_run_rebuilds', 'private.learning_run_rebuild_sums',
                       'private.learning_run_summaries']) t(name)
     where has_table_privilege(r.role, t.name, 'select, insert, update, delete') $$,
  'no API role but the service role touches a run''s scratch (rebuild sums, batch summaries)'
);
select ok(
  has_table_privilege('service_role', 'private.learning_run_rebuild_sums',
                      'select, insert, update, delete'),
  'the worker (service role) writes its rebuild''s scratch'
);
select ok(
  has_table_privilege('service_role', 'private.learning_run_summaries',
                      'select, insert, update, delete'),
  'the worker (service role) writes its batch summaries'
);


-- The Langfuse mirror's hold (one row): the worker's functions read and set it, nobody else.

select is_empty(
  $$ select r.role from unnest(array['anon', 'authenticated']) r(role)
     where has_table_privilege(r.role, 'private.langfuse_hold', 'select, insert, update, delete') $$,
  'no API role but the service role sees or changes the Langfuse mirror''s hold'
);
select ok(
  has_table_privilege('service_role', 'private.langfuse_hold', 'select, update')
  and not has_table_privilege('service_role', 'private.langfuse_hold', 'insert')
  and not has_table_privilege('service_role', 'private.langfuse_hold', 'delete'),
  'the worker reads and sets the hold, and never adds or removes its one row'
);

select * from finish();
rollback;
