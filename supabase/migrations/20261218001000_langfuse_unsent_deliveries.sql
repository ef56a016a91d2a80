-- Delta: the Langfuse mirror after a fourteenth review.
-- * record_langfuse_deliveries takes a delivery's "unsent": true for a failed row that never
--   left the worker (it could not be a score). Only rows Langfuse answered end or set the hold:
--   a probe claim that took only such rows once ended the hold without a request to Langfuse;
--   now it leaves the hold and frees the probe for the next claim or check.
-- * record_langfuse_check (its body unchanged): its comment says a worker whose send could not
--   reach Langfuse records failed too (its claim may have been the probe: that frees it).
-- The worker sends "unsent": its version moves here.

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
  v_answered boolean;
begin
  if jsonb_typeof(p_deliveries) is distinct from 'array' then
    raise exception using errcode = '22023', message = 'p_deliveries must be a JSON array';
  end if;
  if exists (
    select 1 from jsonb_array_elements(p_deliveries) x
    where jsonb_typeof(x) is distinct from 'object'
       or jsonb_typeof(x -> 'hold') not in ('boolean', 'null')
       or jsonb_typeof(x -> 'unsent') not in ('boolean', 'null')
  ) or exists (
    select 1 from jsonb_to_recordset(p_deliveries)
      as d(event_id bigint, outcome text, error text, retry_after_seconds double precision,
           hold boolean, unsent boolean)
    where d.event_id is null or d.outcome is null
       or d.outcome not in ('sent', 'retry', 'wait', 'failed')
       or d.retry_after_seconds < 0 or d.retry_after_seconds > 86400
       or (d.hold and d.outcome not in ('retry', 'wait'))
       or (d.unsent and d.outcome <> 'failed')
  ) then
    raise exception using errcode = '22023',
      message = 'each delivery needs an event_id, an outcome of sent, retry, wait or failed, '
                'a retry_after_seconds of 0 to 86400 or none, a hold of true only with a '
                'retry or a wait, and an unsent of true only with failed';
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
  select coalesce(bool_or(d.outcome = 'sent'), false),
         coalesce(bool_or(not coalesce(d.unsent, false)), false)
    into v_sent, v_answered
  from jsonb_to_recordset(p_deliveries) as d(outcome text, unsent boolean);
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
  elsif v_answered then
    update private.langfuse_hold h
    set hold_until = null, reason = null, probe_until = null,
        bare_waits = case when v_sent then 0 else h.bare_waits end
    where (h.hold_until is not null or (v_sent and h.bare_waits > 0))
      and (h.hold_until is null or h.hold_until <= now());
  elsif jsonb_array_length(p_deliveries) > 0 then
    -- Only rows that never left the worker: Langfuse answered nothing, so the hold stays; if
    -- this batch was its probe, the probe is freed for the next claim or check.
    update private.langfuse_hold h
    set probe_until = null
    where h.hold_until <= now() and h.probe_until is not null;
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
  'top-level 500), else false or absent, "unsent": true with a failed row that never left the '
  'worker (it could not be a score: Langfuse answered nothing for it), else false or absent}; '
  'p_max_attempts (default 8), p_base_delay_seconds (2) and '
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
  'or hold that has a row Langfuse answered (not unsent) ends a hold that has passed; one with a '
  'sent row sets n to 0; a batch of unsent rows only neither ends nor sets a hold, and frees '
  'the probe of a hold that has passed (nothing answered it). A superseded vote stays superseded; the newer vote that waited for it is released, '
  'and sent again if it went out first. Raises 22023 when p_deliveries is not an array, an item '
  'lacks event_id or a known outcome, has a retry_after_seconds out of range, a hold that is '
  'not a boolean or is true with sent or failed, or an unsent that is not a boolean or is true '
  'with another outcome than failed, or a limit is not positive.';


-- Unchanged but for its comment; redefined here so this migration holds its whole text.
create or replace function public.record_langfuse_check(
  p_outcome text,
  p_error text default null,
  p_retry_after_seconds double precision default null,
  p_base_delay_seconds double precision default 2
)
returns double precision
language plpgsql
set search_path = ''
as $$
declare
  v_hold_until timestamptz;
begin
  if p_outcome is null or p_outcome not in ('passed', 'wait', 'failed') then
    raise exception using errcode = '22023', message = 'p_outcome must be passed, wait or failed';
  end if;
  if p_retry_after_seconds < 0 or p_retry_after_seconds > 86400 then
    raise exception using errcode = '22023',
      message = 'p_retry_after_seconds must be 0 to 86400, or null';
  end if;
  if p_base_delay_seconds is null or p_base_delay_seconds <= 0 then
    raise exception using errcode = '22023', message = 'p_base_delay_seconds must be positive';
  end if;
  if p_outcome = 'wait' then
    -- As record_langfuse_deliveries: the longest delay given, else the bare backoff (counted
    -- once per hold), at least 1 s; an answer met while a hold is in force neither counts nor
    -- doubles.
    update private.langfuse_hold h
    set hold_until = greatest(h.hold_until, now() + make_interval(secs => greatest(
          1,
          coalesce(p_retry_after_seconds, 0),
          case when p_retry_after_seconds is null
            then least(p_base_delay_seconds * power(2, least(
                   case when h.hold_until > now() then greatest(h.bare_waits - 1, 0)
                        else h.bare_waits end, 30)), 300)
                 * (0.5 + random() / 2)
            else 0
          end))),
        reason = left(p_error, 2000),
        bare_waits = h.bare_waits
          + case when p_retry_after_seconds is null
                  and not coalesce(h.hold_until > now(), false) then 1 else 0 end,
        probe_until = null
    where h.singleton
    returning h.hold_until into v_hold_until;
  elsif p_outcome = 'passed' then
    update private.langfuse_hold h
    set hold_until = null, reason = null, probe_until = null
    where h.hold_until <= now();
  else
    update private.langfuse_hold h
    set probe_until = null
    where h.hold_until <= now();
  end if;
  select h.hold_until into v_hold_until from private.langfuse_hold h;
  return coalesce(greatest(date_part('epoch', v_hold_until - now()), 0), 0);
end;
$$;

comment on function public.record_langfuse_check(text, text, double precision, double precision) is
  'Worker (the outbox drain''s start-up check). In: p_outcome, what the check met: wait (the '
  'health route or the empty batch answered a 429, a usage suspension, a gateway''s 502/503/504: '
  'p_error is that answer, p_retry_after_seconds its delay in seconds, 0-86400, or null), passed '
  '(the server takes our requests), or failed (neither: down, refused; the probe''s worker '
  'records it, and so does a worker whose send could not reach Langfuse, as its claim may have '
  'been the probe); p_base_delay_seconds (default 2). wait sets the mirror''s hold as a wait recorded '
  'by record_langfuse_deliveries does (now() + the delay given, or with none min(base * 2^n, '
  '300) * (0.5 + random()/2) seconds, n the holds in a row set so, counted once per hold; at '
  'least 1 s; never shortened); passed ends a hold that has passed (its bare-wait count kept: '
  'only a delivered score resets it); failed frees the probe of a hold that has passed, for '
  'another worker. Out: the seconds (float8) until the hold ends, 0 when none holds. Raises '
  '22023 for another p_outcome, a p_retry_after_seconds out of range or a p_base_delay_seconds '
  'that is not positive.';


-- The worker sends "unsent" in record_langfuse_deliveries: it needs this migration.
create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261218001000'::text;
$$;
