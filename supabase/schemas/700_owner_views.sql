-- Section: what twin owners look at — trends, feedback reasons, a twin's overview, events with
-- their processed state — as views for the dashboard and apps, and the two summary tables that
-- keep them fast.
--
-- Every view is security_invoker: it reads the tables with the caller's privileges and policies,
-- so an owner sees only their own twins' rows. Grants are explicit (hosted projects no longer
-- grant new entities to the API roles): select to authenticated and service_role, nothing to anon.
--
-- The summary tables are filled when a learning run completes (a trigger on the run's row, in the
-- completion's transaction) from the run's batch, so that no view scans a twin's events:
--   persona_feedback_daily  current feedback votes per UTC day, module key, intent, reason, score;
--   persona_run_evidence    what each completed run learned from, per module, source, reason and
--                           outcome: the "what moved it" of a module change.

create type public.evidence_outcome as enum ('success', 'failure', 'neutral');
comment on type public.evidence_outcome is
  'How a piece of evidence counts for its module: success (a +1 vote, a passed audit), failure '
  '(a -1 vote, a failed audit) or neutral (a 0 vote: processed, no weight).';

-- Wilson score interval, for views.
create function private.wilson_bounds(
  p_successes double precision, p_trials double precision, p_z double precision default 1.96,
  out lower double precision, out upper double precision
)
language sql
immutable
set search_path = ''
as $$
  select
    case when p_trials > 0 then greatest(0, (p + z2 / (2 * n) - p_z * sqrt(p * (1 - p) / n
      + z2 / (4 * n * n))) / (1 + z2 / n)) end,
    case when p_trials > 0 then least(1, (p + z2 / (2 * n) + p_z * sqrt(p * (1 - p) / n
      + z2 / (4 * n * n))) / (1 + z2 / n)) end
  from (select p_trials as n, p_successes / nullif(p_trials, 0) as p, p_z * p_z as z2) v;
$$;

comment on function private.wilson_bounds(double precision, double precision, double precision) is
  'Views'' helper. In: successes s and trials n (real-valued counts, s <= n), z (default 1.96, a '
  '95% interval). Out: (lower, upper), the Wilson score interval of p = s/n clamped to [0, 1]: '
  '(p + z^2/(2n) -/+ z sqrt(p(1-p)/n + z^2/(4n^2))) / (1 + z^2/n) (Wilson 1927, JASA 22:209-212; '
  'the same formula as worker/learning.py wilson_bounds). Both null when n <= 0 or null. Raises '
  'nothing.';

grant execute on function private.wilson_bounds(double precision, double precision, double precision)
  to authenticated, service_role;


-- ------------------------------------------------------------------ the summary tables

create table public.persona_feedback_daily (
  twin_id uuid not null references public.twins (id) on delete cascade,
  day date not null,
  intent_label text not null,
  module_key text,
  reason public.training_event_reason,
  score smallint not null constraint score_minus_1_to_1 check (score between -1 and 1),
  votes integer not null constraint votes_not_negative check (votes >= 0),
  constraint persona_feedback_daily_key
    unique nulls not distinct (twin_id, day, intent_label, module_key, reason, score)
);

comment on table public.persona_feedback_daily is
  'Learned feedback, summed: the current votes of a twin processed by its completed runs, per UTC '
  'day the vote was cast, intent label, module key, reason and score. Filled when a run completes '
  '(a changed vote moves from its old bucket to its new one); rebuilt for a twin when processed '
  'feedback is deleted. Read by persona_module_feedback_reasons and persona_module_feedback.';
comment on column public.persona_feedback_daily.twin_id is 'The twin the votes are about.';
comment on column public.persona_feedback_daily.day is 'The UTC day the votes were cast.';
comment on column public.persona_feedback_daily.intent_label is 'The votes'' intent label.';
comment on column public.persona_feedback_daily.module_key is
  'The module key the votes named; null when they named none (they then count for the modules '
  'serving their intent label).';
comment on column public.persona_feedback_daily.reason is 'The votes'' reason; null when none was given.';
comment on column public.persona_feedback_daily.score is 'The vote: -1, 0 (neutral) or +1.';
comment on column public.persona_feedback_daily.votes is 'How many current votes fall in this bucket.';

alter table public.persona_feedback_daily enable row level security;
create policy "Owners can read their twins' feedback summary" on public.persona_feedback_daily
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));
-- Written by the completion trigger alone (security definer): every API role only reads.
revoke all on public.persona_feedback_daily from anon, authenticated, service_role;
grant select on public.persona_feedback_daily to authenticated, service_role;


