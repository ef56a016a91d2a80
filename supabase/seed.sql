-- Local demo data, applied by `supabase db reset` after the migrations (never by `db push`).
-- The demo twin keeps the id of the original proof run so its commands read the same.

insert into auth.users (id, email) values
  ('0a5e6b9e-0c3f-4f0a-9b7a-2f1d6c1e7a01', 'owner@demo.local'),
  ('0a5e6b9e-0c3f-4f0a-9b7a-2f1d6c1e7a02', 'app-user@demo.local');

insert into public.twins (id, owner_id, name, feedback_from) values
  ('5dd06bcb-9afa-4174-a9bf-308dcf4108c3', '0a5e6b9e-0c3f-4f0a-9b7a-2f1d6c1e7a01',
   'Demo twin', 'any_user');

insert into public.persona_modules (twin_id, module_key, intent_label, description) values
  ('5dd06bcb-9afa-4174-a9bf-308dcf4108c3', 'evidence_answers', 'factual_with_evidence',
   'Answers factual questions and cites its sources.'),
  ('5dd06bcb-9afa-4174-a9bf-308dcf4108c3', 'small_talk', 'casual_conversation',
   'Keeps a casual conversation in the persona''s voice.'),
  ('5dd06bcb-9afa-4174-a9bf-308dcf4108c3', 'career_advice', 'personal_advice',
   'Gives career advice drawn from the persona''s experience.');

insert into public.persona_specs (twin_id, status, published_at, spec) values
  ('5dd06bcb-9afa-4174-a9bf-308dcf4108c3', 'published', now(), jsonb_build_object(
    'name', 'Demo twin',
    'voice', 'warm, precise, cites sources',
    'modules', jsonb_build_array('evidence_answers', 'small_talk', 'career_advice')
  ));
