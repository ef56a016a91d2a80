-- Delta: several learning runs per round trip (issue 15, case 6's drain). A busy worker claims
-- up to p_max_runs runs in one call (claim_learning_runs), reads their batches and production
-- watches in a second (read_learning_runs) and completes them in a third
-- (complete_learning_runs), each run through the one-run functions, which are unchanged.
-- Runs that need a rebuild or hold a large batch go through the one-run path as before.

-- Section: several runs per round trip (issue 15). A busy worker claims up to p_max_runs runs
-- in one call (claim_learning_runs), reads their batches and watches in a second
-- (read_learning_runs) and completes them in a third (complete_learning_runs). Each reuses the
-- one-run function (claim_learning_run, claim_learning_run_events, claim_production_watch,
-- complete_learning_run) per run, so every rule of those holds for each run. The claim is a
-- call of its own because its first claim takes the share lock on the events that holds
-- inserts up until the transaction ends: reading batches in that transaction would hold ingest
-- up for the whole read.

-- Whether a claimed run is small enough to be read with others: its twin needs no rebuild and
-- its batch holds at most 10,000 events (counted with a limit: the count costs at most that).
create function private.learning_run_batchable(p_run public.persona_feedback_learning_runs)
returns boolean
language sql
stable
set search_path = ''
as $$
  select not exists (
           select 1 from public.twins t
           where t.id = p_run.twin_id and t.evidence_generation <> t.learned_generation)
     and (select count(*) from (
            select 1 from public.persona_training_events e
            where e.twin_id = p_run.twin_id and e.id > p_run.batch_after_event_id
              and e.id <= p_run.batch_last_event_id
            limit 10001) b) <= 10000;
$$;

comment on function private.learning_run_batchable(public.persona_feedback_learning_runs) is
  'Batched runs'' helper. In: a claimed run (its batch fixed). Out: true when its twin needs no '
  'rebuild (evidence_generation = learned_generation) and its batch holds at most 10,000 events '
  '(counted with a limit, so the answer costs at most that many index entries); such a run is '
  'read by read_learning_runs, any other through the one-run path (claim_learning_run_events). '
  'Raises nothing.';

grant execute on function private.learning_run_batchable(public.persona_feedback_learning_runs)
  to service_role;
revoke execute on function private.learning_run_batchable(public.persona_feedback_learning_runs)
  from public;

-- Claims up to p_max_runs runs in one transaction, each as claim_learning_run claims one (same
-- order, same leases, the same batch fixed). It stops early when nothing more is due, after a
-- run that is not batchable (a rebuild, a large batch: the worker takes it through the one-run
-- path, last), and once the batches claimed hold 50,000 events.
create function public.claim_learning_runs(
  p_worker_id text,
  p_lease_seconds integer default 60,
  p_max_runs integer default 16
)
returns setof public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_claimed integer := 0;
  v_events bigint := 0;
begin
  if p_max_runs is null or p_max_runs not between 1 and 100 then
    raise exception using errcode = '22023', message = 'p_max_runs must be 1 to 100';
  end if;
  while v_claimed < p_max_runs loop
    -- Checks p_worker_id and p_lease_seconds (22023) at the first call, before any claim.
    select * into v_run from public.claim_learning_run(p_worker_id, p_lease_seconds);
    exit when v_run.id is null;
    v_claimed := v_claimed + 1;
    return next v_run;
    exit when not private.learning_run_batchable(v_run);
    -- At most 10,000 index entries: the run is batchable.
    v_events := v_events + (
      select count(*) from public.persona_training_events e
      where e.twin_id = v_run.twin_id and e.id > v_run.batch_after_event_id
        and e.id <= v_run.batch_last_event_id);
    exit when v_events >= 50000;
  end loop;
end;
$$;

comment on function public.claim_learning_runs(text, integer, integer) is
  'Worker (batched). In: the worker''s id (1-200 chars), a lease in seconds (1-3600), the most '
  'runs to claim (1-100, default 16). Out: 0 to p_max_runs runs, each claimed exactly as '
  'public.claim_learning_run claims one (the same order: expired leases first, then owners'' '
  'requests, then the oldest; a new lease_token each, until now() + p_lease_seconds; the first '
  'claim fixes the batch and learning_time under the share lock on the events), in claim order. '
  'Stops early when nothing more is due, right after a run that is not batchable '
  '(private.learning_run_batchable: its twin needs a rebuild or its batch holds more than '
  '10,000 events; the caller takes it through the one-run path), and once the claimed batches '
  'hold 50,000 events in all, so that read_learning_runs stays far inside the API''s statement '
  'timeout. One transaction: all the runs or none. Raises 22023 for a bad p_max_runs, '
  'p_worker_id or p_lease_seconds (nothing claimed); 55P03 when the lock on the events is not '
  'granted within 5 s.';

-- Reads the batches and production watches of several claimed runs in one call: per run
-- exactly what claim_learning_run_events and claim_production_watch answer, each run in a
-- subtransaction of its own, so one run's refusal (a stale lease) leaves the others read.
create function public.read_learning_runs(p_runs jsonb)
returns jsonb
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_item jsonb;
  v_ids uuid[] := '{}';
  v_tokens uuid[] := '{}';
  v_id uuid;
  v_token uuid;
  v_run public.persona_feedback_learning_runs;
  v_batch jsonb;
  v_watch jsonb;
  v_out jsonb := '[]';
  v_events bigint := 0;
  v_state text;
  v_message text;
begin
  if jsonb_typeof(p_runs) is distinct from 'array'
     or jsonb_array_length(p_runs) not between 1 and 100 then
    raise exception using errcode = '22023',
      message = 'p_runs must be a JSON array of 1 to 100 {run_id, lease_token}';
  end if;
  for v_item in select * from jsonb_array_elements(p_runs) loop
    begin
      v_id := (v_item ->> 'run_id')::uuid;
      v_token := (v_item ->> 'lease_token')::uuid;
    exception when invalid_text_representation then
      v_id := null;
    end;
    if jsonb_typeof(v_item) is distinct from 'object' or v_id is null or v_token is null then
      raise exception using errcode = '22023',
        message = format('p_runs[%s] needs run_id and lease_token (uuids)', cardinality(v_ids));
    end if;
    v_ids := v_ids || v_id;
    v_tokens := v_tokens || v_token;
  end loop;

  for i in 1 .. cardinality(v_ids) loop
    begin
      v_run := private.lock_leased_run(v_ids[i], v_tokens[i]);
      -- Not read here (batch null): a run that is not batchable, and every run after the
      -- batches read reach 50,000 events or the call 2 s; the worker reads those one by one.
      if v_events >= 50000 or clock_timestamp() - statement_timestamp() > interval '2 seconds'
         or not private.learning_run_batchable(v_run) then
        v_out := v_out || jsonb_build_array(jsonb_build_object(
          'run_id', v_ids[i], 'batch', null, 'watch', null));
        continue;
      end if;
      v_batch := public.claim_learning_run_events(v_ids[i], v_tokens[i]);
      v_watch := null;
      if not coalesce((v_batch ->> 'rebuild_pending')::boolean, false) then
        v_watch := public.claim_production_watch(v_ids[i], v_tokens[i]);
        v_events := v_events + coalesce((v_batch ->> 'events_scanned')::bigint, 0)
          + coalesce((select sum((t ->> 'new_n')::bigint + (t ->> 'old_n')::bigint)
                      from jsonb_array_elements(
                        case jsonb_typeof(v_watch -> 'watch' -> 'twin')
                          when 'array' then v_watch -> 'watch' -> 'twin' else '[]' end) t), 0);
      end if;
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_ids[i], 'batch', v_batch, 'watch', v_watch));
    exception when others then
      get stacked diagnostics v_state = returned_sqlstate, v_message = message_text;
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_ids[i], 'error', jsonb_build_object('code', v_state, 'message', v_message)));
    end;
  end loop;
  return v_out;
