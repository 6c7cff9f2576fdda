"""cine: turn a photo into a short cinematic clip with a 4-step Wan2.1-architecture image-to-video DiT.

The packages follow the data flow, top to bottom: cli → batch → run.py → plan → generate → output, over models →
weights → effects → core. Each imports only those below it (README: Layout; tests/test_layout.py).
"""

__version__ = "0.1.0"
