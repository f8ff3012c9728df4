-- Admission reads usage from `machine_usage` (0006) and no longer sums a
-- user's clusters; this covering index existed only for that sum and has the
-- same keys as `clusters_owner`, which serves the listings. One index entry
-- fewer for every cluster written.
DROP INDEX clusters_owner_usage;
