//! The admin port of `mltap serve` (the real binary) is closed by default: label posts
//! need a bearer token (any case of the scheme) unless unauthenticated posts are
//! configured, a JSON content type, and no cross-site browser origin; the dashboard
//! and its API take an optional token.

mod hardening_support;
mod support;

use hardening_support::{client, Serve, ServeOptions};
use support::fake_tfserving::FakeTfServing;

const LABELS: &str = r#"[{"id": "nobody", "label": 1}]"#;

async fn post(mltap: &Serve, headers: &[(&str, &str)]) -> (u16, String) {
    let mut request = client().post(format!("{}/v1/labels", mltap.admin_url())).body(LABELS);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.unwrap();
    (response.status().as_u16(), response.text().await.unwrap())
}

#[tokio::test]
async fn label_posts_are_refused_without_a_configured_token() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mltap = Serve::start(ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path())).await;
    let (status, body) = post(&mltap, &[("content-type", "application/json")]).await;
    assert_eq!(status, 401, "{body}");
    assert!(body.contains("labels.token_env") && body.contains("allow_unauthenticated"), "{body}");
}

#[tokio::test]
async fn cross_site_and_non_json_label_posts_are_refused_and_the_bearer_scheme_is_case_insensitive() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.config = Some("[labels]\ntoken_env = \"HARDENING_LABELS_TOKEN\"\n");
    options.env = vec![("HARDENING_LABELS_TOKEN", "s3cret")];
    let mltap = Serve::start(options).await;
    let json = ("content-type", "application/json");

    assert_eq!(post(&mltap, &[json]).await.0, 401);
    assert_eq!(post(&mltap, &[json, ("authorization", "Bearer wrong")]).await.0, 401);
    for scheme in ["Bearer", "bearer", "BEARER"] {
        let authorization = format!("{scheme} s3cret");
        let (status, body) = post(&mltap, &[json, ("authorization", &authorization)]).await;
        assert_eq!(status, 200, "{scheme}: {body}");
        assert!(body.contains("\"unmatched\":1"), "{body}");
    }
    let token = ("authorization", "Bearer s3cret");
    // What a cross-site HTML form or a no-preflight fetch can send.
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"] {
        let (status, body) = post(&mltap, &[token, ("content-type", content_type)]).await;
        assert_eq!(status, 415, "{content_type}: {body}");
    }
    let (status, _) = post(&mltap, &[token]).await;
    assert_eq!(status, 415, "no content type");
    // A browser on another site, even with the token (a leaked one, say).
    assert_eq!(post(&mltap, &[token, json, ("origin", "https://evil.example")]).await.0, 403);
    assert_eq!(post(&mltap, &[token, json, ("sec-fetch-site", "cross-site")]).await.0, 403);
    let same_origin = format!("http://{}", mltap.admin);
    assert_eq!(post(&mltap, &[token, json, ("origin", &same_origin)]).await.0, 200);
    // NDJSON under its usual type.
    assert_eq!(post(&mltap, &[token, ("content-type", "application/x-ndjson")]).await.0, 200);
}

#[tokio::test]
async fn unauthenticated_label_posts_when_configured_still_need_json_and_a_same_site_origin() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.config = Some("[labels]\nallow_unauthenticated = true\n");
    let mltap = Serve::start(options).await;
    assert_eq!(post(&mltap, &[("content-type", "application/json")]).await.0, 200);
    assert_eq!(post(&mltap, &[("content-type", "text/plain")]).await.0, 415);
    let csrf = [("content-type", "application/json"), ("origin", "https://evil.example")];
    assert_eq!(post(&mltap, &csrf).await.0, 403);
}

#[tokio::test]
async fn an_admin_token_protects_the_dashboard_and_its_api_but_not_health_or_metrics() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.config = Some("[admin]\ntoken_env = \"HARDENING_ADMIN_TOKEN\"\n");
    options.env = vec![("HARDENING_ADMIN_TOKEN", "dash-token")];
    let mltap = Serve::start(options).await;
    let admin = mltap.admin_url();
    for path in ["/", "/api/models"] {
        let response = client().get(format!("{admin}{path}")).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{path}");
        assert!(response.headers()["www-authenticate"].to_str().unwrap().starts_with("Basic"));
        let bearer = client().get(format!("{admin}{path}")).bearer_auth("dash-token").send().await.unwrap();
        assert_eq!(bearer.status().as_u16(), 200, "{path} with the bearer token");
        // A browser sends the token as the password of basic authentication.
        let basic = client().get(format!("{admin}{path}")).basic_auth("any", Some("dash-token")).send().await.unwrap();
        assert_eq!(basic.status().as_u16(), 200, "{path} with basic authentication");
        let wrong = client().get(format!("{admin}{path}")).basic_auth("any", Some("nope")).send().await.unwrap();
        assert_eq!(wrong.status().as_u16(), 401, "{path} with a wrong token");
    }
    for path in ["/healthz", "/readyz", "/metrics"] {
        assert_eq!(client().get(format!("{admin}{path}")).send().await.unwrap().status().as_u16(), 200, "{path}");
    }
}

#[tokio::test]
async fn an_admin_token_variable_that_is_not_set_stops_start_up() {
    let fake = FakeTfServing::start().await;
    let out = tempfile::tempdir().unwrap();
    let mut options = ServeOptions::new(fake.grpc_url(), fake.rest_url(), out.path());
    options.config = Some("[admin]\ntoken_env = \"HARDENING_ADMIN_TOKEN_NEVER_SET\"\n");
    let mut mltap = Serve::spawn(options);
    let status = mltap.child.wait().await.unwrap();
    assert_eq!(status.code(), Some(2));
    let stderr = mltap.stderr().await;
    assert!(stderr.contains("HARDENING_ADMIN_TOKEN_NEVER_SET"), "{stderr}");
}
