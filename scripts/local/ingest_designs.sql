-- Other designs of the feedback table, measured beside persona_training_events by
-- `scripts/bench --cases ingest_designs` (case 4 with more tables). Created on the bench stack and
-- dropped when the case ends (the tables, and the schema bench_design that holds their helpers);
-- none of this is the product's schema. Run as the postgres superuser.
--
--   bench_design_no_fks            persona_training_events as it is (its declared rules, its
--                                  insert trigger, the vote recorder retargeted; its policies),
--                                  without its foreign keys
--   bench_design_lazy              no insert trigger: the declared rules as in the product, the
--                                  twin's consent in the insert policy (a refused twin calls a
--                                  function that raises its error), the outbox stamped by column
--                                  defaults, a plain (created_by, twin_id, trace_id, id) index in
--                                  place of the unique current-vote one and the created_by one; a
--                                  vote supersedes nothing when it is written. Foreign keys as in
--                                  the product
--   bench_design_lazy_no_fks       bench_design_lazy without the foreign keys
--   bench_design_rules_in_trigger  the design before the rules were declared: text columns, no
--                                  check constraint but created_by's, every field rule checked by
--                                  one PL/pgSQL insert trigger that also checks consent, locks,
--                                  supersedes and stamps the outbox, and an update trigger that
--                                  checks the same rules on updates. Its indexes, policies and
--                                  foreign keys as in the product

create schema bench_design;
grant usage on schema bench_design to authenticated;

create view bench_design.twins as select id, owner_id, feedback_from from public.twins;
grant select on bench_design.twins to authenticated;

create function bench_design.refuse_twin(p_twin_id uuid)
returns boolean
language plpgsql
as $$
begin
  raise exception using errcode = '42501',
    message = format('twin_id: twin %s does not exist or does not accept feedback from this user',
                     p_twin_id);
end;
$$;

grant execute on function bench_design.refuse_twin(uuid) to authenticated;

do $$
declare
  v_table text;
begin
  foreach v_table in array array['bench_design_no_fks', 'bench_design_lazy',
                                 'bench_design_lazy_no_fks'] loop
    execute format('create table public.%I (like public.persona_training_events including all)',
                   v_table);
    execute format('alter table public.%I enable row level security', v_table);
    execute format('create policy "read" on public.%I for select to authenticated '
                   'using (created_by = (select auth.uid()) or private.is_twin_owner(twin_id))',
                   v_table);
    execute format('grant select on public.%I to authenticated', v_table);
    execute format('grant insert (twin_id, trace_id, score, reason, intent_label, module_key, '
                   'comment, metadata) on public.%I to authenticated', v_table);
  end loop;

  execute replace(replace(pg_get_functiondef('private.record_feedback_vote()'::regprocedure),
                          'private.record_feedback_vote', 'bench_design.no_fks_record_vote'),
                  'update public.persona_training_events p', 'update public.bench_design_no_fks p');
  if pg_get_functiondef('bench_design.no_fks_record_vote()'::regprocedure)
     not like '%update public.bench_design_no_fks p%' then
    raise exception 'private.record_feedback_vote changed: its supersede UPDATE was not retargeted';
  end if;
  -- The product's insert trigger (consent, then the vote's record).
  create trigger record_vote before insert on public.bench_design_no_fks
    for each row when (new.source = 'user_feedback')
    execute function bench_design.no_fks_record_vote();
  create policy "insert" on public.bench_design_no_fks for insert to authenticated
    with check (source = 'user_feedback' and created_by = (select auth.uid()));

  foreach v_table in array array['bench_design_lazy', 'bench_design_lazy_no_fks'] loop
    execute format('drop index public.%I, public.%I', v_table || '_twin_id_trace_id_created_by_idx',
                   v_table || '_created_by_idx');
    execute format('create index on public.%I (created_by, twin_id, trace_id, id)', v_table);
    execute format('alter table public.%I alter langfuse_status set default ''pending'', '
                   'alter langfuse_next_attempt_at set default now()', v_table);
    execute format($policy$
      create policy "insert" on public.%I for insert to authenticated with check (
        source = 'user_feedback' and created_by = (select auth.uid())
        and (exists (select 1 from bench_design.twins t
                     where t.id = twin_id
                       and (t.feedback_from = 'any_user' or t.owner_id = created_by))
             or bench_design.refuse_twin(twin_id))
      )$policy$, v_table);
  end loop;

  alter table public.bench_design_lazy
    add foreign key (twin_id) references public.twins (id) on delete cascade,
    add foreign key (created_by) references auth.users (id) on delete cascade,
    add foreign key (twin_id, persona_spec_id)
      references public.persona_specs (twin_id, id) on delete set null (persona_spec_id);
