//! Raw-frame protocol tests.
