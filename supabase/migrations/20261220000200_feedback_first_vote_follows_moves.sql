-- Delta: a feedback's first vote time follows votes moved by hand. The kept time
-- (private.feedback_first_votes, 20261219000300) was written only by a feedback's first vote and
-- read only when no current vote carried a time: a vote moved by hand to another trace (or twin,
-- or voter) kept its old feedback's time and left none for the new one, so once a moderator
-- deleted it the next vote there went out with its own time: the same Langfuse score id on
-- another day, a second row of Langfuse's score table.
-- * The vote recorder takes the kept time first, whatever vote it replaces.
-- * Every vote keeps its feedback's time when the feedback has none (not only one replacing none),
--   written by the vote recorder before it reads it (the after-insert trigger that wrote it is
--   gone), so a vote and a hand move into one new feedback at the same moment take one time.
-- * An edit moving a vote to another feedback gives it that feedback's kept time, or keeps its
--   own there; an edit setting a vote's first_vote_at to another time than its feedback's kept
--   one is refused (23514).

comment on table private.feedback_first_votes is
  'When each feedback (twin, trace, voter: what the Langfuse score id is derived from) was first '
  'voted on: written with the feedback''s first vote (or the first vote moved into it by hand), '
  'read by every later vote and every vote moved into it (persona_training_events.first_vote_at, '
  'which an edit may not set to another time), kept when its votes are deleted (a moderator) or '
  'moved away, removed with the twin or the voter''s account (auth.users). No API role may read '
  'or write it.';

comment on column public.persona_training_events.first_vote_at is
  'When this feedback''s first vote was cast (its created_at), kept in '
  'private.feedback_first_votes and set from there on every vote, and on a vote moved into the '
  'feedback by hand, so it stays when the first vote is deleted: the Langfuse score''s '
  'timestamp, which keys the score there with its id. An edit may not set it to another time. '
  'Null on audits.';

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
  v_kept_at timestamptz;
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
  -- The feedback's first vote time is kept apart from its votes, so it outlives all of them: a
  -- vote cast after its current (or only) vote was deleted, or moved away by hand, still finds
  -- it; where it is kept, it is the time. A feedback new to the table keeps its current vote's
  -- time (votes stored before the table), else this vote's. Its row is locked for the
  -- transaction, as a vote moved into the feedback by hand locks it (the edit trigger): a move
  -- and a vote at the same moment take turns, and the vote then finds the moved vote as the
  -- current one (the update below reads after the lock). A twin given exists (the consent
  -- check); no twin, no trace or a voter that does not exist is the events table's to refuse,
  -- with its own error.
  insert into private.feedback_first_votes (twin_id, trace_id, created_by, first_vote_at)
  select new.twin_id, new.trace_id, new.created_by,
         coalesce((select p.first_vote_at from public.persona_training_events p
                   where p.twin_id = new.twin_id and p.trace_id = new.trace_id
                     and p.created_by = new.created_by and p.source = 'user_feedback'
                     and p.superseded_at is null),
                  new.created_at)
  where new.twin_id is not null and new.trace_id is not null
    and exists (select 1 from auth.users u where u.id = new.created_by)
  on conflict (twin_id, trace_id, created_by) do nothing;
  select f.first_vote_at into v_kept_at
  from private.feedback_first_votes f
  where f.twin_id = new.twin_id and f.trace_id = new.trace_id and f.created_by = new.created_by
  for update;

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
  new.first_vote_at := coalesce(v_kept_at, v_first_vote_at, new.created_at);
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
  'the feedback''s in private.feedback_first_votes, whose row it locks, where a feedback new '
  'to it keeps the current vote''s first_vote_at, else the new created_at); puts the new vote '
  'in the outbox (pending, due at its created_at, or when the superseded one''s delivery window '
  'closes). Security definer: voters may not update events. Raises nothing of its own.';

drop trigger persona_training_events_keep_first_vote on public.persona_training_events;
drop function private.keep_feedback_first_vote();

