-- A vote costs less to record (issue 15, case 4 of the benchmark: ingest against a FastAPI
-- endpoint), with the same guarantees:
--
-- - A vote that starts its feedback (its kept-time row written by this vote, no current vote)
--   runs no supersede update. That update, even when it found no row, fired the two statement
--   triggers that follow edits by hand, with their transition tables: about a fifth of the
--   database's time per vote. private.lock_feedback_first_vote says whether the vote starts its
--   feedback (out parameter started).
-- - Those two triggers skip the vote recorder's own update (a vote change) in their WHEN clause
--   (pfl.recording_vote on): it changes superseded_at and the outbox state alone, which both
--   already ignored for a vote change.
-- - The consent check runs in the vote recorder's trigger, first: one trigger call per vote
--   instead of two, the same error (42501 naming twin_id) before the vote's other rules and the
--   insert policy.

drop trigger persona_training_events_check_consent on public.persona_training_events;
drop function private.check_feedback_consent();
-- Triggers of one event fire in name order: the merged one still comes after bound_created_at
-- (it reads the clamped created_at) and before check_metadata_numbers (consent is the first
-- answer, as before).
alter trigger persona_training_events_record_vote on public.persona_training_events
  rename to persona_training_events_check_consent_and_record_vote;

-- Its result changes from the kept time to (first_vote_at, started).
drop function private.lock_feedback_first_vote(uuid, text, uuid, timestamptz);
create function private.lock_feedback_first_vote(
  p_twin_id uuid, p_trace_id text, p_created_by uuid, p_first_vote_at timestamptz,
  out first_vote_at timestamptz, out started boolean
)
language plpgsql
set search_path = ''
as $$
declare
  v_current_at timestamptz;
begin
  started := false;
  -- A feedback voted on before: one read, no insert (every change of a vote comes this way).
  select f.first_vote_at into first_vote_at
  from private.feedback_first_votes f
  where f.twin_id = p_twin_id and f.trace_id = p_trace_id and f.created_by = p_created_by
  for update;
  if found then
    return;
  end if;
  -- A feedback new to the table keeps its current vote's time (votes stored before the table),
  -- else the one given. Written only for a twin and a voter that exist, a trace within the
  -- events table's bounds (1 to 200 characters: a longer one is too long for this table's key)
  -- and a time given: otherwise the events table's own constraint refuses the vote, with its own
  -- error. A second vote of a new feedback waits here on the first one's insert, until it
  -- commits (then it finds the row) or rolls back (then it writes its own).
  select p.first_vote_at into v_current_at
  from public.persona_training_events p
  where p.twin_id = p_twin_id and p.trace_id = p_trace_id and p.created_by = p_created_by
    and p.source = 'user_feedback' and p.superseded_at is null;
  insert into private.feedback_first_votes as f (twin_id, trace_id, created_by, first_vote_at)
  select p_twin_id, p_trace_id, p_created_by, coalesce(v_current_at, p_first_vote_at)
  where p_first_vote_at is not null and char_length(p_trace_id) between 1 and 200
    and exists (select 1 from public.twins t where t.id = p_twin_id)
    and exists (select 1 from auth.users u where u.id = p_created_by)
  on conflict (twin_id, trace_id, created_by) do nothing
  returning f.first_vote_at into first_vote_at;
  if found then
    -- Written here, under this transaction's lock: no other vote of the feedback can be current
    -- unless one was stored before the table (found above).
    started := v_current_at is null;
    return;
  end if;
  select f.first_vote_at into first_vote_at
  from private.feedback_first_votes f
  where f.twin_id = p_twin_id and f.trace_id = p_trace_id and f.created_by = p_created_by
  for update;
end;
$$;

