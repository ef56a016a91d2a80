-- Kept first vote times (issue 12), found by fresh reviews of 20261220000200:
--
-- - Votes of one feedback take turns on the feedback's row in private.feedback_first_votes alone,
--   locked first by every vote: the advisory lock per vote is gone. It took a slot of PostgreSQL's
--   lock table, which all sessions share, until commit: two requests of 7,000 votes at once, or
--   one transaction of 13,000, made every session's next lock fail ("out of shared memory").
--   Moves into a feedback lock the same row (private.lock_feedback_first_vote, one place for
--   both; a change of a vote reads the row once, with no insert). (Locking the feedback's
--   current vote before that row was tried: three votes at once then deadlocked.)
-- - A vote whose trace_id was too long for an index key (about 2,700 bytes) was refused with
--   54000 (HTTP 413) naming private.feedback_first_votes' key, before the events table's own
--   check could refuse it (23514, trace_id_1_to_200_chars, HTTP 400). The recorder and the edit
--   trigger now write a kept time only for a trace of 1 to 200 characters.
-- - An edit that moves a vote and names a time of its own was silently given the feedback's kept
--   time; it is now refused as any other edit of first_vote_at against the kept time (23514), and
--   a first vote time in the future is refused (a feedback started by a move would keep it).
-- - Votes moved by hand before 20261220000200 and already sent carried their old time, which a
--   re-send would take: every vote now carries its feedback's kept time (a vote already sent is
--   not sent again by this; re-sending it updates the feedback's one score).

-- The row of a feedback's kept first vote time, locked for the transaction: votes of one
-- feedback, and moves of votes into it, take turns on it. Called by the vote recorder and the
-- edit trigger below, as postgres (their owner).
create function private.lock_feedback_first_vote(
  p_twin_id uuid, p_trace_id text, p_created_by uuid, p_first_vote_at timestamptz
)
returns timestamptz
language plpgsql
set search_path = ''
as $$
declare
  v_kept timestamptz;
begin
  -- A feedback voted on before: one read, no insert (every change of a vote comes this way).
  select f.first_vote_at into v_kept
  from private.feedback_first_votes f
  where f.twin_id = p_twin_id and f.trace_id = p_trace_id and f.created_by = p_created_by
  for update;
  if found then
    return v_kept;
  end if;
  -- A feedback new to the table keeps its current vote's time (votes stored before the table),
  -- else the one given. Written only for a twin and a voter that exist, a trace within the
  -- events table's bounds (1 to 200 characters: a longer one is too long for this table's key)
  -- and a time given: otherwise the events table's own constraint refuses the vote, with its own
  -- error. A second vote of a new feedback waits here on the first one's insert, until it
  -- commits (then it finds the row) or rolls back (then it writes its own).
  insert into private.feedback_first_votes (twin_id, trace_id, created_by, first_vote_at)
  select p_twin_id, p_trace_id, p_created_by,
         coalesce((select p.first_vote_at from public.persona_training_events p
                   where p.twin_id = p_twin_id and p.trace_id = p_trace_id
                     and p.created_by = p_created_by and p.source = 'user_feedback'
                     and p.superseded_at is null),
                  p_first_vote_at)
  where p_first_vote_at is not null and char_length(p_trace_id) between 1 and 200
    and exists (select 1 from public.twins t where t.id = p_twin_id)
    and exists (select 1 from auth.users u where u.id = p_created_by)
  on conflict (twin_id, trace_id, created_by) do nothing;
  select f.first_vote_at into v_kept
  from private.feedback_first_votes f
  where f.twin_id = p_twin_id and f.trace_id = p_trace_id and f.created_by = p_created_by
  for update;
  return v_kept;
end;
$$;

comment on function private.lock_feedback_first_vote(uuid, text, uuid, timestamptz) is
  'Vote recorder''s and edit trigger''s helper. In: a feedback (twin, trace, voter) and the time '
  'to keep if it has none (null: keep none). Out: the feedback''s kept first vote time in '
  'private.feedback_first_votes, its row locked for the transaction (a row lock: no slot of the '
  'lock table), written first when missing (its current vote''s first_vote_at, else the time '
  'given) where the twin and the voter exist and the trace has 1 to 200 characters; null when '
  'none is kept. Raises nothing of its own.';

revoke execute on function private.lock_feedback_first_vote(uuid, text, uuid, timestamptz) from public;

create or replace function private.record_feedback_vote()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_previous_id bigint;
  v_first_vote_id bigint;
  v_kept_at timestamptz;
  v_previous_due_at timestamptz;
  v_previous_status public.langfuse_status;
