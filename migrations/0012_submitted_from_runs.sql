-- A run's `submitted` event is no longer a history row: it is the run's own
-- created_at and created_by, which workflows/src/store.rs `history` reads
-- as the first event. Every submission (an API request, a worker's child
-- run) wrote one more row and index entry for what the run row already
-- held. The rows written before this migration would show twice.
DELETE FROM run_history WHERE event = 'submitted';
