//! `GET|HEAD /git/{host}/{path}/snapshot.tar.zst`: the tiered, range-aware path.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::{IntoResponse, Response};

use super::app::App;
use super::error::ApiError;
use super::pinned;
use super::reply::Reply;
use crate::pin::PinRequest;
use crate::protocol::PIN_HEADER;
use crate::snapshot_path::SnapshotPath;
use crate::store::Revision;

/// Every request that is not the admin port's lands here.
pub async fn handle(
    State(app): State<Arc<App>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let response = serve(&app, &method, &uri, &headers)
        .await
        .unwrap_or_else(IntoResponse::into_response);
    let status_class = match response.status().as_u16() {
        200..=299 => "2xx",
        300..=399 => "3xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    app.metrics
        .requests
        .with_label_values(&[status_class])
        .inc();
    response
}

async fn serve(
    app: &App,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let with_body = match *method {
        Method::GET => true,
        Method::HEAD => false,
        _ => return Err(ApiError::MethodNotAllowed),
    };
    let path = SnapshotPath::parse(uri.path())?;
    let key = path.object_key(&app.prefix);
    if let Some(pin) = headers.get(PIN_HEADER) {
        return match PinRequest::parse(pin.as_bytes())? {
            PinRequest::Probe => pinned::probe(app, &key, path.file()).await,
            PinRequest::Pinned(token) => {
                pinned::read(app, &key, path.file(), token, headers, with_body).await
            }
        };
    }
    let info = app.snapshots.head(&key, Revision::Current).await?;
    let reply = Reply {
        app,
        request: headers,
        info: &info,
        file: path.file(),
        with_body,
    };
    let (key, etag) = (&key, &info.etag);
    reply
        .send(|range| async move {
            let revision = Revision::ETag(etag);
            Ok(app.snapshots.get(key, Some(range), revision).await?)
        })
        .await
}