end;
$$;

comment on function public.read_learning_runs(jsonb) is
  'Worker (batched). In: p_runs, a JSON array of 1 to 100 {run_id, lease_token} (uuids) of '
  'runs the caller holds. Out: a JSON array, one element per run in the same order: {run_id, '
  'batch, watch} where batch is exactly claim_learning_run_events'' answer and watch exactly '
  'claim_production_watch''s ({watch: null} when nothing is watched; null when the batch is '
  'rebuild_pending); {run_id, batch: null, watch: null} for a run not read here (its twin '
  'needs a rebuild or its batch holds more than 10,000 events, or the runs read before it '
  'reached 50,000 events, batches and watch evidence counted, or 2 s): the caller reads it '
  'through the one-run path; or {run_id, error: {code, message}} when that run''s read raised '
  '(e.g. PT409, stale lease; P0002): each run is read in a subtransaction of its own, so a '
  'refusal leaves the other runs read. Raises 22023 (nothing read) when p_runs is not such an '
  'array.';

-- Completes several runs in one call, each exactly as complete_learning_run completes one, in
-- a subtransaction of its own: one run's refusal (PT412, a stale lease, a bad payload) undoes
-- that run only.
create function public.complete_learning_runs(p_completions jsonb)
returns jsonb
language plpgsql
set search_path = ''
set jit = off
as $$
declare
  v_item jsonb;
  v_id uuid;
  v_token uuid;
  v_run public.persona_feedback_learning_runs;
  v_out jsonb := '[]';
  v_state text;
  v_message text;
  v_index integer := 0;