comment on function private.lock_feedback_first_vote(uuid, text, uuid, timestamptz) is
  'Vote recorder''s and edit trigger''s helper. In: a feedback (twin, trace, voter) and the time '
  'to keep if it has none (null: keep none). Out: first_vote_at, the feedback''s kept first vote '
  'time in private.feedback_first_votes, its row locked for the transaction (a row lock: no slot '
  'of the lock table), written first when missing (its current vote''s first_vote_at, else the '
  'time given) where the twin and the voter exist and the trace has 1 to 200 characters, null '
  'when none is kept; started, true when this call wrote the row and the feedback has no current '
  'vote (the vote being recorded starts the feedback: there is nothing to supersede). Raises '
  'nothing of its own.';

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
  v_started boolean;
begin
  -- Consent first: whether the twin takes votes from this voter (the owner always, anyone when
  -- feedback_from is any_user). Checked here, for every role, before the insert policy, so the
  -- error names twin_id. One trigger for both steps: each trigger call on this path is paid on
  -- every vote (case 4 of the benchmark). No twin at all is the NOT NULL constraint's to refuse
  -- (23502 naming twin_id).
  if new.twin_id is not null and not exists (
    select 1 from public.twins t
    where t.id = new.twin_id
      and (t.feedback_from = 'any_user' or t.owner_id = new.created_by)
  ) then
    raise exception using
      errcode = '42501',
      column = 'twin_id',
      message = format('twin_id: twin %s does not exist or does not accept feedback from this user',
                       new.twin_id);
  end if;

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
  select l.first_vote_at, l.started into v_kept_at, v_started
  from private.lock_feedback_first_vote(
    new.twin_id, new.trace_id, new.created_by, new.created_at) l;

  -- A vote that starts its feedback (most votes) has nothing to supersede: no update, so none
  -- of the update's statement triggers run for it either.
  if not v_started then
    -- pfl.recording_vote tells this update apart from an edit by hand: the statement triggers
    -- that follow edits of evidence skip it (their WHEN).
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
  end if;

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
  'Trigger (before insert of feedback on persona_training_events, for every role): checks that '
  'the twin accepts feedback from the voter (created_by): the owner always, others when the '
  'twin''s feedback_from is any_user; raises 42501 (HTTP 403) "twin_id: twin <id> does not exist '
  'or does not accept feedback from this user" otherwise, before the insert policy is evaluated. '
  'Then records the vote. Clears the server columns (superseded_at, supersedes_id, '
  'langfuse_attempts, langfuse_last_error, langfuse_sent_at); locks the feedback''s row in '
  'private.feedback_first_votes (inserting it for a feedback new to it), on which votes of one '
  'feedback and moves into it take turns (row locks: no slot of the lock table per vote); unless '
  'the vote starts its feedback, marks the voter''s current vote on the trace superseded '
  '(its outbox state too when not yet delivered), with pfl.recording_vote on so that the '
  'triggers following edits by hand skip this vote change, and links the new vote to it (supersedes_id; '
  'first_vote_id = the feedback''s first vote, or the new id; first_vote_at = the feedback''s in '
  'private.feedback_first_votes, where a feedback new to it keeps the current vote''s '
  'first_vote_at, else the new created_at); puts the new vote in the outbox (pending, due at its '
  'created_at, or when the superseded one''s delivery window closes). Security definer: it reads '
  'twins the voter''s policies hide, and voters may not update events. Raises the 42501 above.';

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
  select l.first_vote_at into v_kept
  from private.lock_feedback_first_vote(
    new.twin_id, new.trace_id, new.created_by, case when v_moved then new.first_vote_at end) l;
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

