-- The quota ledger as a function, and the admission lock taken with it.
--
-- quota_ledger: what api/src/quotas.rs decides from, for a set of users: a
-- row per user (quota, group, machines in use), a row per group that is one
-- of theirs or holds a reservation (quota, reservation, machines in use) and
-- one 'available' row (free machines minus the machines still owed to
-- clusters being provisioned). Usage comes from the counters of
-- 0006_machine_usage.sql, so this is a few primary-key reads however many
-- clusters exist.
--
-- admission_ledger: the admission lock, then the same rows read with a
-- snapshot taken once the lock is held (a VOLATILE plpgsql function takes a
-- new snapshot per statement), so a batch reads every batch committed before
-- it. The admission statement (api/src/admission.rs) calls it at its end,
-- after its inserts, which saves the two round trips a separate lock and
-- read cost while the lock is held. `written` is what the statement
-- inserted: passing it makes the call depend on the inserts, so it cannot
-- run (and take the lock) before they are done.
CREATE FUNCTION quota_ledger(users uuid[], provider text, local_capacity bigint)
RETURNS TABLE (kind text, id uuid, quota bigint, group_id uuid, name text,
               reserved bigint, usage bigint)
LANGUAGE sql STABLE AS $$
    WITH me AS (SELECT u.id, u.quota_machines, u.group_id FROM users u WHERE u.id = ANY(users))
    SELECT 'user', me.id, me.quota_machines::bigint, me.group_id, NULL::text, 0::bigint,
           COALESCE((SELECT machines FROM machine_usage WHERE scope = me.id), 0)
    FROM me
    UNION ALL
    SELECT 'group', g.id, g.quota_machines::bigint, NULL, g.name, g.reserved_machines::bigint,
           COALESCE((SELECT machines FROM machine_usage WHERE scope = g.id), 0)
    FROM groups g
    WHERE g.reserved_machines > 0 OR g.id IN (SELECT me.group_id FROM me)
    UNION ALL
    SELECT 'available', NULL, NULL, NULL, NULL, 0,
           (CASE WHEN provider = 'pool'
                 THEN (SELECT count(*) FROM machines WHERE machines.provider = 'pool' AND state = 'free')
                 ELSE local_capacity - (SELECT count(*) FROM machines
                                        WHERE machines.provider = 'local' AND state = 'allocated')
            END
            - COALESCE((SELECT machines FROM machine_usage
                        WHERE scope = '00000000-0000-0000-0000-000000000000'), 0)
            + (SELECT count(*) FROM machines m
               WHERE m.state = 'allocated'
                 AND m.cluster_id IN (SELECT c.id FROM clusters c WHERE c.state = 'provisioning')))::bigint
$$;

CREATE FUNCTION admission_ledger(written bigint, users uuid[], provider text, local_capacity bigint)
RETURNS TABLE (kind text, id uuid, quota bigint, group_id uuid, name text,
               reserved bigint, usage bigint)
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF written IS NULL THEN
        RAISE EXCEPTION 'admission_ledger: nothing written';
    END IF;
    PERFORM pg_advisory_xact_lock(7263548129);
    RETURN QUERY SELECT * FROM quota_ledger(users, provider, local_capacity);
END
$$;

-- admission_recheck: the keys an API process remembered having verified
-- (api/src/auth.rs, VerifiedKeys) still hold: the key exists with this
-- secret, is not revoked and belongs to this user, who is not disabled and
-- is still in this group. The admission statement calls it before its
-- ledger, so a batch prepared from a key revoked since is not admitted:
-- the error (SQLSTATE OR001) makes the API check the batch's keys anew.
CREATE FUNCTION admission_recheck(lookups text[], secrets bytea[], owners uuid[], owner_groups uuid[])
RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    held bigint;
BEGIN
    SELECT count(*) INTO held
    FROM unnest(lookups, secrets, owners, owner_groups) AS p (lookup, secret, user_id, group_id)
    JOIN api_keys k ON k.lookup = p.lookup AND k.secret_sha256 = p.secret
                   AND k.user_id = p.user_id AND k.revoked_at IS NULL
    JOIN users u ON u.id = p.user_id AND u.disabled_at IS NULL
                AND u.group_id IS NOT DISTINCT FROM p.group_id;
    IF held <> cardinality(lookups) THEN
        RAISE EXCEPTION 'an API key remembered by the admission batch no longer holds'
            USING ERRCODE = 'OR001';
    END IF;
    RETURN held;
END
$$;
