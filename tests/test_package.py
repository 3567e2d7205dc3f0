"""Packaging properties: a light import, a sorted public surface, type information."""

import importlib.util
import subprocess
import sys
from pathlib import Path

import root_hf


def test_public_names_are_sorted_and_exist():
    assert root_hf.__all__ == sorted(root_hf.__all__)
    for name in root_hf.__all__:
        module = root_hf._LAZY.get(name)
        if module is not None and importlib.util.find_spec("transformers") is None:
            continue  # lazy names of the Hugging Face integration need the [hf] extra
        assert getattr(root_hf, name) is not None


def test_import_needs_only_torch():
    code = (
        "import sys, root_hf\n"
        "heavy = [m for m in ('transformers', 'accelerate', 'peft', 'datasets', 'matplotlib') "
        "if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120)
    assert out.stdout.strip() == ""


def test_package_ships_type_information():
    assert (Path(root_hf.__file__).parent / "py.typed").is_file()


def test_unknown_attribute_raises_attribute_error():
    try:
        root_hf.does_not_exist  # noqa: B018
    except AttributeError as err:
        assert "does_not_exist" in str(err)
    else:
        raise AssertionError("expected AttributeError")
