"""What leaves a run: frames to MP4 and back (video.py), slow motion by frame interpolation (slowdown.py), and the
timing report (report.py). May import models/ (to name the attention backend), weights/, effects/ and core/.
"""
