//! `POST /v1/images/edits`: read the body (multipart or JSON), check it, decode the images, submit the jobs, and
//! answer with OpenAI's image response, or with server-sent progress events when `stream` is set.

use std::convert::Infallible;
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Multipart, Request, State};
use axum::http::{header, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures_util::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};

use super::error::{self, ApiError};
use super::params::{decode_image, EditParams};
use super::AppState;
use crate::job::{JobEvent, JobHandle, JobOutput};
use crate::metrics::stage_name;

/// The handler.
pub async fn edits(State(state): State<Arc<AppState>>, request: Request<Body>) -> Response {
    match run(state, request).await {
        Ok(response) => response,
        Err(e) => {
            tracing::info!(status = e.status.as_u16(), code = e.code, message = %e.message, "edit refused");
            e.into_response()
        }
    }
}

async fn run(state: Arc<AppState>, request: Request<Body>) -> Result<Response, ApiError> {
    let received = Instant::now();
    let mut params = read_params(&state, request).await?;
    let n = params.check(&state.limits, &state.model_name)?;
    if let Some(user) = &params.user {
        tracing::debug!(user, "request");
    }
    let encoded = std::mem::take(&mut params.images);
    let max_pixels = state.limits.max_image_pixels;
    let images = tokio::task::spawn_blocking(move || {
        encoded.iter().enumerate().map(|(i, b)| decode_image(b, max_pixels, i)).collect::<Result<Vec<_>, _>>()
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))??;
    let jobs = params.jobs(images, n, &state.defaults)?;
    let mut handles = Vec::with_capacity(jobs.len());
    for job in jobs {
        handles.push(state.service.submit(job)?); // a refusal drops (cancels) the ones already queued
    }
    if params.stream == Some(true) {
        let handle = handles.pop().expect("n ≥ 1");
        return Ok(stream_events(state, handle).into_response());
    }
    let deadline = tokio::time::Instant::now() + state.request_timeout;
    let mut data = Vec::with_capacity(handles.len());
    let mut details = Vec::with_capacity(handles.len());
    for handle in handles {
        let output = match tokio::time::timeout_at(deadline, handle.result()).await {
            Ok(result) => result?,
            Err(_) => return Err(error::timeout(state.request_timeout)), // the dropped handles cancel their jobs
        };
        let (b64, detail) = encode_output(output).await?;
        data.push(json!({"b64_json": b64}));
        details.push(detail);
    }
    // The server's own time for the request (body, decoding, queue, edit, encoding): `server_seconds −
    // edit_seconds − queued_seconds` is its overhead.
    let server_seconds = received.elapsed().as_secs_f64();
    details.iter_mut().for_each(|d| d["server_seconds"] = json!(server_seconds));
    Ok(Json(json!({"created": unix_time(), "data": data, "qwen": details})).into_response())
}

/// The request's fields, from a multipart form or a JSON body.
async fn read_params(state: &AppState, request: Request<Body>) -> Result<EditParams, ApiError> {
    let content_type = request
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    if content_type.starts_with("multipart/form-data") {
        let form = Multipart::from_request(request, &()).await.map_err(|e| {
            ApiError::new(
                e.status(),
                "invalid_multipart",
                format!("malformed multipart body: {}", e.body_text()),
            )
        })?;
        EditParams::from_multipart(form, &state.limits).await
    } else if content_type.starts_with("application/json") {
        let body = Bytes::from_request(request, &()).await.map_err(|e| {
            let code =
                if e.status() == StatusCode::PAYLOAD_TOO_LARGE { "body_too_large" } else { "invalid_body" };
            ApiError::new(e.status(), code, e.body_text())
        })?;
        EditParams::from_json(&body)
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("content type {content_type:?}: send multipart/form-data or application/json"),
        ))
    }
}

/// The image as base64 PNG, and the edit's details (the `qwen` extension of the response).
async fn encode_output(output: Box<JobOutput>) -> Result<(String, Value), ApiError> {
    tokio::task::spawn_blocking(move || {
        let mut png = std::io::Cursor::new(Vec::new());
        output
            .edit
            .image
            .write_to(&mut png, image::ImageFormat::Png)
            .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "encode_failed", e.to_string()))?;
        let b64 = base64::engine::general_purpose::STANDARD.encode(png.get_ref());
        Ok((b64, details(&output)))
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string()))?
}

/// What the response says about an edit beyond the image.
fn details(output: &JobOutput) -> Value {
    let r = &output.edit.report;
    json!({
        "width": r.width,
        "height": r.height,
        "seed": r.seed,
        "steps": r.num_steps,
        "schedule": r.schedule,
        "edit_seconds": r.total_seconds,
        "queued_seconds": output.queued_seconds,
        "stages": r.stages.iter().map(|s| (stage_name(s.stage), json!(s.seconds))).collect::<serde_json::Map<_, _>>(),
        "image_reuse": r.image_reuse,
    })
}

fn unix_time() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

/// Server-sent events of one job: `image_edit.progress` per stage and step, then `image_edit.completed` with the
/// image, or `error`. Dropping the stream (the client went away) cancels the job.
fn stream_events(
    state: Arc<AppState>,
    handle: JobHandle,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let deadline = tokio::time::Instant::now() + state.request_timeout;
    let start = Instant::now();
    let first = Event::default()
        .event("image_edit.queued")
        .json_data(json!({"type": "image_edit.queued", "job": handle.id()}));
    let events = stream::unfold(Some(handle), move |handle| {
        let state = state.clone();
        async move {
            let mut handle = handle?;
            let event = match tokio::time::timeout_at(deadline, handle.next_event()).await {
                Err(_) => return Some((error_event(&error::timeout(state.request_timeout)), None)),
                Ok(None) => return None,
                Ok(Some(event)) => event,
            };
            let next = match event {
                JobEvent::Started { queued } => {
                    progress(json!({"stage": "started", "queued_seconds": queued.as_secs_f64()}))
                }
                JobEvent::Stage(stage) => progress(json!({"stage": stage_name(stage)})),
                JobEvent::Step(s) => progress(
                    json!({"stage": "denoise", "step": s.step, "num_steps": s.num_steps, "eta_seconds": s.eta_seconds}),
                ),
                JobEvent::Finished(Err(e)) => return Some((error_event(&ApiError::from(e)), None)),
                JobEvent::Finished(Ok(output)) => {
                    let event = match encode_output(output).await {
                        Ok((b64, detail)) => {
                            Event::default().event("image_edit.completed").json_data(json!({
                                "type": "image_edit.completed", "b64_json": b64, "created": unix_time(),
                                "qwen": detail, "elapsed_seconds": start.elapsed().as_secs_f64(),
                            }))
                        }
                        Err(e) => return Some((error_event(&e), None)),
                    };
                    return Some((event.unwrap_or_default(), None));
                }
            };
            Some((next, Some(handle)))
        }
    });
    let events = stream::iter([first.unwrap_or_default()]).chain(events).map(Ok);
    Sse::new(events).keep_alive(KeepAlive::default())
}

fn progress(data: Value) -> Event {
    let mut data = data;
    data["type"] = json!("image_edit.progress");
    Event::default().event("image_edit.progress").json_data(data).unwrap_or_default()
}

fn error_event(e: &ApiError) -> Event {
    let mut body = e.body();
    body["type"] = json!("error");
    body["status"] = json!(e.status.as_u16());
    Event::default().event("error").json_data(body).unwrap_or_default()
}
