"""Reference models for parity tests and benchmarks (torch is the optional `parity` extra: these
modules import it inside their functions only, so importing them needs no torch)."""
