//! Attack tests: names.