create or replace function private.bump_evidence_generation_on_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- Once per statement, each twin once: the rows whose evidence columns changed, as a hashed
  -- set difference of the transition tables (the twin of the row before and after). A trigger
  -- per row bumped the twin once per row, and every bump left the twin's row one more version
  -- to step over: an edit of 3,000 events took 1.7 s, of 100,000 more than 4 minutes.
  update public.twins t
  set evidence_generation = t.evidence_generation + 1
  where t.id in (
    select c.twin_id from (
      (select o.id, o.twin_id, o.source, o.intent_label, o.module_key, o.score, o.passed,
              o.reason, o.created_at, o.audit_of_draft, o.supersedes_id, o.superseded_at
       from before_rows o
       except
       select n.id, n.twin_id, n.source, n.intent_label, n.module_key, n.score, n.passed,
              n.reason, n.created_at, n.audit_of_draft, n.supersedes_id, n.superseded_at
       from after_rows n)
      union all
      (select n.id, n.twin_id, n.source, n.intent_label, n.module_key, n.score, n.passed,
              n.reason, n.created_at, n.audit_of_draft, n.supersedes_id, n.superseded_at
       from after_rows n
       except
       select o.id, o.twin_id, o.source, o.intent_label, o.module_key, o.score, o.passed,
              o.reason, o.created_at, o.audit_of_draft, o.supersedes_id, o.superseded_at
       from before_rows o)
    ) c (id, twin_id)
  );
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_edit() is
  'Trigger (after update on persona_training_events, once per statement, the rows as '
  'before_rows and after_rows; not for the vote recorder''s own update, pfl.recording_vote on): '
  'bumps evidence_generation, once, of every twin of a row before or after an update that '
  'changed its twin_id, source, intent_label, module_key, score, passed, reason, created_at, '
  'audit_of_draft, supersedes_id or superseded_at. Linear in the rows updated (hashed set '
  'differences). Security definer: whoever edits, the twin is marked. Raises nothing.';

-- The vote recorder's own update (marking a changed vote superseded, pfl.recording_vote on) is
-- the incremental path's: it changes superseded_at and the outbox state alone, so this trigger
-- and move_edited_feedback (700_owner_views.sql) skip it before their function is called. The
-- flag is the recorder's alone: an operator who sets it by hand makes an edit skip both.
drop trigger persona_training_events_bump_generation_on_edit on public.persona_training_events;
create trigger persona_training_events_bump_generation_on_edit
  after update on public.persona_training_events
  referencing old table as before_rows new table as after_rows
  for each statement
  when (coalesce(current_setting('pfl.recording_vote', true), '') <> 'on')
  execute function private.bump_evidence_generation_on_edit();

