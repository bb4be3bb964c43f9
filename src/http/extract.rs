//! Extractors whose rejections are our JSON errors: a JSON body, a query string, a path.
//!
//! Owns how a request's parts are read into typed values and how a part that does not parse
//! is refused (`http::error::Refused`), so no handler parses or refuses a query string itself.
//! It must never validate what the values mean: that is the handler's module's job.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use serde::de::DeserializeOwned;

use super::error::{ApiError, Refused};

/// A JSON request body; bad JSON, wrong types and bodies over the route's limit are refused
/// with our JSON error (400, or 413 over the limit).
pub struct JsonBody<T>(pub T);

impl<T, S> FromRequest<S> for JsonBody<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, ApiError> {
        let bytes = axum::body::Bytes::from_request(req, state)
            .await
            .map_err(|e| match e.status() {
                StatusCode::PAYLOAD_TOO_LARGE => Refused::BodyTooLarge(e.body_text()),
                _ => Refused::Body(e.body_text()),
            })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| Refused::Json(e.to_string()).into())
    }
}

/// A query string decoded into `T`; one that does not decode is refused naming the problem.
pub struct Query<T>(pub T);

impl<T, S> FromRequestParts<S> for Query<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Query(q.0))
            .map_err(|e| Refused::Query(e.body_text()).into())
    }
}

/// Path parameters decoded into `T` (percent-decoded, valid UTF-8).
pub struct Path<T>(pub T);

impl<T, S> FromRequestParts<S> for Path<T>
where
    T: DeserializeOwned + Send,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|p| Path(p.0))
            .map_err(|e| Refused::Path(e.body_text()).into())
    }
}
