-- Section: the rules on a training event's fields move from check constraints into its trigger,
-- and votes of one feedback take turns.
--
-- Why: PostgreSQL re-reads and plans the expression of every check constraint for every INSERT
-- statement, and one PostgREST request is one statement. The checks cost more database time per
-- feedback insert than anything else the table adds (scripts/bench, case 4; docs/benchmarks.md).
-- The trigger is PL/pgSQL, which keeps its plans for the session, so the same rules cost a
-- fraction there; it also runs on updates of the fields it checks, so the rules hold for every
-- write, as before. One rule stays a constraint: feedback names its voter (created_by), so that a
-- client's insert without a user is refused by the insert policy (403) before any rule is checked.
--
-- A broken rule raises SQLSTATE 23514 (check_violation, HTTP 400 through PostgREST) with a
-- message naming the column and the rule, and the rule's name
-- (persona_training_events_<column>_check) as the constraint. Slugs are checked as "at most 64
-- characters, then ^[a-z][a-z0-9_]*$": the same strings as ^[a-z][a-z0-9_]{0,63}$, whose bounded
-- repeat makes each match about ten times slower.
--
-- Concurrent votes of one feedback (twin, trace, voter) now take turns, so that two devices
-- voting on one trace at once both succeed and the later one is current; before, the later
-- insert failed with 23505 on the current-vote index.

alter table public.persona_training_events
  drop constraint persona_training_events_source_check,
  drop constraint persona_training_events_trace_id_check,
  drop constraint persona_training_events_intent_label_check,
  drop constraint persona_training_events_module_key_check,
  drop constraint persona_training_events_score_check,
  drop constraint persona_training_events_passed_check,
  drop constraint persona_training_events_reason_check,
  drop constraint persona_training_events_comment_check,
  drop constraint persona_training_events_metadata_check,
  drop constraint persona_training_events_langfuse_status_check;

-- On insert: checks the fields, clears server columns, checks that the twin accepts the vote
-- from its voter (owners always; others when the twin is open to any user), supersedes the
-- voter's earlier vote on the same trace and puts the feedback in the Langfuse outbox. It runs
-- before the insert policy, for every role, and is the one place a twin's consent is checked.
-- On update of a checked field: checks the fields.
create or replace function private.prepare_training_event()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_column text;
  v_rule text;
  v_previous_id bigint;
  v_first_vote_id bigint;
  v_previous_due_at timestamptz;
  v_previous_status text;
begin
  -- NULL passes, as in a check constraint: NOT NULL columns refuse it themselves.
  if not coalesce(new.source in ('user_feedback', 'persona_audit'), true) then
    v_column := 'source'; v_rule := 'user_feedback or persona_audit';
  elsif not coalesce(char_length(new.trace_id) between 1 and 200, true) then
    v_column := 'trace_id'; v_rule := '1 to 200 characters';
  elsif not coalesce(char_length(new.intent_label) <= 64
                     and new.intent_label ~ '^[a-z][a-z0-9_]*$', true) then
    v_column := 'intent_label';
    v_rule := 'a lowercase letter, then up to 63 lowercase letters, digits or underscores';
  elsif not coalesce(char_length(new.module_key) <= 64
                     and new.module_key ~ '^[a-z][a-z0-9_]*$', true) then
    v_column := 'module_key';
    v_rule := 'a lowercase letter, then up to 63 lowercase letters, digits or underscores';
  elsif not coalesce((new.source = 'user_feedback') = (new.score is not null)
                     and new.score between -1 and 1, true) then
    v_column := 'score'; v_rule := '-1, 0 or 1 on feedback, and none on audits';
  elsif not coalesce((new.source = 'persona_audit') = (new.passed is not null), true) then
    v_column := 'passed'; v_rule := 'true or false on audits, and none on feedback';
  elsif not coalesce(new.reason in ('incorrect', 'unhelpful', 'off_persona', 'unsafe',
                                    'outdated', 'helpful', 'other'), true) then
    v_column := 'reason';
    v_rule := 'incorrect, unhelpful, off_persona, unsafe, outdated, helpful or other';
  elsif not coalesce(char_length(new.comment) <= 2000, true) then
    v_column := 'comment'; v_rule := 'at most 2000 characters';
  elsif not coalesce(jsonb_typeof(new.metadata) = 'object'
                     and octet_length(new.metadata::text) <= 4096, true) then
    v_column := 'metadata'; v_rule := 'a JSON object of at most 4096 bytes';
  elsif tg_op = 'UPDATE' and not coalesce(
          new.langfuse_status in ('pending', 'retrying', 'sent', 'skipped', 'failed', 'superseded')
          and (new.source = 'user_feedback') = (new.langfuse_status is not null), true) then
    v_column := 'langfuse_status';
    v_rule := 'pending, retrying, sent, skipped, failed or superseded on feedback, none on audits';
  end if;
  if v_column is not null then
    raise exception using
      errcode = '23514',
      schema = 'public',
      table = 'persona_training_events',
      column = v_column,
      constraint = format('persona_training_events_%s_check', v_column),
      message = format('%s: %s', v_column, v_rule);
  end if;
  if tg_op = 'UPDATE' then
    return new;
  end if;

  new.superseded_at := null;
  new.supersedes_id := null;
  new.langfuse_attempts := 0;
  new.langfuse_last_error := null;
  new.langfuse_sent_at := null;

  if new.source = 'persona_audit' then
    new.first_vote_id := null;
    new.langfuse_status := null;
    new.langfuse_next_attempt_at := null;
    return new;
  end if;

  if new.twin_id is null then
    raise exception using errcode = '23502', column = 'twin_id',
      message = 'twin_id: a twin is required';
  end if;
  if not exists (
    select 1 from public.twins t
    where t.id = new.twin_id
      and (t.feedback_from = 'any_user' or t.owner_id = new.created_by)
  ) then
    raise exception using
      errcode = '42501',
      message = format('twin_id: twin %s does not exist or does not accept feedback from this user',
                       new.twin_id);
  end if;

  -- Votes of one feedback take turns: a vote from the voter's second device waits here until the
  -- first one commits, then supersedes it, instead of colliding with it on the current-vote index.
  perform pg_advisory_xact_lock(
    hashtext('public.persona_training_events'),
    hashtext(format('%s/%s/%s', new.twin_id, new.created_by, new.trace_id))
  );
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

  new.supersedes_id := v_previous_id;
  new.first_vote_id := coalesce(v_first_vote_id, new.id);
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

create trigger persona_training_events_check_update
  before update of source, trace_id, intent_label, module_key, score, passed, reason, comment,
    metadata, created_by, langfuse_status
  on public.persona_training_events
  for each row execute function private.prepare_training_event();

comment on trigger persona_training_events_check_update on public.persona_training_events is
  'Holds updates to the rules private.prepare_training_event checks on insert.';
