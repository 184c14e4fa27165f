"""In-process benchmarks and tools (not wire clients): `python -m bench.decode`, `bench.serving`, ..."""
