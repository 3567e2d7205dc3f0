"""The recipes (`sft.py`) and their demo assets (`assets.py`); not part of the root_hf wheel."""
