//! The OpenAPI 3.1 document of every `/v1` route, served at
//! `/v1/openapi.json`. Written as data beside [`OPERATIONS`], the list the
//! test suite walks to prove every documented route answers.

use axum::Json;
use serde_json::{json, Map, Value};

/// (method, path, tag, summary, request body schema, success status).
pub type Operation = (
    &'static str,
    &'static str,
    &'static str,
    &'static str,
    Option<&'static str>,
    u16,
);

pub const OPERATIONS: &[Operation] = &[
    (
        "get",
        "/v1/account",
        "account",
        "Your profile, quota and webhook secret",
        None,
        200,
    ),
    (
        "get",
        "/v1/account/keys",
        "account",
        "Your API keys (no secrets)",
        None,
        200,
    ),
    (
        "post",
        "/v1/account/keys",
        "account",
        "Create an API key; the secret is shown once",
        Some("KeyRequest"),
        201,
    ),
    (
        "delete",
        "/v1/account/keys/{id}",
        "account",
        "Revoke an API key (refused at once)",
        None,
        204,
    ),
    (
        "get",
        "/v1/account/ssh-keys",
        "account",
        "Your SSH public keys with fingerprints",
        None,
        200,
    ),
    (
        "post",
        "/v1/account/ssh-keys",
        "account",
        "Add an SSH public key (validated)",
        Some("SshKeyRequest"),
        201,
    ),
    (
        "delete",
        "/v1/account/ssh-keys/{id}",
        "account",
        "Remove an SSH public key",
        None,
        204,
    ),
    (
        "post",
        "/v1/account/webhook-secret",
        "account",
        "Rotate the secret that signs your callbacks",
        None,
        200,
    ),
    (
        "get",
        "/v1/services",
        "clusters",
        "The optional services and what they pull in",
        None,
        200,
    ),
    (
        "get",
        "/v1/clusters",
        "clusters",
        "Your and your group's shared clusters, newest first, paginated",
        None,
        200,
    ),
    (
        "post",
        "/v1/clusters",
        "clusters",
        "Request a cluster (202 with the task; Idempotency-Key honoured)",
        Some("CreateCluster"),
        202,
    ),
    (
        "get",
        "/v1/clusters/{id}",
        "clusters",
        "A cluster: state and reason, nodes, services, users",
        None,
        200,
    ),
    (
        "delete",
        "/v1/clusters/{id}",
        "clusters",
        "Terminate a running or failed cluster (202; 409 otherwise)",
        None,
        202,
    ),
    (
        "post",
        "/v1/clusters/{id}/users",
        "clusters",
        "Give a user an account on a running cluster (202)",
        Some("AddUser"),
        202,
    ),
    (
        "delete",
        "/v1/clusters/{id}/users/{username}",
        "clusters",
        "Remove a user's account from a running cluster (202)",
        None,
        202,
    ),
    (
        "get",
        "/v1/tasks/{id}",
        "tasks",
        "A task: state, current step, progress, attempts, errors, result",
        None,
        200,
    ),
    (
        "get",
        "/v1/tasks/{id}/events",
        "tasks",
        "The task as server-sent events until it finishes",
        None,
        200,
    ),
    (
        "get",
        "/v1/admin/runs",
        "operators",
        "Runs by state, workflow, cluster, stuck",
        None,
        200,
    ),
    (
        "get",
        "/v1/admin/runs/{id}",
        "operators",
        "A run with its steps and history",
        None,
        200,
    ),
    (
        "post",
        "/v1/admin/runs/{id}/cancel",
        "operators",
        "Cancel a run (compensations run)",
        Some("Reason"),
        202,
    ),
    (
        "post",
        "/v1/admin/runs/{id}/replay",
        "operators",
        "Replay a run from a step, optionally with edited input",
        Some("Replay"),
        202,
    ),
    (
        "post",
        "/v1/admin/runs/cancel",
        "operators",
        "Cancel every run a filter matches",
        Some("Bulk"),
        200,
    ),
    (
        "post",
        "/v1/admin/runs/replay",
        "operators",
        "Replay every run a filter matches",
        Some("Bulk"),
        200,
    ),
    (
        "get",
        "/v1/admin/audit",
        "operators",
        "The operator audit log: who, what, when, why",
        None,
        200,
    ),
    (
        "get",
        "/v1/admin/users",
        "operators",
        "Every user",
        None,
        200,
    ),
    (
        "post",
        "/v1/admin/users",
        "operators",
        "Create a user and their first API key",
        Some("NewUser"),
        201,
    ),
    (
        "patch",
        "/v1/admin/users/{name}",
        "operators",
        "Change a user's quota, operator role or disabled flag",
        Some("UserChange"),
        204,
    ),
    (
        "get",
        "/v1/admin/groups",
        "operators",
        "Every group with its quota, reservation and usage",
        None,
        200,
    ),
    (
        "post",
        "/v1/admin/groups",
        "operators",
        "Create a group",
        Some("NewGroup"),
        201,
    ),
    (
        "get",
        "/v1/openapi.json",
        "meta",
        "This document",
        None,
        200,
    ),
];

