-- Other designs of the feedback table, measured beside persona_training_events by
-- `scripts/bench --cases ingest_designs` (case 4 with more tables). Created on the bench stack and
-- dropped when the case ends (the three tables, and the schema bench_design that holds their
-- helpers); none of this is the product's schema. Run as the postgres superuser.
--
--   bench_design_no_fks       persona_training_events as it is (its trigger retargeted, its
--                             policies), without its foreign keys
--   bench_design_lazy         no insert trigger: the rules and the twin's consent in the insert
--                             policy (a broken rule calls a function that raises its error), the
--                             outbox stamped by column defaults, a plain (created_by, twin_id,
--                             trace_id, id) index in place of the unique current-vote one and the
--                             created_by one; a vote supersedes nothing when it is written. Foreign
--                             keys as in the product
--   bench_design_lazy_no_fks  bench_design_lazy without the foreign keys

create schema bench_design;
grant usage on schema bench_design to authenticated;

create view bench_design.twins as select id, owner_id, feedback_from from public.twins;
grant select on bench_design.twins to authenticated;

create function bench_design.refuse(p_column text, p_rule text)
returns boolean
language plpgsql
as $$
begin
  raise exception using errcode = '23514', column = p_column,
    message = format('%s: %s', p_column, p_rule);
end;
$$;

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

grant execute on function bench_design.refuse(text, text),
  bench_design.refuse_twin(uuid) to authenticated;

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

  execute replace(replace(pg_get_functiondef('private.prepare_training_event()'::regprocedure),
                          'private.prepare_training_event', 'bench_design.no_fks_prepare'),
                  'update public.persona_training_events p', 'update public.bench_design_no_fks p');
  if pg_get_functiondef('bench_design.no_fks_prepare()'::regprocedure)
     not like '%update public.bench_design_no_fks p%' then
    raise exception 'private.prepare_training_event changed: its supersede UPDATE was not retargeted';
  end if;
  create trigger prepare before insert on public.bench_design_no_fks
    for each row execute function bench_design.no_fks_prepare();
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
        and (coalesce(char_length(trace_id) between 1 and 200, true)
             or bench_design.refuse('trace_id', '1 to 200 characters'))
        and (coalesce(char_length(intent_label) <= 64 and intent_label ~ '^[a-z][a-z0-9_]*$', true)
             or bench_design.refuse('intent_label', 'a slug'))
        and (coalesce(char_length(module_key) <= 64 and module_key ~ '^[a-z][a-z0-9_]*$', true)
             or bench_design.refuse('module_key', 'a slug'))
        and (coalesce(score between -1 and 1, false)
             or bench_design.refuse('score', '-1, 0 or 1'))
        and (coalesce(reason in ('incorrect', 'unhelpful', 'off_persona', 'unsafe', 'outdated',
                                 'helpful', 'other'), true)
             or bench_design.refuse('reason', 'one of the reasons'))
        and (coalesce(char_length(comment) <= 2000, true)
             or bench_design.refuse('comment', 'at most 2000 characters'))
        and (coalesce(jsonb_typeof(metadata) = 'object' and octet_length(metadata::text) <= 4096,
                      true)
             or bench_design.refuse('metadata', 'a JSON object of at most 4096 bytes'))
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
