-- Delta: a feedback's first vote time outlives all its votes. first_vote_at was carried from a
-- superseded vote to its replacement; a vote cast after a moderator deleted the feedback's
-- current (or only) vote found none to carry it from and went out with its own time: the same
-- Langfuse score id on another day, a second row of Langfuse's score table (keyed by day of
-- timestamp, name and id), counted twice once the server's stored events expired.
-- * private.feedback_first_votes (twin, trace, voter: what the score id is derived from):
--   the first vote's time, written with a feedback's first vote, read by later votes when no
--   current vote carries it; removed with the twin or the voter's account.
-- * Backfill: the earliest first_vote_at among each feedback's remaining votes.

-- Section: a feedback's first vote time, kept when every vote of it is deleted. Keyed as the
-- Langfuse score id is (twin, trace, voter): the score's timestamp is part of Langfuse's key, so
-- a vote cast after a moderator deleted the feedback's current (or only) vote must go out with
-- the time its first vote went out with, or it is a second row there, counted twice.
create table private.feedback_first_votes (
  twin_id uuid not null references public.twins (id) on delete cascade,
  trace_id text not null,
  created_by uuid not null references auth.users (id) on delete cascade,
  first_vote_at timestamptz not null,
  primary key (twin_id, trace_id, created_by)
);

comment on table private.feedback_first_votes is
  'When each feedback (twin, trace, voter: what the Langfuse score id is derived from) was first '
  'voted on: written by the vote recorder with the feedback''s first vote, read by every later '
  'vote (persona_training_events.first_vote_at), kept when its votes are deleted (a moderator), '
  'removed with the twin or the voter''s account (auth.users). No API role may read or write it.';

-- A user's account deleted: the cascade finds the voter's rows by this index.
create index feedback_first_votes_created_by_idx on private.feedback_first_votes (created_by);

insert into private.feedback_first_votes (twin_id, trace_id, created_by, first_vote_at)
select e.twin_id, e.trace_id, e.created_by, min(e.first_vote_at)
from public.persona_training_events e
where e.source = 'user_feedback'
group by e.twin_id, e.trace_id, e.created_by;

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

  -- The feedback's first vote time is kept apart from its votes, so it outlives all of them: a
  -- vote cast after its current (or only) vote was deleted still finds it.
  if v_first_vote_at is null then
    select f.first_vote_at into v_first_vote_at
    from private.feedback_first_votes f
    where f.twin_id = new.twin_id and f.trace_id = new.trace_id
      and f.created_by = new.created_by;
  end if;

  new.supersedes_id := v_previous_id;
  new.first_vote_id := coalesce(v_first_vote_id, new.id);
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
  'the superseded vote''s first_vote_at, else the feedback''s in private.feedback_first_votes, '
  'else the new created_at); puts the new vote '
  'in the outbox (pending, due at its created_at, or when the superseded one''s delivery window '
  'closes). Security definer: voters may not update events. Raises nothing of its own.';

-- The first vote of a feedback leaves its time in private.feedback_first_votes. After the
-- insert: the row has passed its checks and foreign keys (those fire first), so a vote that is
-- refused writes nothing there and its error stays the events table's own.
create function private.keep_feedback_first_vote()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into private.feedback_first_votes (twin_id, trace_id, created_by, first_vote_at)
  values (new.twin_id, new.trace_id, new.created_by, new.first_vote_at)
  on conflict (twin_id, trace_id, created_by) do nothing;
  return null;
end;
$$;

comment on function private.keep_feedback_first_vote() is
  'Trigger (after insert of a feedback vote that replaces none, on persona_training_events): '
  'records its feedback''s first vote time (first_vote_at, as the vote recorder set it) in '
  'private.feedback_first_votes, unless the feedback has one there already. Security definer: '
  'no API role may write that table. Raises nothing of its own.';

create trigger persona_training_events_keep_first_vote
  after insert on public.persona_training_events
  for each row when (new.source = 'user_feedback' and new.supersedes_id is null)
  execute function private.keep_feedback_first_vote();

revoke execute on function private.keep_feedback_first_vote() from public;

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261219000300'::text;
$$;
