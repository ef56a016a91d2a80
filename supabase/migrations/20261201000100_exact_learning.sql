-- Delta: learned confidence stays exact whatever changes (issue 11).
--
-- DESIGN. The invariant (DESIGN.md, Learning): after every completed run, each module's counts
-- equal the sum over the evidence that exists now, matched to the modules that exist now, decayed
-- to the module's time. Two paths keep it:
--
-- * Incremental (unchanged, the fast path): appends and vote changes. A run adds its batch's
--   decayed weight and retracts what each superseded vote added.
-- * Exact (new): anything else that changes which evidence exists or where it counts bumps the
--   twin's evidence_generation, in the same transaction as the change:
--     - deleting events (a user's deletion cascading, moderation, a twin's deletion) when a
--       deleted row was learned or is in a running batch, or replaced a vote (statement-level
--       trigger with a transition table: one aggregate per statement, however many rows);
--     - editing an event's evidence columns (a row trigger that fires only when one changes);
--     - adding, renaming, re-targeting or deleting a module.
--   A run that sees evidence_generation <> learned_generation at its claim rebuilds every module
--   of the twin from scratch in SQL (one pass over the twin's current evidence, grouped by match
--   key first, then matched to the modules: the cost of a bare aggregate over the same rows), and
--   learns its batch on top. Its completion moves the cursor only if the generation is still
--   the one it read (otherwise PT412: the worker reads the batch again), so a run never adds the
--   weight of rows that vanished mid-run nor reports them processed.
--   Why not a ledger of where each event's weight went: it writes one row per (event, module)
--   at every run (the 1,000,000-event runs of bench case 1 would write as much again), and a
--   module edit must still re-match every event; the rebuild reads what a ledger would and
--   writes nothing per event. Measured figures: README, Learning.
--
-- Spec changes move no module: whether an audit is module evidence is fixed when it is recorded
-- (audit_of_draft: the audited spec was a draft then). Audits of a draft are gate evidence only,
-- whatever becomes of that draft later (published, archived, deleted).
--
-- Service-role times are bounded: an event's created_at more than the twin's
-- max_clock_skew_seconds ahead of the server's clock is refused (22008, naming created_at); one
-- ahead by less is stored as the server's time, so no stored time lies in the future and the
-- gate's "latest audit per trace" cannot be captured by a skewed clock.
--
-- Feedback metadata's 4,096-byte limit is measured on its compact JSON form (what
-- JSON.stringify sends), not on the stored text (which adds a space after every ':' and ',').
--
-- processed_at / processed_run_id tell voters the truth: the run is read with the definer's
-- rights once the caller's own policies show the event.


-- Settings: how far ahead of the server's clock a service-role time may be.
alter table public.persona_learning_settings
  add column max_clock_skew_seconds integer not null default 60
    constraint max_clock_skew_seconds_0_to_3600 check (max_clock_skew_seconds between 0 and 3600);
comment on column public.persona_learning_settings.max_clock_skew_seconds is
  'An event''s created_at (set by the service role) may be at most this many seconds ahead of '
  'the server''s clock; it is then stored as the server''s time. Further ahead is refused.';


-- Twins: the generation of their evidence, and the one their modules were learned at.
alter table public.twins
  add column evidence_generation bigint not null default 0,
  add column learned_generation bigint not null default 0;
comment on column public.twins.evidence_generation is
  'Bumped by every change that the incremental path cannot follow: deleting learned (or '
  'in-flight) events, editing an event''s evidence, adding, editing or deleting a module.';
comment on column public.twins.learned_generation is
  'The evidence_generation the modules were last learned at by a completed run; when it differs, '
  'the next run rebuilds the twin''s modules from scratch.';


-- Runs: the generation a run read, and whether it rebuilt the modules.
alter table public.persona_feedback_learning_runs
  add column evidence_generation bigint,
  add column rebuilt_modules boolean;
comment on column public.persona_feedback_learning_runs.evidence_generation is
  'The twin''s evidence_generation when the run read its batch; it completes only if unchanged.';
comment on column public.persona_feedback_learning_runs.rebuilt_modules is
  'True when the run recomputed every module from all the twin''s evidence (something other than '
  'an append or a vote change happened since the last run), false when it learned incrementally.';


-- Events: whether an audit audited a draft (gate evidence only), fixed when recorded.
alter table public.persona_training_events
  add column audit_of_draft boolean not null default false,
  add constraint audit_of_draft_on_audits_only check (not audit_of_draft or source = 'persona_audit');
comment on column public.persona_training_events.audit_of_draft is
  'Audits: the audited spec was a draft when the audit was recorded, so the audit is evidence for '
  'the gate only and moves no module, whatever becomes of the spec later. Set by the database.';
