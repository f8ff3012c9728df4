-- The REST API's own tables: API keys, SSH keys, tasks (a run as a user
-- sees it, with its idempotency key) and webhook callbacks.

-- API keys: the secret is shown once; only its SHA-256 is kept. `lookup` is
-- the public key id (the Cosmos `apiKey`), found by index before the hash is
-- compared, so authentication is one indexed read.
CREATE TABLE api_keys (
    id              uuid PRIMARY KEY,
    user_id         uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    lookup          text        NOT NULL UNIQUE,
    secret_sha256   bytea       NOT NULL,
    name            text        NOT NULL DEFAULT '',
    created_at      timestamptz NOT NULL DEFAULT now(),
    last_used_at    timestamptz,
    revoked_at      timestamptz
);
CREATE INDEX api_keys_user ON api_keys (user_id);

-- SSH public keys, validated; the fingerprint is OpenSSH's SHA256:... form.
CREATE TABLE ssh_keys (
    id              uuid PRIMARY KEY,
    user_id         uuid        NOT NULL REFERENCES users (id) ON DELETE CASCADE,
    name            text        NOT NULL DEFAULT '',
    public_key      text        NOT NULL,
    fingerprint     text        NOT NULL,
    created_at      timestamptz NOT NULL DEFAULT now(),
    UNIQUE (user_id, fingerprint)
);

-- Webhook signing secret of each user (HMAC-SHA256 of callbacks). Kept in
-- clear because it signs; it authenticates nothing on the way in.
ALTER TABLE users ADD COLUMN webhook_secret text;

-- A task is a run as a user sees it: who asked, about which cluster, and the
-- idempotency key that makes a resubmission return the same task.
CREATE TABLE tasks (
    run_id          uuid PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE,
    user_id         uuid        NOT NULL REFERENCES users (id),
    cluster_id      uuid        REFERENCES clusters (id),
    kind            text        NOT NULL,
    idempotency_key text,
    -- SHA-256 of the route and body, so a key reused for another request is refused.
    request_sha256  bytea,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX tasks_idempotency ON tasks (user_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX tasks_user ON tasks (user_id, created_at);
CREATE INDEX tasks_cluster ON tasks (cluster_id);

-- Webhook deliveries: one per (task, URL); the delivery is itself a durable
-- run (`delivery_run_id`) that waits for the task to finish, then posts with
-- retries. Every attempt updates this row, so attempts are visible.
CREATE TABLE callbacks (
    id              uuid PRIMARY KEY,
    task_run_id     uuid        NOT NULL REFERENCES runs (id) ON DELETE CASCADE,
    user_id         uuid        NOT NULL REFERENCES users (id),
    url             text        NOT NULL,
    delivery_run_id uuid        REFERENCES runs (id) ON DELETE SET NULL,
    state           text        NOT NULL DEFAULT 'pending'
                    CHECK (state IN ('pending', 'delivered', 'failed')),
    attempts        int         NOT NULL DEFAULT 0,
    last_status     int,
    last_error      text,
    last_attempt_at timestamptz,
    delivered_at    timestamptz,
    created_at      timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX callbacks_task ON callbacks (task_run_id);

-- Availability and quota reads, index-only (api/src/quotas.rs).
CREATE INDEX clusters_owner_usage ON clusters (owner_id, state) INCLUDE (size);
CREATE INDEX clusters_group_usage ON clusters (group_id, state) INCLUDE (size);
CREATE INDEX clusters_provisioning ON clusters (id) INCLUDE (size) WHERE state = 'provisioning';
CREATE INDEX machines_cluster ON machines (cluster_id);
CREATE INDEX operator_audit_at ON operator_audit (at);
