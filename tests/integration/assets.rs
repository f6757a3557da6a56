//! The JavaScript client library and its example page, as the engine serves them
//! (`/client/src/{file}`, `/client/example/`): every file of `clients/js/src` byte for byte with a
//! JavaScript type (what a browser requires to run a module), the page with its CSP, and clear
//! errors for what is not there. That the page works is the headless-Chromium test's part
//! (`clients/js/test/browser.test.js` opens it from the engine).

use crate::common::*;

fn client_dir(sub: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("clients/js")
        .join(sub)
}

#[tokio::test]
async fn every_library_module_is_served_as_javascript_byte_for_byte() {
    let t = TestServer::start().await;
    let mut files: Vec<String> = std::fs::read_dir(client_dir("src"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    files.sort();
    let served: Vec<&str> = herald::transport::assets::LIBRARY
        .iter()
        .map(|(n, _)| *n)
        .collect();
    assert_eq!(files, served, "clients/js/src and the compiled-in list");
    for f in &files {
        let resp = t
            .http
            .get(t.url(&format!("/client/src/{f}")))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{f}");
        let h = resp.headers().clone();
        assert_eq!(h["content-type"], "text/javascript; charset=utf-8", "{f}");
        assert_eq!(h["x-content-type-options"], "nosniff", "{f}");
        let body = resp.bytes().await.unwrap();
        assert_eq!(
            body,
            std::fs::read(client_dir("src").join(f)).unwrap(),
            "{f}"
        );
    }
}

#[tokio::test]
async fn a_module_not_in_the_library_is_a_clear_404() {
    let t = TestServer::start().await;
    for path in [
        "/client/src/nope.js",
        "/client/src/..%2Fpackage.json",
        "/client/src/",
    ] {
        let (s, v) = t.raw("GET", path, None, &[]).await;
        assert_error(&(s, v), 404, "not_found");
    }
    let (s, v) = t.raw("POST", "/client/src/index.js", None, &[]).await;
    assert_error(&(s, v), 405, "method_not_allowed");
}

#[tokio::test]
async fn the_example_page_is_served_with_its_csp_and_the_bare_path_redirects_to_it() {
    let t = TestServer::start().await;
    let resp = t.http.get(t.url("/client/example/")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let h = resp.headers().clone();
    assert_eq!(h["content-type"], "text/html; charset=utf-8");
    let csp = h["content-security-policy"].to_str().unwrap();
    assert!(csp.contains("default-src 'none'"), "{csp}");
    assert!(csp.contains("script-src 'self' 'sha256-"), "{csp}");
    assert!(csp.contains("frame-ancestors 'none'"), "{csp}");
    let page = resp.text().await.unwrap();
    assert_eq!(
        page,
        std::fs::read_to_string(client_dir("example/index.html")).unwrap()
    );
    assert!(
        page.contains("from '../src/index.js'"),
        "imports the library served beside it"
    );

    let no_follow = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let resp = no_follow
        .get(t.url("/client/example"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 308);
    assert_eq!(resp.headers()["location"], "/client/example/");
}