comment on constraint audit_of_draft_on_audits_only on public.persona_training_events is
  'Only an audit can be an audit of a draft.';

-- Existing audits: a spec still a draft, or published after the audit was cast, was a draft then.
update public.persona_training_events e
set audit_of_draft = true
from public.persona_specs s
where e.source = 'persona_audit' and s.id = e.persona_spec_id
  and (s.published_at is null or s.published_at > e.created_at);

alter table public.persona_training_events
  drop constraint metadata_object_at_most_4096_bytes,
  add constraint metadata_object_at_most_4096_compact_json_bytes check (
    jsonb_typeof(metadata) = 'object'
    and (octet_length(metadata::text) <= 4096
         -- The stored text adds one space after each ',' and ':' between tokens; without them it
         -- is the compact JSON a client sends. Strings are matched whole, so their contents stay.
         or octet_length(regexp_replace(metadata::text, '("(?:[^"\\]|\\.)*")|([,:]) ', '\1\2',
                                        'g')) <= 4096)
  );
comment on constraint metadata_object_at_most_4096_compact_json_bytes
  on public.persona_training_events is
  'A JSON object of at most 4,096 bytes as compact JSON in UTF-8: no whitespace between tokens, '
  'characters other than " \ and control characters unescaped (JSON.stringify, or Python '
  'json.dumps(m, separators=(",", ":"), ensure_ascii=False)); numbers count as written.';


-- Service-role times: refused beyond the skew, clamped within it.
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


-- Audits of a draft: decided when the audit is recorded (or re-targeted to another spec).
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
  return new;
end;
$$;

comment on function private.mark_audit_of_draft() is
  'Trigger (before insert, or update of persona_spec_id, of audits on persona_training_events): '
  'sets audit_of_draft to whether the audited spec is a draft now, whatever the writer said; '
  'when persona_spec_id becomes null (the spec deleted), keeps the value it had. Security '
  'definer: it reads specs whoever writes. Raises nothing of its own.';

create trigger persona_training_events_mark_audit_of_draft
  before insert or update of persona_spec_id on public.persona_training_events
  for each row when (new.source = 'persona_audit')
  execute function private.mark_audit_of_draft();


-- The exact path's markers.
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
  update public.twins t
  set evidence_generation = t.evidence_generation + 1
  where t.id in (old.twin_id, new.twin_id);
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_edit() is
  'Trigger (after an update that changes an event''s evidence columns): bumps '
  'evidence_generation of the twin(s) of the old and new row. Security definer: whoever edits, '
  'the twin is marked. Raises nothing.';

-- A vote change (the vote recorder marking the earlier vote superseded) is the incremental
-- path's; pfl.recording_vote tells it apart from an edit by hand.
create trigger persona_training_events_bump_generation_on_edit
  after update of twin_id, source, intent_label, module_key, score, passed, reason, created_at,
    audit_of_draft, supersedes_id, superseded_at
  on public.persona_training_events
  for each row when (
    old.twin_id is distinct from new.twin_id or old.source is distinct from new.source
    or old.intent_label is distinct from new.intent_label
    or old.module_key is distinct from new.module_key or old.score is distinct from new.score
    or old.passed is distinct from new.passed or old.reason is distinct from new.reason
    or old.created_at is distinct from new.created_at
    or old.audit_of_draft is distinct from new.audit_of_draft
    or old.supersedes_id is distinct from new.supersedes_id
    or (old.superseded_at is distinct from new.superseded_at
        and coalesce(current_setting('pfl.recording_vote', true), '') <> 'on')
  )
  execute function private.bump_evidence_generation_on_edit();

create function private.bump_evidence_generation_on_module_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- A module with nothing learned yet is exact at zero: a twin is marked only when it has learned
  -- evidence (its cursor moved) or a run holds a batch read against the modules as they were.
  update public.twins t
  set evidence_generation = t.evidence_generation + 1
  where t.id in (old.twin_id, new.twin_id)
    and (t.learned_through_event_id > 0
         or exists (select 1 from public.persona_feedback_learning_runs r
                    where r.twin_id = t.id and r.status = 'running'));
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_module_edit() is
  'Trigger (after insert, update of key, intent or twin, or delete on persona_modules): bumps '
  'evidence_generation of the twin(s) of the old and new row when the twin has learned evidence '
  '(learned_through_event_id > 0) or a running run, so that its next run rebuilds its modules '
  'and a running one reads its batch again. Security definer: whoever edits, the twin is marked. '
  'Raises nothing.';