create table public.persona_run_evidence (
  run_id uuid not null references public.persona_feedback_learning_runs (id) on delete cascade,
  twin_id uuid not null references public.twins (id) on delete cascade,
  module_id uuid references public.persona_modules (id) on delete cascade,
  source public.training_event_source not null,
  reason public.training_event_reason,
  outcome public.evidence_outcome not null,
  events integer not null constraint events_not_negative check (events >= 0),
  vote_changes integer not null constraint vote_changes_not_negative check (vote_changes >= 0),
  constraint vote_changes_at_most_events check (vote_changes <= events),
  constraint persona_run_evidence_key
    unique nulls not distinct (run_id, module_id, source, reason, outcome)
);

comment on table public.persona_run_evidence is
  'What each completed learning run learned from: its batch''s events per module (matched as the '
  'run matched them: by module_key if given, else by intent label), source, reason and outcome. '
  'Audits of a spec not yet published when the run completed are gate evidence and are not '
  'listed. Written when the run completes; the "what moved it" of persona_module_changes.';
comment on column public.persona_run_evidence.run_id is 'The completed run.';
comment on column public.persona_run_evidence.twin_id is 'The run''s twin.';
comment on column public.persona_run_evidence.module_id is
  'The module the events counted for; null for events that matched no module.';
comment on column public.persona_run_evidence.source is 'user_feedback or persona_audit.';
comment on column public.persona_run_evidence.reason is 'The events'' reason; null when none was given.';
comment on column public.persona_run_evidence.outcome is
  'success (+1 vote, passed audit), failure (-1 vote, failed audit) or neutral (0 vote).';
comment on column public.persona_run_evidence.events is 'How many events of the batch.';
comment on column public.persona_run_evidence.vote_changes is
  'Of those, votes that replaced an earlier vote of the same user on the same trace (the run '
  'retracted the earlier one).';

create index persona_run_evidence_twin_idx on public.persona_run_evidence (twin_id);
create index persona_run_evidence_module_idx on public.persona_run_evidence (module_id, run_id);

alter table public.persona_run_evidence enable row level security;
create policy "Owners can read their twins' run evidence" on public.persona_run_evidence
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));
-- Written by the completion trigger alone (security definer): every API role only reads.
revoke all on public.persona_run_evidence from anon, authenticated, service_role;
grant select on public.persona_run_evidence to authenticated, service_role;


-- The owner views' summaries of a run's batch, counted by the claim's one pass and written by
-- the completion (private.summarize_completed_run), so the batch is read once.
create type private.run_evidence_count as (
  by_key boolean, key text, source public.training_event_source,
  reason public.training_event_reason, outcome public.evidence_outcome, events bigint,
  changes bigint
);

comment on type private.run_evidence_count is
  'A batch''s events per match key as they arrived (by_key: the events named a module_key, key: '
  'that module_key, else the intent_label), source, reason and outcome: events, and changes '
  '(those that replaced an earlier vote). Audits of a draft are left out.';

create type private.feedback_day_count as (
  day integer, intent_label text, module_key text, reason public.training_event_reason,
  score smallint, votes bigint
);

comment on type private.feedback_day_count is
  'A batch''s net feedback votes per bucket of persona_feedback_daily; day in days since '
  '1970-01-01 (UTC), votes = +1 per vote current at the batch''s end, -1 per earlier vote one of '
  'them replaced.';

create table private.learning_run_summaries (
  run_id uuid primary key
    references public.persona_feedback_learning_runs (id) on delete cascade,
  run_evidence private.run_evidence_count[] not null,
  feedback_daily private.feedback_day_count[] not null
);

comment on table private.learning_run_summaries is
  'A run''s batch as the owner views count it, from claim_learning_run_events until the '
  'completion takes it. One row per twin at most: a claim drops what an unfinished earlier run '
  'left. Scratch of the worker''s; read by no API role.';

grant select, insert, update, delete on private.learning_run_summaries to service_role;


-- Writes a completed run's batch into the two summary tables, in the completion's transaction.
-- A twin's daily feedback summary counted again from its evidence: what a hand edit of a vote's
-- links, or of the summary itself, leaves no delta to follow.
create function private.count_feedback_daily_again(p_twin_ids uuid[])
returns void
language sql
security definer
set search_path = ''
as $$
  delete from public.persona_feedback_daily d where d.twin_id = any (p_twin_ids);
  insert into public.persona_feedback_daily
    (twin_id, day, intent_label, module_key, reason, score, votes)
  select e.twin_id, (e.created_at at time zone 'UTC')::date, e.intent_label, e.module_key,
         e.reason, e.score, count(*)
  from public.twins t
  join public.persona_training_events e on e.twin_id = t.id
  where t.id = any (p_twin_ids) and e.source = 'user_feedback'
    and e.id <= t.learned_through_event_id
    and (e.superseded_at is null
         or exists (select 1 from public.persona_training_events x
                    where x.twin_id = e.twin_id and x.supersedes_id = e.id
                      and x.id > t.learned_through_event_id))
  group by 1, 2, 3, 4, 5, 6;
