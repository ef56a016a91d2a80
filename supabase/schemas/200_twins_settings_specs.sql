-- Section: twins, their learning settings and their persona specs.
--
-- Closed sets of words are enum types and every other rule a check constraint named
-- <field>_<rule>, so that `\d`, the dashboard and generated types show them and an error names
-- the field and the rule (23514 with the constraint's name; 22P02 naming the enum type).

create type public.twin_feedback_from as enum ('owner', 'any_user');
comment on type public.twin_feedback_from is
  'Who may send feedback on a twin''s answers: only its owner, or any signed-in user.';

create table public.twins (
  id uuid primary key default gen_random_uuid(),
  owner_id uuid not null default auth.uid() references auth.users (id) on delete cascade,
  name text not null constraint name_1_to_200_chars check (char_length(name) between 1 and 200),
  feedback_from public.twin_feedback_from not null default 'owner',
  learned_through_event_id bigint not null default 0,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  evidence_generation bigint not null default 0,
  learned_generation bigint not null default 0
);

comment on table public.twins is 'An AI persona ("twin") owned by one user.';
comment on column public.twins.owner_id is 'The user who owns the twin; set from the caller''s JWT.';
comment on column public.twins.feedback_from is
  'Who may send feedback on the twin''s answers: only the owner, or any signed-in user.';
comment on column public.twins.learned_through_event_id is
  'Every training event of this twin with an id up to this one has been processed by a '
  'completed learning run; later ones wait for the next run.';
comment on column public.twins.evidence_generation is
  'Bumped by every change that the incremental path cannot follow: deleting learned (or '
  'in-flight) events, editing an event''s evidence, adding, editing or deleting a module.';
comment on column public.twins.learned_generation is
  'The evidence_generation the modules were last learned at by a completed run; when it differs, '
  'the next run rebuilds the twin''s modules from scratch.';

create index twins_owner_id_idx on public.twins (owner_id);

create trigger twins_touch_updated_at before update of name, feedback_from on public.twins
  for each row execute function private.touch_updated_at();

-- Security definer so that it can read twins the caller's own policies would hide.
create function private.is_twin_owner(p_twin_id uuid)
returns boolean
language sql
stable
security definer
set search_path = ''
as $$
  select exists (
    select 1 from public.twins t
    where t.id = p_twin_id and t.owner_id = (select auth.uid())
  );
$$;

comment on function private.is_twin_owner(uuid) is
  'Policies'' helper. In: a twin id. Out: true when the caller (auth.uid() of the JWT) owns that '
  'twin; false for another user''s twin, an unknown id, null, or no user. Security definer, so it '
  'sees twins the caller''s policies hide. Raises nothing.';

grant execute on function private.is_twin_owner(uuid) to authenticated, service_role;

-- The caller's twins, once per statement: policies say `twin_id = any ((select
-- private.owned_twin_ids())::uuid[])`, an init plan evaluated once, where a per-row call of
-- private.is_twin_owner costs ~28 us a row (measured: 960 rows of module changes, 27 ms).
create function private.owned_twin_ids()
returns uuid[]
language sql
stable
security definer
set search_path = ''
as $$
  select coalesce(array_agg(t.id), '{}')
  from public.twins t
  where t.owner_id = (select auth.uid());
$$;

comment on function private.owned_twin_ids() is
  'Policies'' helper. Out: the ids of the twins the caller (auth.uid() of the JWT) owns, as '
  'uuid[]; empty for no user or a user without twins. Select policies wrap it in a scalar '
  'subquery, so it runs once per statement. Security definer with search_path set. Raises nothing.';

grant execute on function private.owned_twin_ids() to authenticated, service_role;

alter table public.twins enable row level security;

create policy "Owners can read their twins" on public.twins
  for select to authenticated using (owner_id = (select auth.uid()));
create policy "Users can create twins they own" on public.twins
  for insert to authenticated with check (owner_id = (select auth.uid()));
create policy "Owners can update their twins" on public.twins
  for update to authenticated
  using (owner_id = (select auth.uid())) with check (owner_id = (select auth.uid()));

grant select, delete, insert, update on public.twins to service_role;
grant select on public.twins to authenticated;
grant insert (name, feedback_from), update (name, feedback_from) on public.twins to authenticated;


create type public.watch_mode as enum ('off', 'alert', 'auto');
comment on type public.watch_mode is
  'What the production watch does with a twin''s newly published spec: off (no watch), alert '
  '(record a regression; the default) or auto (roll the spec back in the run that finds it).';

-- Per-twin learning settings: one row per twin, created with the twin. Field names match the
-- worker's LearningSettings model.
create table public.persona_learning_settings (
  twin_id uuid primary key references public.twins (id) on delete cascade,
  auto_publish boolean not null default false,
  -- Each float setting has an upper bound, which refuses NaN and Infinity too (NaN sorts above
  -- every number in PostgreSQL).
  half_life_days double precision not null default 30
    constraint half_life_days_0_01_to_3650 check (half_life_days between 0.01 and 3650),
  feedback_weight double precision not null default 1
    constraint feedback_weight_0_to_1000 check (feedback_weight between 0 and 1000),
  audit_weight double precision not null default 2
    constraint audit_weight_0_to_1000 check (audit_weight between 0 and 1000),
  unsafe_multiplier double precision not null default 3
    constraint unsafe_multiplier_1_to_1000 check (unsafe_multiplier between 1 and 1000),
  min_evidence double precision not null default 10
    constraint min_evidence_0_to_1000000 check (min_evidence between 0 and 1000000),
  disable_upper_bound double precision not null default 0.35
    constraint disable_upper_bound_0_to_1 check (disable_upper_bound between 0 and 1),
  activate_lower_bound double precision not null default 0.6
    constraint activate_lower_bound_0_to_1 check (activate_lower_bound between 0 and 1),
  keep_active_lower_bound double precision not null default 0.5
    constraint keep_active_lower_bound_0_to_1 check (keep_active_lower_bound between 0 and 1),
  wilson_z double precision not null default 1.96
    constraint wilson_z_above_0_to_10 check (wilson_z > 0 and wilson_z <= 10),
  gate_min_pairs integer not null default 20
    constraint gate_min_pairs_1_to_100000 check (gate_min_pairs between 1 and 100000),
  gate_non_inferiority_margin double precision not null default 0.05
    constraint gate_non_inferiority_margin_0_to_1 check (gate_non_inferiority_margin between 0 and 1),
  gate_first_publish_min_lower_bound double precision not null default 0.8
    constraint gate_first_publish_min_lower_bound_0_to_1
    check (gate_first_publish_min_lower_bound between 0 and 1),
  gate_min_audited_traces integer not null default 20
    constraint gate_min_audited_traces_1_to_100000
    check (gate_min_audited_traces between 1 and 100000),
  max_batch_events integer not null default 100000,
  max_attempts integer not null default 3
    constraint max_attempts_1_to_100 check (max_attempts between 1 and 100),
  updated_at timestamptz not null default now(),
  max_clock_skew_seconds integer not null default 60
    constraint max_clock_skew_seconds_0_to_3600 check (max_clock_skew_seconds between 0 and 3600),
  rebuild_step_events integer not null default 500000,
  watch_mode public.watch_mode not null default 'alert',
  watch_margin double precision not null default 0.02
    constraint watch_margin_0_02_to_1 check (watch_margin between 0.02 and 1),
  watch_alpha double precision not null default 0.05
    constraint watch_alpha_1e_10_to_0_5 check (watch_alpha >= 1e-10 and watch_alpha <= 0.5),
  watch_min_evidence integer not null default 30
    constraint watch_min_evidence_30_to_50000 check (watch_min_evidence between 30 and 50000),
  watch_pass_evidence integer not null default 400
    constraint watch_pass_evidence_30_to_50000 check (watch_pass_evidence between 30 and 50000),
  watch_looks integer not null default 10
    constraint watch_looks_1_to_100 check (watch_looks between 1 and 100),
  watch_expire_days double precision not null default 14
    constraint watch_expire_days_above_0_to_3650
    check (watch_expire_days > 0 and watch_expire_days <= 3650),
  constraint keep_active_lower_bound_at_most_activate_lower_bound
    check (keep_active_lower_bound <= activate_lower_bound),
  -- Measured: README.md, "Hosted Supabase" (the worker within the API's timeouts).
  constraint max_batch_events_1_to_200000 check (max_batch_events between 1 and 200000),
  constraint rebuild_step_events_1_to_500000 check (rebuild_step_events between 1 and 500000),
  constraint watch_pass_evidence_at_least_watch_min_evidence
    check (watch_pass_evidence >= watch_min_evidence)
);

comment on table public.persona_learning_settings is
  'How the learning worker treats one twin''s evidence. Defaults follow DESIGN.md.';
comment on column public.persona_learning_settings.auto_publish is
  'Scheduled runs may publish a draft spec that passes the gate; otherwise they run in safe mode.';
comment on column public.persona_learning_settings.half_life_days is
  'Evidence loses half its weight every this many days (default 30; 0.01 to 3650: shorter '
  'underflows every weight older than a few hours to 0).';
comment on column public.persona_learning_settings.feedback_weight is
  'Weight of one feedback vote (default 1; 0 to 1000).';
comment on column public.persona_learning_settings.audit_weight is
  'Weight of one persona audit (default 2; 0 to 1000).';
comment on column public.persona_learning_settings.unsafe_multiplier is
  'Extra weight of a failure whose reason is unsafe (default 3; 1 to 1000).';
comment on column public.persona_learning_settings.min_evidence is
  'Weighted evidence a module needs before its status moves (default 10; 0 to 1,000,000).';
comment on column public.persona_learning_settings.gate_min_pairs is
  'Paired audited traces the gate needs to compare a draft with the published spec (default 20; '
  '1 to 100,000).';
comment on column public.persona_learning_settings.gate_min_audited_traces is
  'Audited traces a first publish needs (default 20; 1 to 100,000).';
comment on column public.persona_learning_settings.max_batch_events is
  'At most this many events (1 to 200,000) are claimed by one run; the rest wait for the next '
  'run. The bound keeps each worker call well inside the API''s 8 s statement timeout.';
comment on column public.persona_learning_settings.rebuild_step_events is
  'A rebuild of the twin''s modules (after evidence was deleted or modules edited) reads at most '
  'this many events (1 to 500,000) per worker call, so that each call stays well inside the '
  'API''s 8 s statement timeout however long the twin''s history.';
comment on column public.persona_learning_settings.wilson_z is
  'z of the Wilson bounds (module status) and of the gate''s intervals (default 1.96; more than '
  '0, at most 10).';
comment on column public.persona_learning_settings.max_clock_skew_seconds is
  'An event''s created_at (set by the service role) may be at most this many seconds ahead of '
  'the server''s clock; it is then stored as the server''s time. Further ahead is refused.';

comment on column public.persona_learning_settings.watch_mode is
  'Production watch of each newly published spec: off, alert (record a regression; default) or '
  'auto (the run that finds a regression publishes the previous spec again).';
comment on column public.persona_learning_settings.watch_margin is
  'A regression is a drop of the pass rate (new spec - replaced spec) beyond this (default 0.02; '
  '0.02 to 1: at 0 Newcombe''s interval calls a false regression more often than its share of '
  'watch_alpha, README "When the bound holds").';
comment on column public.persona_learning_settings.watch_alpha is
  'The chance of a false regression over a whole watch, all looks and comparisons (default '
  '0.05; 1e-10 to 0.5). Changed mid-watch, it changes the plan of the looks to come; what was '
  'spent stays spent.';
comment on column public.persona_learning_settings.watch_min_evidence is
  'Votes and audits each side of a comparison (twin-wide or per module) needs to be judged '
  '(default 30; 30 to 50,000: below 30 a side Newcombe''s interval does not hold its level, '
  'README "When the bound holds"). Within the twin-wide comparison a module enters with 10 a '
  'side.';
comment on column public.persona_learning_settings.watch_pass_evidence is
  'The watch passes once the smaller compared side of the twin-wide comparison of every kind in '
  'play (votes, audits) holds this much evidence with no regression found (default 400; 30 to '
  '50,000 and at least watch_min_evidence: each side counts at most its latest 50,000 '
  'events).';
comment on column public.persona_learning_settings.watch_looks is
  'Looks planned over watch_pass_evidence; runs between two looks test nothing (default 10).';
comment on column public.persona_learning_settings.watch_expire_days is
  'A watch that has not concluded this many days after the publish expires (default 14; more '
  'than 0, at most 3650).';


create trigger persona_learning_settings_touch_updated_at
  before update on public.persona_learning_settings
  for each row execute function private.touch_updated_at();

-- The exact learning path's marker for the weighting: a twin whose half-life, source weights or
-- unsafe multiplier change has its modules rebuilt with the new ones by its next run.
create function private.bump_evidence_generation_on_weighting_edit()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  -- As private.bump_evidence_generation_on_module_edit: always a new generation (a run that
  -- read the old weighting is refused at its completion), and learned_generation along with it
  -- for a twin with nothing learned.
  update public.twins t
  set evidence_generation = t.evidence_generation + 1,
      learned_generation = t.learned_generation
        + case when t.learned_through_event_id = 0
                    and t.learned_generation = t.evidence_generation then 1 else 0 end
  where t.id = new.twin_id;
  return null;
end;
$$;

comment on function private.bump_evidence_generation_on_weighting_edit() is
  'Trigger (after update of half_life_days, feedback_weight, audit_weight or unsafe_multiplier '
  'on persona_learning_settings, when one changes): bumps the twin''s evidence_generation, so '
  'that a running run reads its batch again (PT412 at its completion) and a twin with learned '
  'evidence has every module rebuilt with the new weighting by its next run; a twin with nothing '
  'learned (learned_through_event_id 0, not already marked) has its learned_generation bumped '
  'too. Security definer: the owner may tune the settings but not write the twin''s generation. '
  'Raises nothing.';

create trigger persona_learning_settings_bump_generation
  after update of half_life_days, feedback_weight, audit_weight, unsafe_multiplier
  on public.persona_learning_settings
  for each row
  when (old.half_life_days is distinct from new.half_life_days
        or old.feedback_weight is distinct from new.feedback_weight
        or old.audit_weight is distinct from new.audit_weight
        or old.unsafe_multiplier is distinct from new.unsafe_multiplier)
  execute function private.bump_evidence_generation_on_weighting_edit();

revoke execute on function private.bump_evidence_generation_on_weighting_edit() from public;

create function private.create_default_learning_settings()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  insert into public.persona_learning_settings (twin_id) values (new.id);
  return new;
end;
$$;

comment on function private.create_default_learning_settings() is
  'Trigger (after insert on twins): gives the new twin its settings row with every default. '
  'Security definer: the twin''s creator may not insert settings. Raises nothing of its own.';

create trigger twins_create_learning_settings after insert on public.twins
  for each row execute function private.create_default_learning_settings();

alter table public.persona_learning_settings enable row level security;

create policy "Owners can read their twins' learning settings" on public.persona_learning_settings
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));
create policy "Owners can change their twins' learning settings" on public.persona_learning_settings
  for update to authenticated
  using (private.is_twin_owner(twin_id)) with check (private.is_twin_owner(twin_id));

-- No delete: a twin's settings row lives and dies with the twin (every run reads it).
grant select, insert, update on public.persona_learning_settings to service_role;
grant select on public.persona_learning_settings to authenticated;
grant update (
  auto_publish, half_life_days, feedback_weight, audit_weight, unsafe_multiplier, min_evidence,
  disable_upper_bound, activate_lower_bound, keep_active_lower_bound, wilson_z, gate_min_pairs,
  gate_non_inferiority_margin, gate_first_publish_min_lower_bound, gate_min_audited_traces,
  max_batch_events, max_attempts
) on public.persona_learning_settings to authenticated;
grant update (
  watch_mode, watch_margin, watch_alpha, watch_min_evidence, watch_pass_evidence, watch_looks,
  watch_expire_days
) on public.persona_learning_settings to authenticated;


-- Persona specs: versioned documents; at most one published per twin.
create type public.persona_spec_status as enum ('draft', 'published', 'archived');
comment on type public.persona_spec_status is
  'A persona spec''s life: draft (editable by its owner), published (at most one per twin), '
  'archived.';

create table public.persona_specs (
  id uuid primary key default gen_random_uuid(),
  twin_id uuid not null references public.twins (id) on delete cascade,
  version integer not null,
  status public.persona_spec_status not null default 'draft',
  spec jsonb not null default '{}'::jsonb
    constraint spec_object_with_string_modules_at_most_256_kb check (
      jsonb_typeof(spec) = 'object'
      and (not spec ? 'modules' or jsonb_typeof(spec -> 'modules') = 'array')
      and not jsonb_path_exists(spec, '$.modules[*] ? (@.type() != "string")')
      and octet_length(spec::text) <= 262144
    ),
  created_by uuid default auth.uid() references auth.users (id) on delete set null,
  created_at timestamptz not null default now(),
  updated_at timestamptz not null default now(),
  published_at timestamptz,
  archived_at timestamptz,
  rolled_back_at timestamptz,
  rollback_reason text
    constraint rollback_reason_1_to_500_chars check (char_length(rollback_reason) between 1 and 500),
  constraint persona_specs_twin_version_key unique (twin_id, version),
  -- Lets training events reference a spec of their own twin only.
  constraint persona_specs_twin_id_id_key unique (twin_id, id),
  constraint rollback_reason_with_rolled_back_at
    check ((rolled_back_at is null) = (rollback_reason is null))
);

comment on table public.persona_specs is
  'Versioned persona documents of a twin. The worker publishes the latest draft when the gate passes.';
comment on column public.persona_specs.spec is
  'The persona document; spec->''modules'' lists the module keys it relies on.';
comment on column public.persona_specs.version is 'Per-twin version number, assigned on insert.';

comment on column public.persona_specs.rolled_back_at is
  'When the spec was rolled back (archived, the spec before it published again); null otherwise.';
comment on column public.persona_specs.rollback_reason is
  'Why it was rolled back: the production watch''s finding or the owner''s reason.';

create unique index persona_specs_one_published_idx on public.persona_specs (twin_id)
  where status = 'published';
create index persona_specs_created_by_idx on public.persona_specs (created_by);

create function private.number_persona_spec()
returns trigger
language plpgsql
security definer
set search_path = ''
as $$
begin
  select coalesce(max(s.version), 0) + 1 into new.version
  from public.persona_specs s where s.twin_id = new.twin_id;
  return new;
end;
$$;

comment on function private.number_persona_spec() is
  'Trigger (before insert on persona_specs): sets version to the twin''s highest version + 1 '
  '(1 for its first spec), whatever the insert said. Security definer: it reads specs the '
  'caller''s policies may hide. Two concurrent inserts for one twin: the second fails with 23505 '
  'on persona_specs_twin_version_key rather than sharing a number.';

create trigger persona_specs_number before insert on public.persona_specs
  for each row execute function private.number_persona_spec();

create function private.stamp_persona_spec_status()
returns trigger
language plpgsql
set search_path = ''
as $$
begin
  if new.status = 'published' and new.published_at is null then
    new.published_at := now();
  end if;
  if new.status = 'archived' and new.archived_at is null then
    new.archived_at := now();
  end if;
  return new;
end;
$$;

comment on function private.stamp_persona_spec_status() is
  'Trigger (before insert, or update of status, on persona_specs): sets published_at or '
  'archived_at to now() when the spec reaches that status and the time is not set yet, however '
  'it got there. Raises nothing.';

create trigger persona_specs_stamp_status before insert or update of status
  on public.persona_specs
  for each row execute function private.stamp_persona_spec_status();
create trigger persona_specs_touch_updated_at before update on public.persona_specs
  for each row execute function private.touch_updated_at();

alter table public.persona_specs enable row level security;

create policy "Owners can read their twins' specs" on public.persona_specs
  for select to authenticated using (twin_id = any ((select private.owned_twin_ids())::uuid[]));
create policy "Owners can create draft specs" on public.persona_specs
  for insert to authenticated
  with check (status = 'draft' and private.is_twin_owner(twin_id));
create policy "Owners can edit draft specs" on public.persona_specs
  for update to authenticated
  using (status = 'draft' and private.is_twin_owner(twin_id))
  with check (status = 'draft' and private.is_twin_owner(twin_id));

grant select, insert, update, delete on public.persona_specs to service_role;
grant select on public.persona_specs to authenticated;
grant insert (twin_id, spec), update (spec) on public.persona_specs to authenticated;

-- PostgreSQL lets PUBLIC execute every new function; only the grants above apply here.
revoke execute on function
  private.is_twin_owner(uuid),
  private.owned_twin_ids(),
  private.create_default_learning_settings(),
  private.number_persona_spec(),
  private.stamp_persona_spec_status()
from public;