create trigger persona_modules_bump_generation
  after insert or delete or update of twin_id, module_key, intent_label on public.persona_modules
  for each row execute function private.bump_evidence_generation_on_module_edit();

-- The vote recorder, as before, with the flag that tells its supersede from an edit by hand.
create or replace function private.record_feedback_vote()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
declare
  v_previous_id bigint;
  v_first_vote_id bigint;
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
  returning p.id, p.first_vote_id, p.langfuse_next_attempt_at, p.langfuse_status
    into v_previous_id, v_first_vote_id, v_previous_due_at, v_previous_status;
  perform set_config('pfl.recording_vote', '', true);

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

comment on function private.record_feedback_vote() is
  'Trigger (before insert of feedback on persona_training_events, after the consent check): '
  'records the vote. Clears the server columns (superseded_at, supersedes_id, langfuse_attempts, '
  'langfuse_last_error, langfuse_sent_at); takes a transaction advisory lock on (twin, voter, '
  'trace) so two votes of one feedback take turns; marks the voter''s current vote on the trace '
  'superseded (its outbox state too when not yet delivered), with pfl.recording_vote on so that '
  'this vote change is not taken for an edit by hand, and links the new vote to it '
  '(supersedes_id; first_vote_id = the feedback''s first vote, or the new id); puts the new vote '
  'in the outbox (pending, due at its created_at, or when the superseded one''s delivery window '
  'closes). Security definer: voters may not update events. Raises nothing of its own.';


-- processed_at / processed_run_id: the truth for everyone who may see the event.
create function private.event_processing(p_event_id bigint)
returns table (run_id uuid, finished_at timestamptz)
language sql
stable
security definer
set search_path = ''
as $$
  select r.id, r.finished_at
  from public.persona_training_events e
  join lateral (
    select r.id, r.finished_at
    from public.persona_feedback_learning_runs r
    where r.twin_id = e.twin_id and r.status = 'completed'
      and r.batch_last_event_id >= e.id and r.batch_after_event_id < e.id
    order by r.batch_last_event_id
    limit 1
  ) r on true
  where e.id = p_event_id;
$$;

comment on function private.event_processing(bigint) is
  'Computed fields'' helper. In: an event id. Out: one row (run_id, finished_at) of the completed '
  'run whose batch holds the event, or no row while it waits (or for an unknown id). Security '
  'definer: voters may not read runs; the public computed fields call it only for an event the '
  'caller''s own policies show. Raises nothing.';

grant execute on function private.event_processing(bigint) to authenticated, service_role;

create or replace function public.processed_run_id(p_event public.persona_training_events)
returns uuid
language sql
stable
set search_path = ''
as $$
  select p.run_id
  from private.event_processing(p_event.id) p
  where exists (select 1 from public.persona_training_events e where e.id = p_event.id);
$$;

create or replace function public.processed_at(p_event public.persona_training_events)
returns timestamptz
language sql
stable
set search_path = ''
as $$
  select p.finished_at
  from private.event_processing(p_event.id) p
  where exists (select 1 from public.persona_training_events e where e.id = p_event.id);
$$;

comment on function public.processed_run_id(public.persona_training_events) is
  'Computed field of persona_training_events. In: an event row. Out: the id of the completed '
  'learning run whose batch holds the event; null while it waits, and for an event the caller''s '
  'policies do not show (the voter and the twin''s owner both see it). Raises nothing.';
comment on function public.processed_at(public.persona_training_events) is
  'Computed field of persona_training_events. In: an event row. Out: when the learning run that '
  'processed the event finished (timestamptz); null while it waits, and for an event the '
  'caller''s policies do not show (the voter and the twin''s owner both see it). Raises nothing.';


-- The exact path's rebuild, in a function of its own: RETURN QUERY may run its query with parallel
-- workers, which a SELECT INTO in the claim may not (PL/pgSQL fetches it with a row limit).
create function private.rebuild_module_counts(
  p_twin_id uuid, p_last_event_id bigint, p_learning_time timestamptz,
  p_half_life_days double precision, p_feedback_weight double precision,
  p_audit_weight double precision, p_unsafe_multiplier double precision
)
returns table (module_id uuid, success double precision, failure double precision)
language plpgsql
stable
set search_path = ''
as $$
#variable_conflict use_column
declare
  v_t_epoch float8 := date_part('epoch', p_learning_time);
  v_rate float8 := ln(2::float8) / (p_half_life_days * 86400);
