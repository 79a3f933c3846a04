//! Listeners, upstream clients, the body tee and hop-by-hop header rules.
//!
//! The proxy never parses a payload and never waits on the worker: it forwards bytes
//! as they stream and hands cheap copies to the capture queue.