end;
$$;


-- bench_design_rules_in_trigger: the rules in a PL/pgSQL trigger instead of the catalog.

create table public.bench_design_rules_in_trigger (
  id bigint generated always as identity primary key,
  twin_id uuid not null references public.twins (id) on delete cascade,
  source text not null default 'user_feedback',
  trace_id text not null,
  intent_label text not null,
  module_key text,
  score smallint,
  passed boolean,
  reason text,
  comment text,
  metadata jsonb not null default '{}'::jsonb,
  persona_spec_id uuid,
  created_by uuid default auth.uid() references auth.users (id) on delete cascade
    check (source <> 'user_feedback' or created_by is not null),
  created_at timestamptz not null default now(),
  first_vote_id bigint,
  supersedes_id bigint,
  superseded_at timestamptz,
  langfuse_status text,
  langfuse_attempts integer not null default 0,
  langfuse_next_attempt_at timestamptz,
  langfuse_last_error text,
  langfuse_sent_at timestamptz,
  foreign key (twin_id, persona_spec_id)
    references public.persona_specs (twin_id, id) on delete set null (persona_spec_id)
);

create index on public.bench_design_rules_in_trigger (twin_id, id);
create index on public.bench_design_rules_in_trigger (created_by);
create unique index on public.bench_design_rules_in_trigger (twin_id, trace_id, created_by)
  where source = 'user_feedback' and superseded_at is null;
create index on public.bench_design_rules_in_trigger
  (persona_spec_id, trace_id, created_at desc, id desc) where source = 'persona_audit';
create index on public.bench_design_rules_in_trigger (langfuse_next_attempt_at, id)
  where langfuse_status in ('pending', 'retrying');

create function bench_design.prepare_rules_in_trigger()
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
      table = 'bench_design_rules_in_trigger',
      column = v_column,
      constraint = format('bench_design_rules_in_trigger_%s_check', v_column),
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

  perform pg_advisory_xact_lock(
    hashtext('public.bench_design_rules_in_trigger'),
    hashtext(format('%s/%s/%s', new.twin_id, new.created_by, new.trace_id))
  );
  update public.bench_design_rules_in_trigger p
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
  new.langfuse_next_attempt_at := case when v_previous_status = 'superseded'
                                       then greatest(new.created_at, v_previous_due_at)
                                       else new.created_at end;
  return new;
end;
$$;

revoke execute on function bench_design.prepare_rules_in_trigger() from public;

create trigger prepare before insert on public.bench_design_rules_in_trigger
  for each row execute function bench_design.prepare_rules_in_trigger();
create trigger check_update
  before update of source, trace_id, intent_label, module_key, score, passed, reason, comment,
    metadata, created_by, langfuse_status
  on public.bench_design_rules_in_trigger
  for each row execute function bench_design.prepare_rules_in_trigger();

alter table public.bench_design_rules_in_trigger enable row level security;
create policy "read" on public.bench_design_rules_in_trigger for select to authenticated
  using (created_by = (select auth.uid()) or private.is_twin_owner(twin_id));
create policy "insert" on public.bench_design_rules_in_trigger for insert to authenticated
  with check (source = 'user_feedback' and created_by = (select auth.uid()));
grant select on public.bench_design_rules_in_trigger to authenticated;
grant insert (twin_id, trace_id, score, reason, intent_label, module_key, comment, metadata)
  on public.bench_design_rules_in_trigger to authenticated;
