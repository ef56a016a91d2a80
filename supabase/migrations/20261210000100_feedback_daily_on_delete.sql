-- Section: a deletion takes exactly its votes out of the owner views' daily summary.
--
-- The trigger on deleted events rebuilt each affected twin's persona_feedback_daily from its whole
-- learned history: a moderator's delete of one vote of a twin with 1,800,000 learned events ran
-- 14 s and was cancelled by the API's 8 s statement timeout. It also missed a deletion that
-- changes the counts without removing a learned vote: a learned vote whose replacement (not yet
-- learned) is deleted stays retracted, as learning leaves it out, but the summary kept counting
-- it. The new trigger subtracts exactly what the deletion removes, one or two index lookups per
-- deleted vote.

drop trigger persona_training_events_rebuild_feedback_daily on public.persona_training_events;
drop function private.rebuild_feedback_daily();

-- Deleting feedback (a user's deletion, moderation) takes out of the twins' daily summary exactly
-- the votes it counted that the deletion removes, so that the summary never counts a vote that is
-- gone; the cost follows the deleted rows, not the twin's history.
create function private.subtract_deleted_feedback()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  with gone_votes as (
    select g.*, t.learned_through_event_id as cursor
    from gone g join public.twins t on t.id = g.twin_id
    where g.source = 'user_feedback'
  ),
  uncounted as (
    -- A deleted vote the summary counted: learned, and current at the cursor (never replaced,
    -- or replaced by a vote after the cursor, which may be gone too).
    select v.twin_id, v.created_at, v.intent_label, v.module_key, v.reason, v.score
    from gone_votes v
    where v.id <= v.cursor
      and (v.superseded_at is null
           or exists (select 1 from public.persona_training_events n
                      where n.twin_id = v.twin_id and n.supersedes_id = v.id and n.id > v.cursor)
           or exists (select 1 from gone n
                      where n.supersedes_id = v.id and n.id > v.cursor))
    union all
    -- A learned vote that remains, whose replacement after the cursor was deleted: it stays
    -- retracted, as learning leaves it out.
    select e.twin_id, e.created_at, e.intent_label, e.module_key, e.reason, e.score
    from gone_votes n
    join public.persona_training_events e on e.id = n.supersedes_id
    where n.id > n.cursor and e.id <= n.cursor
  ),
  delta as (
    select u.twin_id, (u.created_at at time zone 'UTC')::date as day, u.intent_label,
           u.module_key, u.reason, u.score, count(*) as votes
    from uncounted u
    group by 1, 2, 3, 4, 5, 6
  )
  update public.persona_feedback_daily d
  set votes = d.votes - x.votes
  from delta x
  where d.twin_id = x.twin_id and d.day = x.day and d.intent_label = x.intent_label
    and coalesce(d.module_key, '') = coalesce(x.module_key, '')
    and coalesce(d.reason::text, '') = coalesce(x.reason::text, '') and d.score = x.score;
  delete from public.persona_feedback_daily d
  where d.votes = 0 and d.twin_id in (select g.twin_id from gone g);
  return null;
end;
$$;

comment on function private.subtract_deleted_feedback() is
  'Trigger (after delete on persona_training_events, per statement, the deleted rows as gone): '
  'takes out of persona_feedback_daily each deleted feedback vote it counted (learned, and '
  'current at the twin''s cursor) and each learned vote whose replacement after the cursor was '
  'deleted (it stays retracted, as learning leaves it out), and drops buckets left at 0. Costs '
  'one or two index lookups per deleted vote. Security definer: deleting roles may not write '
  'the summary. Raises nothing of its own (a count below 0 would be 23514 votes_not_negative).';

create trigger persona_training_events_subtract_deleted_feedback
  after delete on public.persona_training_events
  referencing old table as gone
  for each statement execute function private.subtract_deleted_feedback();

revoke execute on function private.subtract_deleted_feedback() from public;

-- The summaries, counted once more from the learned votes: a twin that lost a vote replacement
-- before this migration had the vote it replaced counted still. One pass over every twin's learned
-- feedback, once.
delete from public.persona_feedback_daily d where d.twin_id is not null;
insert into public.persona_feedback_daily (twin_id, day, intent_label, module_key, reason, score, votes)
select t.id, x.day, x.intent_label, x.module_key, x.reason, x.score, x.votes
from public.twins t
cross join lateral private.feedback_daily_delta(t.id, 0, t.learned_through_event_id) x
where x.votes > 0;
