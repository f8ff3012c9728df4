-- admission_fits: the admission lock, then whether a whole batch of cluster
-- requests fits within every bound if all of them are admitted; when it
-- does not, it raises SQLSTATE OR002 and the API decides the batch request
-- by request instead (api/src/admission.rs: the exact path, with the
-- decision of api/src/quotas.rs).
--
-- The admission statement calls it before its inserts, so a batch that
-- fits is written and committed by that one statement, one round trip;
-- near a limit the statement fails before writing anything.
--
-- Why "fits" means the request-by-request decision admits every request:
-- that decision admits request i when its size is at most each of
--   - the user's limit minus the user's usage and the sizes admitted before
--     it for the same user: here, the user's usage plus all of the user's
--     requests is within the limit;
--   - the same for the user's group, when it has a limit;
--   - the machines available minus the sizes admitted before it, minus the
--     unused reservations of the other groups: here, the available
--     machines minus the whole batch cover the unused reservations of all
--     groups, the caller's own included, and a reservation's unused part
--     only shrinks as its group is admitted more.
-- Every user of the batch must be in the ledger (a user it cannot find is
-- refused there).
CREATE FUNCTION admission_fits(owners uuid[], sizes bigint[], provider text,
                               local_capacity bigint, default_quota bigint)
RETURNS boolean
LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    fits boolean;
BEGIN
    PERFORM pg_advisory_xact_lock(7263548129);
    WITH ledger AS (SELECT * FROM quota_ledger(owners, provider, local_capacity)),
         asked AS (SELECT a.owner, sum(a.size) AS machines
                   FROM unnest(owners, sizes) AS a (owner, size) GROUP BY a.owner),
         holders AS (SELECT u.id, u.group_id, u.usage,
                            COALESCE(u.quota, g.quota, default_quota) AS lim
                     FROM ledger u
                     LEFT JOIN ledger g ON g.kind = 'group' AND g.id = u.group_id
                     WHERE u.kind = 'user'),
         by_group AS (SELECT h.group_id, sum(a.machines) AS machines
                      FROM asked a JOIN holders h ON h.id = a.owner
                      WHERE h.group_id IS NOT NULL GROUP BY h.group_id)
    SELECT (SELECT count(*) FROM holders) = (SELECT count(*) FROM asked)
       AND NOT EXISTS (SELECT 1 FROM asked a JOIN holders h ON h.id = a.owner
                       WHERE h.usage + a.machines > h.lim)
       AND NOT EXISTS (SELECT 1 FROM by_group b
                       JOIN ledger g ON g.kind = 'group' AND g.id = b.group_id
                       WHERE g.quota IS NOT NULL AND g.usage + b.machines > g.quota)
       AND (SELECT usage FROM ledger WHERE kind = 'available') - (SELECT sum(machines) FROM asked)
           >= (SELECT COALESCE(sum(GREATEST(reserved - usage, 0)), 0) FROM ledger WHERE kind = 'group')
    INTO fits;
    IF NOT fits THEN
        RAISE EXCEPTION 'this batch of cluster requests must be decided request by request'
            USING ERRCODE = 'OR002';
    END IF;
    RETURN fits;
END
$$;
