-- Section: the production watch after a third review (issue 14): watch_alpha has a floor; the
-- look clock follows the kind in play with the least compared evidence (worker/watch.py).

-- watch_alpha only had to be above 0: 5e-324 (the smallest float) was accepted, α/2 then rounds
-- to 0, the spending function's quantile is undefined, and every run of the twin failed. No
-- watch of a persona's traffic finds anything at a level below 1e-10 either. Rows below the
-- floor are raised to it first, so the constraint can be added.
update public.persona_learning_settings s
set watch_alpha = 1e-10
where s.watch_alpha < 1e-10;

alter table public.persona_learning_settings
  drop constraint watch_alpha_above_0_to_0_5,
  add constraint watch_alpha_1e_10_to_0_5 check (watch_alpha >= 1e-10 and watch_alpha <= 0.5);

comment on column public.persona_learning_settings.watch_alpha is
  'The chance of a false regression over a whole watch, all looks and comparisons (default '
  '0.05; 1e-10 to 0.5). Changed mid-watch, it changes the plan of the looks to come; what was '
  'spent stays spent.';

-- The watch's clock follows the kind in play (votes, audits) with the least compared evidence
-- (worker/watch.py, decide_watch): the last look needs every kind in play to reach it.
comment on column public.persona_learning_settings.watch_pass_evidence is
  'The watch passes once the smaller compared side of the twin-wide comparison of every kind in '
  'play (votes, audits) holds this much evidence with no regression found (default 400; 1 to '
  '50,000: each side counts at most its latest 50,000 events).';
