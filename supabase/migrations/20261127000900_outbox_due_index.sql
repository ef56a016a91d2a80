-- Section: the outbox claim reads its rows in index order.
--
-- claim_langfuse_outbox takes due rows `order by langfuse_next_attempt_at, id`. The index had the
-- due time alone, so rows sharing one (requeue_langfuse_outbox gives every requeued row the same
-- time) were sorted in full on every claim: with 200,000 requeued rows, 52 ms per claim of 100,
-- and a drain quadratic in the backlog. With the id in the key the claim is an index scan that
-- stops at its limit (0.1 ms for the same backlog).

drop index public.persona_training_events_langfuse_due_idx;
create index persona_training_events_langfuse_due_idx
  on public.persona_training_events (langfuse_next_attempt_at, id)
  where langfuse_status in ('pending', 'retrying');
