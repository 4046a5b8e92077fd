"""How models are run: block by block over the decoder (``blocks.py``)."""
