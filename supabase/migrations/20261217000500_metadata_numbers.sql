-- Metadata numbers: the size limit's documentation says how a number counts (issue 11).
--
-- The limit is measured on the stored jsonb written back compactly. jsonb keeps a number as a
-- numeric and writes it in plain decimal notation, so a number the client sent with an exponent
-- counts as written out (1e300 as 301 bytes). The constraint's comment said "numbers count as
-- written", which holds only for numbers JSON.stringify and json.dumps write without one.

comment on constraint metadata_object_at_most_4096_compact_json_bytes
  on public.persona_training_events is
  'A JSON object of at most 4,096 bytes as compact JSON in UTF-8: no whitespace between tokens, '
  'characters other than " \ and control characters unescaped (JSON.stringify, or Python '
  'json.dumps(m, separators=(",", ":"), ensure_ascii=False)); numbers count as stored, in plain '
  'decimal notation (1e3 counts as 1000, 1.5e-7 as 0.00000015), which is how JSON.stringify and '
  'json.dumps write every number between 1e-4 and 1e16.';