create or replace function private.move_edited_feedback()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_relinked uuid[];
begin
  -- The transition tables are compared by set differences, which are hashed: a join of the two
  -- under EXISTS was planned as a nested loop, quadratic in the rows updated (1.1 s for 3,000
  -- rows, 20 minutes for 100,000; the outbox's requeue updates 10,000 rows per call).
  --
  -- Most updates (outbox states) change none of the columns the summary depends on: they stop
  -- here.
  if not exists (
    select o.id, o.twin_id, o.source, o.created_at, o.intent_label, o.module_key, o.reason,
           o.score, o.supersedes_id, o.superseded_at
    from before_rows o
    except
    select n.id, n.twin_id, n.source, n.created_at, n.intent_label, n.module_key, n.reason,
           n.score, n.supersedes_id, n.superseded_at
    from after_rows n
  ) then
    return null;
  end if;

  -- A hand edit of a vote's links (supersedes_id, superseded_at: the service role repairing
  -- data; the vote recorder's own write does not fire this trigger) can change which votes count
  -- in ways a delta per edited row cannot follow (the edited vote, the vote it names, the vote
  -- naming it). The summary of each twin such an edit touches (or an edit of a row's twin) is
  -- counted again from the twin's learned votes, by the rule of the deltas below. Rare, and it
  -- costs a read of the twin's learned votes.
  select array_agg(distinct c.twin_id) into v_relinked
  from (
    (select o.id, o.twin_id, o.supersedes_id, o.superseded_at from before_rows o
     except
     select n.id, n.twin_id, n.supersedes_id, n.superseded_at from after_rows n)
    union all
    (select n.id, n.twin_id, n.supersedes_id, n.superseded_at from after_rows n
     except
     select o.id, o.twin_id, o.supersedes_id, o.superseded_at from before_rows o)
  ) c;
  if v_relinked is not null then
    perform private.count_feedback_daily_again(v_relinked);
  end if;

  with changed as (
    -- The rows whose bucket columns changed (twins counted again above are right already).
    select x.id from (
      select o.id, o.twin_id, o.source, o.created_at, o.intent_label, o.module_key, o.reason,
             o.score
      from before_rows o
      except
      select n.id, n.twin_id, n.source, n.created_at, n.intent_label, n.module_key, n.reason,
             n.score
      from after_rows n
    ) x
    where not (x.twin_id = any (coalesce(v_relinked, '{}')))
  ),
  moved as (
    -- Each such row as it was (-1) and as it is (+1).
    select -1 as sign, o.* from before_rows o where o.id in (select c.id from changed c)
      and not (o.twin_id = any (coalesce(v_relinked, '{}')))
    union all
    select 1, n.* from after_rows n where n.id in (select c.id from changed c)
      and not (n.twin_id = any (coalesce(v_relinked, '{}')))
  ),
  counted as (
    -- A vote the summary counts: learned, and current at its twin's cursor (never replaced, or
    -- replaced by a vote after the cursor), as in subtract_deleted_feedback.
    select m.*
    from moved m join public.twins t on t.id = m.twin_id
    where m.source = 'user_feedback' and m.id <= t.learned_through_event_id
      and (m.superseded_at is null
           or exists (select 1 from public.persona_training_events x
                      where x.twin_id = m.twin_id and x.supersedes_id = m.id
                        and x.id > t.learned_through_event_id))
  ),
  delta as (
    select c.twin_id, (c.created_at at time zone 'UTC')::date as day, c.intent_label,
           c.module_key, c.reason, c.score, sum(c.sign)::integer as votes
    from counted c
    group by 1, 2, 3, 4, 5, 6
    having sum(c.sign) <> 0
  ),
  taken as (
    update public.persona_feedback_daily d
    set votes = d.votes + x.votes
    from delta x
    where x.votes < 0 and d.twin_id = x.twin_id and d.day = x.day
      and d.intent_label = x.intent_label
      and coalesce(d.module_key, '') = coalesce(x.module_key, '')
      and coalesce(d.reason::text, '') = coalesce(x.reason::text, '') and d.score = x.score
    returning 1
  )
  insert into public.persona_feedback_daily as d
    (twin_id, day, intent_label, module_key, reason, score, votes)
  select x.twin_id, x.day, x.intent_label, x.module_key, x.reason, x.score, x.votes
  from delta x
  where x.votes > 0
  on conflict (twin_id, day, intent_label, module_key, reason, score)
  do update set votes = d.votes + excluded.votes;
  delete from public.persona_feedback_daily d
  where d.votes = 0
    and d.twin_id in (select o.twin_id from before_rows o union select n.twin_id from after_rows n);
  return null;
end;
$$;

comment on function private.move_edited_feedback() is
  'Trigger (after update on persona_training_events, per statement, the rows as before_rows and '
  'after_rows; not for the vote recorder''s own update, pfl.recording_vote on): for each row '
  'whose twin_id, source, created_at, intent_label, module_key, reason or score changed, takes it '
  'out of persona_feedback_daily as it was when the summary counted it (a learned vote current at '
  'its twin''s cursor) and puts it in as it is now when counted, then drops buckets left at 0. A '
  'hand edit of a row''s supersedes_id, superseded_at or twin_id counts the summary of each twin '
  'it touches again from the twin''s learned votes instead. The transition tables are compared by '
  'hashed set differences: linear in the rows updated; an update changing none of those columns '
  'costs that comparison alone. Security definer: the summary is written by no API role. Raises '
  'nothing of its own (a count below 0 would be 23514 votes_not_negative).';

-- Not for the vote recorder's own update: see persona_training_events_bump_generation_on_edit.
drop trigger persona_training_events_move_edited_feedback on public.persona_training_events;
create trigger persona_training_events_move_edited_feedback
  after update on public.persona_training_events
  referencing old table as before_rows new table as after_rows
  for each statement
  when (coalesce(current_setting('pfl.recording_vote', true), '') <> 'on')
  execute function private.move_edited_feedback();

-- PostgreSQL lets PUBLIC execute every new function.
revoke execute on function private.lock_feedback_first_vote(uuid, text, uuid, timestamptz)
  from public;
