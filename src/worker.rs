//! The worker: takes exchanges off the capture queue, decodes them into
//! observations, and feeds the monitor, the label store and the sinks.
