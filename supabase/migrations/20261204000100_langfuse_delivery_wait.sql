-- Delta: record_langfuse_deliveries learns the outcome "wait" (Langfuse answered 429 or
-- "ingestion suspended": come back later, not an attempt, never failed for it) and an optional
-- per-item retry_after_seconds (the server's Retry-After), the least delay before the next try.

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
begin
  if jsonb_typeof(p_deliveries) is distinct from 'array' then
    raise exception using errcode = '22023', message = 'p_deliveries must be a JSON array';
  end if;
  if exists (
    select 1 from jsonb_to_recordset(p_deliveries)
      as d(event_id bigint, outcome text, error text, retry_after_seconds double precision)
    where d.event_id is null or d.outcome is null
       or d.outcome not in ('sent', 'retry', 'wait', 'failed')
       or d.retry_after_seconds < 0 or d.retry_after_seconds > 86400
  ) then
    raise exception using errcode = '22023',
      message = 'each delivery needs an event_id, an outcome of sent, retry, wait or failed, '
                'and a retry_after_seconds of 0 to 86400 or none';
  end if;
  if p_max_attempts is null or p_max_attempts < 1 or p_base_delay_seconds is null
     or p_base_delay_seconds <= 0 or p_max_delay_seconds is null or p_max_delay_seconds <= 0 then
    raise exception using errcode = '22023',
      message = 'p_max_attempts, p_base_delay_seconds and p_max_delay_seconds must be positive';
  end if;

  with d as (
    select * from jsonb_to_recordset(p_deliveries)
      as d(event_id bigint, outcome text, error text, retry_after_seconds double precision)
  ),
  updated as (
    update public.persona_training_events e
    -- a wait (the server asked us to come back later: 429, usage suspension) is not an attempt
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
          when d.outcome in ('retry', 'wait') then now() + make_interval(secs => greatest(
            coalesce(d.retry_after_seconds, 0),
            least(p_base_delay_seconds * power(2, e.langfuse_attempts), p_max_delay_seconds)
            * (0.5 + random() / 2)))
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
  '(the server''s Retry-After)}; p_max_attempts (default 8), p_base_delay_seconds (2) and '
  'p_max_delay_seconds (600). Out: how many feedback rows it recorded. sent: sent_at = now(); '
  'failed, or a retry on the last attempt: failed with the error (up to 2000 chars); retry: an '
  'attempt, due again after max(retry_after_seconds, min(base * 2^attempts, max) * (0.5 + '
  'random()/2)) seconds, exponential backoff with "equal jitter" (AWS Architecture Blog, '
  'Exponential Backoff and Jitter, 2015); wait (Langfuse rate limit or usage suspension): the '
  'same delay, but not an attempt, so it never fails a row. A superseded vote stays superseded; '
  'the newer vote that waited for it is released, and sent again if it went out first. Raises '
  '22023 when p_deliveries is not an array, an item lacks event_id or a known outcome or has a '
  'retry_after_seconds out of range, or a limit is not positive.';

-- The worker records the outcome "wait": it needs this migration.
create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261204000100'::text;
$$;
