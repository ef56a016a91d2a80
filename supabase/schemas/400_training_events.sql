-- Section: training events — user feedback written by apps, persona audits written by the audit
-- pipeline. Apps insert straight through PostgREST; everything but the vote itself is set here.
--
-- Every rule on a field is declared: closed sets are enum types (a bad value is 22P02 "invalid
-- input value for enum <type>", HTTP 400), everything else a check constraint named
-- <field>_<rule> (23514 "... violates check constraint <name>", HTTP 400), and they hold for
-- inserts and updates by every role. Two triggers do what no declaration can: check that the
-- twin accepts the vote from its voter, and record the vote (supersede the voter's earlier vote
-- on the trace, put it in the Langfuse outbox).

create type public.training_event_source as enum ('user_feedback', 'persona_audit');
comment on type public.training_event_source is
  'Where a training event comes from: user_feedback (apps) or persona_audit (the audit pipeline).';

create type public.training_event_reason as enum
  ('incorrect', 'unhelpful', 'off_persona', 'unsafe', 'outdated', 'helpful', 'other');
comment on type public.training_event_reason is
  'Why a vote or an audit came out as it did; unsafe failures weigh 3x in learning.';

create type public.audit_origin as enum ('production', 'replay');
comment on type public.audit_origin is
  'Where an audited answer came from: production (an answer the spec gave a user while it was '
  'live) or replay (an answer regenerated offline: a gate''s pairing, a hard set, a draft).';

create type public.langfuse_status as enum
  ('pending', 'retrying', 'sent', 'skipped', 'failed', 'superseded');
comment on type public.langfuse_status is
  'Langfuse mirror (outbox) state of a feedback vote: pending, retrying, sent, skipped (Langfuse '
  'not configured), failed, or superseded by a later vote of the same feedback.';

create table public.persona_training_events (
  id bigint generated always as identity primary key,
  twin_id uuid not null references public.twins (id) on delete cascade,
  source public.training_event_source not null default 'user_feedback',
  trace_id text not null
    constraint trace_id_1_to_200_chars check (char_length(trace_id) between 1 and 200),
  intent_label text not null
    constraint intent_label_slug
    check (char_length(intent_label) <= 64 and intent_label ~ '^[a-z][a-z0-9_]*$'),
  module_key text
    constraint module_key_slug
    check (char_length(module_key) <= 64 and module_key ~ '^[a-z][a-z0-9_]*$'),
  score smallint
    constraint score_minus_1_to_1 check (score between -1 and 1),
  passed boolean,
  reason public.training_event_reason,
  comment text
    constraint comment_at_most_2000_chars check (char_length(comment) <= 2000),
  metadata jsonb not null default '{}'::jsonb
    constraint metadata_object_at_most_4096_compact_json_bytes check (
      jsonb_typeof(metadata) = 'object'
      and (octet_length(metadata::text) <= 4096
           -- The stored text adds one space after each ',' and ':' between tokens; without them it
           -- is the compact JSON a client sends. Strings are matched whole, so their contents stay.
           or octet_length(regexp_replace(metadata::text, '("(?:[^"\\]|\\.)*")|([,:]) ', '\1\2',
                                          'g')) <= 4096)
    ),
  persona_spec_id uuid,
  created_by uuid default auth.uid() references auth.users (id) on delete cascade,
  created_at timestamptz not null default now(),
  first_vote_id bigint,
  supersedes_id bigint,
  superseded_at timestamptz,
  langfuse_status public.langfuse_status,
  langfuse_attempts integer not null default 0,
  langfuse_next_attempt_at timestamptz,
  langfuse_last_error text,
  langfuse_sent_at timestamptz,
  audit_of_draft boolean not null default false,
  audit_origin public.audit_origin,
  first_vote_at timestamptz,
  constraint score_on_feedback_only check ((source = 'user_feedback') = (score is not null)),
  constraint passed_on_audits_only check ((source = 'persona_audit') = (passed is not null)),
  -- Feedback names its voter, so that an insert without a user is refused by the insert policy
  -- (403) before any other rule is checked.
  constraint created_by_on_feedback check (source <> 'user_feedback' or created_by is not null),
  constraint langfuse_status_on_feedback_only
    check ((source = 'user_feedback') = (langfuse_status is not null)),
  constraint persona_training_events_persona_spec_fkey foreign key (twin_id, persona_spec_id)
    references public.persona_specs (twin_id, id) on delete set null (persona_spec_id),
  constraint audit_of_draft_on_audits_only check (not audit_of_draft or source = 'persona_audit'),
  -- Every audit has an origin (the database fills in a default: mark_audit_of_draft), feedback
  -- none; a draft never answered a user, so its audits are replays.
  constraint audit_origin_on_audits_only
    check ((source = 'persona_audit') = (audit_origin is not null)),
  constraint audit_origin_replay_for_drafts check (not audit_of_draft or audit_origin = 'replay'),
  -- A vote change links two votes of one feedback; an audit replaces nothing and is never
  -- replaced (the claim would otherwise retract whatever vote its supersedes_id names).
  constraint supersedes_id_on_feedback_only
    check (source = 'user_feedback' or supersedes_id is null),
  constraint superseded_at_on_feedback_only
    check (source = 'user_feedback' or superseded_at is null),
  -- Every vote of a feedback carries its first vote's time, kept when that vote is deleted: the
  -- Langfuse score's timestamp (part of Langfuse's key), which must never change.
  constraint first_vote_at_on_feedback_only
    check ((source = 'user_feedback') = (first_vote_at is not null))
);