fn schemas() -> Value {
    let s = |t: &str| json!({ "type": t });
    json!({
        "Problem": {
            "type": "object",
            "description": "RFC 9457 problem details; `field` names the request field at fault.",
            "properties": { "type": s("string"), "title": s("string"), "status": s("integer"), "detail": s("string"), "field": s("string") },
            "required": ["type", "title", "status", "detail"],
        },
        "CreateCluster": {
            "type": "object", "additionalProperties": false, "required": ["name", "size"],
            "properties": {
                "name": { "type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[A-Za-z0-9][A-Za-z0-9._-]*$" },
                "size": { "type": "integer", "minimum": 1 },
                "services": { "type": "array", "items": { "type": "string", "enum": ["HIVE", "OOZIE", "PIG", "SQOOP", "HCATALOG", "WEBHCAT", "ZOOKEEPER", "HDFS", "YARN", "MAPREDUCE2"] } },
                "shared": s("boolean"),
                "ttl_seconds": { "type": "integer", "minimum": 60, "maximum": 7776000 },
                "callback_url": { "type": "string", "format": "uri" },
            },
        },
        "AddUser": { "type": "object", "additionalProperties": false, "required": ["username"], "properties": { "username": s("string"), "callback_url": { "type": "string", "format": "uri" } } },
        "KeyRequest": { "type": "object", "additionalProperties": false, "properties": { "name": s("string") } },
        "SshKeyRequest": { "type": "object", "additionalProperties": false, "required": ["public_key"], "properties": { "public_key": s("string"), "name": s("string") } },
        "Reason": { "type": "object", "additionalProperties": false, "required": ["reason"], "properties": { "reason": s("string") } },
        "Replay": { "type": "object", "additionalProperties": false, "required": ["reason"], "properties": { "reason": s("string"), "from_step": s("string"), "input": {}, "force": s("boolean") } },
        "RunFilter": { "type": "object", "additionalProperties": false, "properties": { "state": s("string"), "workflow": s("string"), "cluster": { "type": "string", "format": "uuid" }, "stuck": s("boolean"), "limit": s("integer") } },
        "Bulk": { "type": "object", "additionalProperties": false, "required": ["filter", "reason"], "properties": { "filter": { "$ref": "#/components/schemas/RunFilter" }, "reason": s("string"), "from_step": s("string"), "force": s("boolean") } },
        "NewUser": { "type": "object", "additionalProperties": false, "required": ["name"], "properties": { "name": s("string"), "email": s("string"), "group": s("string"), "operator": s("boolean"), "quota_machines": s("integer") } },
        "UserChange": { "type": "object", "additionalProperties": false, "properties": { "quota_machines": { "type": ["integer", "null"] }, "operator": s("boolean"), "disabled": s("boolean"), "reason": s("string") } },
        "NewGroup": { "type": "object", "additionalProperties": false, "required": ["name"], "properties": { "name": s("string"), "quota_machines": s("integer"), "reserved_machines": s("integer") } },
        "Task": {
            "type": "object",
            "properties": {
                "id": s("string"), "href": s("string"), "kind": s("string"), "state": s("string"),
                "current_step": s("string"),
                "progress": { "type": "object", "properties": { "done": s("integer"), "total": s("integer"), "percent": s("integer") } },
                "steps": { "type": "array", "items": { "type": "object", "properties": { "name": s("string"), "state": s("string"), "attempts": s("integer"), "duration_ms": s("integer"), "last_error": s("string") } } },
                "result": {}, "error": s("string"),
                "callbacks": { "type": "array", "items": { "type": "object", "properties": { "url": s("string"), "state": s("string"), "attempts": s("integer"), "last_status": s("integer"), "last_error": s("string") } } },
            },
        },
    })
}