$$;

comment on function private.count_feedback_daily_again(uuid[]) is
  'In: twin ids. Replaces each twin''s rows of persona_feedback_daily by a count of its learned '
  'feedback votes (id <= learned_through_event_id) current at the cursor (never replaced, or '
  'replaced by a vote after the cursor), per UTC day, intent label, module key, reason and score. '
  'Costs a read of the twins'' learned votes. Out: nothing. Raises nothing of its own.';

create function private.summarize_completed_run()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_summary private.learning_run_summaries;
  v_retracted bigint;
begin
  -- Counted by the claim in its one pass over the batch (claim_learning_run_events). Anything
  -- that changes those counts since (a deletion, a module edit) moved the twin's
  -- evidence_generation, and the completion refused before this trigger. Taken first, so that
  -- an empty batch leaves no scratch row either.
  delete from private.learning_run_summaries s where s.run_id = new.id
  returning * into v_summary;
  if new.batch_last_event_id is null or new.batch_last_event_id <= new.batch_after_event_id then
    return null;
  end if;
  if v_summary.run_id is null then
    -- A run that read its batch before the summaries were kept (a worker of an older schema).
    raise exception using errcode = 'PT412',
      message = format('run %s has no batch summary: read the batch again', new.id);
  end if;

  insert into public.persona_run_evidence
    (run_id, twin_id, module_id, source, reason, outcome, events, vote_changes)
  -- Counted per key an event matches by (its module_key, else its intent_label), matched to the
  -- modules here: one row per key, not per event.
  with per_key as (
    select * from unnest(v_summary.run_evidence)
  ),
  targets as (
    select true as by_key, m.module_key as key, m.id as module_id
    from public.persona_modules m where m.twin_id = new.twin_id
    union all
    select false, m.intent_label, m.id
    from public.persona_modules m where m.twin_id = new.twin_id
  )
  select new.id, new.twin_id, t.module_id, k.source, k.reason, k.outcome,
         sum(k.events), sum(k.changes)
  from per_key k
  left join targets t on t.by_key = k.by_key and t.key = k.key
  group by 3, 4, 5, 6;

  -- A retraction (a negative delta) meets a bucket an earlier run filled: updated in place, and
  -- a bucket left at 0 goes.
  update public.persona_feedback_daily d
  set votes = d.votes + x.votes
  from unnest(v_summary.feedback_daily) x
  -- Equalities on coalesced keys, not IS NOT DISTINCT FROM: those can be hashed, so the cost
  -- follows the batch, not the twin's history of buckets.
  where x.votes < 0 and d.twin_id = new.twin_id and d.day = date '1970-01-01' + x.day
    and d.intent_label = x.intent_label
    and coalesce(d.module_key, '') = coalesce(x.module_key, '')
    and coalesce(d.reason::text, '') = coalesce(x.reason::text, '') and d.score = x.score
    and d.votes + x.votes >= 0;
  get diagnostics v_retracted = row_count;
  if v_retracted < (select count(*) from unnest(v_summary.feedback_daily) x where x.votes < 0)
  then
    -- The summary holds less than this run retracts (a bucket missing or short: an edit of the
    -- summary by hand): it is counted again from the twin's learned votes, this batch included
    -- (the cursor has moved), rather than fail every run of the twin on votes_not_negative.
    perform private.count_feedback_daily_again(array[new.twin_id]);
    return null;
  end if;
  if v_retracted > 0 then
    delete from public.persona_feedback_daily d where d.twin_id = new.twin_id and d.votes = 0;
  end if;
  -- Everything else adds: one upsert on the bucket's key (NULLS NOT DISTINCT). Only positive
  -- deltas go through it: an insert checks votes_not_negative before ON CONFLICT is considered.
  -- It costs half the update-then-insert it replaces (which sorted the twin's every bucket).
  insert into public.persona_feedback_daily as d
    (twin_id, day, intent_label, module_key, reason, score, votes)
  select new.twin_id, date '1970-01-01' + x.day, x.intent_label, x.module_key, x.reason, x.score,
         x.votes
  from unnest(v_summary.feedback_daily) x
  where x.votes > 0
  on conflict on constraint persona_feedback_daily_key
  do update set votes = d.votes + excluded.votes;
  return null;
end;
$$;

comment on function private.summarize_completed_run() is
  'Trigger (after update of status on persona_feedback_learning_runs, when a run becomes '
  'completed): adds the run''s batch to persona_run_evidence (events per module, source, reason '
  'and outcome; audits of a draft left out) and its net feedback votes to persona_feedback_daily '
  '(+1 per vote current at the batch''s end, -1 per earlier vote one of them replaced), both as '
  'claim_learning_run_events counted them into private.learning_run_summaries, whose row it '
  'takes (also for an empty batch, which adds nothing). Security definer: the summaries are '
  'written by no API role. Raises PT412 (HTTP 412) '
  '"run <id> has no batch summary: read the batch again" when the run''s batch was read without '
  'one; a vote count below 0 would be 23514 votes_not_negative. Either rolls the completion '
  'back. A retraction whose bucket is missing or holds fewer votes (the summary edited by hand) '
  'counts the twin''s summary again from its learned votes (private.count_feedback_daily_again).';

create trigger persona_feedback_learning_runs_summarize
  after update of status on public.persona_feedback_learning_runs
  for each row
  when (new.status = 'completed' and old.status is distinct from 'completed')
  execute function private.summarize_completed_run();


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
    -- or replaced by a vote after the cursor, which may be gone too). The same rule as
    -- move_edited_feedback's, spelt out in each: a shared SQL helper would not be inlined (every
    -- function pins its search_path) and would cost a call per deleted vote.
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
    join public.persona_training_events e on e.id = n.supersedes_id and e.twin_id = n.twin_id
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