comment on table public.persona_training_events is
  'Evidence about a twin''s answers: user feedback (apps, through the API) and persona audits '
  '(the audit pipeline, service role). An event is processed once its id is at most its twin''s '
  'learned_through_event_id; processed_at and processed_run_id tell when and by which run.';
comment on column public.persona_training_events.trace_id is 'The trace of the answer (1-200 chars).';
comment on column public.persona_training_events.score is 'Feedback vote: -1, 0 (neutral) or +1.';
comment on column public.persona_training_events.passed is 'Audit outcome: did the answer follow the spec?';
comment on column public.persona_training_events.reason is
  'incorrect, unhelpful, off_persona, unsafe, outdated, helpful or other; unsafe failures weigh 3x.';
comment on column public.persona_training_events.persona_spec_id is
  'Audits: the spec audited. Feedback: none; the spec live when the vote was cast follows from '
  'the specs'' published_at and archived_at.';
comment on column public.persona_training_events.created_by is 'The user who voted; from the JWT.';
comment on column public.persona_training_events.first_vote_id is
  'The first vote of this feedback (same twin, trace and user); later votes change it.';
comment on column public.persona_training_events.first_vote_at is
  'When this feedback''s first vote was cast (its created_at), kept in '
  'private.feedback_first_votes and set from there on every vote, and on a vote moved into the '
  'feedback by hand, so it stays when the first vote is deleted: the Langfuse score''s '
  'timestamp, which keys the score there with its id. An edit may not set it to another time. '
  'Null on audits.';
comment on column public.persona_training_events.supersedes_id is
  'The earlier vote this one replaces; the worker retracts what that one contributed.';
comment on column public.persona_training_events.superseded_at is
  'When a later vote by the same user on the same trace replaced this one.';
comment on column public.persona_training_events.langfuse_status is
  'Langfuse mirror (outbox) state of a feedback: pending, retrying, sent, skipped, failed or '
  'superseded by a later vote.';

comment on constraint intent_label_slug on public.persona_training_events is
  'A lowercase letter, then up to 63 lowercase letters, digits or underscores.';
comment on constraint module_key_slug on public.persona_training_events is
  'A lowercase letter, then up to 63 lowercase letters, digits or underscores.';
comment on constraint score_on_feedback_only on public.persona_training_events is
  'Feedback carries a score (-1, 0 or 1); audits carry none.';
comment on constraint passed_on_audits_only on public.persona_training_events is
  'Audits carry an outcome (passed true or false); feedback carries none.';
comment on constraint langfuse_status_on_feedback_only on public.persona_training_events is
  'Feedback is in the Langfuse outbox; audits are not mirrored.';