pub fn document() -> Value {
    let mut paths = Map::new();
    for (method, path, tag, summary, body, status) in OPERATIONS {
        let mut op = json!({
            "tags": [tag],
            "summary": summary,
            "responses": {
                status.to_string(): { "description": "success" },
                "4XX": { "description": "what to fix", "content": { "application/problem+json": { "schema": { "$ref": "#/components/schemas/Problem" } } } },
            },
        });
        if *path != "/v1/openapi.json" {
            op["security"] = json!([{ "bearer": [] }]);
        }
        let params: Vec<Value> = path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({ "name": name, "in": "path", "required": true, "schema": { "type": "string" } }))
            .collect();
        if !params.is_empty() {
            op["parameters"] = json!(params);
        }
        if *status == 202 {
            op["parameters"] = json!([op.get("parameters").cloned().unwrap_or(json!([])).as_array().cloned().unwrap_or_default(), vec![json!({
                "name": "Idempotency-Key", "in": "header", "required": false, "schema": { "type": "string", "maxLength": 255 },
                "description": "Resubmitting with the same key returns the same task and creates nothing."
            })]].concat());
            if body.is_none() {
                // Task-creating routes without a body take their callback in the query.
                op["parameters"].as_array_mut().expect("set above").push(json!({
                    "name": "callback_url", "in": "query", "required": false, "schema": { "type": "string", "format": "uri" },
                    "description": "Called (HMAC-signed, retried until it answers 2xx) when the task ends."
                }));
            }
            op["responses"]["202"] = json!({
                "description": "accepted; follow Location",
                "headers": { "Location": { "schema": { "type": "string" } } },
                "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Task" } } },
            });
        }
        if let Some(schema) = body {
            op["requestBody"] = json!({ "required": true, "content": { "application/json": { "schema": { "$ref": format!("#/components/schemas/{schema}") } } } });
        }
        let entry = paths.entry(path.to_string()).or_insert_with(|| json!({}));
        entry[*method] = op;
    }
    json!({
        "openapi": "3.1.0",
        "info": { "title": "Orrery API", "version": env!("CARGO_PKG_VERSION"), "description": "Hadoop clusters as a service, on durable workflows. Long work answers 202 with a task." },
        "paths": paths,
        "components": {
            "schemas": schemas(),
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer", "description": "orr_<id>_<secret>" } },
        },
    })
}

pub async fn handler() -> Json<Value> {
    Json(document())
}

#[cfg(test)]
mod tests {
    #[test]
    fn every_operation_is_in_the_document_and_refs_resolve() {
        let doc = super::document();
        for (method, path, ..) in super::OPERATIONS {
            assert!(doc["paths"][path][method].is_object(), "{method} {path}");
        }
        let text = doc.to_string();
        for part in text.split("#/components/schemas/").skip(1) {
            let name: String = part.chars().take_while(|c| c.is_alphanumeric()).collect();
            assert!(
                doc["components"]["schemas"][&name].is_object(),
                "missing schema {name}"
            );
        }
    }
}
