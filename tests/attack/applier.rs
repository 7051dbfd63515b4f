//! Attack tests: applier.