comment on column public.persona_training_events.audit_of_draft is
  'Audits: the audited spec was a draft when the audit was recorded, so the audit is evidence for '
  'the gate only and moves no module, whatever becomes of the spec later. Set by the database.';
comment on constraint audit_of_draft_on_audits_only on public.persona_training_events is
  'Only an audit can be an audit of a draft.';
comment on column public.persona_training_events.audit_origin is
  'Audits: production (the audited answer was given to a user by the audited spec while it was '
  'live: the production watch''s evidence) or replay (regenerated offline for a comparison: a '
  'gate''s pairing, a hard set; the gate pairs any audit, the watch counts none). The audit '
  'pipeline sends it; left out, an audit of a draft is a replay and any other a production '
  'audit. Null on feedback.';
comment on constraint audit_origin_on_audits_only on public.persona_training_events is
  'Every audit has an origin (production or replay; the database fills in a default), feedback '
  'none.';
comment on constraint audit_origin_replay_for_drafts on public.persona_training_events is
  'An audit of a draft is a replay: a draft never answered a user, so it has no production.';
comment on constraint supersedes_id_on_feedback_only on public.persona_training_events is
  'Only a vote replaces an earlier vote (set by the database when a voter changes a vote); an '
  'audit carries no supersedes_id.';
comment on constraint superseded_at_on_feedback_only on public.persona_training_events is
  'Only a vote is replaced by a later vote; an audit carries no superseded_at.';
comment on constraint metadata_object_at_most_4096_compact_json_bytes
  on public.persona_training_events is
  'A JSON object of at most 4,096 bytes as compact JSON in UTF-8: no whitespace between tokens, '
  'characters other than " \ and control characters unescaped (JSON.stringify, or Python '
  'json.dumps(m, separators=(",", ":"), ensure_ascii=False)); numbers count as stored, in plain '
  'decimal notation (1e3 counts as 1000, 1.5e-7 as 0.00000015), which is how JSON.stringify and '
  'json.dumps write every number between 1e-4 and 1e16.';


-- A twin's evidence in arrival order: runs claim the ids after the twin's cursor.
create index persona_training_events_twin_id_idx on public.persona_training_events (twin_id, id);
-- A twin's events by time: the production watch's windows (claim_production_watch).
create index persona_training_events_twin_created_idx
  on public.persona_training_events (twin_id, created_at);
create index persona_training_events_created_by_idx on public.persona_training_events (created_by);
-- A twin's vote changes by the vote each replaced: a rebuild step reads those of its range.
create index persona_training_events_supersedes_idx
  on public.persona_training_events (twin_id, supersedes_id) where supersedes_id is not null;
-- A twin's vote changes in arrival order: a run's claim reads those of its batch (to retract
-- the votes they replaced) without reading the batch's pages a second time.
create index persona_training_events_vote_changes_idx
  on public.persona_training_events (twin_id, id) where supersedes_id is not null;
-- One current vote per twin, trace and user; a new vote supersedes the old one.
create unique index persona_training_events_current_vote_idx
  on public.persona_training_events (twin_id, trace_id, created_by)
  where source = 'user_feedback' and superseded_at is null;
-- Audits of a spec by trace, latest first: the regression gate's evidence. Feedback rows stay out
-- of it, so ingestion does not pay for it.
create index persona_training_events_audits_idx
  on public.persona_training_events (persona_spec_id, trace_id, created_at desc, id desc)
  where source = 'persona_audit';
-- The outbox claim takes due rows `order by langfuse_next_attempt_at, id`: with the id in the key
-- it is an index scan that stops at its limit, even when many rows share one due time (a requeue
-- gives every requeued row the same).
create index persona_training_events_langfuse_due_idx
  on public.persona_training_events (langfuse_next_attempt_at, id)
  where langfuse_status in ('pending', 'retrying');

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
  'voted on: written with the feedback''s first vote (or the first vote moved into it by hand), '
  'read by every later vote and every vote moved into it (persona_training_events.first_vote_at, '
  'which an edit may not set to another time), kept when its votes are deleted (a moderator) or '
  'moved away, removed with the twin or the voter''s account (auth.users). No API role may read '
  'or write it.';

