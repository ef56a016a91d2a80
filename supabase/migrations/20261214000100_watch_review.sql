-- Section: the production watch, after a review (issue 14).

-- 1. Bounded watch and gate settings. watch_expire_days only had to be > 0, which NaN and
-- Infinity satisfy (NaN sorts above every number in PostgreSQL): one owner's NaN, Infinity or
-- 1e12 made the scheduler's make_interval fail (22008) for every twin, and that twin's runs
-- fail. Each float setting of the watch and gate now has an upper bound, which refuses NaN and
-- Infinity too (watch_margin, watch_alpha, gate_non_inferiority_margin and
-- gate_first_publish_min_lower_bound had one already; wilson_z, the gate's z, did not). The
-- watch's evidence counts are bounded by the 50,000 events a side claim_production_watch
-- counts: a larger watch_pass_evidence could never be reached. Rows over a new bound are
-- clamped to it first (NaN to the column's default), so the constraints can be added.
update public.persona_learning_settings s
set watch_expire_days = case when s.watch_expire_days = 'NaN' then 14
                             else least(s.watch_expire_days, 3650) end,
    watch_min_evidence = least(s.watch_min_evidence, 50000),
    watch_pass_evidence = least(s.watch_pass_evidence, 50000),
    wilson_z = case when s.wilson_z = 'NaN' then 1.96 else least(s.wilson_z, 10) end
where not (s.watch_expire_days <= 3650) or s.watch_min_evidence > 50000
   or s.watch_pass_evidence > 50000 or not (s.wilson_z <= 10);

alter table public.persona_learning_settings
  drop constraint watch_expire_days_positive,
  add constraint watch_expire_days_above_0_to_3650
    check (watch_expire_days > 0 and watch_expire_days <= 3650),
  drop constraint watch_min_evidence_at_least_1,
  add constraint watch_min_evidence_1_to_50000 check (watch_min_evidence between 1 and 50000),
  drop constraint watch_pass_evidence_at_least_1,
  add constraint watch_pass_evidence_1_to_50000 check (watch_pass_evidence between 1 and 50000),
  drop constraint wilson_z_positive,
  add constraint wilson_z_above_0_to_10 check (wilson_z > 0 and wilson_z <= 10);

comment on column public.persona_learning_settings.watch_expire_days is
  'A watch that has not concluded this many days after the publish expires (default 14; more '
  'than 0, at most 3650).';
comment on column public.persona_learning_settings.watch_min_evidence is
  'Votes and audits each side of a comparison (twin-wide or per module) needs to be judged '
  '(default 30; 1 to 50,000).';
comment on column public.persona_learning_settings.watch_pass_evidence is
  'The watch passes once the smaller side of the twin-wide comparison holds this much evidence '
  'with no regression found (default 400; 1 to 50,000: each side counts at most its latest '
  '50,000 events).';
comment on column public.persona_learning_settings.wilson_z is
  'z of the Wilson bounds (module status) and of the gate''s intervals (default 1.96; more than '
  '0, at most 10).';