begin
  -- Every module from scratch, over the twin's evidence up to p_last_event_id as it stands
  -- there (a vote replaced by a later vote after it still counts; that later vote's run
  -- retracts it), decayed to p_learning_time. The weights are summed per match key first (a
  -- handful of groups), then matched to the modules: one pass of an aggregate over the rows.
  -- Each weight's decay is exp(least(0, t - T) * ln 2 / H) with t and T in epoch seconds: the
  -- same 2^(-(T - t)/H) as a batch's, without an interval per row.
  return query
  with per_key as (
    select g.by_key, g.key, sum(g.success) as success, sum(g.failure) as failure
    from (
      -- The current votes and the audits that did not audit a draft.
      select c.module_key is not null as by_key, coalesce(c.module_key, c.intent_label) as key,
             coalesce(sum(c.weight) filter (where c.success), 0) as success,
             coalesce(sum(c.weight) filter (where not c.success), 0) as failure
      from (
        select e.module_key, e.intent_label, coalesce(e.score > 0, e.passed) as success,
               case when e.source = 'user_feedback' then p_feedback_weight
                    else p_audit_weight end
               * case when e.reason = 'unsafe' and not coalesce(e.score > 0, e.passed)
                      then p_unsafe_multiplier else 1 end
               * exp(least(0, date_part('epoch', e.created_at) - v_t_epoch) * v_rate) as weight
        from public.persona_training_events e
        where e.twin_id = p_twin_id and e.id <= p_last_event_id
          and e.superseded_at is null and not e.audit_of_draft
          and (e.source = 'persona_audit' or e.score <> 0)
      ) c
      group by 1, 2
      union all
      -- Votes replaced only after p_last_event_id (one primary-key lookup per later vote).
      select c.module_key is not null, coalesce(c.module_key, c.intent_label),
             coalesce(sum(c.weight) filter (where c.success), 0),
             coalesce(sum(c.weight) filter (where not c.success), 0)
      from (
        select p.module_key, p.intent_label, coalesce(p.score > 0, p.passed) as success,
               case when p.source = 'user_feedback' then p_feedback_weight
                    else p_audit_weight end
               * case when p.reason = 'unsafe' and not coalesce(p.score > 0, p.passed)
                      then p_unsafe_multiplier else 1 end
               * exp(least(0, date_part('epoch', p.created_at) - v_t_epoch) * v_rate) as weight
        from public.persona_training_events n
        cross join lateral (
          select r.* from public.persona_training_events r where r.id = n.supersedes_id offset 0
        ) p
        where n.twin_id = p_twin_id and n.id > p_last_event_id
          and n.supersedes_id is not null
          and p.id <= p_last_event_id and not p.audit_of_draft
          and (p.source = 'persona_audit' or p.score <> 0)
      ) c
      group by 1, 2
    ) g
    group by 1, 2
  )
  -- A module takes the group of its key and the group of its intent label.
  select m.id, coalesce(sum(k.success), 0)::float8, coalesce(sum(k.failure), 0)::float8
  from public.persona_modules m
  left join per_key k on k.key = case when k.by_key then m.module_key else m.intent_label end
  where m.twin_id = p_twin_id
  group by m.id;
end;
$$;

comment on function private.rebuild_module_counts(
  uuid, bigint, timestamptz, double precision, double precision, double precision,
  double precision
) is
  'The exact learning path (claim_learning_run_events of a marked twin). In: a twin, the last '
  'event id to count, the time T, half_life_days H, feedback_weight, audit_weight, '
  'unsafe_multiplier. Out: one row per module of the twin (module_id, success, failure): the sum '
  'over the twin''s events up to that id that are current there (not superseded, or superseded '
  'only by a later event), feedback with a score other than 0 and audits that did not audit a '
  'draft, matched by module_key if given, else by intent_label, each weighing w * 2^(-(T - t)/H) '
  '(DESIGN.md, Learning; age at least 0) with w the source''s weight, times unsafe_multiplier for '
  'an unsafe failure. Raises nothing.';

grant execute on function private.rebuild_module_counts(
  uuid, bigint, timestamptz, double precision, double precision, double precision,
  double precision
) to service_role;
revoke execute on function private.rebuild_module_counts(
  uuid, bigint, timestamptz, double precision, double precision, double precision,
  double precision
) from public;

-- The claim: the batch's evidence as before, or every module rebuilt when the twin is marked.
create or replace function public.claim_learning_run_events(p_run_id uuid, p_lease_token uuid)
returns jsonb
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_settings public.persona_learning_settings;
  v_draft public.persona_specs;
  v_baseline_id uuid;
  v_scanned integer;
  v_unmatched integer;
  v_evidence jsonb;
  v_audits jsonb;
  v_generation bigint;
  v_rebuild boolean;
  v_modules jsonb;
