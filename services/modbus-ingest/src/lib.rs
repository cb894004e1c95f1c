//! modbus-ingest (in progress).