-- An edit by hand that moves a vote to another feedback (its twin, trace or voter changed, or an
-- event made feedback) or changes its first vote time. The kept time is the Langfuse score's
-- timestamp: a vote moved into a feedback must go out with that feedback's time, and the
-- feedback it starts must keep its own time when the vote is later deleted, or the next vote
-- there is a second row of Langfuse's score table.
create function private.keep_feedback_first_vote_on_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_kept timestamptz;
  v_moved boolean := (old.source, old.twin_id, old.trace_id, old.created_by)
                     is distinct from (new.source, new.twin_id, new.trace_id, new.created_by);
begin
  -- A feedback new to the table keeps the vote's time. Its row is locked for the transaction
  -- (a row lock, not an advisory one: a move of many votes takes no slot of the lock table per
  -- vote), so a vote or a move into the same feedback at the same moment waits for this one,
  -- then reads its time and finds this vote where it moved. Inserted only for a twin and a
  -- voter that exist, and a time given: otherwise the events table's own foreign key or check
  -- refuses the row, with its own error.
  if v_moved then
    insert into private.feedback_first_votes (twin_id, trace_id, created_by, first_vote_at)
    select new.twin_id, new.trace_id, new.created_by, new.first_vote_at
    where new.first_vote_at is not null and new.trace_id is not null
      and exists (select 1 from public.twins t where t.id = new.twin_id)
      and exists (select 1 from auth.users u where u.id = new.created_by)
    on conflict (twin_id, trace_id, created_by) do nothing;
  end if;
  select f.first_vote_at into v_kept
  from private.feedback_first_votes f
  where f.twin_id = new.twin_id and f.trace_id = new.trace_id and f.created_by = new.created_by
  for update;
  if not found then
    return new;
  elsif v_moved then
    new.first_vote_at := v_kept;
  elsif new.first_vote_at is distinct from v_kept then
    raise exception using
      errcode = '23514',
      column = 'first_vote_at',
      message = format('first_vote_at: event %s is a vote of a feedback first voted on at %s, '
                       'its Langfuse score''s timestamp; it cannot be set to %s',
                       new.id, v_kept, coalesce(new.first_vote_at::text, 'null')),
      hint = 'The feedback''s first vote time is kept in private.feedback_first_votes (twin_id, '
             'trace_id, created_by): change it there first, then on its votes.';
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
  'first_vote_at to another time than its feedback''s kept one (change that first). Security '
  'definer: no API role may read or write that table.';

create trigger persona_training_events_keep_first_vote_on_edit
  before update of source, twin_id, trace_id, created_by, first_vote_at
  on public.persona_training_events
  for each row when (
    new.source = 'user_feedback'
    and (old.source, old.twin_id, old.trace_id, old.created_by, old.first_vote_at)
        is distinct from (new.source, new.twin_id, new.trace_id, new.created_by, new.first_vote_at))
  execute function private.keep_feedback_first_vote_on_edit();

revoke execute on function private.keep_feedback_first_vote_on_edit() from public;

create or replace function public.worker_schema_version()
returns text
language sql
stable
set search_path = ''
as $$
  select '20261220000200'::text;
$$;

-- Backfill: a feedback a vote was moved into by hand before this migration may have no kept time
-- (its votes' earliest is taken), and a vote moved into one that had may carry another time:
-- votes not yet sent take the kept one, so they go out into the score's one row.
insert into private.feedback_first_votes (twin_id, trace_id, created_by, first_vote_at)
select e.twin_id, e.trace_id, e.created_by, min(e.first_vote_at)
from public.persona_training_events e
where e.source = 'user_feedback'
group by e.twin_id, e.trace_id, e.created_by
on conflict (twin_id, trace_id, created_by) do nothing;

update public.persona_training_events e
set first_vote_at = f.first_vote_at
from private.feedback_first_votes f
where e.source = 'user_feedback'
  and e.langfuse_status in ('pending', 'retrying', 'skipped', 'failed')
  and f.twin_id = e.twin_id and f.trace_id = e.trace_id and f.created_by = e.created_by
  and e.first_vote_at is distinct from f.first_vote_at;
