-- The control plane's domain, shared by the API (accounts, quotas, intent)
-- and the provisioning workflows (inventory, clusters, cluster users).

CREATE TABLE groups (
    id                  uuid PRIMARY KEY,
    name                text        NOT NULL UNIQUE,
    -- Max machines the whole group may hold (NULL: no group limit).
    quota_machines      int,
    -- Machines kept available for this group only (a guaranteed minimum).
    reserved_machines   int         NOT NULL DEFAULT 0,
    created_at          timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE users (
    id                  uuid PRIMARY KEY,
    name                text        NOT NULL UNIQUE,
    email               text,
    group_id            uuid        REFERENCES groups (id),
    is_operator         bool        NOT NULL DEFAULT false,
    -- Max machines this user's active clusters may hold (NULL: group/default limit).
    quota_machines      int,
    created_at          timestamptz NOT NULL DEFAULT now(),
    disabled_at         timestamptz
);

-- The machine inventory: what providers allocate from (pool) or created (local).
CREATE TABLE machines (
    id              uuid PRIMARY KEY,
    provider        text        NOT NULL,
    hostname        text        NOT NULL UNIQUE,
    address         text        NOT NULL,
    ssh_port        int         NOT NULL DEFAULT 22,
    -- Pinned SSH host key, as an OpenSSH public key line ("ssh-ed25519 AAAA...").
    host_key        text        NOT NULL,
    profile         text        NOT NULL DEFAULT 'standard',
    state           text        NOT NULL DEFAULT 'free'
                    CHECK (state IN ('free', 'allocated', 'broken', 'retired')),
    cluster_id      uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX machines_free ON machines (provider, profile) WHERE state = 'free';

CREATE TABLE clusters (
    id              uuid PRIMARY KEY,
    name            text        NOT NULL,
    owner_id        uuid        NOT NULL REFERENCES users (id),
    group_id        uuid        REFERENCES groups (id),
    size            int         NOT NULL CHECK (size > 0),
    -- Every service, compulsory and chosen, with dependencies resolved.
    services        text[]      NOT NULL,
    shared          bool        NOT NULL DEFAULT false,
    expires_at      timestamptz,
    state           text        NOT NULL DEFAULT 'provisioning'
                    CHECK (state IN ('provisioning', 'running', 'terminating', 'terminated', 'failed')),
    state_reason    text,
    -- The run that currently acts on the cluster (create, terminate).
    run_id          uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    terminated_at   timestamptz
);
CREATE INDEX clusters_owner ON clusters (owner_id, state);

ALTER TABLE machines ADD CONSTRAINT machines_cluster FOREIGN KEY (cluster_id) REFERENCES clusters (id);

-- Accounts on a cluster: UNIX (every node), HDFS home, Ambari login.
CREATE TABLE cluster_users (
    cluster_id      uuid        NOT NULL REFERENCES clusters (id) ON DELETE CASCADE,
    username        text        NOT NULL,
    user_id         uuid        REFERENCES users (id),
    public_key      text,
    is_sudoer       bool        NOT NULL DEFAULT false,
    ssh_enabled     bool        NOT NULL DEFAULT true,
    hdfs_enabled    bool        NOT NULL DEFAULT true,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'active', 'removing', 'removed', 'failed')),
    run_id          uuid,
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (cluster_id, username)
);
