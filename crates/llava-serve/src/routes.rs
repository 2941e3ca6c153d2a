//! The HTTP routes. Handlers parse, check, fetch images and enqueue; the model thread
//! ([`crate::scheduler`]) does everything with tensors.

use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderValue, Method, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, middleware};
use llava_data::image::ImageProcessor;
use tokio::sync::Semaphore;
use tokio::sync::mpsc::{self, UnboundedSender};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::auth::require_key;
use crate::config::ServeConfig;
use crate::error::{ApiError, ServeError};
use crate::media;
use crate::metrics::Metrics;
use crate::scheduler::{Event, Job};
use crate::sse;
use crate::validate;
use crate::wire::{ChatCompletion, Model, ModelList, StreamHead};

/// The model thread's inbox, set once the model has loaded.
pub struct ModelHandle {
    pub jobs: UnboundedSender<Job>,
    pub processor: ImageProcessor,
}

pub struct AppState {
    pub config: ServeConfig,
    pub model: OnceLock<ModelHandle>,
    /// One permit per place, running or queued: `max_running + max_queue`.
    pub slots: Arc<Semaphore>,
    pub metrics: Arc<Metrics>,
    pub started: u64,
}

pub fn router(state: Arc<AppState>) -> Result<Router, ServeError> {
    let keys = Arc::new(state.config.api_keys.clone());
    let limit = state.config.max_body_bytes;
    let protected = Router::new()
        .route("/v1/chat/completions", post(chat_completions))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(keys, require_key));
    let mut router = Router::new()
        .merge(protected)
        .route("/health", get(health))
        .route("/", get(page))
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state.clone());
    if !state.config.cors_origins.is_empty() {
        let origins = state
            .config
            .cors_origins
            .iter()
            .map(|o| {
                HeaderValue::from_str(o).map_err(|_| {
                    ServeError::Config(format!("--cors-origin {o}: not a valid origin"))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        router = router.layer(
            CorsLayer::new()
                .allow_origin(AllowOrigin::list(origins))
                .allow_methods([Method::GET, Method::POST])
                .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE]),
        );
    }
    Ok(router)
}

async fn not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::not_found(method.as_str(), uri.path())
}

/// The web chat page: one file in the binary, nothing fetched from elsewhere.
async fn page() -> Response {
    (
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        include_str!("page.html"),
    )
        .into_response()
}

async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.model.get() {
        Some(_) => Json(serde_json::json!({"status": "ok"})).into_response(),
        None => ApiError::loading().into_response(),
    }
}

async fn models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    Json(ModelList {
        object: "list",
        data: vec![Model {
            id: state.config.model_name.clone(),
            object: "model",
            created: state.started,
            owned_by: "llava-rs",
        }],
    })
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    let received = Instant::now();
    let response = match chat(&state, body, received).await {
        Ok(r) => r,
        Err(e) => e.into_response(),
    };
    state.metrics.request(response.status().as_u16());
    response
}

async fn chat(
    state: &AppState,
    body: Result<Bytes, BytesRejection>,
    received: Instant,
) -> Result<Response, ApiError> {
    let config = &state.config;
    let body = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError::too_large(config.max_body_bytes),
        _ => ApiError::invalid(e.body_text()),
    })?;
    let request = validate::parse(&body, config.max_images_per_request)?;
    if let Some(name) = &request.model
        && name != &config.model_name
    {
        let mut e = ApiError::invalid_param(
            "model",
            format!(
                "the model `{name}` does not exist; this server serves `{}`",
                config.model_name
            ),
        );
        e.status = StatusCode::NOT_FOUND;
        e.code = Some("model_not_found");
        return Err(e);
    }
    let Some(model) = state.model.get() else {
        return Err(ApiError::loading());
    };
    let permit = state
        .slots
        .clone()
        .try_acquire_owned()
        .map_err(|_| ApiError::busy(1))?;
    let mut images = Vec::with_capacity(request.images.len());
    for image in &request.images {
        images.push(
            media::load(
                image,
                &config.media,
                config.max_image_pixels,
                &model.processor,
            )
            .await?,
        );
    }
    let (events, mut rx) = mpsc::unbounded_channel();
    model
        .jobs
        .send(Job {
            messages: request.messages,
            images,
            sampling: request.sampling,
            max_tokens: request.max_tokens,
            stop: request.stop,
            events,
            permit,
            received,
        })
        .map_err(|_| ApiError::internal("the model thread stopped"))?;
    match rx.recv().await {
        Some(Event::Accepted { .. }) => {}
        Some(Event::Failed(e)) => return Err(e),
        _ => return Err(ApiError::internal("the model thread stopped")),
    }
    let head = StreamHead::new(&config.model_name, request.include_usage);
    if request.stream {
        return Ok(sse::response(head, rx));
    }
    loop {
        match rx.recv().await {
            Some(Event::Text(_) | Event::Accepted { .. }) => {}
            Some(Event::Done {
                finish,
                usage,
                text,
            }) => {
                return Ok(Json(ChatCompletion::new(&head, text, finish, usage)).into_response());
            }
            Some(Event::Failed(e)) => return Err(e),
            None => return Err(ApiError::internal("the model thread stopped")),
        }
    }
}