begin
  if jsonb_typeof(p_completions) is distinct from 'array'
     or jsonb_array_length(p_completions) not between 1 and 100 then
    raise exception using errcode = '22023',
      message = 'p_completions must be a JSON array of 1 to 100 {run_id, lease_token, result}';
  end if;
  for v_item in select * from jsonb_array_elements(p_completions) loop
    begin
      v_id := (v_item ->> 'run_id')::uuid;
      v_token := (v_item ->> 'lease_token')::uuid;
    exception when invalid_text_representation then
      v_id := null;
    end;
    if jsonb_typeof(v_item) is distinct from 'object' or v_id is null or v_token is null
       or jsonb_typeof(v_item -> 'result') is distinct from 'object' then
      raise exception using errcode = '22023',
        message = format('p_completions[%s] needs run_id and lease_token (uuids) and result '
                         '(an object)', v_index);
    end if;
    v_index := v_index + 1;
  end loop;

  for v_item in select * from jsonb_array_elements(p_completions) loop
    v_id := (v_item ->> 'run_id')::uuid;
    begin
      v_run := public.complete_learning_run(
        v_id, (v_item ->> 'lease_token')::uuid, v_item -> 'result');
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_id, 'run', to_jsonb(v_run) - 'lease_token'));
    exception when others then
      get stacked diagnostics v_state = returned_sqlstate, v_message = message_text;
      v_out := v_out || jsonb_build_array(jsonb_build_object(
        'run_id', v_id, 'error', jsonb_build_object('code', v_state, 'message', v_message)));
    end;
  end loop;
  return v_out;
end;
$$;

comment on function public.complete_learning_runs(jsonb) is
  'Worker (batched). In: p_completions, a JSON array of 1 to 100 {run_id, lease_token, result} '
  '(uuids; result: complete_learning_run''s p_result). Each run is completed exactly as '
  'public.complete_learning_run completes it, in a subtransaction of its own, in the order '
  'given. Out: a JSON array, one element per run in that order: {run_id, run} (the completed '
  'run''s row, without lease_token) or {run_id, error: {code, message}} with the SQLSTATE and '
  'message complete_learning_run raised for that run (PT409 stale lease, PT412 the evidence '
  'changed, PT422 the cursor moved, 22023 or 55000 a refused payload...), which leaves that run '
  'as it was and the other runs completed. Raises 22023 (nothing completed) when p_completions '
  'is not such an array.';

grant execute on function
  public.claim_learning_runs(text, integer, integer),
  public.read_learning_runs(jsonb),
  public.complete_learning_runs(jsonb)
to service_role;
revoke execute on function
  public.claim_learning_runs(text, integer, integer),
  public.read_learning_runs(jsonb),
  public.complete_learning_runs(jsonb)
from public;

-- The worker calls the batched functions: its version moves here.
create or replace function public.worker_schema_version()
returns text
language sql
-- stable, not immutable: PostgreSQL folds an immutable call into the plan, and PostgREST
-- reuses a connection's prepared plans across roles, so an anon request could read the
-- value a service-role request planned without its EXECUTE being checked.
stable
set search_path = ''
as $$
  select '20261218000100'::text;
$$;
