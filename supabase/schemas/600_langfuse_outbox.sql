-- Section: the Langfuse mirror. The outbox is the langfuse_* columns of each feedback row, set in
-- the same transaction as the insert (no second row to write); the worker drains it through these
-- functions, executable by service_role only.

-- The outbox as operators look at it (dashboard, SQL): one row per feedback vote.
create view public.persona_langfuse_outbox
with (security_invoker = true)
as
select e.id as event_id, e.twin_id, e.trace_id, e.created_by, e.score, e.reason, e.intent_label,
       e.langfuse_status as status, e.langfuse_attempts as attempts,
       e.langfuse_next_attempt_at as next_attempt_at, e.langfuse_last_error as last_error,
       e.langfuse_sent_at as sent_at, e.created_at
from public.persona_training_events e
where e.source = 'user_feedback';

comment on view public.persona_langfuse_outbox is
  'Langfuse delivery state of every feedback vote: pending, retrying, sent, skipped, failed or '
  'superseded by a later vote of the same user on the same trace.';

revoke all on public.persona_langfuse_outbox from anon, authenticated;
-- Operators read the outbox and fix its rows through the view (it writes through to
-- persona_training_events with the caller's rights).
grant select, insert, update, delete on public.persona_langfuse_outbox to service_role;

-- Section: the mirror's hold. When Langfuse (or a proxy in front of it) asks the mirror to wait
-- (a 429, a usage suspension, no ingestion route), no worker may send it anything before the
-- hold ends: record_langfuse_deliveries sets it, claim_langfuse_outbox honours it, for every
-- worker draining this outbox. One row.
create table private.langfuse_hold (
  singleton boolean primary key default true constraint one_row check (singleton),
  hold_until timestamptz,
  reason text,
  bare_waits integer not null default 0 constraint bare_waits_not_negative check (bare_waits >= 0),
  probe_until timestamptz
);

comment on table private.langfuse_hold is
  'The Langfuse mirror''s hold (one row). hold_until: no outbox row is claimed for Langfuse, and '
  'no start-up check sent, before it (null: no hold); once it has passed, one claim that takes '
  'rows, or one check (claim_langfuse_check), at a time is the probe (probe_until: until when '
  'other claims and checks wait for that probe''s answer), and the probe''s recorded answer '
  'ends the hold or sets the next one. reason: the answer that set it. bare_waits: holds in a '
  'row set by an answer without a delay (a proxy''s bare 429 or 502, a 500), counted once per '
  'hold, which double the next one; a success sets it to 0. End a hold early with select '
  'public.end_langfuse_hold(); (it also makes the rows that waited for it due).';

insert into private.langfuse_hold default values;

grant select, update on private.langfuse_hold to service_role;

-- Claims up to p_limit due feedback rows for delivery. They stay invisible to other workers for
-- p_visibility_seconds; a worker that dies leaves them due again after that. Nothing is claimed
-- while the mirror's hold lasts; once it has passed, one claim at a time (for
-- p_visibility_seconds) is the probe whose recorded answer ends the hold or sets the next one.
-- A claim that takes no row is no probe: it leaves the next claim free to be one.
create function public.claim_langfuse_outbox(p_limit integer default 100,
                                             p_visibility_seconds integer default 60)
returns table (
  event_id bigint, twin_id uuid, trace_id text, created_by uuid, score smallint,
  reason public.training_event_reason,
  intent_label text, module_key text, comment text, metadata jsonb, attempts integer,
  score_timestamp timestamptz
)
language plpgsql
set search_path = ''
as $$
declare
  v_hold_until timestamptz;
  v_probe boolean := false;
begin
  if p_limit is null or p_limit not between 1 and 1000 then
    raise exception using errcode = '22023', message = 'p_limit must be 1 to 1000';
  end if;
  if p_visibility_seconds is null or p_visibility_seconds not between 1 and 3600 then
    raise exception using errcode = '22023', message = 'p_visibility_seconds must be 1 to 3600';
  end if;
  select h.hold_until into v_hold_until from private.langfuse_hold h;
  if v_hold_until is not null then
    if v_hold_until > now() then
      return;  -- Langfuse asked to wait: no request before the hold ends
    end if;
    -- The hold has passed: this claim is the probe, unless another one is in flight (the row
    -- lock makes a concurrent claim wait, then find probe_until set). The probe is armed below,
    -- once a row is claimed.
    perform 1 from private.langfuse_hold h
    where h.hold_until is not null and h.hold_until <= now()
      and (h.probe_until is null or h.probe_until <= now())
    for update;
    if not found then
      return;
    end if;
    v_probe := true;
  end if;
  return query
  with due as (
    select e.id
    from public.persona_training_events e
    where e.langfuse_status in ('pending', 'retrying') and e.langfuse_next_attempt_at <= now()
    order by e.langfuse_next_attempt_at, e.id
    limit p_limit
    for update skip locked
  ),
  claimed as (
    update public.persona_training_events e
    set langfuse_next_attempt_at = now() + make_interval(secs => p_visibility_seconds)
    from due
    where e.id = due.id
    returning e.*
  )
  select c.id, c.twin_id, c.trace_id, c.created_by, c.score, c.reason, c.intent_label,
         c.module_key, c.comment, c.metadata, c.langfuse_attempts,
         -- Every vote of one feedback carries the first vote's time (stored on the row, so
         -- it stays when the first vote is deleted): Langfuse updates the same score instead
         -- of adding one.
         c.first_vote_at
  from claimed c
  order by c.id;
  -- Nothing due: no probe is in flight, so nothing would ever answer it (a probe armed here
  -- would hold every claim for p_visibility_seconds); the hold stays until a claim with rows.
  if v_probe and found then
    update private.langfuse_hold h
    set probe_until = now() + make_interval(secs => p_visibility_seconds)
    where h.singleton;
  end if;
