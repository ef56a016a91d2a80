-- Section: explicit grants, the same on every hosted project.
--
-- Hosted projects made before 2026-05-30 gave every new table, view, sequence and function in
-- public all privileges for anon, authenticated and service_role by default; since then (and
-- for every project since 2026-10-30) new entities get none of the Data API's privileges (the
-- "Default privileges for new entities" setting is off), but keep truncate, references and
-- trigger on tables and update on sequences. The baseline revoked the defaults of anon and
-- authenticated only and so relied on them for service_role. From here on each role holds
-- exactly what it is granted by name, whichever kind of project the migrations run on.

-- No default privileges for the API roles on what the project creates from now on.
alter default privileges in schema public revoke all on tables from anon, authenticated, service_role;
alter default privileges in schema public revoke all on sequences from anon, authenticated, service_role;
alter default privileges in schema public revoke all on functions from anon, authenticated, service_role;

-- What the old defaults left behind and no role needs: emptying or referencing tables, table
-- triggers, and the identity sequences (an identity column's value needs no privilege on its
-- sequence).
revoke truncate, references, trigger on all tables in schema public
  from anon, authenticated, service_role;
revoke all on all sequences in schema public from anon, authenticated, service_role;
-- The owner's RPC is for owners; the worker queues runs through enqueue_learning_run.
revoke execute on function public.request_learning_run(uuid, boolean) from service_role;

-- What the service role relied on the defaults for: operators fix outbox rows through the view
-- (it writes through to persona_training_events with the caller's rights).
grant insert, update, delete on public.persona_langfuse_outbox to service_role;
