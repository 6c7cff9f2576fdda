"""``cine batch``: collecting (photo, effect) items (items.py), the manifest (manifest.py), the per-process worker
that turns items into clips (worker.py), the local driver (driver.py) and the Ray driver (ray_driver.py).
May import run.py and everything below it; the driver never imports the Ray side (the CLI hands it over).
"""
