//! Prometheus view of the model metrics: the points of the last closed bucket of each
//! model, as gauges on `/metrics` (`mltap_model_<what>`).