end;
$$;

comment on function public.claim_langfuse_outbox(integer, integer) is
  'Worker (outbox drain). In: at most p_limit rows (1-1000), hidden from other workers for '
  'p_visibility_seconds (1-3600). Out: the claimed due feedback rows (pending or retrying, due '
  'now), oldest due first, as (event_id, twin_id, trace_id, created_by, score, reason, '
  'intent_label, module_key, comment, metadata, attempts, score_timestamp = the row''s '
  'first_vote_at, the feedback''s first vote''s created_at, kept when that vote is deleted, so '
  'every vote of one feedback updates one Langfuse score); their next attempt '
  'moves to now() + p_visibility_seconds, so a worker that dies leaves them due again. None '
  'while private.langfuse_hold holds (Langfuse asked to wait); after the hold, one claim at a '
  'time that takes rows, for p_visibility_seconds, is the probe, and the others get none (a '
  'claim that finds nothing due arms no probe: the hold stays until a claim with rows, or a '
  'start-up check, probes). Raises 22023 for a p_limit or p_visibility_seconds out of range.';

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
create function public.record_langfuse_deliveries(
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

-- Langfuse is not configured: due rows are kept locally and marked skipped.
create function public.skip_langfuse_outbox(p_limit integer default 1000)
returns integer
language sql
set search_path = ''
as $$
  with due as (
    select e.id from public.persona_training_events e
    where e.langfuse_status in ('pending', 'retrying') and e.langfuse_next_attempt_at <= now()
    order by e.langfuse_next_attempt_at
    limit greatest(p_limit, 0)
    for update skip locked
  ),
  skipped as (
    update public.persona_training_events e
    set langfuse_status = 'skipped',
        langfuse_last_error = 'stored locally; Langfuse logging unavailable'
    from due where e.id = due.id
    returning 1
  )
  select count(*)::integer from skipped;
$$;

comment on function public.skip_langfuse_outbox(integer) is
  'Worker (Langfuse not configured). In: at most p_limit due rows (default 1000; negative counts '
  'as 0). Out: how many it marked skipped, with last_error "stored locally; Langfuse logging '
  'unavailable". Raises nothing.';

-- Puts skipped (or failed) current votes back in the outbox, e.g. once Langfuse is configured,
-- at most p_limit per call so that a call stays well inside the API's statement timeout; the
-- worker calls it until it answers 0.
create function public.requeue_langfuse_outbox(p_status text default 'skipped',
                                               p_limit integer default 10000)
returns integer
language plpgsql
set search_path = ''
as $$
declare
  v_count integer;
begin
  if p_status is null or p_status not in ('skipped', 'failed') then
    raise exception using errcode = '22023', message = 'p_status must be skipped or failed';
  end if;
  if p_limit is null or p_limit not between 1 and 10000 then
    raise exception using errcode = '22023', message = 'p_limit must be 1 to 10000';
  end if;
  with due as (
    select e.id from public.persona_training_events e
    where e.langfuse_status = p_status::public.langfuse_status and e.source = 'user_feedback'
      and e.superseded_at is null
    limit p_limit
    for update skip locked
  )
  update public.persona_training_events e
  set langfuse_status = 'pending', langfuse_attempts = 0, langfuse_last_error = null,
      langfuse_next_attempt_at = now()
  from due
  where e.id = due.id;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;

comment on function public.requeue_langfuse_outbox(text, integer) is
  'Worker (outbox requeue). In: p_status, skipped (default) or failed; p_limit, at most this many '
  'rows (1-10000, default 10000). Out: how many current votes in that state it put back as '
  'pending, due now, attempts 0; 0 when none is left. Raises 22023 "p_status must be skipped or '
  'failed" or "p_limit must be 1 to 10000" otherwise.';

grant execute on function
  public.claim_langfuse_outbox(integer, integer),
  public.record_langfuse_deliveries(jsonb, integer, double precision, double precision),
  public.skip_langfuse_outbox(integer),
  public.requeue_langfuse_outbox(text, integer)
to service_role;

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  public.claim_langfuse_outbox(integer, integer),
  public.record_langfuse_deliveries(jsonb, integer, double precision, double precision),
  public.skip_langfuse_outbox(integer),
  public.requeue_langfuse_outbox(text, integer)
from public;

-- Section: the outbox's backlog, for the worker's metrics (pfl serve with PFL_METRICS_PORT).
-- One indexed read (the due index holds exactly the undelivered rows); its cost follows the
-- backlog, not the table.
create function public.langfuse_outbox_backlog()
returns jsonb
language sql
stable
set search_path = ''
as $$
  select jsonb_build_object(
    'rows', count(*),
    'oldest_seconds',
      date_part('epoch', statement_timestamp() - min(e.created_at)),
    'hold_seconds', coalesce((
      select greatest(date_part('epoch', h.hold_until - statement_timestamp()), 0)
      from private.langfuse_hold h), 0),
    'hold_reason', (
      select h.reason from private.langfuse_hold h where h.hold_until > statement_timestamp())
  )
  from public.persona_training_events e
  where e.langfuse_status in ('pending', 'retrying');
$$;

comment on function public.langfuse_outbox_backlog() is
  'Worker (metrics, and the outbox drain after a wait). In: nothing. Out: jsonb {rows: the '
  'feedback votes waiting for Langfuse (status pending or retrying; bigint), oldest_seconds: the '
  'age in seconds (float8) of the oldest of them, from its created_at to now, null when none '
  'waits, hold_seconds: the seconds (float8) until the mirror''s hold ends, 0 when none holds, '
  'hold_reason: the answer that set a hold in force (text), else null}. Raises nothing.';

grant execute on function public.langfuse_outbox_backlog() to service_role;
revoke execute on function public.langfuse_outbox_backlog() from public;

-- An operator ends the mirror's hold early (the plan upgraded, the proxy fixed): the hold and
-- its count of bare waits go, and the rows that waited for it are due now. Those are the rows
-- whose next attempt is the hold's end: a wait, and a retry the hold outlasted, are recorded
-- due exactly then. A row claimed and in flight (due at its claim's time + the visibility) is
-- not one of them: made due, a second worker would send it again.
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
    and e.langfuse_next_attempt_at = v_until;
  get diagnostics v_count = row_count;
  return v_count;
end;
$$;

comment on function public.end_langfuse_hold() is
  'Operator (service role). In: nothing. Ends the Langfuse mirror''s hold now '
  '(private.langfuse_hold cleared, its bare-wait count 0) and makes due now every pending or '
  'retrying feedback row whose next attempt is the hold''s end: the rows that waited for it '
  '(and retries whose backoff it outlasted), never a row claimed and in flight. A row that '
  'waited for an earlier, shorter end of the same hold keeps its time. Out: how many rows it '
  'made due (0 when no hold was in force). Raises nothing.';

grant execute on function public.end_langfuse_hold() to service_role;
revoke execute on function public.end_langfuse_hold() from public;

-- Section: the start-up check goes through the hold and its probe. A worker checks Langfuse (a
-- health GET and an empty batch) before its first send; after a hold that check is the one
-- request of the hold's end, as a claim would be: one worker's check (or claim) is the probe,
-- the others send nothing until its answer is recorded.
create function public.claim_langfuse_check(p_visibility_seconds integer default 120)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_hold private.langfuse_hold;
begin
  if p_visibility_seconds is null or p_visibility_seconds not between 1 and 3600 then
    raise exception using errcode = '22023', message = 'p_visibility_seconds must be 1 to 3600';
  end if;
  select * into v_hold from private.langfuse_hold h where h.singleton for update;
  if v_hold.hold_until is null then
    return jsonb_build_object('turn', 'check', 'hold_seconds', 0, 'hold_reason', null);
  end if;
  if v_hold.hold_until > now() or v_hold.probe_until > now() then
    return jsonb_build_object(
      'turn', 'held',
      'hold_seconds', greatest(date_part('epoch', v_hold.hold_until - now()), 0),
      'hold_reason', v_hold.reason);
  end if;
  update private.langfuse_hold h
  set probe_until = now() + make_interval(secs => p_visibility_seconds)
  where h.singleton;
  return jsonb_build_object('turn', 'probe', 'hold_seconds', 0, 'hold_reason', v_hold.reason);
end;
$$;

comment on function public.claim_langfuse_check(integer) is
  'Worker (the outbox drain''s start-up check). In: p_visibility_seconds (1-3600, default 120), '
  'how long a probe may take. Out: jsonb {turn, hold_seconds (float8), hold_reason (text or '
  'null)}. turn: check (no hold: check now), held (the hold is in force, hold_seconds left, or '
  'its end has come and another worker''s probe is in flight, hold_seconds 0: send nothing), '
  'or probe (the hold has passed and this check is its one probe: no claim and no other check '
  'until record_langfuse_check records its answer or p_visibility_seconds pass). Raises 22023 '
  'for a p_visibility_seconds out of range.';

-- Records the start-up check's answer for the hold: a wait sets the hold (the same rules as
-- record_langfuse_deliveries' waits), a pass ends a hold that has passed (the probe was
-- answered), a failure (down, refused) frees the probe for another worker.
create function public.record_langfuse_check(
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

grant execute on function
  public.claim_langfuse_check(integer),
  public.record_langfuse_check(text, text, double precision, double precision)
to service_role;
revoke execute on function
  public.claim_langfuse_check(integer),
  public.record_langfuse_check(text, text, double precision, double precision)
from public;