-- A user's account deleted: the cascade finds the voter's rows by this index.
create index feedback_first_votes_created_by_idx on private.feedback_first_votes (created_by);

-- The row of a feedback's kept first vote time, locked for the transaction: votes of one
-- feedback, and moves of votes into it, take turns on it. Called by the vote recorder and the
-- edit trigger below, as postgres (their owner).
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

create function private.record_feedback_vote()
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

-- Triggers of one event fire in name order: this one after bound_created_at (it reads the
-- clamped created_at) and before check_metadata_numbers (consent is the first answer).
create trigger persona_training_events_check_consent_and_record_vote
  before insert on public.persona_training_events
  for each row when (new.source = 'user_feedback')
  execute function private.record_feedback_vote();

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

comment on function private.keep_feedback_first_vote_on_edit() is
  'Trigger (before update of source, twin_id, trace_id, created_by or first_vote_at of a feedback '
  'vote on persona_training_events, when one of them changed): a vote moved to another feedback '
  '(twin, trace, voter) takes that feedback''s first vote time from '
  'private.feedback_first_votes, or leaves its own there when the feedback has none; a vote that '
  'stays keeps its feedback''s time. Raises 23514 naming first_vote_at when an edit sets a vote''s '
  'first_vote_at to another time than its feedback''s kept one (a move with a time of its own '
  'too), or to a time in the future. Security definer: no API role may read or write that '
  'table.';

create trigger persona_training_events_keep_first_vote_on_edit
  before update of source, twin_id, trace_id, created_by, first_vote_at
  on public.persona_training_events
  for each row when (
    new.source = 'user_feedback'
    and (old.source, old.twin_id, old.trace_id, old.created_by, old.first_vote_at)
        is distinct from (new.source, new.twin_id, new.trace_id, new.created_by, new.first_vote_at))
  execute function private.keep_feedback_first_vote_on_edit();

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