-- Editing a learned vote's evidence columns (the service role relabelling a reason, moving it to
-- another intent or day) moves it in the daily summary, so that a later retraction of that vote
-- (its voter changes it) subtracts from the bucket that counts it.
create function private.move_edited_feedback()
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
create trigger persona_training_events_move_edited_feedback
  after update on public.persona_training_events
  referencing old table as before_rows new table as after_rows
  for each statement
  when (coalesce(current_setting('pfl.recording_vote', true), '') <> 'on')
  execute function private.move_edited_feedback();

revoke execute on function
  private.wilson_bounds(double precision, double precision, double precision),
  private.count_feedback_daily_again(uuid[]),
  private.summarize_completed_run(),
  private.subtract_deleted_feedback(),
  private.move_edited_feedback()
from public;


-- ------------------------------------------------------------------ the views

create view public.persona_module_trend
with (security_invoker = true)
as
select c.twin_id, c.module_id, m.module_key, m.intent_label, c.run_id,
       coalesce(r.learning_time, c.changed_at) as measured_at,
       c.confidence_before, c.confidence_after as confidence,
       c.status_before, c.status_after as status,
       c.success_weight, c.failure_weight, w.n as evidence_weight,
       -- The Wilson score interval (Wilson 1927) of p = s / n, written out as
       -- private.wilson_bounds computes it: a function call per row costs ~40 us here.
       case when w.n > 0 then greatest(0, (w.p + w.z2 / (2 * w.n) - w.z * sqrt(w.p * (1 - w.p)
         / w.n + w.z2 / (4 * w.n * w.n))) / (1 + w.z2 / w.n)) end as wilson_lower,
       case when w.n > 0 then least(1, (w.p + w.z2 / (2 * w.n) + w.z * sqrt(w.p * (1 - w.p)
         / w.n + w.z2 / (4 * w.n * w.n))) / (1 + w.z2 / w.n)) end as wilson_upper
from public.persona_module_changes c
join public.persona_modules m on m.id = c.module_id
join public.persona_feedback_learning_runs r on r.id = c.run_id
join public.persona_learning_settings s on s.twin_id = c.twin_id
cross join lateral (
  select c.success_weight + c.failure_weight as n,
         c.success_weight / nullif(c.success_weight + c.failure_weight, 0) as p,
         s.wilson_z as z, s.wilson_z * s.wilson_z as z2
) w;

comment on view public.persona_module_trend is
  'How each module moved: one row per recorded change (a run that changed its confidence or '
  'status), with its weighted evidence counts and Wilson bounds after it; what the run learned '
  'from is in persona_run_evidence. Chart confidence (or wilson_lower/upper) against '
  'measured_at per module_key.';
comment on column public.persona_module_trend.twin_id is 'The module''s twin.';
comment on column public.persona_module_trend.module_id is 'The module.';
comment on column public.persona_module_trend.module_key is 'The module''s key.';
comment on column public.persona_module_trend.intent_label is 'The intent the module serves.';
comment on column public.persona_module_trend.run_id is 'The completed run that made the change.';
comment on column public.persona_module_trend.measured_at is
  'The time the counts refer to: the run''s learning time T (timestamptz).';
comment on column public.persona_module_trend.confidence_before is
  'Confidence before the run, in [0, 1].';
comment on column public.persona_module_trend.confidence is
  'Confidence after the run, in [0, 1]: (s + 1) / (s + f + 2).';
comment on column public.persona_module_trend.status_before is 'Status before the run.';
comment on column public.persona_module_trend.status is
  'Status after the run: insufficient_data, probation, active or disabled.';
