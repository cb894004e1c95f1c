//! serial-ingest: Arduino current sensors and sensor lines over USB serial (in progress).
