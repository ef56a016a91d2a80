-- Section: training events — user feedback written by apps, persona audits written by the audit
-- pipeline. Apps insert straight through PostgREST; everything but the vote itself is set here.

create table public.persona_training_events (
  id bigint generated always as identity primary key,
  twin_id uuid not null references public.twins (id) on delete cascade,
  source text not null default 'user_feedback'
    constraint persona_training_events_source_check
    check (source in ('user_feedback', 'persona_audit')),
  trace_id text not null
    constraint persona_training_events_trace_id_check check (char_length(trace_id) between 1 and 200),
  intent_label text not null
    constraint persona_training_events_intent_label_check check (intent_label ~ '^[a-z][a-z0-9_]{0,63}$'),
  module_key text
    constraint persona_training_events_module_key_check check (module_key ~ '^[a-z][a-z0-9_]{0,63}$'),
  score smallint
    constraint persona_training_events_score_check
    check ((source = 'user_feedback') = (score is not null) and score between -1 and 1),
  passed boolean
    constraint persona_training_events_passed_check
    check ((source = 'persona_audit') = (passed is not null)),
  reason text
    constraint persona_training_events_reason_check check (reason in (
      'incorrect', 'unhelpful', 'off_persona', 'unsafe', 'outdated', 'helpful', 'other'
    )),
  comment text
    constraint persona_training_events_comment_check check (char_length(comment) <= 2000),
  metadata jsonb not null default '{}'::jsonb
    constraint persona_training_events_metadata_check
    check (jsonb_typeof(metadata) = 'object' and octet_length(metadata::text) <= 4096),
  persona_spec_id uuid,
  created_by uuid default auth.uid() references auth.users (id) on delete cascade
    constraint persona_training_events_created_by_check
    check (source <> 'user_feedback' or created_by is not null),
  created_at timestamptz not null default now(),
  first_vote_id bigint,
  supersedes_id bigint,
  superseded_at timestamptz,
  langfuse_status text
    constraint persona_training_events_langfuse_status_check check (
      langfuse_status in ('pending', 'retrying', 'sent', 'skipped', 'failed', 'superseded')
      and (source = 'user_feedback') = (langfuse_status is not null)
    ),
  langfuse_attempts integer not null default 0,
  langfuse_next_attempt_at timestamptz,
  langfuse_last_error text,
  langfuse_sent_at timestamptz,
  constraint persona_training_events_persona_spec_fkey foreign key (twin_id, persona_spec_id)
    references public.persona_specs (twin_id, id) on delete set null (persona_spec_id)
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
comment on column public.persona_training_events.supersedes_id is
  'The earlier vote this one replaces; the worker retracts what that one contributed.';
comment on column public.persona_training_events.superseded_at is
  'When a later vote by the same user on the same trace replaced this one.';
comment on column public.persona_training_events.langfuse_status is
  'Langfuse mirror (outbox) state of a feedback: pending, retrying, sent, skipped, failed or '
  'superseded by a later vote.';

-- A twin's evidence in arrival order: runs claim the ids after the twin's cursor.
create index persona_training_events_twin_id_idx on public.persona_training_events (twin_id, id);
create index persona_training_events_created_by_idx on public.persona_training_events (created_by);
-- One current vote per twin, trace and user; a new vote supersedes the old one.
create unique index persona_training_events_current_vote_idx
  on public.persona_training_events (twin_id, trace_id, created_by)
  where source = 'user_feedback' and superseded_at is null;
-- Audits of a spec by trace, latest first: the regression gate's evidence. Feedback rows stay out
-- of it, so ingestion does not pay for it.
create index persona_training_events_audits_idx
  on public.persona_training_events (persona_spec_id, trace_id, created_at desc, id desc)
  where source = 'persona_audit';
create index persona_training_events_langfuse_due_idx
  on public.persona_training_events (langfuse_next_attempt_at)
  where langfuse_status in ('pending', 'retrying');

-- Sets everything a client may not: clears server columns, checks that the twin accepts the vote
-- from its voter (owners always; others when the twin is open to any user), supersedes the
-- voter's earlier vote on the same trace and puts the feedback in the Langfuse outbox. It runs
-- before the insert policy, for every role, and is the one place a twin's consent is checked.
create function private.prepare_training_event()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_previous_id bigint;
  v_first_vote_id bigint;
  v_previous_due_at timestamptz;
  v_previous_status text;
begin
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

create trigger persona_training_events_prepare before insert on public.persona_training_events
  for each row execute function private.prepare_training_event();

alter table public.persona_training_events enable row level security;

create policy "Voters and twin owners can read events"
  on public.persona_training_events
  for select to authenticated
  using (created_by = (select auth.uid()) or private.is_twin_owner(twin_id));
-- Whether the twin accepts the vote is checked by private.prepare_training_event, which raises a
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
  private.prepare_training_event()
from public;
