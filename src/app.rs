//! `mltap serve`: composes listeners, proxy, capture queue, worker, admin server and
//! graceful shutdown from one validated `Config`.
