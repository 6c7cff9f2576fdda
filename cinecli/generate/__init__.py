"""One clip from one photo: the request and its plan of frames (pipeline.py), the sampler (sampler.py), reading and
fitting the photo (image.py), cached prompt embeddings (prompt_cache.py) and the tiny self-test backbone (selftest.py).
May import output/, models/, weights/, effects/ and core/.
"""
