-- The update triggers of persona_training_events: linear in the rows updated, and the daily
-- feedback summary follows hand edits of a vote's links (issue 11).
--
-- Two statement costs grew with the square of the rows one UPDATE touched. Measured on the
-- local stack, one twin of 1,000,000 events:
-- - private.move_edited_feedback asked "did any updated row change a bucket column?" with EXISTS
--   over a join of the statement's two transition tables. Tuplestores have no index, and under
--   EXISTS the planner chose a nested loop for its cheap first row: 1.1 s for an UPDATE of 3,000
--   rows (an outbox state), one of 100,000 cancelled after 10 minutes. The outbox's
--   record_langfuse_deliveries updates up to 1,000 rows per call, requeue_langfuse_outbox 10,000
--   (about 12 s: over the 8 s API timeout). Now hashed set differences (EXCEPT, IN): 100,000
--   rows in 1.8 s with or without the trigger.
-- - private.bump_evidence_generation_on_edit ran per row: an edit of 3,000 events' intent bumped
--   the twin's row 3,000 times, each bump one more version of that row for every later lookup
--   to step over (1.7 s; 100,000 rows more than 4 minutes). Now once per statement, each twin
--   once.
--
-- persona_feedback_daily counts the learned votes current at the twin's cursor. The update
-- trigger moved a vote between buckets when a bucket column was edited, but an edit of
-- supersedes_id or superseded_at by hand (the service role repairing data) changes which votes
-- are current without touching a bucket column: the summary kept counting as before, while
-- learning (its generation moved) rebuilt the modules. Such an edit now counts the summary of
-- each twin it touches again from the twin's learned votes. The vote recorder's own write
-- (pfl.recording_vote on) is unaffected.

create or replace function private.bump_evidence_generation_on_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  -- A vote change (the vote recorder marking the earlier vote superseded) is the incremental
  -- path's; pfl.recording_vote tells it apart from an edit by hand.
  v_recording boolean := coalesce(current_setting('pfl.recording_vote', true), '') = 'on';
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
              o.reason, o.created_at, o.audit_of_draft, o.supersedes_id,
              case when v_recording then null else o.superseded_at end
       from before_rows o
       except
       select n.id, n.twin_id, n.source, n.intent_label, n.module_key, n.score, n.passed,
              n.reason, n.created_at, n.audit_of_draft, n.supersedes_id,
              case when v_recording then null else n.superseded_at end
       from after_rows n)
      union all
      (select n.id, n.twin_id, n.source, n.intent_label, n.module_key, n.score, n.passed,
              n.reason, n.created_at, n.audit_of_draft, n.supersedes_id,
              case when v_recording then null else n.superseded_at end
       from after_rows n
       except
       select o.id, o.twin_id, o.source, o.intent_label, o.module_key, o.score, o.passed,
              o.reason, o.created_at, o.audit_of_draft, o.supersedes_id,
              case when v_recording then null else o.superseded_at end
       from before_rows o)
    ) c (id, twin_id)
  );
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_edit() is
  'Trigger (after update on persona_training_events, once per statement, the rows as '
  'before_rows and after_rows): bumps evidence_generation, once, of every twin of a row before '
  'or after an update that changed its twin_id, source, intent_label, module_key, score, passed, '
  'reason, created_at, audit_of_draft, supersedes_id or superseded_at (the last not when the vote '
  'recorder marks a vote superseded, pfl.recording_vote on). Linear in the rows updated (hashed '
  'set differences). Security definer: whoever edits, the twin is marked. Raises nothing.';

drop trigger persona_training_events_bump_generation_on_edit on public.persona_training_events;
create trigger persona_training_events_bump_generation_on_edit
  after update on public.persona_training_events
  referencing old table as before_rows new table as after_rows
  for each statement execute function private.bump_evidence_generation_on_edit();

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
  -- data; the vote recorder's own write sets pfl.recording_vote) can change which votes count in
  -- ways a delta per edited row cannot follow (the edited vote, the vote it names, the vote
  -- naming it). The summary of each twin such an edit touches (or an edit of a row's twin) is
  -- counted again from the twin's learned votes, by the rule of the deltas below. Rare, and it
  -- costs a read of the twin's learned votes.
  if coalesce(current_setting('pfl.recording_vote', true), '') <> 'on' then
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
  end if;
  if v_relinked is not null then
    perform private.count_feedback_daily_again(v_relinked);
  end if;

  with changed as (
    -- The rows whose bucket columns changed (twins counted again above are right already). A
    -- vote change (superseded_at set by the vote recorder) changes none of them.
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
  'after_rows): for each row whose twin_id, source, created_at, intent_label, module_key, reason '
  'or score changed, takes it out of persona_feedback_daily as it was when the summary counted it '
  '(a learned vote current at its twin''s cursor) and puts it in as it is now when counted, then '
  'drops buckets left at 0. A hand edit of a row''s supersedes_id, superseded_at or twin_id (not '
  'the vote recorder''s, which sets pfl.recording_vote) counts the summary of each twin it '
  'touches again from the twin''s learned votes instead. The transition tables are compared by '
  'hashed set differences: linear in the rows updated; an update changing none of those columns '
  'costs that comparison alone. Security definer: the summary is written by no API role. Raises '
  'nothing of its own (a count below 0 would be 23514 votes_not_negative).';
