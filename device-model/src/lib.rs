//! vcdev device models.