comment on column public.persona_module_trend.success_weight is
  's: weighted successes decayed to measured_at (feedback 1, audits 2; half-life from the '
  'twin''s settings).';
comment on column public.persona_module_trend.failure_weight is
  'f: weighted failures decayed to measured_at (unsafe failures 3x).';
comment on column public.persona_module_trend.evidence_weight is 'n = s + f, the evidence weight.';
comment on column public.persona_module_trend.wilson_lower is
  'Lower Wilson bound of s / n with the twin''s wilson_z (null when n = 0); the status '
  'thresholds (activate, keep active) apply to it.';
comment on column public.persona_module_trend.wilson_upper is
  'Upper Wilson bound of s / n (null when n = 0); below the disable threshold a module is disabled.';


create view public.persona_module_feedback_reasons
with (security_invoker = true)
as
with windowed as (
  select d.twin_id, d.intent_label, d.module_key, d.reason,
         sum(d.votes) filter (where d.score > 0 and d.day >= v.today - 6) as up_7d,
         sum(d.votes) filter (where d.score < 0 and d.day >= v.today - 6) as down_7d,
         sum(d.votes) filter (where d.score = 0 and d.day >= v.today - 6) as neutral_7d,
         sum(d.votes) filter (where d.score > 0) as up_30d,
         sum(d.votes) filter (where d.score < 0) as down_30d,
         sum(d.votes) filter (where d.score = 0) as neutral_30d
  from public.persona_feedback_daily d
  cross join (select (now() at time zone 'UTC')::date as today) v
  where d.day >= v.today - 29
  group by d.twin_id, d.intent_label, d.module_key, d.reason
),
matched as (
  select m.twin_id, m.id as module_id, m.module_key, w.reason,
         sum(w.up_7d) as up_7d, sum(w.down_7d) as down_7d, sum(w.neutral_7d) as neutral_7d,
         sum(w.up_30d) as up_30d, sum(w.down_30d) as down_30d, sum(w.neutral_30d) as neutral_30d
  from public.persona_modules m
  join windowed w
    on w.twin_id = m.twin_id
   and ((w.module_key is not null and w.module_key = m.module_key)
        or (w.module_key is null and w.intent_label = m.intent_label))
  group by m.twin_id, m.id, m.module_key, w.reason
)
select x.twin_id, x.module_id, x.module_key, x.reason,
       coalesce(x.up_7d + x.down_7d + x.neutral_7d, 0)::integer as votes_7d,
       coalesce(x.up_7d, 0)::integer as up_7d,
       coalesce(x.down_7d, 0)::integer as down_7d,
       coalesce(x.up_30d + x.down_30d + x.neutral_30d, 0)::integer as votes_30d,
       coalesce(x.up_30d, 0)::integer as up_30d,
       coalesce(x.down_30d, 0)::integer as down_30d
from (
  select m.twin_id, m.module_id, m.module_key, m.reason,
         coalesce(m.up_7d, 0) as up_7d, coalesce(m.down_7d, 0) as down_7d,
         coalesce(m.neutral_7d, 0) as neutral_7d, coalesce(m.up_30d, 0) as up_30d,
         coalesce(m.down_30d, 0) as down_30d, coalesce(m.neutral_30d, 0) as neutral_30d
  from matched m
) x;

comment on view public.persona_module_feedback_reasons is
  'Why users voted as they did, per module and reason, over the last 7 and 30 UTC days (today '
  'and the 6 or 29 days before), from the votes learned by completed runs (persona_feedback_daily;'
  ' votes after the last run appear after the next). A vote counts for the module it names, '
  'else for every module serving its intent label. Only reasons with votes in 30 days appear.';
comment on column public.persona_module_feedback_reasons.twin_id is 'The module''s twin.';
comment on column public.persona_module_feedback_reasons.module_id is 'The module.';
comment on column public.persona_module_feedback_reasons.module_key is 'The module''s key.';
comment on column public.persona_module_feedback_reasons.reason is
  'The reason the voters gave (incorrect, unhelpful, off_persona, unsafe, outdated, helpful, '
  'other); null: no reason given.';
comment on column public.persona_module_feedback_reasons.votes_7d is
  'Current votes with this reason cast in the last 7 days (+1, -1 and 0).';
comment on column public.persona_module_feedback_reasons.up_7d is 'Of those, +1 votes.';
comment on column public.persona_module_feedback_reasons.down_7d is 'Of those, -1 votes.';
comment on column public.persona_module_feedback_reasons.votes_30d is
  'Current votes with this reason cast in the last 30 days (+1, -1 and 0).';
comment on column public.persona_module_feedback_reasons.up_30d is 'Of those, +1 votes.';
comment on column public.persona_module_feedback_reasons.down_30d is 'Of those, -1 votes.';


