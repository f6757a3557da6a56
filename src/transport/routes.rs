//! The router's routes as data. Every route builder (`ws`, `sse`, `api`, `admin`) adds its routes
//! through [`Routes`], which records each (method, path) beside the axum route it makes, so the
//! whole list is enumerable ([`super::route_table`]) without running a server: the OpenAPI
//! description (`docs/openapi.json`) is checked against it, route by route. Adding a route stays
//! one line: `.get("/path", handler)`.

use axum::Router;
use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{MethodRouter, delete, get, patch, post, put};

use super::AppState;

/// One route: a method and an axum path (`{name}` marks a path parameter, as in OpenAPI).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// The HTTP method.
    pub method: Method,
    /// The path.
    pub path: &'static str,
}

/// A router being built, and the table of what it routes.
pub(crate) struct Routes {
    router: Router<AppState>,
    table: Vec<Route>,
}

impl Routes {
    /// No routes yet.
    pub(crate) fn new() -> Self {
        Routes {
            router: Router::new(),
            table: Vec::new(),
        }
    }

    /// `GET path` (axum answers `HEAD` with it too).
    pub(crate) fn get<H: Handler<T, AppState>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::GET, path, get(h))
    }

    /// `POST path`.
    pub(crate) fn post<H: Handler<T, AppState>, T: 'static>(
        self,
        path: &'static str,
        h: H,
    ) -> Self {
        self.add(Method::POST, path, post(h))
    }

    /// `PUT path`.
    pub(crate) fn put<H: Handler<T, AppState>, T: 'static>(self, path: &'static str, h: H) -> Self {
        self.add(Method::PUT, path, put(h))
    }

    /// `PATCH path`.
    pub(crate) fn patch<H: Handler<T, AppState>, T: 'static>(
        self,
        path: &'static str,
        h: H,
    ) -> Self {
        self.add(Method::PATCH, path, patch(h))
    }

    /// `DELETE path`.
    pub(crate) fn delete<H: Handler<T, AppState>, T: 'static>(
        self,
        path: &'static str,
        h: H,
    ) -> Self {
        self.add(Method::DELETE, path, delete(h))
    }

    /// One method on one path; axum merges the methods of a path given more than once (and panics
    /// on a method given twice, so a duplicate cannot hide in the table).
    fn add(mut self, method: Method, path: &'static str, route: MethodRouter<AppState>) -> Self {
        self.router = self.router.route(path, route);
        self.table.push(Route { method, path });
        self
    }

    /// These routes and `other`'s.
    pub(crate) fn merge(mut self, other: Routes) -> Self {
        self.router = self.router.merge(other.router);
        self.table.extend(other.table);
        self
    }

    /// The router and the table of its routes.
    pub(crate) fn into_parts(self) -> (Router<AppState>, Vec<Route>) {
        (self.router, self.table)
    }
}
