//! The served models by id, and how a request's `model` field picks one: optional when one
//! model is served, required otherwise; an unknown id is a 404 `model_not_found` that lists
//! the ids served.

use std::sync::Arc;

use super::error::ApiError;
use crate::engine::{EngineHandle, EngineStats};

/// Every model the server holds, in the order they were configured (never empty).
#[derive(Clone)]
pub struct Models {
    handles: Arc<Vec<EngineHandle>>,
}

impl Models {
    pub fn new(handles: Vec<EngineHandle>) -> anyhow::Result<Self> {
        anyhow::ensure!(!handles.is_empty(), "no model to serve");
        Ok(Self {
            handles: Arc::new(handles),
        })
    }

    pub fn all(&self) -> &[EngineHandle] {
        &self.handles
    }

    /// The served ids, in order.
    pub fn ids(&self) -> Vec<&str> {
        self.handles.iter().map(EngineHandle::name).collect()
    }

    pub fn get(&self, id: &str) -> Option<&EngineHandle> {
        self.handles.iter().find(|h| h.name() == id)
    }

    /// The model a request asked for (`param` names its field), or the only one served.
    pub fn resolve(&self, requested: Option<&str>, param: &str) -> Result<EngineHandle, ApiError> {
        match requested {
            Some(id) => self
                .get(id)
                .cloned()
                .ok_or_else(|| self.not_found(id, param)),
            None if self.handles.len() == 1 => Ok(self.handles[0].clone()),
            None => Err(ApiError::invalid_field(
                param,
                format!(
                    "{param} is required: this server serves {} models ({})",
                    self.handles.len(),
                    self.quoted_ids()
                ),
            )
            .with_code("model_required")),
        }
    }

    /// 404 `model_not_found` for `id`, listing the served ids.
    pub fn not_found(&self, id: &str, param: &str) -> ApiError {
        // Quote at most a short prefix: the id came from the client.
        let shown: String = id.chars().take(80).collect();
        // OpenAI's shape for it: an invalid_request_error, status 404, code model_not_found.
        ApiError::bad_request(format!(
            "model '{shown}' is not served here; the models served are {} (GET /v1/models)",
            self.quoted_ids()
        ))
        .with_status(axum::http::StatusCode::NOT_FOUND)
        .with_param(param)
        .with_code("model_not_found")
    }

    fn quoted_ids(&self) -> String {
        self.ids()
            .iter()
            .map(|id| format!("'{id}'"))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn stats(&self) -> impl Iterator<Item = &EngineStats> {
        self.handles.iter().map(EngineHandle::stats)
    }

    /// Every engine of every model warmed up and running.
    pub fn ready(&self) -> bool {
        self.stats().all(EngineStats::ready)
    }

    /// Draining is one flag for the whole server.
    pub fn is_draining(&self) -> bool {
        self.handles[0].is_draining()
    }

    pub fn start_draining(&self) {
        self.handles[0].start_draining();
    }

    /// Closes every model's queue, so that the engines exit once what they hold is done.
    pub fn close_queues(&self) {
        for handle in self.handles.iter() {
            handle.close_queue();
        }
    }

    /// Images queued for any model.
    pub fn queued_images(&self) -> usize {
        self.stats()
            .map(|s| s.queued_images.load(std::sync::atomic::Ordering::SeqCst))
            .sum()
    }

    /// Images being denoised for any model.
    pub fn active_samples(&self) -> usize {
        self.stats().map(EngineStats::active_samples).sum()
    }

    /// Waits until an engine of any model reports that it cannot run, and returns why.
    pub async fn failed(&self) -> String {
        // One failure record serves every model.
        self.handles[0].failed().await
    }
}