create view public.persona_module_feedback
with (security_invoker = true)
as
select m.twin_id, m.id as module_id, m.module_key, m.intent_label, m.status,
       a.votes_7d, a.up_7d, a.down_7d,
       a.up_7d::double precision / nullif(a.up_7d + a.down_7d, 0) as approval_rate_7d,
       w7.lower as approval_lower_7d, w7.upper as approval_upper_7d,
       a.votes_30d, a.up_30d, a.down_30d,
       a.up_30d::double precision / nullif(a.up_30d + a.down_30d, 0) as approval_rate_30d,
       w30.lower as approval_lower_30d, w30.upper as approval_upper_30d,
       a.top_negative_reason_30d
from public.persona_modules m
cross join lateral (
  select coalesce(sum(r.votes_7d), 0)::integer as votes_7d,
         coalesce(sum(r.up_7d), 0)::integer as up_7d,
         coalesce(sum(r.down_7d), 0)::integer as down_7d,
         coalesce(sum(r.votes_30d), 0)::integer as votes_30d,
         coalesce(sum(r.up_30d), 0)::integer as up_30d,
         coalesce(sum(r.down_30d), 0)::integer as down_30d,
         (array_agg(r.reason order by r.down_30d desc, r.reason)
            filter (where r.down_30d > 0 and r.reason is not null))[1] as top_negative_reason_30d
  from public.persona_module_feedback_reasons r
  where r.module_id = m.id
) a
cross join lateral private.wilson_bounds(a.up_7d, a.up_7d + a.down_7d, 1.96) w7
cross join lateral private.wilson_bounds(a.up_30d, a.up_30d + a.down_30d, 1.96) w30;

comment on view public.persona_module_feedback is
  'How users rate each module over the last 7 and 30 UTC days: votes, the approval rate (+1 '
  'votes over +1 and -1 votes; 0 votes are neutral) and its 95% Wilson score interval (Wilson '
  '1927, z = 1.96), from the votes learned by completed runs. One row per module, zeros when it '
  'had no votes.';
comment on column public.persona_module_feedback.twin_id is 'The module''s twin.';
comment on column public.persona_module_feedback.module_id is 'The module.';
comment on column public.persona_module_feedback.module_key is 'The module''s key.';
comment on column public.persona_module_feedback.intent_label is 'The intent the module serves.';
comment on column public.persona_module_feedback.status is 'The module''s status now.';
comment on column public.persona_module_feedback.votes_7d is
  'Current votes cast in the last 7 days (+1, -1 and 0).';
comment on column public.persona_module_feedback.up_7d is '+1 votes of the last 7 days.';
comment on column public.persona_module_feedback.down_7d is '-1 votes of the last 7 days.';
comment on column public.persona_module_feedback.approval_rate_7d is
  'up_7d / (up_7d + down_7d), in [0, 1]; null without +1 or -1 votes.';
comment on column public.persona_module_feedback.approval_lower_7d is
  'Lower bound of the 95% Wilson interval of approval_rate_7d (z = 1.96); null without votes.';
comment on column public.persona_module_feedback.approval_upper_7d is
  'Upper bound of the 95% Wilson interval of approval_rate_7d (z = 1.96); null without votes.';
comment on column public.persona_module_feedback.votes_30d is
  'Current votes cast in the last 30 days (+1, -1 and 0).';
comment on column public.persona_module_feedback.up_30d is '+1 votes of the last 30 days.';
comment on column public.persona_module_feedback.down_30d is '-1 votes of the last 30 days.';
comment on column public.persona_module_feedback.approval_rate_30d is
  'up_30d / (up_30d + down_30d), in [0, 1]; null without +1 or -1 votes.';
comment on column public.persona_module_feedback.approval_lower_30d is
  'Lower bound of the 95% Wilson interval of approval_rate_30d (z = 1.96); null without votes.';
comment on column public.persona_module_feedback.approval_upper_30d is
  'Upper bound of the 95% Wilson interval of approval_rate_30d (z = 1.96); null without votes.';
comment on column public.persona_module_feedback.top_negative_reason_30d is
  'The reason given most often with -1 votes in the last 30 days; null when none.';


