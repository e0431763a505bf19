//! The live status page at `GET /` (in progress).

use axum::response::Html;

/// The page: static HTML and JavaScript that polls the admin API; no build step.
pub async fn page() -> Html<&'static str> {
    Html("<!doctype html><title>Weir</title><p>Weir status page</p>")
}
