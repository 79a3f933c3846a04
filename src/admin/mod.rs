//! The admin HTTP server: `/metrics`, `/healthz`, `/readyz`, `/v1/labels` and the
//! dashboard. It never sits on the proxy's path.
