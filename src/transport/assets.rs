//! The JavaScript client library (`clients/js/src`, compiled in) and its chat example page, served
//! so that a newcomer's first `herald serve` has a page to open and an app can load the library
//! from the engine it talks to, without a build step or a static server:
//! - `GET /client/src/{file}`: the library's ES modules (`import { connect } from
//!   "/client/src/index.js"`);
//! - `GET /client/example/`: the example chat page (`clients/js/example/index.html`), which
//!   imports `../src/index.js`, so the same file works from a checkout under any static server.
//!
//! Nothing here holds data or takes a key: the page asks for a client token (or reads it from the
//! URL's `#token=` fragment, which the browser never sends to a server).

use std::sync::LazyLock;

use axum::extract::Path;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};

use super::ApiError;
use super::admin::{inline, sha256_source};

/// The library's modules, by file name: every file of `clients/js/src` (a test holds this list
/// to the directory).
pub const LIBRARY: [(&str, &str); 10] = [
    (
        "backoff.js",
        include_str!("../../clients/js/src/backoff.js"),
    ),
    ("client.js", include_str!("../../clients/js/src/client.js")),
    (
        "emitter.js",
        include_str!("../../clients/js/src/emitter.js"),
    ),
    ("errors.js", include_str!("../../clients/js/src/errors.js")),
    (
        "eventsource.js",
        include_str!("../../clients/js/src/eventsource.js"),
    ),
    ("index.js", include_str!("../../clients/js/src/index.js")),
    ("policy.js", include_str!("../../clients/js/src/policy.js")),
    ("sse.js", include_str!("../../clients/js/src/sse.js")),
    (
        "subscription.js",
        include_str!("../../clients/js/src/subscription.js"),
    ),
    ("ws.js", include_str!("../../clients/js/src/ws.js")),
];

/// The example page.
const EXAMPLE: &str = include_str!("../../clients/js/example/index.html");

/// The page's CSP: its one inline module script and style (by hash) and the library from this
/// origin; it may connect to any herald (its `url` field), and nothing else.
static EXAMPLE_CSP: LazyLock<String> = LazyLock::new(|| {
    format!(
        "default-src 'none'; script-src 'self' {}; style-src {}; \
         connect-src 'self' http: https: ws: wss:; base-uri 'none'; form-action 'none'; \
         frame-ancestors 'none'",
        sha256_source(inline(EXAMPLE, "<script type=\"module\">", "</script>")),
        sha256_source(inline(EXAMPLE, "<style>", "</style>")),
    )
});

pub(super) fn routes() -> super::routes::Routes {
    super::routes::Routes::new()
        .get("/client/example", to_example)
        .get("/client/example/", example)
        .get("/client/src/{file}", module)
}

/// `/client/example` -> `/client/example/`, where the page's relative import resolves.
async fn to_example() -> Redirect {
    Redirect::permanent("/client/example/")
}

async fn example() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/html; charset=utf-8"),
            (header::CONTENT_SECURITY_POLICY, EXAMPLE_CSP.as_str()),
            (header::CACHE_CONTROL, "no-cache"),
            (header::REFERRER_POLICY, "no-referrer"),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        ],
        EXAMPLE,
    )
        .into_response()
}

async fn module(Path(file): Path<String>) -> Response {
    match LIBRARY.iter().find(|(name, _)| *name == file) {
        Some((_, text)) => (
            [
                (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
                // Served by the engine it talks to: a new engine version serves its own library.
                (header::CACHE_CONTROL, "no-cache"),
                (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            ],
            *text,
        )
            .into_response(),
        None => ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no module {file:?} in the client library"),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_csp_allows_the_pages_inline_script_and_style() {
        let script = inline(EXAMPLE, "<script type=\"module\">", "</script>");
        let style = inline(EXAMPLE, "<style>", "</style>");
        assert!(script.contains("connect("), "the module script is found");
        assert!(!style.is_empty());
        assert!(EXAMPLE_CSP.contains(&sha256_source(script)));
        assert!(EXAMPLE_CSP.contains(&sha256_source(style)));
    }
}
