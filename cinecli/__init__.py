"""cine: turn a photo into a short cinematic clip with a 4-step Wan2.1-architecture image-to-video DiT.

Data flow, one subpackage per stage: preset → weights → models → sampler → video → report.
"""

__version__ = "0.1.0"
