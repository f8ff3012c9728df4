//! Extractors whose rejections are problem+json naming what to fix: the JSON
//! body ([`Body`]), query strings ([`Query`]) and ids in paths ([`parse_id`]).
//!
//! Bodies are decoded with `serde_path_to_error`, so a wrong type deep in a
//! request names its path (`services[1]`); request types use
//! `#[serde(deny_unknown_fields)]` so a misspelt field is refused, not ignored.

use axum::{
    body::Bytes,
    extract::{FromRequest, FromRequestParts, Request},
    http::{header, request::Parts},
};
use serde::de::DeserializeOwned;
use uuid::Uuid;

use crate::error::ApiError;

/// A JSON request body.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        if let Some(ct) = req.headers().get(header::CONTENT_TYPE) {
            let ct = ct.to_str().unwrap_or_default();
            if !ct.starts_with("application/json") && !ct.contains("+json") {
                return Err(ApiError::new(
                    axum::http::StatusCode::UNSUPPORTED_MEDIA_TYPE,
                    "unsupported-media-type",
                    format!("send the body as application/json, not {ct}"),
                ));
            }
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            ApiError::bad_request(format!("the request body could not be read: {e}"))
        })?;
        parse_json(&bytes).map(Body)
    }
}

/// Decode `bytes` as `T`; a syntax error is 400, a data error 422 naming the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(
            "the request body is empty; send a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: T = match serde_path_to_error::deserialize(&mut de) {
        Ok(v) => v,
        Err(err) => {
            let path = err.path().to_string();
            let inner = err.into_inner();
            return Err(match inner.classify() {
                serde_json::error::Category::Data => {
                    let msg = strip_position(&inner.to_string());
                    let field = field_of(&path, &msg);
                    ApiError::invalid(field.clone(), format!("`{field}`: {msg}"))
                }
                _ => ApiError::bad_request(format!("the request body is not valid JSON: {inner}")),
            });
        }
    };
    de.end()
        .map_err(|e| ApiError::bad_request(format!("the request body is not valid JSON: {e}")))?;
    Ok(value)
}

/// serde_json appends " at line 1 column 20" to data errors; the field says where.
fn strip_position(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_owned(),
        None => msg.to_owned(),
    }
}

/// The field a data error is about: its path, or for "missing field `x`" and
/// "unknown field `x`" (reported at the parent) the parent path plus `x`.
fn field_of(path: &str, msg: &str) -> String {
    let named = ["missing field `", "unknown field `"]
        .iter()
        .find_map(|p| msg.strip_prefix(p))
        .and_then(|rest| rest.split('`').next());
    match (path, named) {
        (".", Some(name)) => name.to_owned(),
        // Unknown fields are already at their own path.
        (path, Some(name)) if path == name || path.ends_with(&format!(".{name}")) => {
            path.to_owned()
        }
        (parent, Some(name)) => format!("{parent}.{name}"),
        (".", None) => "body".to_owned(),
        (path, None) => path.to_owned(),
    }
}

/// A query string; a bad parameter is 400 naming it.
pub struct Query<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let query = parts.uri.query().unwrap_or_default();
        let de = serde_urlencoded_de(query);
        match de {
            Ok(v) => Ok(Query(v)),
            Err(msg) => Err(ApiError::bad_request(format!("query string: {msg}"))),
        }
    }
}

fn serde_urlencoded_de<T: DeserializeOwned>(query: &str) -> Result<T, String> {
    let uri: axum::http::Uri = format!("/?{query}")
        .parse()
        .map_err(|_| "the query string is not valid".to_owned())?;
    axum::extract::Query::<T>::try_from_uri(&uri)
        .map(|q| q.0)
        .map_err(|e| {
            e.body_text()
                .replace("Failed to deserialize query string: ", "")
        })
}

/// An id in a path. Anything that is not a UUID names nothing that exists: 404.
pub fn parse_id(raw: &str, what: &str) -> Result<Uuid, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::not_found(format!("no {what} {raw}")))
}

/// `Idempotency-Key` header, if present (1 to 255 visible ASCII characters).
pub fn idempotency_key(headers: &axum::http::HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("idempotency-key") else {
        return Ok(None);
    };
    let v = v.to_str().unwrap_or_default().trim();
    if v.is_empty() || v.len() > 255 || !v.bytes().all(|b| b.is_ascii_graphic()) {
        let mut e = ApiError::bad_request(
            "Idempotency-Key must be 1 to 255 visible ASCII characters (a UUID is a good choice)",
        );
        e.field = Some("Idempotency-Key".into());
        return Err(e);
    }
    Ok(Some(v.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Req {
        name: String,
        size: i64,
        #[serde(default)]
        services: Vec<String>,
    }

    #[test]
    fn wrong_types_unknown_and_missing_fields_are_named() {
        let e = parse_json::<Req>(br#"{"name":"a","size":"x"}"#).unwrap_err();
        assert_eq!((e.status.as_u16(), e.field.as_deref()), (422, Some("size")));
        let e = parse_json::<Req>(br#"{"name":"a","size":1,"colour":1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("colour"));
        let e = parse_json::<Req>(br#"{"size":1}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("name"));
        let e = parse_json::<Req>(br#"{"name":"a","size":1,"services":["HIVE",3]}"#).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("services[1]"));
        assert!(!e.detail.contains("line"), "{}", e.detail);
    }

    #[test]
    fn malformed_and_empty_bodies_are_bad_requests() {
        assert_eq!(
            parse_json::<Req>(b"{\"name\":")
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
        assert_eq!(parse_json::<Req>(b"  ").unwrap_err().status.as_u16(), 400);
        assert_eq!(
            parse_json::<Req>(br#"{"name":"a","size":1} x"#)
                .unwrap_err()
                .status
                .as_u16(),
            400
        );
    }
}