begin
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  select * into strict v_settings from public.persona_learning_settings s
  where s.twin_id = v_run.twin_id;
  -- Read before the evidence: a change committed after this read bumps the generation, and the
  -- completion then refuses (PT412) rather than learn from what this claim saw.
  select t.evidence_generation, t.evidence_generation <> t.learned_generation
  into strict v_generation, v_rebuild
  from public.twins t where t.id = v_run.twin_id;

  -- One streaming pass over the batch: each vote's decayed weight (a vote that replaced an earlier
  -- one also retracts that one), matched to its modules (by module_key if given, else by
  -- intent_label; an unmatched vote lands in the null group), summed per module.
  with targets as (
    select true as by_key, m.module_key as key, m.id as module_id
    from public.persona_modules m where m.twin_id = v_run.twin_id
    union all
    select false, m.intent_label, m.id
    from public.persona_modules m where m.twin_id = v_run.twin_id
  ),
  votes as (
    select 1.0::float8 as sign, e.source, e.module_key, e.intent_label, e.score, e.passed,
           e.reason, e.created_at, e.audit_of_draft
    from public.persona_training_events e
    where e.twin_id = v_run.twin_id
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
    union all
    select -1.0::float8, p.source, p.module_key, p.intent_label, p.score, p.passed,
           p.reason, p.created_at, p.audit_of_draft
    from public.persona_training_events e
    -- One primary-key lookup per vote change (offset 0 keeps the planner from hashing the
    -- whole table instead).
    cross join lateral (
      select r.* from public.persona_training_events r where r.id = e.supersedes_id offset 0
    ) p
    where e.twin_id = v_run.twin_id and e.supersedes_id is not null
      and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id
  ),
  weighted as (
    select t.module_id, v.sign,
           coalesce(v.score > 0, v.passed) as success,
           v.sign
           * case
               when v.source = 'user_feedback' and v.score = 0 then 0
               when v.audit_of_draft then 0
               when v.source = 'user_feedback' then v_settings.feedback_weight
               else v_settings.audit_weight
             end
           * case
               when not coalesce(v.score > 0, v.passed) and v.reason = 'unsafe'
                 then v_settings.unsafe_multiplier
               else 1
             end
           * exp(-ln(2::float8)
                 * greatest(0, date_part('epoch', v_run.learning_time - v.created_at))
                 / (v_settings.half_life_days * 86400)) as weight
    from votes v
    left join targets t
      on t.by_key = (v.module_key is not null) and t.key = coalesce(v.module_key, v.intent_label)
  ),
  per_module as (
    select w.module_id,
           coalesce(sum(w.weight) filter (where w.success), 0) as success,
           coalesce(sum(w.weight) filter (where not w.success), 0) as failure,
           count(*) filter (where w.sign > 0) as events
    from weighted w
    group by w.module_id
  )
  select
    coalesce((select p.events from per_module p where p.module_id is null), 0),
    coalesce((select jsonb_agg(jsonb_build_object(
        'module_id', p.module_id, 'success', p.success, 'failure', p.failure))
      from per_module p where p.module_id is not null), '[]')
  into v_unmatched, v_evidence;

  if v_rebuild then
    -- The exact path: every module from scratch (private.rebuild_module_counts), the batch's
    -- evidence in it, so none is added on top.
    select jsonb_agg(jsonb_build_object(
        'module_id', m.id, 'module_key', m.module_key, 'intent_label', m.intent_label,
        'success', r.success, 'failure', r.failure, 'evidence_at', v_run.learning_time,
        'confidence', m.confidence, 'status', m.status) order by m.module_key)
    into v_modules
    from private.rebuild_module_counts(
      v_run.twin_id, v_run.batch_last_event_id, v_run.learning_time,
      v_settings.half_life_days, v_settings.feedback_weight, v_settings.audit_weight,
      v_settings.unsafe_multiplier
    ) r
    join public.persona_modules m on m.id = r.module_id;
    v_evidence := '[]';
  else
    select jsonb_agg(jsonb_build_object(
        'module_id', m.id, 'module_key', m.module_key, 'intent_label', m.intent_label,
        'success', m.success_weight, 'failure', m.failure_weight, 'evidence_at', m.evidence_at,
        'confidence', m.confidence, 'status', m.status) order by m.module_key)
    into v_modules
    from public.persona_modules m where m.twin_id = v_run.twin_id;
  end if;

  -- The batch's size, from the index alone.
  select count(*) into v_scanned
  from public.persona_training_events e
  where e.twin_id = v_run.twin_id
    and e.id > v_run.batch_after_event_id and e.id <= v_run.batch_last_event_id;

  update public.persona_feedback_learning_runs r
  set events_scanned = v_scanned, events_unmatched = v_unmatched,
      evidence_generation = v_generation, rebuilt_modules = v_rebuild
  where r.id = v_run.id;

  select * into v_draft from public.persona_specs s
  where s.twin_id = v_run.twin_id and s.status = 'draft'
  order by s.version desc
  limit 1;
  select s.id into v_baseline_id from public.persona_specs s
  where s.twin_id = v_run.twin_id and s.status = 'published';

  -- The gate's evidence: the latest audit of every trace audited under the candidate (the latest
  -- draft), paired with the baseline's (published spec's) latest audit of the same trace: all
  -- audits of both specs, not only this batch's. Driven by the candidate's audits, through the
  -- audit index, so it costs the same whatever the twin's history. No stored created_at is in
  -- the future (private.bound_event_created_at), so a skewed clock cannot make an audit latest.
  if v_draft.id is null then
    v_audits := jsonb_build_object(
      'pairs', 0, 'candidate_only_passed', 0, 'baseline_only_passed', 0,
      'candidate_audited', 0, 'candidate_passed', 0, 'candidate_unsafe_failures', 0);
  else
    with candidate as (
      select distinct on (e.trace_id) e.trace_id, e.passed
      from public.persona_training_events e
      where e.persona_spec_id = v_draft.id and e.source = 'persona_audit'
      order by e.trace_id, e.created_at desc, e.id desc
    ),
    paired as (
      select c.passed, b.passed as baseline_passed
      from candidate c
      left join lateral (
        select e.passed from public.persona_training_events e
        where e.persona_spec_id = v_baseline_id and e.trace_id = c.trace_id
          and e.source = 'persona_audit'
        order by e.created_at desc, e.id desc
        limit 1
      ) b on true
    )
    select jsonb_build_object(
      'pairs', count(p.baseline_passed),
      'candidate_only_passed', count(*) filter (where p.passed and not p.baseline_passed),
      'baseline_only_passed', count(*) filter (where not p.passed and p.baseline_passed),
      'candidate_audited', count(*),
      'candidate_passed', count(*) filter (where p.passed),
      'candidate_unsafe_failures', (
        select count(*) from public.persona_training_events e
        where e.persona_spec_id = v_draft.id and e.source = 'persona_audit'
          and not e.passed and e.reason = 'unsafe'
      )
    )
    into v_audits
    from paired p;
  end if;

  return jsonb_build_object(
    'run', to_jsonb(v_run) - 'lease_token',
    'learning_time', v_run.learning_time,
    'events_scanned', v_scanned,
    'events_unmatched', v_unmatched,
    'rebuilt_modules', v_rebuild,
    'settings', to_jsonb(v_settings),
    'modules', coalesce(v_modules, '[]'),
    'evidence', v_evidence,
    'draft_spec_id', v_draft.id,
    'draft_modules', coalesce(v_draft.spec -> 'modules', '[]'),
    'baseline_spec_id', v_baseline_id,
    'audits', v_audits
  );
