-- Section: persona modules and the history of how each one moved.
--
-- Keys and intent labels are slugs: a lowercase letter, then up to 63 lowercase letters, digits
-- or underscores. Each check says so as "at most 64 characters, then ^[a-z][a-z0-9_]*$": the same
-- strings as ^[a-z][a-z0-9_]{0,63}$, whose bounded repeat makes each match about ten times
-- slower. The pattern is written into each check: a function there would not be inlined (it
-- pins its search_path) and would cost every insert a call.

create type public.persona_module_status as enum
  ('insufficient_data', 'probation', 'active', 'disabled');
comment on type public.persona_module_status is
  'A module''s standing from the Wilson bounds of its evidence: insufficient_data, probation, '
  'active or disabled.';

create table public.persona_modules (
  id uuid primary key default gen_random_uuid(),
  twin_id uuid not null references public.twins (id) on delete cascade,
  module_key text not null
    constraint module_key_slug
    check (char_length(module_key) <= 64 and module_key ~ '^[a-z][a-z0-9_]*$'),
  intent_label text not null
    constraint intent_label_slug
    check (char_length(intent_label) <= 64 and intent_label ~ '^[a-z][a-z0-9_]*$'),
  description text
    constraint description_at_most_2000_chars check (char_length(description) <= 2000),
  confidence double precision not null default 0.5
    constraint confidence_0_to_1 check (confidence between 0 and 1),
  status public.persona_module_status not null default 'insufficient_data',
  success_weight double precision not null default 0
    constraint success_weight_not_negative check (success_weight >= 0),
  failure_weight double precision not null default 0
    constraint failure_weight_not_negative check (failure_weight >= 0),
  evidence_at timestamptz,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  constraint persona_modules_twin_module_key_key unique (twin_id, module_key)
);

comment on table public.persona_modules is
  'Capabilities of a twin, each serving one intent, with the confidence learned from evidence.';
comment on column public.persona_modules.confidence is
  'Posterior mean of success with a Beta(1,1) prior: (s + 1) / (s + f + 2).';
comment on column public.persona_modules.status is
  'insufficient_data, probation, active or disabled, from the Wilson bounds of the evidence.';
comment on column public.persona_modules.success_weight is
  'Weighted, decayed successes (s) as of evidence_at.';
comment on column public.persona_modules.failure_weight is
  'Weighted, decayed failures (f) as of evidence_at.';
comment on column public.persona_modules.evidence_at is
  'The time the weights refer to: the time of the last run that learned for this module.';

create index persona_modules_twin_intent_idx on public.persona_modules (twin_id, intent_label);

create trigger persona_modules_touch_updated_at before update on public.persona_modules
  for each row execute function private.touch_updated_at();

-- The exact learning path's marker (see 400_training_events.sql): a module added, edited or
-- deleted makes the twin's next run rebuild its modules.
create function private.bump_evidence_generation_on_module_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- Always a new generation, so that a run whose claim read the modules before this edit
  -- committed is refused at its completion (PT412) and reads them again, even when this
  -- transaction began before the run (it could not see it). A twin with nothing learned is
  -- exact at zero whatever its modules: its learned_generation moves along, so its next run
  -- learns incrementally rather than rebuilding.
  update public.twins t
  set evidence_generation = t.evidence_generation + 1,
      learned_generation = t.learned_generation
        + case when t.learned_through_event_id = 0
                    and t.learned_generation = t.evidence_generation then 1 else 0 end
  where t.id in (old.twin_id, new.twin_id);
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_module_edit() is
  'Trigger (after insert, update of key, intent or twin, or delete on persona_modules): bumps '
  'evidence_generation of the twin(s) of the old and new row, so that a running run reads its '
  'batch again (PT412 at its completion) and a twin with learned evidence has its modules '
  'rebuilt by its next run; a twin with nothing learned (learned_through_event_id 0, not '
  'already marked) has its learned_generation bumped too, as its modules are exact at zero. '
  'Security definer: whoever edits, the twin is marked. Raises nothing.';

create trigger persona_modules_bump_generation
  after insert or delete or update of twin_id, module_key, intent_label on public.persona_modules
  for each row execute function private.bump_evidence_generation_on_module_edit();

revoke execute on function private.bump_evidence_generation_on_module_edit() from public;

alter table public.persona_modules enable row level security;

create policy "Owners can read their twins' modules" on public.persona_modules
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));

grant select, insert, update, delete on public.persona_modules to service_role;
grant select on public.persona_modules to authenticated;


-- Its run_id references persona_feedback_learning_runs, declared with that table.
create table public.persona_module_changes (
  id bigint generated always as identity primary key,
  module_id uuid not null references public.persona_modules (id) on delete cascade,
  twin_id uuid not null references public.twins (id) on delete cascade,
  run_id uuid not null,
  confidence_before double precision not null,
  confidence_after double precision not null,
  status_before public.persona_module_status not null,
  status_after public.persona_module_status not null,
  success_weight double precision not null,
  failure_weight double precision not null,
  changed_at timestamptz not null default now()
);

comment on table public.persona_module_changes is
  'Every change of a module''s confidence or status, with the run that made it.';

create index persona_module_changes_module_idx on public.persona_module_changes (module_id, changed_at);
create index persona_module_changes_twin_idx on public.persona_module_changes (twin_id);
create index persona_module_changes_run_idx on public.persona_module_changes (run_id);

alter table public.persona_module_changes enable row level security;

create policy "Owners can read their twins' module changes" on public.persona_module_changes
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));

grant select, insert, update, delete on public.persona_module_changes to service_role;
grant select on public.persona_module_changes to authenticated;