create view public.persona_twin_overview
with (security_invoker = true)
as
select t.id as twin_id, t.name,
       coalesce(mods.modules, 0) as modules,
       coalesce(mods.active, 0) as modules_active,
       coalesce(mods.probation, 0) as modules_probation,
       coalesce(mods.disabled, 0) as modules_disabled,
       coalesce(mods.insufficient_data, 0) as modules_insufficient_data,
       pub.id as published_spec_id, pub.version as published_version,
       pub.published_at,
       dr.id as draft_spec_id, dr.version as draft_version, dr.updated_at as draft_updated_at,
       lr.id as last_run_id, lr.status as last_run_status, lr.trigger as last_run_trigger,
       lr.created_at as last_run_created_at, lr.finished_at as last_run_finished_at,
       lr.gate_passed as last_run_gate_passed,
       array(
         select c ->> 'name' from jsonb_array_elements(
           case when jsonb_typeof(lr.gate_report -> 'checks') = 'array'
                then lr.gate_report -> 'checks' else '[]' end) c
         where c ->> 'verdict' is distinct from 'pass'
       ) as last_run_failed_checks,
       lr.publish_decision as last_run_publish_decision,
       lr.hold_reason as last_run_hold_reason,
       lr.error as last_run_error,
       coalesce(pend.events, 0) as pending_events,
       pend.oldest as pending_since,
       nr.status as next_run_status,
       wa.state as watch_state,
       wa.spec_id as watch_spec_id,
       lr.retry_not_before as last_run_retry_not_before
from public.twins t
left join lateral (
  select count(*)::integer as modules,
         (count(*) filter (where m.status = 'active'))::integer as active,
         (count(*) filter (where m.status = 'probation'))::integer as probation,
         (count(*) filter (where m.status = 'disabled'))::integer as disabled,
         (count(*) filter (where m.status = 'insufficient_data'))::integer as insufficient_data
  from public.persona_modules m where m.twin_id = t.id
) mods on true
left join lateral (
  select s.id, s.version, s.published_at from public.persona_specs s
  where s.twin_id = t.id and s.status = 'published'
) pub on true
left join lateral (
  select s.id, s.version, s.updated_at from public.persona_specs s
  where s.twin_id = t.id and s.status = 'draft'
  order by s.version desc limit 1
) dr on true
-- The last run that ended: a run queued or running since must not hide its gate outcome.
left join lateral (
  select r.* from public.persona_feedback_learning_runs r
  where r.twin_id = t.id and r.status in ('completed', 'failed')
  order by r.created_at desc limit 1
) lr on true
left join lateral (
  select r.status from public.persona_feedback_learning_runs r
  where r.twin_id = t.id and r.status in ('queued', 'running')
  order by r.status = 'running' desc limit 1
) nr on true
left join lateral (
  select w.state, w.spec_id from public.persona_spec_watches w
  where w.twin_id = t.id
  order by w.created_at desc limit 1
) wa on true
left join lateral (
  select count(*)::integer as events, min(e.created_at) as oldest
  from public.persona_training_events e
  where e.twin_id = t.id and e.id > t.learned_through_event_id
) pend on true;

comment on view public.persona_twin_overview is
  'A twin at a glance: its modules by status, its published spec and latest draft, its last run '
  'that ended with the gate''s outcome, a run under way, the evidence waiting for the next run, '
  'its latest production watch, and until when a failed run holds the scheduler back. One row '
  'per twin.';
comment on column public.persona_twin_overview.twin_id is 'The twin.';
comment on column public.persona_twin_overview.name is 'The twin''s name.';
comment on column public.persona_twin_overview.modules is 'Modules of the twin.';
comment on column public.persona_twin_overview.modules_active is 'Modules now active.';
comment on column public.persona_twin_overview.modules_probation is 'Modules now on probation.';
comment on column public.persona_twin_overview.modules_disabled is 'Modules now disabled.';
comment on column public.persona_twin_overview.modules_insufficient_data is
  'Modules with too little evidence for a status.';
comment on column public.persona_twin_overview.published_spec_id is
  'The published persona spec; null when none is.';
comment on column public.persona_twin_overview.published_version is 'Its version.';
comment on column public.persona_twin_overview.published_at is 'When it was published.';
comment on column public.persona_twin_overview.draft_spec_id is
  'The latest draft spec (the next run''s candidate); null when there is none.';
comment on column public.persona_twin_overview.draft_version is 'Its version.';
comment on column public.persona_twin_overview.draft_updated_at is 'When it was last edited.';
comment on column public.persona_twin_overview.last_run_id is
  'The twin''s latest run that ended (completed or failed); null before its first.';
comment on column public.persona_twin_overview.last_run_status is 'completed or failed.';
comment on column public.persona_twin_overview.last_run_trigger is
  'owner_request, schedule, manual or owner_rollback (a rollback by hand).';
comment on column public.persona_twin_overview.last_run_created_at is 'When it was queued.';
comment on column public.persona_twin_overview.last_run_finished_at is
  'When it completed or failed.';
comment on column public.persona_twin_overview.last_run_gate_passed is
  'Whether the regression gate passed; null unless completed, and for a rollback by hand '
  '(owner_rollback: no gate ran).';
comment on column public.persona_twin_overview.last_run_failed_checks is
  'Names of the gate checks that did not pass (fail or insufficient_evidence); empty when all '
  'passed or the run has no gate report.';
