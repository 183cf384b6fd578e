//! vcdev daemon library.
