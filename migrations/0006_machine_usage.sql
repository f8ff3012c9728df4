-- Machine usage as counters, so admitting a cluster request reads a few rows
-- instead of summing every active cluster (which grew with the installation
-- and was read under the admission lock, api/src/quotas.rs).
--
-- One row per scope:
--   a user's id   machines held by the user's clusters in an active state
--                 (provisioning, running, terminating);
--   a group's id  the same for the clusters of the group;
--   the nil uuid  machines of every cluster still provisioning (the demand
--                 not yet backed by allocated machines is this minus the
--                 machines already allocated to those clusters).
CREATE TABLE machine_usage (
    scope       uuid   PRIMARY KEY,
    machines    bigint NOT NULL
);

-- Kept by a deferred trigger: it runs at commit, so a transaction holds the
-- counter rows only while it commits (the admission lock is already held
-- then), and the rows of one event are taken in one order (by scope, the nil
-- uuid first).
CREATE FUNCTION machine_usage_track() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    was_active  bool := TG_OP <> 'INSERT'
                        AND OLD.state IN ('provisioning', 'running', 'terminating');
    is_active   bool := TG_OP <> 'DELETE'
                        AND NEW.state IN ('provisioning', 'running', 'terminating');
    was_pending bool := TG_OP <> 'INSERT' AND OLD.state = 'provisioning';
    is_pending  bool := TG_OP <> 'DELETE' AND NEW.state = 'provisioning';
BEGIN
    INSERT INTO machine_usage AS u (scope, machines)
    SELECT scope, sum(delta)
    FROM (VALUES
        (CASE WHEN was_active THEN OLD.owner_id END, -OLD.size::bigint),
        (CASE WHEN was_active THEN OLD.group_id END, -OLD.size::bigint),
        (CASE WHEN was_pending THEN '00000000-0000-0000-0000-000000000000'::uuid END, -OLD.size::bigint),
        (CASE WHEN is_active THEN NEW.owner_id END, NEW.size::bigint),
        (CASE WHEN is_active THEN NEW.group_id END, NEW.size::bigint),
        (CASE WHEN is_pending THEN '00000000-0000-0000-0000-000000000000'::uuid END, NEW.size::bigint)
    ) AS d (scope, delta)
    WHERE scope IS NOT NULL
    GROUP BY scope
    HAVING sum(delta) <> 0
    ORDER BY scope
    ON CONFLICT (scope) DO UPDATE SET machines = u.machines + EXCLUDED.machines;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER clusters_machine_usage
    AFTER INSERT OR UPDATE OF state, size, owner_id, group_id OR DELETE ON clusters
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW EXECUTE FUNCTION machine_usage_track();

INSERT INTO machine_usage (scope, machines)
SELECT scope, sum(size)
FROM (SELECT owner_id AS scope, size FROM clusters
      WHERE state IN ('provisioning', 'running', 'terminating')
      UNION ALL
      SELECT group_id, size FROM clusters
      WHERE group_id IS NOT NULL AND state IN ('provisioning', 'running', 'terminating')
      UNION ALL
      SELECT '00000000-0000-0000-0000-000000000000'::uuid, size FROM clusters
      WHERE state = 'provisioning') AS s
GROUP BY scope;

-- Members of a group get accounts on its shared clusters.
CREATE INDEX users_group ON users (group_id) WHERE group_id IS NOT NULL;
