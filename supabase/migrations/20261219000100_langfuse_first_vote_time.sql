-- Delta: the Langfuse score's timestamp survives the deletion of a feedback's first vote.
-- claim_langfuse_outbox took it from the first vote's row (a join on first_vote_id); once a
-- moderator deleted that row, later votes went out with their own created_at, another day, so
-- another row of Langfuse's score table (keyed by day of timestamp, name and id): the feedback
-- counted twice once the server's stored events expired.
-- * persona_training_events.first_vote_at: the first vote's time, set by the vote recorder and
--   carried by every later vote (as first_vote_id is); every feedback row has one.
-- * Backfill: the first vote's created_at; where that vote is already gone, the earliest
--   remaining vote of the feedback (its first time can no longer be known).
-- * claim_langfuse_outbox sends first_vote_at as score_timestamp.

alter table public.persona_training_events add column first_vote_at timestamptz;

comment on column public.persona_training_events.first_vote_at is
  'When this feedback''s first vote was cast (its created_at), set by the vote recorder and '
  'carried by every later vote, so it stays when the first vote is deleted: the Langfuse '
  'score''s timestamp, which keys the score there with its id. Null on audits.';

update public.persona_training_events e
set first_vote_at = coalesce(
  (select f.created_at from public.persona_training_events f where f.id = e.first_vote_id),
  (select min(o.created_at) from public.persona_training_events o
   where o.source = 'user_feedback' and o.twin_id = e.twin_id and o.trace_id = e.trace_id
     and o.created_by = e.created_by),
  e.created_at)
where e.source = 'user_feedback';

-- Every vote of a feedback carries its first vote's time, kept when that vote is deleted: the
-- Langfuse score's timestamp (part of Langfuse's key), which must never change.
alter table public.persona_training_events
  add constraint first_vote_at_on_feedback_only
  check ((source = 'user_feedback') = (first_vote_at is not null));

create or replace function private.record_feedback_vote()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_previous_id bigint;
  v_first_vote_id bigint;
  v_first_vote_at timestamptz;
  v_previous_due_at timestamptz;
  v_previous_status public.langfuse_status;
begin
  new.superseded_at := null;
  new.supersedes_id := null;
  new.langfuse_attempts := 0;
  new.langfuse_last_error := null;
  new.langfuse_sent_at := null;

  -- Votes of one feedback take turns: a vote from the voter's second device waits here until the
  -- first one commits, then supersedes it, instead of colliding with it on the current-vote index.
  perform pg_advisory_xact_lock(
    hashtext('public.persona_training_events'),
    hashtext(format('%s/%s/%s', new.twin_id, new.created_by, new.trace_id))
  );
  perform set_config('pfl.recording_vote', 'on', true);
  update public.persona_training_events p
  set superseded_at = now(),
      langfuse_status = case when p.langfuse_status in ('pending', 'retrying')
                             then 'superseded' else p.langfuse_status end
  where p.twin_id = new.twin_id
    and p.trace_id = new.trace_id
    and p.created_by = new.created_by
    and p.source = 'user_feedback'
    and p.superseded_at is null
  returning p.id, p.first_vote_id, p.first_vote_at, p.langfuse_next_attempt_at, p.langfuse_status
    into v_previous_id, v_first_vote_id, v_first_vote_at, v_previous_due_at, v_previous_status;
  perform set_config('pfl.recording_vote', '', true);

  new.supersedes_id := v_previous_id;
  new.first_vote_id := coalesce(v_first_vote_id, new.id);
  -- Carried down the chain of votes, not looked up: it survives the first vote's deletion.
  new.first_vote_at := coalesce(v_first_vote_at, new.created_at);
  new.langfuse_status := 'pending';
  -- The new vote updates the same Langfuse score. If the old one was not yet delivered it may be
  -- in flight: wait until its delivery is recorded (which releases this one) or its window
  -- closes, so that the new value always lands last.
  new.langfuse_next_attempt_at := case when v_previous_status = 'superseded'
                                       then greatest(new.created_at, v_previous_due_at)
                                       else new.created_at end;
  return new;
end;
$$;

comment on function private.record_feedback_vote() is
  'Trigger (before insert of feedback on persona_training_events, after the consent check): '
  'records the vote. Clears the server columns (superseded_at, supersedes_id, langfuse_attempts, '
  'langfuse_last_error, langfuse_sent_at); takes a transaction advisory lock on (twin, voter, '
  'trace) so two votes of one feedback take turns; marks the voter''s current vote on the trace '
  'superseded (its outbox state too when not yet delivered), with pfl.recording_vote on so that '
  'this vote change is not taken for an edit by hand, and links the new vote to it '
  '(supersedes_id; first_vote_id = the feedback''s first vote, or the new id; first_vote_at = '
  'the superseded vote''s first_vote_at, or the new created_at); puts the new vote '
  'in the outbox (pending, due at its created_at, or when the superseded one''s delivery window '
  'closes). Security definer: voters may not update events. Raises nothing of its own.';

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

-- The worker reads score_timestamp as before; the version moves with the column.
create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261219000100'::text;
$$;
