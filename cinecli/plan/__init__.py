"""The memory plan: where every component lives and in what recipe, decided before anything loads (memory.py), from
what the machine has and what the job needs (inputs.py: sizes from weight headers, activations from the models).
May import generate/, output/ and below; run.py and batch/ use it.
"""