begin
  new.superseded_at := null;
  new.supersedes_id := null;
  new.langfuse_attempts := 0;
  new.langfuse_last_error := null;
  new.langfuse_sent_at := null;

  -- The feedback's first vote time is kept apart from its votes, so it outlives all of them: a
  -- vote cast after its current (or only) vote was deleted, or moved away by hand, still finds
  -- it; where it is kept, it is the time (a feedback new to the table keeps this vote's). Its
  -- row, locked for the transaction before any other, is where votes of one feedback take
  -- turns: a vote from the voter's second device waits until the first one commits, then
  -- supersedes it, instead of colliding with it on the current-vote index. A vote moved into the
  -- feedback by hand locks it too (the edit trigger), so the vote then finds the moved vote as
  -- the current one (the update below reads after the lock). Row locks, not an advisory lock: a
  -- transaction writing many votes takes no slot of PostgreSQL's lock table, which all sessions
  -- share (one per vote ran out of them for every session past some 12,000 votes in flight).
  -- Taken first, by every vote: votes of a feedback never wait for each other while holding its
  -- current vote (taken the other way round, three votes at once deadlocked). None is kept for
  -- a vote the events table refuses (no twin, a trace out of bounds, an unknown voter).
  v_kept_at := private.lock_feedback_first_vote(
    new.twin_id, new.trace_id, new.created_by, new.created_at);

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
  returning p.id, p.first_vote_id, p.langfuse_next_attempt_at, p.langfuse_status
    into v_previous_id, v_first_vote_id, v_previous_due_at, v_previous_status;
  perform set_config('pfl.recording_vote', '', true);

  new.supersedes_id := v_previous_id;
  new.first_vote_id := coalesce(v_first_vote_id, new.id);
  new.first_vote_at := coalesce(v_kept_at, new.created_at);
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
  'langfuse_last_error, langfuse_sent_at); locks the feedback''s row in '
  'private.feedback_first_votes (inserting it for a feedback new to it), on which votes of one '
  'feedback and moves into it take turns (row locks: no slot of the lock table per vote); marks '
  'the voter''s current vote on the trace superseded '
  '(its outbox state too when not yet delivered), with pfl.recording_vote on so that this vote '
  'change is not taken for an edit by hand, and links the new vote to it (supersedes_id; '
  'first_vote_id = the feedback''s first vote, or the new id; first_vote_at = the feedback''s in '
  'private.feedback_first_votes, where a feedback new to it keeps the current vote''s '
  'first_vote_at, else the new created_at); puts the new vote in the outbox (pending, due at its '
  'created_at, or when the superseded one''s delivery window closes). Security definer: voters '
  'may not update events. Raises nothing of its own.';

create or replace function private.keep_feedback_first_vote_on_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_kept timestamptz;
  v_moved boolean := (old.source, old.twin_id, old.trace_id, old.created_by)
                     is distinct from (new.source, new.twin_id, new.trace_id, new.created_by);
  -- The edit names a time of its own (a move alone carries the old one).
  v_set boolean := new.first_vote_at is distinct from old.first_vote_at;
begin
  -- No stored time is in the future (as created_at): a feedback started by a move would keep it.
  if v_set and new.first_vote_at > statement_timestamp() then
    raise exception using
      errcode = '23514',
      column = 'first_vote_at',
      message = format('first_vote_at: event %s cannot take a first vote time in the future (%s)',
                       new.id, new.first_vote_at);
  end if;
  -- The feedback's kept time, its row locked (a vote or a move into the same feedback at the
  -- same moment waits for this one, then reads its time and finds this vote where it moved);
  -- a feedback a move starts keeps the moved vote's time.
  v_kept := private.lock_feedback_first_vote(
    new.twin_id, new.trace_id, new.created_by, case when v_moved then new.first_vote_at end);
  if v_kept is null then
    return new;
  elsif v_moved and not v_set then
    new.first_vote_at := v_kept;
  elsif new.first_vote_at is distinct from v_kept then
    raise exception using
      errcode = '23514',
      column = 'first_vote_at',
      message = format('first_vote_at: event %s is a vote of a feedback first voted on at %s, '
                       'its Langfuse score''s timestamp; it cannot be set to %s',
                       new.id, v_kept, coalesce(new.first_vote_at::text, 'null')),
      hint = 'Leave first_vote_at out of the edit: a vote moved to a feedback takes its time. '
             'The time is kept in private.feedback_first_votes (twin_id, trace_id, created_by); '
             'a score already sent to Langfuse keeps the old one, so changing it there makes '
             'the next vote a second score in Langfuse.';
  end if;
  return new;
end;
$$;

comment on function private.keep_feedback_first_vote_on_edit() is
  'Trigger (before update of source, twin_id, trace_id, created_by or first_vote_at of a feedback '
  'vote on persona_training_events, when one of them changed): a vote moved to another feedback '
  '(twin, trace, voter) takes that feedback''s first vote time from '
  'private.feedback_first_votes, or leaves its own there when the feedback has none; a vote that '
  'stays keeps its feedback''s time. Raises 23514 naming first_vote_at when an edit sets a vote''s '
  'first_vote_at to another time than its feedback''s kept one (a move with a time of its own '
  'too), or to a time in the future. Security definer: no API role may read or write that '
  'table.';

update public.persona_training_events e
set first_vote_at = f.first_vote_at
from private.feedback_first_votes f
where e.source = 'user_feedback'
  and f.twin_id = e.twin_id and f.trace_id = e.trace_id and f.created_by = e.created_by
  and e.first_vote_at is distinct from f.first_vote_at;
