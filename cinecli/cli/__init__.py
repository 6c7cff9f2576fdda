"""The command line: the Typer app (app.py) and one module per command group (batch, weights = ``cine models``
and ``cine lora``, quantize, scan, doctor), with the shared error handling and consoles in common.py.
Top of the layout: it may import every package below it; nothing imports it. Importing it loads no torch.
"""
