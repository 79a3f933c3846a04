//! `mltap demo`: an embedded TF-Serving-compatible model server, the proxy in front of
//! it, and a traffic generator whose inputs drift half-way, with delayed labels.
