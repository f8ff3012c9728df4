-- Foreign keys that can never catch anything, dropped for what their checks
-- cost every cluster request (as 0005 did for the checkpoint writer).
--
-- A cluster request writes a task, a cluster and the owner's account in one
-- statement (api/src/admission.rs); each row's foreign keys were checked one
-- row at a time at the statement's end, six checks per request, each a
-- query with its own executor start-up and row lock: about a fifth of the
-- database's work for a submission (perf, docs/BENCHMARKS.md, session 13).
-- These five point at rows nothing deletes or at rows the same statement
-- inserts:
--   - users are never deleted (an account is disabled instead), so
--     tasks.user_id, clusters.owner_id and cluster_users.user_id cannot
--     dangle; every writer takes the id from the caller's key row, which
--     the admission statement reads again when the key was remembered;
--   - clusters are deleted only by admission withdrawing a refused request,
--     which deletes the request's task (with its run) and its accounts
--     first, so tasks.cluster_id and cluster_users.cluster_id cannot dangle
--     either; the accounts' cascade is now that explicit delete.
-- tasks.run_id stays: runs are purged, and their tasks go with them by
-- cascade. clusters.group_id stays (checked only for group members).
ALTER TABLE tasks DROP CONSTRAINT tasks_cluster_id_fkey;
ALTER TABLE tasks DROP CONSTRAINT tasks_user_id_fkey;
ALTER TABLE clusters DROP CONSTRAINT clusters_owner_id_fkey;
ALTER TABLE cluster_users DROP CONSTRAINT cluster_users_cluster_id_fkey;
ALTER TABLE cluster_users DROP CONSTRAINT cluster_users_user_id_fkey;