end;
$$;

comment on function public.claim_learning_run_events(uuid, uuid) is
  'Worker. In: a run id and its lease token. Reads the run''s batch and records events_scanned, '
  'events_unmatched, evidence_generation and rebuilt_modules on the run. Out: jsonb {run (without '
  'lease_token), learning_time T, events_scanned, events_unmatched, rebuilt_modules, settings, '
  'modules [{module_id, module_key, intent_label, success, failure, evidence_at, confidence, '
  'status}], evidence [{module_id, success, failure}] (the batch''s decayed weight per module), '
  'draft_spec_id, draft_modules, baseline_spec_id, audits {pairs, candidate_only_passed, '
  'baseline_only_passed, candidate_audited, candidate_passed, candidate_unsafe_failures} (latest '
  'audit per trace of the latest draft, paired with the published spec''s)}. Incremental when the '
  'twin''s evidence_generation equals its learned_generation; otherwise (rebuilt_modules) every '
  'module''s success/failure is recomputed from the twin''s evidence up to the batch''s end, '
  'evidence_at = T, and evidence is empty. Each vote weighs w * 2^(-(T - t)/H) (DESIGN.md, '
  'Learning), computed as exp(-ln 2 * age / (half_life_days * 86400)) with the age T - t in '
  'seconds (at least 0): w = feedback_weight or audit_weight (0 for a neutral vote and for an '
  'audit of a draft), times unsafe_multiplier for an unsafe failure; a vote that supersedes '
  'another also retracts that one with the same formula. Raises P0002 and PT409 (HTTP 409, stale '
  'lease) as private.lock_leased_run.';


