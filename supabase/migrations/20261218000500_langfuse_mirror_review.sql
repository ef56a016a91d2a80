-- Delta: the Langfuse mirror after a thirteenth review.
-- * Metadata numbers beyond a double's range are refused at insert (a trigger naming the column):
--   JavaScript reads them as Infinity (Python too, with a fraction), which is not JSON, so the
--   vote could never be mirrored and, before this, such a row stopped every drain.
-- * claim_langfuse_outbox arms the probe only when it claims a row: an empty claim after a hold
--   left a probe that nothing answered, holding every claim for the visibility (120 s).
-- * end_langfuse_hold() makes due only the rows whose next attempt is the hold's end (those that
--   waited for it), no longer every row due before it, which took in rows claimed and in flight
--   (sent twice).
-- * The start-up check takes part in the hold: claim_langfuse_check() says whether a worker may
--   check now (after a hold only one check, or claim, is the probe), record_langfuse_check()
--   records its answer (a wait sets the hold: this replaces recording a wait for event id 0).
-- The worker calls the two new functions: its version moves here.

-- A metadata number beyond a double's range (about ±1.8e308, e.g. 310 digits) fits the size
-- limit, but JSON readers read it as Infinity (JavaScript and Langfuse always, Python when it
-- has a fraction or an exponent), which is not JSON: such a vote could never be mirrored. Refused at insert (and at an update of metadata),
-- naming the column; rows stored before this rule are failed by the worker, one row at a time.
create function private.check_metadata_numbers()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  raise exception using
    errcode = '22003',
    column = 'metadata',
    message = 'metadata: a number is beyond the range of a double (its magnitude must stay below '
              '2^1024 - 2^970, about 1.8e308): JSON readers take it for Infinity, so the vote '
              'could not be mirrored to Langfuse; send it as a string',
    hint = 'JavaScript (Langfuse) reads every JSON number as an IEEE 754 double, and Python '
           'every number with a fraction or an exponent.';
end;
$$;

comment on function private.check_metadata_numbers() is
  'Trigger (before insert, or update of metadata, on persona_training_events, only when a number '
  'in metadata, at any depth, has a magnitude of at least 2^1024 - 2^970, the least that a '
  'double rounds to Infinity): raises 22003 (HTTP 400) "metadata: a number is beyond the range '
  'of a double ..." with column metadata. Other rows never call it.';

create trigger persona_training_events_check_metadata_numbers
  before insert or update of metadata on public.persona_training_events
  for each row when (jsonb_path_exists(new.metadata, 'strict $.** ? (@.type() == "number" && @.abs() >= 179769313486231580793728971405303415079934132710037826936173778980444968292764750946649017977587207096330286416692887910946555547851940402630657488671505820681908902000708383676273854845817711531764475730270069855571366959622842914819860834936475292719074168444365510704342711559699508093042880177904174497792)'))
  execute function private.check_metadata_numbers();

-- PostgreSQL lets PUBLIC execute every new function; a trigger needs no grant to fire.
revoke execute on function private.check_metadata_numbers() from public;

comment on table private.langfuse_hold is
  'The Langfuse mirror''s hold (one row). hold_until: no outbox row is claimed for Langfuse, and '
  'no start-up check sent, before it (null: no hold); once it has passed, one claim that takes '
  'rows, or one check (claim_langfuse_check), at a time is the probe (probe_until: until when '
  'other claims and checks wait for that probe''s answer), and the probe''s recorded answer '
  'ends the hold or sets the next one. reason: the answer that set it. bare_waits: holds in a '
  'row set by an answer without a delay (a proxy''s bare 429 or 502, a 500), counted once per '
  'hold, which double the next one; a success sets it to 0. End a hold early with select '
  'public.end_langfuse_hold(); (it also makes the rows that waited for it due).';

-- Claims up to p_limit due feedback rows for delivery. They stay invisible to other workers for
-- p_visibility_seconds; a worker that dies leaves them due again after that. Nothing is claimed
-- while the mirror's hold lasts; once it has passed, one claim at a time (for
-- p_visibility_seconds) is the probe whose recorded answer ends the hold or sets the next one.
-- A claim that takes no row is no probe: it leaves the next claim free to be one.
create or replace function public.claim_langfuse_outbox(p_limit integer default 100,
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
         -- Every vote of one feedback carries the first vote's time, so Langfuse updates the
         -- same score instead of adding one.
         coalesce(first_vote.created_at, c.created_at)
  from claimed c
  left join public.persona_training_events first_vote on first_vote.id = c.first_vote_id
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
  'intent_label, module_key, comment, metadata, attempts, score_timestamp = the first vote''s '
  'created_at, so every vote of one feedback updates one Langfuse score); their next attempt '
  'moves to now() + p_visibility_seconds, so a worker that dies leaves them due again. None '
  'while private.langfuse_hold holds (Langfuse asked to wait); after the hold, one claim at a '
  'time that takes rows, for p_visibility_seconds, is the probe, and the others get none (a '
  'claim that finds nothing due arms no probe: the hold stays until a claim with rows, or a '
  'start-up check, probes). Raises 22023 for a p_limit or p_visibility_seconds out of range.';

-- An operator ends the mirror's hold early (the plan upgraded, the proxy fixed): the hold and
-- its count of bare waits go, and the rows that waited for it are due now. Those are the rows
-- whose next attempt is the hold's end: a wait, and a retry the hold outlasted, are recorded
-- due exactly then. A row claimed and in flight (due at its claim's time + the visibility) is
-- not one of them: made due, a second worker would send it again.
create or replace function public.end_langfuse_hold()
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
  '(the server takes our requests), or failed (neither: down, refused; only the probe''s worker '
  'records it); p_base_delay_seconds (default 2). wait sets the mirror''s hold as a wait recorded '
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

-- The worker calls claim_langfuse_check and record_langfuse_check: it needs this migration.
create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261218000500'::text;
$$;
