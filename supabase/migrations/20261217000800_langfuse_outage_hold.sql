-- Delta: the mirror's hold after a twelfth review.
-- * A top-level 500 (Langfuse's catch-all) now holds every worker too (no storm of requests
--   from every worker while Langfuse's storage or queue is down), and stays an attempt: the
--   worker records it as a retry with "hold": true. A gateway's 502/503/504 is a wait (the
--   worker's classification; no change here).
-- * The bare backoff counts once per hold, not once per worker that met the same answer, and
--   only a success sets it back to 0 (a 502 between two 429s no longer starts it again).
-- * A hold lasts at least 1 s (a Retry-After of 0 made a busy loop of probes).
-- * end_langfuse_hold(): ending a hold early also makes its waiting rows due (the documented
--   update of private.langfuse_hold left them waiting until the hold's old end).
-- The worker sends "hold" and needs the new recording: its version moves here.

comment on table private.langfuse_hold is
  'The Langfuse mirror''s hold (one row). hold_until: no outbox row is claimed for Langfuse '
  'before it (null: no hold); once it has passed, one claim at a time is the probe (probe_until: '
  'until when another claim waits for that probe''s answer), and the probe''s recorded answer '
  'ends the hold or sets the next one. reason: the answer that set it. bare_waits: holds in a '
  'row set by an answer without a delay (a proxy''s bare 429 or 502, a 500), counted once per '
  'hold, which double the next one; a success sets it to 0. End a hold early with select '
  'public.end_langfuse_hold(); (it also makes the rows that waited for it due).';

-- Records what happened to claimed rows: p_deliveries is a JSON array of
-- {"event_id": n, "outcome": "sent" | "retry" | "wait" | "failed", "error": text|null,
-- "retry_after_seconds": n|null, "hold": boolean|null}. A retry waits base * 2^attempts seconds
-- (at most p_max_delay_seconds) with jitter, or the server's Retry-After if longer; after
-- p_max_attempts deliveries it fails. A wait (Langfuse asked the mirror to wait, or is not there
-- for now: 429, usage suspension, no ingestion route, a gateway's 502/503/504) is not an
-- attempt: it sets the mirror's hold (private.langfuse_hold), for the longest
-- retry_after_seconds of the batch's waits, or, for a wait without one (a proxy's bare 429),
-- base * 2^n seconds (at most 300) with jitter, n the holds in a row set so before it; at least
-- 1 s; no claim before the hold ends, and the waiting rows are due then. A retry with hold (a
-- top-level 500) sets the hold the same way and is an attempt, due at the later of its backoff
-- and the hold's end. n counts once per hold: an answer recorded while a hold is in force
-- (another worker's request of the same moment) may lengthen it but does not count again.
-- A batch recorded without a wait ends a hold that has passed (the probe was answered); a
-- batch with a success also sets n to 0. A superseded
-- vote keeps that status; if the newer vote was already sent, it is sent again so that Langfuse
-- ends with the newer value; if it waits for this delivery, it is released.
create or replace function public.record_langfuse_deliveries(
  p_deliveries jsonb,
  p_max_attempts integer default 8,
  p_base_delay_seconds double precision default 2,
  p_max_delay_seconds double precision default 600
)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
  v_waits integer;
  v_given double precision;
  v_bare boolean;
  v_reason text;
  v_hold_until timestamptz;
  v_sent boolean;
begin
  if jsonb_typeof(p_deliveries) is distinct from 'array' then
    raise exception using errcode = '22023', message = 'p_deliveries must be a JSON array';
  end if;
  if exists (
    select 1 from jsonb_array_elements(p_deliveries) x
    where jsonb_typeof(x) is distinct from 'object'
       or jsonb_typeof(x -> 'hold') not in ('boolean', 'null')
  ) or exists (
    select 1 from jsonb_to_recordset(p_deliveries)
      as d(event_id bigint, outcome text, error text, retry_after_seconds double precision,
           hold boolean)
    where d.event_id is null or d.outcome is null
       or d.outcome not in ('sent', 'retry', 'wait', 'failed')
       or d.retry_after_seconds < 0 or d.retry_after_seconds > 86400
       or (d.hold and d.outcome not in ('retry', 'wait'))
  ) then
    raise exception using errcode = '22023',
      message = 'each delivery needs an event_id, an outcome of sent, retry, wait or failed, '
                'a retry_after_seconds of 0 to 86400 or none, and a hold of true only with a '
                'retry or a wait';
  end if;
  if p_max_attempts is null or p_max_attempts < 1 or p_base_delay_seconds is null
     or p_base_delay_seconds <= 0 or p_max_delay_seconds is null or p_max_delay_seconds <= 0 then
    raise exception using errcode = '22023',
      message = 'p_max_attempts, p_base_delay_seconds and p_max_delay_seconds must be positive';
  end if;

  -- The mirror's hold: waits and retries with hold set it (all of one request's rows carry the
  -- same answer), a batch without one ends a hold that has passed. The bare backoff: equal
  -- jitter, as the rows'; it counts once per hold, not once per worker that met the answer: an
  -- answer recorded while a hold is in force (h.hold_until > now()) neither counts nor doubles.
  select count(*), max(d.retry_after_seconds), coalesce(bool_or(d.retry_after_seconds is null), false),
         min(d.error)
    into v_waits, v_given, v_bare, v_reason
  from jsonb_to_recordset(p_deliveries)
    as d(event_id bigint, outcome text, error text, retry_after_seconds double precision,
         hold boolean)
  where d.outcome = 'wait' or (d.outcome = 'retry' and d.hold);
  select coalesce(bool_or(d.outcome = 'sent'), false) into v_sent
  from jsonb_to_recordset(p_deliveries) as d(outcome text);
  if v_waits > 0 then
    update private.langfuse_hold h
    set hold_until = greatest(h.hold_until, now() + make_interval(secs => greatest(
          1,  -- a Retry-After of 0 (or a date gone by) still holds a second: no busy loop
          coalesce(v_given, 0),
          case when v_bare
            then least(p_base_delay_seconds * power(2, least(
                   case when h.hold_until > now() then greatest(h.bare_waits - 1, 0)
                        else h.bare_waits end, 30)), 300)
                 * (0.5 + random() / 2)
            else 0
          end))),
        reason = left(v_reason, 2000),
        bare_waits = h.bare_waits
          + case when v_bare and not coalesce(h.hold_until > now(), false) then 1 else 0 end,
        probe_until = null
    where h.singleton  -- the one row (hosted Supabase refuses an update without a where)
    returning h.hold_until into v_hold_until;
  elsif jsonb_array_length(p_deliveries) > 0 then
    update private.langfuse_hold h
    set hold_until = null, reason = null, probe_until = null,
        bare_waits = case when v_sent then 0 else h.bare_waits end
    where (h.hold_until is not null or (v_sent and h.bare_waits > 0))
      and (h.hold_until is null or h.hold_until <= now());
  end if;

  with d as (
    select * from jsonb_to_recordset(p_deliveries)
      as d(event_id bigint, outcome text, error text, retry_after_seconds double precision,
           hold boolean)
  ),
  updated as (
    update public.persona_training_events e
    -- a wait (the server asked us to come back later) is not an attempt
    set langfuse_attempts = e.langfuse_attempts + case when d.outcome = 'wait' then 0 else 1 end,
        langfuse_status = case
          when e.langfuse_status = 'superseded' then 'superseded'
          when d.outcome = 'sent' then 'sent'
          when d.outcome = 'wait' then 'retrying'
          when d.outcome = 'failed' or e.langfuse_attempts + 1 >= p_max_attempts then 'failed'
          else 'retrying'
        end::public.langfuse_status,
        langfuse_sent_at = case when d.outcome = 'sent' then now() else e.langfuse_sent_at end,
        langfuse_last_error = case
          when d.outcome = 'sent' then null
          when d.outcome = 'retry' and e.langfuse_attempts + 1 >= p_max_attempts
            then left(format('gave up after %s attempts: %s', e.langfuse_attempts + 1, d.error), 2000)
          else left(d.error, 2000)
        end,
        langfuse_next_attempt_at = case
          when d.outcome = 'wait' then coalesce(v_hold_until, now())
          -- greatest() skips the null of a retry without hold
          when d.outcome = 'retry' then greatest(now() + make_interval(secs => greatest(
            coalesce(d.retry_after_seconds, 0),
            least(p_base_delay_seconds * power(2, e.langfuse_attempts), p_max_delay_seconds)
            * (0.5 + random() / 2))), case when d.hold then v_hold_until end)
          else now()
        end
    from d
    where e.id = d.event_id and e.source = 'user_feedback'
      and e.langfuse_status in ('pending', 'retrying', 'superseded')
    returning e.twin_id, e.trace_id, e.created_by, e.superseded_at, d.outcome
  ),
  -- The newer vote of a superseded one waited for this delivery: release it now, and send it
  -- again if it already went out before the older value.
  release_newer as (
    update public.persona_training_events cur
    set langfuse_status = case when cur.langfuse_status = 'sent' and u.outcome = 'sent'
                               then 'pending' else cur.langfuse_status end,
        langfuse_attempts = case when cur.langfuse_status = 'sent' and u.outcome = 'sent'
                                 then 0 else cur.langfuse_attempts end,
        langfuse_next_attempt_at = now()
    from updated u
    -- the current vote of the same feedback, found through the current-vote index
    where u.superseded_at is not null
      and cur.twin_id = u.twin_id and cur.trace_id = u.trace_id and cur.created_by = u.created_by
      and cur.source = 'user_feedback' and cur.superseded_at is null
      and (cur.langfuse_status = 'pending' or (cur.langfuse_status = 'sent' and u.outcome = 'sent'))
    returning 1
  )
  select count(*) into v_count from updated;
  return v_count;
end;
$$;

comment on function public.record_langfuse_deliveries(jsonb, integer, double precision, double precision) is
  'Worker (outbox drain). In: p_deliveries, a JSON array of {"event_id": n, "outcome": "sent" | '
  '"retry" | "wait" | "failed", "error": text or null, "retry_after_seconds": 0-86400 or null '
  '(the server''s Retry-After), "hold": true with a retry that also holds every worker (a '
  'top-level 500), else false or absent}; p_max_attempts (default 8), p_base_delay_seconds (2) and '
  'p_max_delay_seconds (600). Out: how many feedback rows it recorded. sent: sent_at = now(); '
  'failed, or a retry on the last attempt: failed with the error (up to 2000 chars); retry: an '
  'attempt, due again after max(retry_after_seconds, min(base * 2^attempts, max) * (0.5 + '
  'random()/2)) seconds, exponential backoff with "equal jitter" (AWS Architecture Blog, '
  'Exponential Backoff and Jitter, 2015); wait (Langfuse asked to wait or is not there for now: '
  'rate limit, usage suspension, no ingestion route, a gateway''s 502/503/504): not an attempt, '
  'so it never fails a row; it sets the mirror''s hold (private.langfuse_hold, no claim before '
  'it ends) to now() + the longest retry_after_seconds of the waits, or, with a wait that has '
  'none, at least min(base * 2^n, 300) * (0.5 + random()/2) seconds, n the holds in a row set '
  'so (then n + 1; an answer recorded while a hold is in force neither counts nor doubles), and '
  'at least 1 s; the waiting rows are due at its end. A retry with hold sets the hold alike and '
  'is an attempt, due at the later of its backoff and the hold''s end. A batch without a wait '
  'or hold ends a hold that has passed; one with a sent row sets n to 0. A superseded vote stays superseded; the newer vote that waited for it is released, '
  'and sent again if it went out first. Raises 22023 when p_deliveries is not an array, an item '
  'lacks event_id or a known outcome, has a retry_after_seconds out of range or a hold that is '
  'not a boolean or is true with sent or failed, or a limit is not positive.';

-- An operator ends the mirror's hold early (the plan upgraded, the proxy fixed): the hold and
-- its count of bare waits go, and the rows that waited for it are due now (their next attempt
-- was the hold's end).
create function public.end_langfuse_hold()
returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_until timestamptz;
  v_count integer;
begin
  select h.hold_until into v_until from private.langfuse_hold h where h.singleton for update;
  update private.langfuse_hold h
  set hold_until = null, reason = null, bare_waits = 0, probe_until = null
  where h.singleton;
  if v_until is null or v_until <= now() then
    return 0;  -- no hold in force: its rows, if any, are already due
  end if;
  update public.persona_training_events e
  set langfuse_next_attempt_at = now()
  where e.source = 'user_feedback' and e.langfuse_status in ('pending', 'retrying')
    and e.langfuse_next_attempt_at > now() and e.langfuse_next_attempt_at <= v_until;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;

comment on function public.end_langfuse_hold() is
  'Operator (service role). In: nothing. Ends the Langfuse mirror''s hold now '
  '(private.langfuse_hold cleared, its bare-wait count 0) and makes due now every pending or '
  'retrying feedback row whose next attempt falls before the hold''s end: the rows that waited '
  'for it, and retries whose backoff the hold outlasted. Out: how many rows it made due (0 '
  'when no hold was in force). Raises nothing.';

grant execute on function public.end_langfuse_hold() to service_role;
revoke execute on function public.end_langfuse_hold() from public;

-- The worker records "hold" and relies on the once-per-hold count: it needs this migration.
create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261217000800'::text;
$$;