-- The completion: as before, and only at the evidence generation its claim read.
create or replace function public.complete_learning_run(
  p_run_id uuid, p_lease_token uuid, p_result jsonb
)
returns public.persona_feedback_learning_runs
language plpgsql
set search_path = ''
as $$
declare
  v_run public.persona_feedback_learning_runs;
  v_publish_spec_id uuid;
  v_gate_passed boolean;
  v_given integer;
  v_applied integer;
  v_changed integer;
  v_twin public.twins;
begin
  v_run := private.lock_leased_run(p_run_id, p_lease_token);
  if v_run.events_scanned is null then
    raise exception using errcode = '55000',
      message = format('run %s has not read its batch (claim_learning_run_events)', p_run_id);
  end if;
  if p_result is null or jsonb_typeof(p_result -> 'module_updates') is distinct from 'array'
     or jsonb_typeof(p_result -> 'gate_passed') is distinct from 'boolean'
     or jsonb_typeof(p_result -> 'gate_report') is distinct from 'object' then
    raise exception using errcode = '22023',
      message = 'p_result needs module_updates (array), gate_passed (boolean), gate_report (object)';
  end if;
  v_gate_passed := (p_result ->> 'gate_passed')::boolean;
  v_publish_spec_id := (p_result ->> 'publish_spec_id')::uuid;

  -- Processing the batch is moving the twin's cursor over it, at the evidence generation the
  -- claim read: a deletion or a module edit committed since (it waits for this row lock, or
  -- this update re-reads the row it committed) makes the run read its batch again (PT412).
  update public.twins t
  set learned_through_event_id = v_run.batch_last_event_id,
      learned_generation = v_run.evidence_generation
  where t.id = v_run.twin_id and t.learned_through_event_id = v_run.batch_after_event_id
    and t.evidence_generation = v_run.evidence_generation
  returning * into v_twin;
  if v_twin.id is null then
    select * into v_twin from public.twins t where t.id = v_run.twin_id;
    if v_twin.learned_through_event_id is distinct from v_run.batch_after_event_id then
      raise exception using errcode = '40001',
        message = format('run %s: the twin''s cursor moved since the batch was claimed', p_run_id);
    end if;
    -- PT412 (HTTP 412), not 40001: PostgREST retries a serialization failure itself, after
    -- backoff, by which time the lease may be gone; the worker reads the batch again at once.
    raise exception using errcode = 'PT412',
      message = format('run %s: the twin''s evidence or modules changed since the batch was read '
                       '(generation %s, now %s); read the batch again', p_run_id,
                       v_run.evidence_generation, v_twin.evidence_generation);
  end if;

  with updates as (
    select u.*
    from jsonb_to_recordset(p_result -> 'module_updates')
      as u(module_id uuid, success float8, failure float8, confidence float8,
            status public.persona_module_status)
  ),
  history as (
    insert into public.persona_module_changes (
      module_id, twin_id, run_id, confidence_before, confidence_after, status_before, status_after,
      success_weight, failure_weight
    )
    select m.id, m.twin_id, v_run.id, m.confidence, u.confidence, m.status, u.status,
           u.success, u.failure
    from updates u
    join public.persona_modules m on m.id = u.module_id and m.twin_id = v_run.twin_id
    where abs(m.confidence - u.confidence) > 1e-12 or m.status <> u.status
    returning 1
  ),
  applied as (
    update public.persona_modules m
    set success_weight = u.success, failure_weight = u.failure, confidence = u.confidence,
        status = u.status, evidence_at = v_run.learning_time
    from updates u
    where m.id = u.module_id and m.twin_id = v_run.twin_id
    returning 1
  )
  select (select count(*) from updates), (select count(*) from applied), (select count(*) from history)
  into v_given, v_applied, v_changed;
  if v_given <> v_applied then
    raise exception using errcode = '22023',
      message = format('run %s: %s of %s module updates name no module of twin %s',
                       p_run_id, v_given - v_applied, v_given, v_run.twin_id);
  end if;
  if v_publish_spec_id is not null then
    if v_run.safe_mode then
      raise exception using errcode = '55000',
        message = format('run %s is in safe mode and may not publish', p_run_id);
    end if;
    if not v_gate_passed then
      raise exception using errcode = '55000',
        message = format('run %s: the gate did not pass; spec %s may not be published',
                         p_run_id, v_publish_spec_id);
    end if;
    if v_publish_spec_id is distinct from (
      select s.id from public.persona_specs s
      where s.twin_id = v_run.twin_id and s.status = 'draft'
      order by s.version desc limit 1
    ) then
      raise exception using errcode = '55000',
        message = format('run %s: spec %s is not the latest draft of twin %s',
                         p_run_id, v_publish_spec_id, v_run.twin_id);
    end if;
    update public.persona_specs s set status = 'archived'
    where s.twin_id = v_run.twin_id and s.status = 'published';
    update public.persona_specs s set status = 'published'
    where s.id = v_publish_spec_id;
  end if;

  update public.persona_feedback_learning_runs r
  set status = 'completed', finished_at = now(), lease_token = null, lease_expires_at = null,
      events_processed = v_run.events_scanned, modules_updated = v_changed,
      gate_passed = v_gate_passed, gate_report = p_result -> 'gate_report',
      publish_decision = case when v_publish_spec_id is null then 'held'
                              else 'published' end::public.learning_run_publish_decision,
      hold_reason = case when v_publish_spec_id is null
                         then coalesce(p_result ->> 'hold_reason', 'gate_failed')
                         end::public.learning_run_hold_reason,
      published_spec_id = v_publish_spec_id, error = null
  where r.id = v_run.id
  returning * into v_run;
  return v_run;