-- Service-role times: refused beyond the skew, clamped within it (DESIGN: no stored time is in
-- the future, so a skewed clock cannot capture the gate's latest audit per trace).
create function private.bound_event_created_at()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_skew integer;
begin
  select s.max_clock_skew_seconds into v_skew
  from public.persona_learning_settings s where s.twin_id = new.twin_id;
  v_skew := coalesce(v_skew, 60);
  if new.created_at > now() + make_interval(secs => v_skew) then
    raise exception using
      errcode = '22008',
      column = 'created_at',
      message = format('created_at: %s is more than %s s ahead of the server''s clock (%s); '
                       'send the time the event happened', new.created_at, v_skew, now()),
      hint = 'The allowed skew is the twin''s max_clock_skew_seconds setting.';
  end if;
  new.created_at := now();
  return new;
end;
$$;

comment on function private.bound_event_created_at() is
  'Trigger (before insert, or update of created_at, on persona_training_events, only for a '
  'created_at after now()): stores a time at most the twin''s max_clock_skew_seconds (default 60 '
  's) ahead of the server''s clock as now(), so no stored time is in the future. Raises 22008 '
  '(HTTP 400) "created_at: <t> is more than <n> s ahead of the server''s clock (<now>) ..." when '
  'it is further ahead. Security definer: it reads the twin''s settings whoever writes.';

-- Fires first of the insert triggers (name order), before the vote recorder reads created_at.
create trigger persona_training_events_bound_created_at
  before insert or update of created_at on public.persona_training_events
  for each row when (new.created_at > now())
  execute function private.bound_event_created_at();


-- Audits of a draft: decided when the audit is recorded (or re-targeted to another spec); and
-- an audit's origin when the pipeline sent none.
create function private.mark_audit_of_draft()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  if tg_op = 'UPDATE' and new.persona_spec_id is null then
    -- The spec was deleted (the foreign key sets null) or detached: what it was stays.
    new.audit_of_draft := old.audit_of_draft;
  else
    new.audit_of_draft := exists (
      select 1 from public.persona_specs s
      where s.id = new.persona_spec_id and s.status = 'draft'
    );
  end if;
  -- A draft never answered a user: its audits are replays. Any other spec's audit is taken for
  -- production unless the pipeline says replay (audit_origin_replay_for_drafts refuses a
  -- draft's audit sent as production).
  if tg_op = 'INSERT' and new.audit_origin is null then
    new.audit_origin := case when new.audit_of_draft then 'replay' else 'production'
                        end::public.audit_origin;
  end if;
  return new;
end;
$$;

comment on function private.mark_audit_of_draft() is
  'Trigger (before insert, or update of persona_spec_id, of audits on persona_training_events): '
  'sets audit_of_draft to whether the audited spec is a draft now, whatever the writer said; '
  'when persona_spec_id becomes null (the spec deleted), keeps the value it had. On insert, an '
  'audit sent without audit_origin gets replay when it audits a draft, else production; one '
  'sent with it keeps it. Security definer: it reads specs whoever writes. Raises nothing of '
  'its own (the check constraints on audit_origin refuse what does not fit).';

create trigger persona_training_events_mark_audit_of_draft
  before insert or update of persona_spec_id on public.persona_training_events
  for each row when (new.source = 'persona_audit')
  execute function private.mark_audit_of_draft();


-- The exact learning path's markers (DESIGN in the 20261201000100_exact_learning migration):
-- what the incremental path cannot follow bumps the twin's evidence_generation.
create function private.bump_evidence_generation_on_delete()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- One aggregate over the deleted rows per twin; a twin is marked when one of them was learned
  -- (id up to the cursor), sits in a running run's batch, or replaced an earlier vote (whose
  -- retraction is then no longer pending).
  update public.twins t
  set evidence_generation = t.evidence_generation + 1
  from (
    select o.twin_id, min(o.id) as first_id, bool_or(o.supersedes_id is not null) as replaced
    from old_events o
    group by o.twin_id
  ) d
  where t.id = d.twin_id
    and (d.replaced
         or d.first_id <= t.learned_through_event_id
         or d.first_id <= (select r.batch_last_event_id
                           from public.persona_feedback_learning_runs r
                           where r.twin_id = t.id and r.status = 'running'));
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_delete() is
  'Trigger (after delete on persona_training_events, once per statement, with the deleted rows '
  'as old_events): bumps evidence_generation of every twin one of whose deleted events was '
  'learned (id <= learned_through_event_id), is in its running run''s batch, or had replaced an '
  'earlier vote. Security definer: whoever deletes, the twin is marked. Raises nothing.';

create trigger persona_training_events_bump_generation_on_delete
  after delete on public.persona_training_events
  referencing old table as old_events
  for each statement execute function private.bump_evidence_generation_on_delete();

create function private.bump_evidence_generation_on_edit()
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
create trigger persona_training_events_bump_generation_on_edit
  after update on public.persona_training_events
  referencing old table as before_rows new table as after_rows
  for each statement
  when (coalesce(current_setting('pfl.recording_vote', true), '') <> 'on')
  execute function private.bump_evidence_generation_on_edit();

alter table public.persona_training_events enable row level security;

create policy "Voters and twin owners can read events"
  on public.persona_training_events
  for select to authenticated
  using (created_by = (select auth.uid()) or twin_id = any ((select private.owned_twin_ids())::uuid[]));
-- Whether the twin accepts the vote is checked by private.record_feedback_vote, which raises a
-- clear error naming twin_id before this policy is evaluated.
create policy "Users send their own feedback" on public.persona_training_events
  for insert to authenticated
  with check (source = 'user_feedback' and created_by = (select auth.uid()));

grant select, insert, update, delete on public.persona_training_events to service_role;
grant select on public.persona_training_events to authenticated;
grant insert (twin_id, trace_id, score, reason, intent_label, module_key, comment, metadata)
  on public.persona_training_events to authenticated;

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  private.lock_feedback_first_vote(uuid, text, uuid, timestamptz),
  private.record_feedback_vote(),
  private.keep_feedback_first_vote_on_edit(),
  private.bound_event_created_at(),
  private.mark_audit_of_draft(),
  private.bump_evidence_generation_on_delete(),
  private.bump_evidence_generation_on_edit()
from public;
