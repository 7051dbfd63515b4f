//! Attack tests: surface.