end;
$$;

comment on function public.complete_learning_run(uuid, uuid, jsonb) is
  'Worker. In: a run id, its lease token and p_result {module_updates [{module_id, success, '
  'failure, confidence, status}], gate_passed, gate_report, '
  'publish_spec_id (uuid or null), hold_reason}. In one transaction: moves the twin''s cursor '
  'over the batch and sets its learned_generation to the run''s evidence_generation, applies the '
  'module updates (recording each change of confidence or status in persona_module_changes), '
  'publishes the draft (the published spec archived) when publish_spec_id is set, and completes '
  'the run with its figures (events_processed = the batch''s events, all still there). Out: the '
  'completed run. Raises P0002 and PT409 (HTTP 409, stale lease) as private.lock_leased_run; '
  '55000 when the batch was not read yet, or publishing in safe mode, after a failed gate, or a '
  'spec that is not the latest draft; 22023 when p_result lacks module_updates (array), '
  'gate_passed (boolean) or gate_report (object), or an update names no module of the twin; '
  '22P02 for a status or hold_reason outside its enum; 40001 when the twin''s cursor '
  'moved since the claim; PT412 (HTTP 412) "run <id>: the twin''s evidence or modules changed '
  'since the batch was read ..." when its evidence_generation changed (events deleted or '
  'edited, modules added, edited or deleted) since the claim read the batch. Nothing changes '
  'when it raises.';


-- The scheduler: twins whose modules must be rebuilt are due too.
-- Queues a scheduled run for every twin with unprocessed evidence, or whose modules must be
-- rebuilt, and no run queued or running.
create or replace function public.enqueue_due_learning_runs(p_twin_id uuid default null)
returns setof public.persona_feedback_learning_runs
language sql
set search_path = ''
as $$
  insert into public.persona_feedback_learning_runs (twin_id, trigger, safe_mode, max_attempts)
  select t.id, 'schedule', not s.auto_publish, s.max_attempts
  from public.twins t
  join public.persona_learning_settings s on s.twin_id = t.id
  where (p_twin_id is null or t.id = p_twin_id)
    and (
      exists (
        select 1 from public.persona_training_events e
        where e.twin_id = t.id and e.id > t.learned_through_event_id
      )
      -- Evidence deleted or edited, or modules edited, since the last run: rebuild them.
      or t.evidence_generation <> t.learned_generation
    )
    and not exists (
      select 1 from public.persona_feedback_learning_runs r
      where r.twin_id = t.id and r.status in ('queued', 'running')
    )
  on conflict do nothing
  returning *;
$$;

comment on function public.enqueue_due_learning_runs(uuid) is
  'Worker (scheduler). In: a twin id, or null for every twin. Out: the runs it queued (trigger '
  'schedule, safe_mode = not the twin''s auto_publish, max_attempts from its settings): one per '
  'twin with an event after its cursor (learned_through_event_id), or whose evidence_generation '
  'differs from its learned_generation (modules to rebuild), and no run queued or running. '
  'Raises nothing; an unknown twin queues nothing.';

-- Every twin is rebuilt once by its next run: audit_of_draft was just derived for old audits.
update public.twins t set evidence_generation = t.evidence_generation + 1
where t.learned_through_event_id > 0;

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  private.bound_event_created_at(),
  private.mark_audit_of_draft(),
  private.bump_evidence_generation_on_delete(),
  private.bump_evidence_generation_on_edit(),
  private.bump_evidence_generation_on_module_edit(),
  private.event_processing(bigint)
from public;