comment on column public.persona_twin_overview.last_run_publish_decision is
  'published or held; null unless completed.';
comment on column public.persona_twin_overview.last_run_hold_reason is
  'Why it held: no_draft, safe_mode, gate_failed or rolled_back (its production watch rolled '
  'the spec back).';
comment on column public.persona_twin_overview.last_run_error is 'What went wrong, if it failed.';
comment on column public.persona_twin_overview.pending_events is
  'Events (feedback and audits) waiting for the next run.';
comment on column public.persona_twin_overview.pending_since is
  'When the oldest of them was cast; null when none waits.';
comment on column public.persona_twin_overview.next_run_status is
  'running or queued when a run of the twin is under way or waiting; null otherwise.';
comment on column public.persona_twin_overview.watch_state is
  'The state of the twin''s latest production watch (watching, passed, regressed, expired, '
  'rolled_back, superseded); null when no spec was ever watched.';
comment on column public.persona_twin_overview.watch_spec_id is
  'The spec that watch is about.';
comment on column public.persona_twin_overview.last_run_retry_not_before is
  'When the last run that ended failed: the scheduler queues no new run of the twin before this '
  'time (10 s after the first failure in a row, doubled for each further one, at most 1 hour; '
  'an owner''s request is not held back). Null when it completed.';


create view public.persona_training_events_state
with (security_invoker = true)
as
select e.id, e.twin_id, e.source, e.trace_id, e.intent_label, e.module_key, e.score, e.passed,
       e.reason, e.comment, e.persona_spec_id, e.created_by, e.created_at, e.superseded_at,
       e.id <= t.learned_through_event_id as processed,
       pr.finished_at as processed_at,
       pr.id as processed_run_id,
       e.langfuse_status
from public.persona_training_events e
join public.twins t on t.id = e.twin_id
-- The completed run whose batch holds the event (the computed field processed_run_id's rule),
-- looked up only for the rows a page returns.
left join lateral (
  select r.id, r.finished_at from public.persona_feedback_learning_runs r
  where r.twin_id = e.twin_id and r.status = 'completed'
    and r.batch_last_event_id >= e.id and r.batch_after_event_id < e.id
  order by r.batch_last_event_id
  limit 1
) pr on e.id <= t.learned_through_event_id;

comment on view public.persona_training_events_state is
  'Training events of the caller''s twins with their processed state as plain columns, for the '
  'dashboard''s table editor (the table''s processed_at and processed_run_id are computed fields '
  'it does not show). The events waiting for a run are the twin''s newest: list them newest '
  'first (order by id desc). Voters read their own feedback in persona_training_events.';
comment on column public.persona_training_events_state.id is 'The event (arrival order).';
comment on column public.persona_training_events_state.twin_id is 'The twin it is about.';
comment on column public.persona_training_events_state.source is 'user_feedback or persona_audit.';
comment on column public.persona_training_events_state.trace_id is 'The trace of the answer.';
comment on column public.persona_training_events_state.intent_label is 'The intent the answer served.';
comment on column public.persona_training_events_state.module_key is
  'The module it is about; null: the modules serving its intent.';
comment on column public.persona_training_events_state.score is 'Feedback: -1, 0 or +1.';
comment on column public.persona_training_events_state.passed is 'Audit: did the answer follow the spec?';
comment on column public.persona_training_events_state.reason is 'The reason given, if any.';
comment on column public.persona_training_events_state.comment is 'The voter''s comment, if any.';
comment on column public.persona_training_events_state.persona_spec_id is 'Audits: the spec audited.';
comment on column public.persona_training_events_state.created_by is 'The voter (feedback).';
comment on column public.persona_training_events_state.created_at is 'When it was cast.';
comment on column public.persona_training_events_state.superseded_at is
  'When a later vote of the same user on the same trace replaced it; null while current.';
comment on column public.persona_training_events_state.processed is
  'true once a completed learning run has processed it (its id is at most the twin''s cursor).';
comment on column public.persona_training_events_state.processed_at is
  'When the run that processed it finished; null while it waits.';
comment on column public.persona_training_events_state.processed_run_id is
  'The run that processed it; null while it waits.';
comment on column public.persona_training_events_state.langfuse_status is
  'Feedback''s Langfuse mirror state; null for audits.';


revoke all on public.persona_module_trend, public.persona_module_feedback_reasons,
  public.persona_module_feedback, public.persona_twin_overview,
  public.persona_training_events_state
from anon, authenticated, service_role;
grant select on public.persona_module_trend, public.persona_module_feedback_reasons,
  public.persona_module_feedback, public.persona_twin_overview,
  public.persona_training_events_state
to authenticated, service_role;
