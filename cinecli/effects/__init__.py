"""Effects as the user names them: presets, backbones and LoRA cards from TOML (preset.py) and the one table of
rules every value is checked against (rules.py; it imports no preset). May import core/ only.
"""
